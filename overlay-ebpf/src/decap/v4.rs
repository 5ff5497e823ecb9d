//! VXLAN over IPv4 from a peer: checked against the leases, stripped as a whole (GSO
//! superpackets stay whole), and put straight into a known local container, routed as docker0
//! would (TTL − 1), or into flannel.1's receive path, as if the kernel had decapsulated it
//! there.
use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_ADJ_ROOM_NO_CSUM_RESET, bpf_adj_room_mode},
    programs::TcContext,
};
use core::mem::size_of;
use overlay_common::{Counter, LocalEndpoint, OverlayConfig};
use overlay_ebpf::ecn::{ECN_CE, lost_to_congestion};

use super::{mark_checked, spend_outer_checksum_level};
use crate::{
    classify::{VxlanFrame, classify_ipv4_vxlan},
    flows::note_handed,
    maps,
    parse::{EthHdr, EthIpv4Headers, Frame, Ipv4Hdr, TransportHead, flow_of},
    redirect,
};

/// How long an inner IPv4 packet without options must be to carry the transport header's
/// first bytes, which tell its flow.
const INNER_TRANSPORT_HEAD_END: usize = size_of::<Ipv4Hdr>() + size_of::<TransportHead>();

/// A well-formed VXLAN frame over IPv4 for us, from a host holding a lease, carrying IPv4
/// from inside a subnet that host leases (it may hold more than one, re-leased or in two
/// networks) or from the host's own PublicIP. The latter is what a reply looks like once that
/// host's conntrack has undone a DNAT to its PublicIP (a published port); the host could send
/// from that address without VXLAN anyway. With `--accept-nat-peers`, a frame from an outer
/// source no lease names is taken as the lease's whose subnet holds the inner source, if it
/// carries that lease's VtepMAC as inner Ethernet source.
#[inline(always)]
pub fn from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<VxlanFrame, Counter> {
    let mut vxlan = classify_ipv4_vxlan(frame, config)?;
    let inner_lease = if vxlan.inner_is_ipv4 {
        maps::remote_vtep(vxlan.inner_src)
    } else {
        None
    };
    // The inner source's lease naming the sender is the common case, and says the sender
    // holds a lease: only the others need the `vteps` lookup.
    if let Some(lease) = inner_lease.filter(|lease| lease.public_ip == vxlan.outer_src) {
        vxlan.peer = lease.peer;
    } else if !maps::holds_a_lease(vxlan.outer_src) {
        let behind_nat = inner_lease
            .filter(|lease| config.accept_nat_peers() && lease.mac == vxlan.inner_eth_src);
        let Some(lease) = behind_nat else {
            return Err(Counter::RxUnknownVtep);
        };
        vxlan.peer = lease.peer;
    } else if !vxlan.inner_is_ipv4 {
        return Err(Counter::RxInnerOtherFamily);
    } else if vxlan.inner_src != vxlan.outer_src {
        return Err(Counter::RxSpoofedSource);
    }
    if lost_to_congestion(vxlan.outer_ecn, vxlan.inner_ecn) {
        return Err(Counter::RxCeNotEct);
    }
    Ok(vxlan)
}

