//! What arrives on the uplink as flannel's VXLAN, at one of two hooks (the agent's
//! `--decap-hook`). Either way, what the stack gets to route arrives on flannel.1, as it does
//! with flannel: host firewall rules on `-i flannel.1` and strict reverse-path filtering see
//! the same packets.
//!
//! - `tc_uplink_ingress` (the default): strips the outer headers of a GSO packet as a whole, so
//!   superpackets stay large, and puts a packet for a known local container straight into it
//!   with `bpf_redirect_peer`, routed as docker0 would (TTL − 1). Anything else (the host's own
//!   traffic, TTL running out, a container not yet learned, a flow conntrack must see) it puts
//!   into flannel.1 decapsulated, as if the kernel had decapsulated it there (see `decap`).
//! - `xdp_uplink`: an early filter in front of `tc_uplink_ingress`, which still decapsulates:
//!   what fails a check is dropped before the stack allocates anything (XDP cannot put a packet
//!   into another device's receive path, so it does not decapsulate itself).
//!
//! Both check the sender against the leases first. Each outcome is a counter whose declared
//! verdict decides the action: what is not ours passes untouched, ours that fails a check is
//! dropped. VXLAN over IPv6 gets the same checks (a lease's PublicIPv6, an inner source in its
//! IPv6 subnet) and then goes straight into a container or on still encapsulated, marked, to
//! flannel-v6.1's socket, for the kernel to decapsulate.
use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use overlay_common::{Counter, OverlayConfig};
use overlay_ebpf::lengths::IPV4_MAX_HEADER_LEN;

use crate::{
    classify::{Vxlan6Frame, VxlanFrame},
    decap,
    flows::note_handed,
    maps,
    parse::{
        ETH_HEADER_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, EthIpv4Headers, EthIpv6Headers,
        FLOW_HEADERS_LEN, Frame, IPPROTO_FRAGMENT, IPPROTO_UDP, IPV4_NO_OPTIONS, Ipv6FragmentHdr,
        TransportHead, UdpHdr, VxlanHdr, linear_frame,
    },
    verdict::{tc_act, xdp_act},
};

/// The most a VXLAN frame over IPv4 can take up in headers: outer Ethernet, IPv4 with
/// options, UDP, VXLAN, inner Ethernet and IPv4, and the start of the inner transport header.
const IPV4_HEADERS_LEN: usize = ETH_HEADER_LEN
    + IPV4_MAX_HEADER_LEN
    + size_of::<UdpHdr>()
    + size_of::<VxlanHdr>()
    + size_of::<EthIpv4Headers>()
    + size_of::<TransportHead>();
/// The same over IPv6: outer Ethernet and IPv6, a fragment header, UDP, VXLAN, inner Ethernet
/// and IPv6, and the start of the inner transport header.
const IPV6_HEADERS_LEN: usize = size_of::<EthIpv6Headers>()
    + size_of::<Ipv6FragmentHdr>()
    + size_of::<UdpHdr>()
    + size_of::<VxlanHdr>()
    + size_of::<EthIpv6Headers>()
    + size_of::<TransportHead>();
/// What the checks may read of either family's frame.
const MAX_HEADERS_LEN: usize = if IPV4_HEADERS_LEN > IPV6_HEADERS_LEN {
    IPV4_HEADERS_LEN
} else {
    IPV6_HEADERS_LEN
};

/// Where the inner Ethernet header of VXLAN over IPv4 without options starts, and the
/// transport header behind inner IPv4 without options.
const PLAIN_INNER_OFFSET: usize =
    size_of::<EthIpv4Headers>() + size_of::<UdpHdr>() + size_of::<VxlanHdr>();
const PLAIN_TRANSPORT_OFFSET: usize = PLAIN_INNER_OFFSET + size_of::<EthIpv4Headers>();

#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_OK as i32;
    };
    let outcome = decapsulate_skb(&ctx, config).unwrap_or_else(|outcome| outcome);
    if config.direct_routing() && matches!(outcome, Counter::RxNotUdp | Counter::RxOtherPort) {
        note_direct_arrival(&ctx);
    }
    tc_act(&ctx, outcome)
}

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return xdp_action::XDP_PASS;
    };
    xdp_act(
        &ctx,
        check_xdp(&ctx, config).unwrap_or_else(|outcome| outcome),
    )
}

/// A packet a DirectRouting peer's container sent us as it is goes to the stack, which routes
/// it into the bridge: noted, so that the bridge does not take its flow for a translated one.
#[inline(always)]
fn note_direct_arrival(ctx: &TcContext) {
    let frame = linear_frame(ctx, FLOW_HEADERS_LEN);
    let from_direct_peer = frame
        .header::<EthIpv4Headers>(0)
        .filter(|headers| headers.eth.is_ipv4())
        .and_then(|headers| maps::remote_vtep(headers.ip.src))
        .is_some_and(|remote| remote.routes_directly());
    if from_direct_peer {
        // SAFETY: the context's skb is valid for the whole program run.
        note_handed::<EthIpv4Headers>(&frame, 0, unsafe { (*ctx.skb.skb).ifindex });
    }
}

