//! VXLAN over IPv6 from a peer: checked against the leases (a PublicIPv6 holding a lease, an
//! inner source in an IPv6 subnet it leases), and, on the IPv6 fast path, for a known local container,
//! decapsulated, routed as docker0 would (hop limit − 1) and put straight into the container
//! with `bpf_redirect_peer`.
//!
//! The kernel verifies the outer UDP checksum before it decapsulates; so does this, from the
//! headers, by the identity `encap::v6` computes it with: the outer checksum must equal what the
//! headers and the inner pseudo-header give. That leaves the inner transport checksum, which
//! the container's stack verifies as it verifies any packet's (the skb's checksum state is
//! kept: a complete sum is patched for the hop limit, a device's "checksum verified" is spent
//! on the outer UDP checksum, as the kernel's UDP spends it). A superpacket on receive was
//! merged by GRO, which verified every segment's checksum, or comes from a local peer, which
//! the kernel trusts as well. Everything else goes to flannel-v6.<VNI>'s socket as before
//! (`rx_checked`): a checksum that does not verify (a sender that left it to offload), the
//! transports `checksums_itself` does not take, a first fragment, congestion marked outside
//! (RFC 6040 is the kernel's here), a hop limit running out, a container not yet learned, a
//! flow conntrack must see.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_RECOMPUTE_CSUM, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    programs::TcContext,
};
use core::mem::{offset_of, size_of};
use overlay_common::{Counter, LocalEndpoint, OverlayConfig};
use overlay_ebpf::ecn::ECN_CE;

use super::{mark_checked, spend_outer_checksum_level};
use crate::{
    classify::{Vxlan6Frame, classify_ipv6_vxlan},
    flows::note_handed,
    maps,
    parse::{
        ETH_HEADER_LEN, EthIpv6Headers, Frame, Ipv6Hdr, TransportHead, UdpHdr, VxlanHdr,
        checksums_itself, flow_of6, linear_frame,
    },
    redirect,
    vxlan::{ENCAP6_LEN, Encapsulation6, inner_checksum_part, outer_udp_checksum},
};

/// Where the inner Ethernet header starts: behind the outer Ethernet, IPv6, UDP and VXLAN
/// headers (no fragment header).
const INNER_ETH: usize =
    ETH_HEADER_LEN + size_of::<Ipv6Hdr>() + size_of::<UdpHdr>() + size_of::<VxlanHdr>();
/// Where the inner transport header starts.
const INNER_TRANSPORT: usize = INNER_ETH + size_of::<EthIpv6Headers>();
/// Where the inner IPv6 header's hop limit sits once the outer headers are gone.
const HOP_LIMIT_OFFSET: usize = ETH_HEADER_LEN + offset_of!(Ipv6Hdr, hop_limit);

/// VXLAN over IPv6 from a host holding a lease, carrying IPv6 from inside an IPv6 subnet that
/// host leases (any of them: it may hold more than one, as for IPv4) or from its own
/// PublicIPv6 (a reply its conntrack un-DNATed, as for IPv4).
#[inline(always)]
pub fn from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<Vxlan6Frame, Counter> {
    let mut vxlan = classify_ipv6_vxlan(frame, config)?;
    // As for IPv4: the inner source's lease naming the sender says it holds a lease.
    let sender_lease = vxlan
        .inner_is_ipv6
        .then(|| maps::remote_vtep6(&vxlan.inner_src))
        .flatten()
        .filter(|lease| lease.public_ipv6 == vxlan.outer_src);
    if let Some(lease) = sender_lease {
        vxlan.peer = lease.peer;
    } else {
        if !maps::holds_an_ipv6_lease(&vxlan.outer_src) {
            return Err(Counter::RxIpv6NonMember);
        }
        if !vxlan.inner_is_ipv6 {
            return Err(Counter::RxInnerOtherFamily);
        }
        if vxlan.inner_src != vxlan.outer_src {
            return Err(Counter::RxIpv6SpoofedInner);
        }
    }
    Ok(vxlan)
}

/// With the fast path, puts `vxlan`'s inner packet into a known local container
/// (`RxDelivered`); otherwise it goes on marked, still encapsulated, to flannel-v6.<VNI>'s
/// socket (`RxChecked`), its flow noted as handed to the stack.
#[inline(always)]
pub fn decapsulate(
    ctx: &TcContext,
    frame: &Frame,
    config: &OverlayConfig,
    vxlan: &Vxlan6Frame,
) -> Result<Counter, Counter> {
    if config.fast_path() {
        if let Some(endpoint) = deliverable_to(ctx, frame, vxlan) {
            return deliver(ctx, config, &endpoint);
        }
        note_handed::<EthIpv6Headers>(frame, vxlan.inner_offset, config.vtep6_ifindex);
    }
    mark_checked(ctx);
    Ok(Counter::RxChecked)
}

/// The local container `vxlan`'s inner packet can go straight into, or `None` when the stack
/// must take it (see the module's comment). Reads only: the frame is left as it came.
#[inline(always)]
fn deliverable_to(ctx: &TcContext, frame: &Frame, vxlan: &Vxlan6Frame) -> Option<LocalEndpoint> {
    if vxlan.first_fragment || vxlan.outer_ecn == ECN_CE || vxlan.inner_offset != INNER_ETH {
        return None;
    }
    let outer: &Encapsulation6 = frame.header(ETH_HEADER_LEN)?;
    let inner: &EthIpv6Headers = frame.header(INNER_ETH)?;
    let udp_len = u16::from_be_bytes(outer.udp.len);
    if usize::from(udp_len) + ETH_HEADER_LEN + size_of::<Ipv6Hdr>() != frame.len()
        || !checksums_itself(frame, INNER_TRANSPORT, &inner.ip)
        || inner.ip.hop_limit <= 1
    {
        return None;
    }
    // SAFETY: the context's skb is valid for the whole program run.
    let merged = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let expected = outer_udp_checksum(outer, inner_checksum_part(&inner.ip), udp_len);
    if !merged && outer.udp.checksum != expected.to_be_bytes() {
        return None;
    }
    let endpoint = maps::local_endpoint6(&inner.ip.dst)?;
    let flow = flow_of6(&inner.ip, frame.header::<TransportHead>(INNER_TRANSPORT))?;
    if maps::takes_routed_path(&flow) {
        return None;
    }
    Some(endpoint)
}

/// Strips the outer headers and the inner Ethernet header of a frame `deliverable_to`
/// accepted, routes the packet as docker0 would and puts it into `endpoint`.
#[inline(never)]
fn deliver(
    ctx: &TcContext,
    config: &OverlayConfig,
    endpoint: &LocalEndpoint,
) -> Result<Counter, Counter> {
    ctx.adjust_room(
        -(ENCAP6_LEN as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Counter::RxError)?;
    let mut frame = linear_frame(ctx, size_of::<EthIpv6Headers>());
    let headers: &mut EthIpv6Headers = frame.header_mut(0).ok_or(Counter::RxError)?;
    let hop_limit = headers.ip.hop_limit - 1;
    headers.eth.src = config.bridge_mac;
    headers.eth.dst = endpoint.mac;
    // IPv6 has no header checksum, but a device's complete sum of the packet covers the hop
    // limit: the helper patches it.
    ctx.store(
        HOP_LIMIT_OFFSET,
        &hop_limit,
        u64::from(BPF_F_RECOMPUTE_CSUM),
    )
    .map_err(|_| Counter::RxError)?;
    spend_outer_checksum_level(ctx);
    redirect::into_container(endpoint)
}