/// Decapsulates `vxlan`, then puts the packet into a known local container (`RxDelivered`)
/// or into flannel.1 for the stack (`RxDecapsulated`, `RxRoutedFlow`). What only the stack
/// can finish (a first fragment, a UDP checksum) goes on marked, still encapsulated
/// (`RxChecked`). `Err` is why it did none of these.
#[inline(always)]
pub fn decapsulate(
    ctx: &TcContext,
    config: &OverlayConfig,
    vxlan: &VxlanFrame,
) -> Result<Counter, Counter> {
    if vxlan.first_fragment || vxlan.has_udp_checksum {
        mark_checked(ctx);
        return Ok(Counter::RxChecked);
    }
    // Removes the outer IPv4, UDP and VXLAN headers and the inner Ethernet header, keeping
    // the outer Ethernet header (addressed to the uplink). The segment size of a GSO packet is
    // the inner packets' and stays. What a device or GRO verified is kept, less the outer UDP
    // header's level, as the kernel's own decapsulation leaves it.
    ctx.adjust_room(
        -(vxlan.inner_offset as i32),
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET),
    )
    .map_err(|_| Counter::RxError)?;
    spend_outer_checksum_level(ctx);

    let mut frame = Frame::new(ctx.data(), ctx.data_end());
    if vxlan.outer_ecn == ECN_CE {
        propagate_congestion(&mut frame)?;
    }
    match deliverable_to(&frame, config) {
        Ok(endpoint) => deliver(&mut frame, config, endpoint),
        Err(reason) => {
            mark_checked(ctx);
            hand_to_vtep(&mut frame, config, reason)
        }
    }
}

/// RFC 6040 decapsulation: congestion the outer header met is marked on the inner packet
/// (which `from_a_peer` made sure is ECN-capable).
#[inline(always)]
fn propagate_congestion(frame: &mut Frame) -> Result<(), Counter> {
    let headers: &mut EthIpv4Headers = frame.header_mut(0).ok_or(Counter::RxError)?;
    headers.ip.set_ce();
    Ok(())
}

/// The local container a decapsulated packet can go straight into; `Err` names why the
/// stack must route it instead.
#[inline(always)]
fn deliverable_to(frame: &Frame, config: &OverlayConfig) -> Result<LocalEndpoint, Counter> {
    let headers: &EthIpv4Headers = frame.header(0).ok_or(Counter::RxError)?;
    let endpoint = maps::local_endpoint(headers.ip.dst, config).ok_or(Counter::RxDecapsulated)?;
    // The stack answers a packet whose TTL runs out here with ICMP time exceeded.
    if headers.ip.ttl <= 1 {
        return Err(Counter::RxDecapsulated);
    }
    // Bytes behind the packet's own length (a sender's padding) are no transport header.
    let carries_transport_head =
        usize::from(u16::from_be_bytes(headers.ip.total_len)) >= INNER_TRANSPORT_HEAD_END;
    let transport = frame
        .header::<TransportHead>(size_of::<EthIpv4Headers>())
        .filter(|_| carries_transport_head);
    let flow = flow_of(&headers.ip, transport).ok_or(Counter::RxRoutedFlow)?;
    if maps::takes_routed_path(&flow) {
        return Err(Counter::RxRoutedFlow);
    }
    Ok(endpoint)
}

/// Routes the decapsulated packet as docker0 would and puts it into `endpoint`.
#[inline(always)]
fn deliver(
    frame: &mut Frame,
    config: &OverlayConfig,
    endpoint: LocalEndpoint,
) -> Result<Counter, Counter> {
    let headers: &mut EthIpv4Headers = frame.header_mut(0).ok_or(Counter::RxError)?;
    headers.ip.decrement_ttl();
    headers.eth.src = config.bridge_mac;
    headers.eth.dst = endpoint.mac;
    redirect::into_container(&endpoint)
}

/// Puts the decapsulated packet into flannel.1's receive path, addressed to flannel.1, as the
/// kernel's own decapsulation would: the stack routes it from there, counted as `reason`.
/// What goes there only for want of a known container is noted (see `flows`).
#[inline(always)]
fn hand_to_vtep(
    frame: &mut Frame,
    config: &OverlayConfig,
    reason: Counter,
) -> Result<Counter, Counter> {
    if reason == Counter::RxDecapsulated {
        note_handed::<EthIpv4Headers>(frame, 0, config.vtep_ifindex);
    }
    let eth: &mut EthHdr = frame.header_mut(0).ok_or(Counter::RxError)?;
    eth.dst = config.vtep_mac;
    redirect::into_receive_path(config.vtep_ifindex)?;
    Ok(reason)
}