/// A VXLAN frame from a peer that passed every check, by its outer header's family.
enum PeerVxlan {
    Ipv4(VxlanFrame),
    Ipv6(Vxlan6Frame),
}

/// A well-formed VXLAN frame for us from a peer, over IPv4 or IPv6; `Err` names why not.
#[inline(always)]
fn vxlan_from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<PeerVxlan, Counter> {
    let eth: &EthHdr = frame.header(0).ok_or(Counter::RxMalformed)?;
    match eth.ether_type() {
        ETH_P_IPV4 => decap::v4::from_a_peer(frame, config).map(PeerVxlan::Ipv4),
        ETH_P_IPV6 => decap::v6::from_a_peer(frame, config).map(PeerVxlan::Ipv6),
        _ => Err(Counter::RxNotIp),
    }
}

/// Decapsulates VXLAN from a peer, by its family (see `decap`). `Err` is why it did not.
#[inline(always)]
fn decapsulate_skb(ctx: &TcContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    let frame = checkable_frame(ctx);
    let vxlan = vxlan_from_a_peer(&frame, config)?;
    count_received(ctx, &vxlan);
    match vxlan {
        PeerVxlan::Ipv4(vxlan) => decap::v4::decapsulate(ctx, config, &vxlan),
        PeerVxlan::Ipv6(vxlan) => decap::v6::decapsulate(ctx, &frame, config, &vxlan),
    }
}

/// The packet as a frame whose headers the checks can read. A superpacket's linear area ends
/// where its headers do, so pulling in the longest headers any frame may have would copy
/// payload into it, a new head and a copy per superpacket (about half of decapsulation's time
/// on TCP, and a tax on the host's own TCP): what the checks read in place is left as it is.
#[inline(always)]
fn checkable_frame(ctx: &TcContext) -> Frame {
    let len = ctx.len() as usize;
    let frame = Frame::with_len(ctx.data(), ctx.data_end(), len);
    // The first test is all a small packet pays: it is linear as a whole.
    if ctx.data() + MAX_HEADERS_LEN.min(len) <= ctx.data_end() || checks_read_in_place(&frame) {
        return frame;
    }
    linear_frame(ctx, MAX_HEADERS_LEN)
}

/// Whether all that the checks and decapsulation read of `frame` is readable already: IP that
/// is not UDP (its first header tells), or the common VXLAN frame.
#[inline(always)]
fn checks_read_in_place(frame: &Frame) -> bool {
    let Some(eth) = frame.header::<EthHdr>(0) else {
        return false;
    };
    match eth.ether_type() {
        ETH_P_IPV4 => frame
            .header::<EthIpv4Headers>(0)
            .is_some_and(|outer| outer.ip.protocol != IPPROTO_UDP || plain_vxlan_over_ipv4(frame)),
        ETH_P_IPV6 => frame
            .header::<EthIpv6Headers>(0)
            .is_some_and(|outer| !matches!(outer.ip.next_header, IPPROTO_UDP | IPPROTO_FRAGMENT)),
        _ => true,
    }
}

/// Whether `frame` is VXLAN over IPv4 without options carrying IPv4 without options, readable
/// up to the inner transport header's start.
#[inline(always)]
fn plain_vxlan_over_ipv4(frame: &Frame) -> bool {
    plain_ipv4_at(frame, 0)
        && plain_ipv4_at(frame, PLAIN_INNER_OFFSET)
        && frame
            .header::<TransportHead>(PLAIN_TRANSPORT_OFFSET)
            .is_some()
}

/// Whether `frame` holds Ethernet carrying IPv4 without options at `offset`.
#[inline(always)]
fn plain_ipv4_at(frame: &Frame, offset: usize) -> bool {
    frame
        .header::<EthIpv4Headers>(offset)
        .is_some_and(|headers| headers.eth.is_ipv4() && headers.ip.version_ihl == IPV4_NO_OPTIONS)
}

/// Counts a checked frame as received from its sender's lease: the inner IP packet's bytes.
/// Here at tc only, so that a frame the XDP hook checked first counts once.
#[inline(always)]
fn count_received(ctx: &TcContext, vxlan: &PeerVxlan) {
    let (peer, inner_offset) = match vxlan {
        PeerVxlan::Ipv4(vxlan) => (vxlan.peer, vxlan.inner_offset),
        PeerVxlan::Ipv6(vxlan) => (vxlan.peer, vxlan.inner_offset),
    };
    let bytes = ctx.len() - (inner_offset + ETH_HEADER_LEN) as u32;
    maps::count_peer(peer, maps::Direction::Received, bytes);
}

/// Checks what XDP sees; a frame from a peer goes on encapsulated (`RxChecked`), to the tc
/// program behind. `Err` is why it does not.
#[inline(always)]
fn check_xdp(ctx: &XdpContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    vxlan_from_a_peer(&Frame::new(ctx.data(), ctx.data_end()), config)?;
    Ok(Counter::RxChecked)
}
