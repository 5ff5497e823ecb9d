//! What arrives on the uplink as flannel's VXLAN, at one of two hooks (the agent's
//! `--decap-hook`). Either way, what the stack gets to route arrives on flannel.1, as it does
//! with flannel: host firewall rules on `-i flannel.1` and strict reverse-path filtering see
//! the same packets.
//!
//! - `tc_uplink_ingress` (the default): strips the outer headers of a GSO packet as a whole, so
//!   superpackets stay large, and puts a packet for a known local container straight into it
//!   with `bpf_redirect_peer`, routed as docker0 would (TTL − 1). Anything else (the host's own
//!   traffic, TTL running out, a container not yet learned, a flow conntrack must see) it puts
//!   into flannel.1 decapsulated, as if the kernel had decapsulated it there.
//! - `xdp_uplink`: an early filter in front of `tc_uplink_ingress`, which still decapsulates:
//!   what fails a check is dropped before the stack allocates anything (XDP cannot put a packet
//!   into another device's receive path, so it does not decapsulate itself).
//!
//! Both check the sender against the leases first. Each outcome is a counter whose declared
//! verdict decides the action: what is not ours passes untouched, ours that fails a check is
//! dropped. VXLAN over IPv6 gets the same checks (a lease's PublicIPv6, an inner source in its
//! IPv6 subnet) and then goes straight into a container (see `decap6`) or on still
//! encapsulated, marked, to flannel-v6.1's socket, for the kernel to decapsulate.
//!
//! flannel.1 and flannel-v6.1 keep their own VXLAN sockets, which decapsulate whatever reaches
//! UDP 8472 on any address: VXLAN from another interface or a local sender, and datagrams the
//! stack reassembled from fragments. `tc_vtep_ingress`, on both devices' ingress, lets through
//! only what carries `CHECKED_MARK`: what the uplink program checked and handed on,
//! decapsulated or (a first fragment, a frame with a UDP checksum to verify, VXLAN over IPv6)
//! for the socket.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_REDIRECT, bpf_adj_room_mode,
        xdp_action,
    },
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use overlay_common::{CHECKED_MARK, Counter, LocalEndpoint, OverlayConfig};

use crate::{
    decap6, maps,
    parse::{
        ECN_CE, ECN_NOT_ECT, ETH_HEADER_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, EthIpv4Headers,
        EthIpv6Headers, FLOW_HEADERS_LEN, Frame, IPV4_MAX_HEADER_LEN, Ipv6FragmentHdr,
        TransportHead, UdpHdr, Vxlan6Frame, VxlanFrame, VxlanHdr, classify_ipv4_vxlan,
        classify_ipv6_vxlan, flow_of, linear_frame,
    },
    routed::{note_handed, note_handed6},
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
        note_handed(&frame, unsafe { (*ctx.skb.skb).ifindex });
    }
}

/// flannel.1's and flannel-v6.1's ingress: what their sockets decapsulated without our checks
/// goes no further.
#[classifier]
pub fn tc_vtep_ingress(ctx: TcContext) -> i32 {
    // SAFETY: the context's skb is valid for the whole program run, and tc programs may
    // write its mark.
    let skb = unsafe { &mut *ctx.skb.skb };
    if skb.mark & CHECKED_MARK == 0 {
        return tc_act(&ctx, Counter::RxUncheckedVxlan);
    }
    skb.mark &= !CHECKED_MARK;
    TC_ACT_OK as i32
}

/// Marks a checked packet for `tc_vtep_ingress`: the mark survives decapsulation, a redirect
/// within the namespace, and reassembly (the datagram keeps its first fragment's).
#[inline(always)]
fn mark_checked(ctx: &TcContext) {
    // SAFETY: as in `tc_vtep_ingress`.
    unsafe { (*ctx.skb.skb).mark |= CHECKED_MARK };
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

/// A VXLAN frame from a peer that passed every check, by its outer header's family.
enum PeerVxlan {
    Ipv4(VxlanFrame),
    /// Delivered by `decap6`, or decapsulated by the kernel (flannel-v6.<VNI>'s socket).
    Ipv6(Vxlan6Frame),
}

/// A well-formed VXLAN frame for us from a peer, over IPv4 or IPv6; `Err` names why not.
#[inline(always)]
fn vxlan_from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<PeerVxlan, Counter> {
    let eth: &EthHdr = frame.header(0).ok_or(Counter::RxMalformed)?;
    match eth.ether_type() {
        ETH_P_IPV4 => ipv4_vxlan_from_a_peer(frame, config).map(PeerVxlan::Ipv4),
        ETH_P_IPV6 => ipv6_vxlan_from_a_peer(frame, config).map(PeerVxlan::Ipv6),
        _ => Err(Counter::RxNotIp),
    }
}

/// VXLAN over IPv6 from a host holding a lease, carrying IPv6 from inside the IPv6 subnet it
/// leases or from its own PublicIPv6 (a reply its conntrack un-DNATed, as for IPv4).
#[inline(always)]
fn ipv6_vxlan_from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<Vxlan6Frame, Counter> {
    let vxlan = classify_ipv6_vxlan(frame, config)?;
    let lease = maps::ipv6_vtep(&vxlan.outer_src).ok_or(Counter::RxIpv6NonMember)?;
    if !vxlan.inner_is_ipv6 {
        return Err(Counter::RxInnerOtherFamily);
    }
    if !lease.contains(&vxlan.inner_src) && vxlan.inner_src != vxlan.outer_src {
        return Err(Counter::RxIpv6SpoofedInner);
    }
    Ok(vxlan)
}

/// A well-formed VXLAN frame over IPv4 for us, from a host holding a lease, carrying IPv4
/// from inside a subnet that host leases (it may hold more than one, re-leased or in two
/// networks) or from the host's own PublicIP. The latter is what a reply looks like once that
/// host's conntrack has undone a DNAT to its PublicIP (a published port); the host could send
/// from that address without VXLAN anyway.
#[inline(always)]
fn ipv4_vxlan_from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<VxlanFrame, Counter> {
    let vxlan = classify_ipv4_vxlan(frame, config)?;
    if !maps::holds_a_lease(vxlan.outer_src) {
        return Err(Counter::RxUnknownVtep);
    }
    if !vxlan.inner_is_ipv4 {
        return Err(Counter::RxInnerOtherFamily);
    }
    let leased_by_sender =
        maps::remote_vtep(vxlan.inner_src).is_some_and(|lease| lease.public_ip == vxlan.outer_src);
    if !leased_by_sender && vxlan.inner_src != vxlan.outer_src {
        return Err(Counter::RxSpoofedSource);
    }
    if vxlan.outer_ecn == ECN_CE && vxlan.inner_ecn == ECN_NOT_ECT {
        return Err(Counter::RxCeNotEct);
    }
    Ok(vxlan)
}

/// Decapsulates, then puts a packet for a known local container straight into it
/// (`RxDelivered`) or into flannel.1 for the stack (`RxDecapsulated`, `RxRoutedFlow`). What
/// only the stack can finish (a first fragment, a UDP checksum, VXLAN over IPv6 `decap6`
/// does not deliver) goes on marked, still encapsulated (`RxChecked`). `Err` is why it did
/// none of these.
#[inline(always)]
fn decapsulate_skb(ctx: &TcContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    let frame = linear_frame(ctx, MAX_HEADERS_LEN);
    let vxlan = match vxlan_from_a_peer(&frame, config)? {
        PeerVxlan::Ipv4(vxlan) => vxlan,
        PeerVxlan::Ipv6(vxlan) => {
            if config.fast_path() {
                if let Some(endpoint) = decap6::deliverable_to(ctx, &frame, &vxlan) {
                    return decap6::deliver(ctx, config, &endpoint);
                }
                note_handed6(&frame, vxlan.inner_offset, config.vtep6_ifindex);
            }
            mark_checked(ctx);
            return Ok(Counter::RxChecked);
        }
    };
    if vxlan.first_fragment || vxlan.has_udp_checksum {
        mark_checked(ctx);
        return Ok(Counter::RxChecked);
    }
    // Removes the outer IPv4, UDP and VXLAN headers and the inner Ethernet header, keeping
    // the outer Ethernet header (addressed to the uplink). The segment size of a GSO packet is
    // the inner packets' and stays.
    ctx.adjust_room(
        -(vxlan.inner_offset as i32),
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Counter::RxError)?;

    let mut frame = Frame::new(ctx.data(), ctx.data_end());
    if vxlan.outer_ecn == ECN_CE {
        propagate_congestion(&mut frame)?;
    }
    match deliverable_to(&frame) {
        Ok(endpoint) => deliver(&mut frame, config, endpoint),
        Err(reason) => {
            mark_checked(ctx);
            hand_to_vtep(&mut frame, config, reason)
        }
    }
}

/// RFC 6040 decapsulation: congestion the outer header met is marked on the inner packet
/// (which `vxlan_from_a_peer` made sure is ECN-capable).
#[inline(always)]
fn propagate_congestion(frame: &mut Frame) -> Result<(), Counter> {
    let headers: &mut EthIpv4Headers = frame.header_mut(0).ok_or(Counter::RxError)?;
    headers.ip.set_ce();
    Ok(())
}

/// The local container a decapsulated packet can go straight into; `Err` names why the
/// stack must route it instead.
#[inline(always)]
fn deliverable_to(frame: &Frame) -> Result<LocalEndpoint, Counter> {
    let headers: &EthIpv4Headers = frame.header(0).ok_or(Counter::RxError)?;
    let endpoint = maps::local_endpoint(headers.ip.dst).ok_or(Counter::RxDecapsulated)?;
    // The stack answers a packet whose TTL runs out here with ICMP time exceeded.
    if headers.ip.ttl <= 1 {
        return Err(Counter::RxDecapsulated);
    }
    let transport = frame.header::<TransportHead>(size_of::<EthIpv4Headers>());
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
    redirect_into(&endpoint)
}

/// Puts the packet, readdressed already, into the container behind `endpoint`.
#[inline(always)]
pub fn redirect_into(endpoint: &LocalEndpoint) -> Result<Counter, Counter> {
    // SAFETY: a plain helper call; the kernel checks that the index is a veth.
    let verdict = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::RxError);
    }
    Ok(Counter::RxDelivered)
}

/// Puts the decapsulated packet into flannel.1's receive path, addressed to flannel.1, as the
/// kernel's own decapsulation would: the stack routes it from there, counted as `reason`.
/// What goes there only for want of a known container is noted (see `routed`).
#[inline(always)]
fn hand_to_vtep(
    frame: &mut Frame,
    config: &OverlayConfig,
    reason: Counter,
) -> Result<Counter, Counter> {
    if reason == Counter::RxDecapsulated {
        note_handed(frame, config.vtep_ifindex);
    }
    let eth: &mut EthHdr = frame.header_mut(0).ok_or(Counter::RxError)?;
    eth.dst = config.vtep_mac;
    // SAFETY: a plain helper call; the kernel checks the index when it redirects.
    let verdict = unsafe { bpf_redirect(config.vtep_ifindex, u64::from(BPF_F_INGRESS)) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::RxError);
    }
    Ok(reason)
}

/// Checks what XDP sees; a frame from a peer goes on encapsulated (`RxChecked`), to the tc
/// program behind. `Err` is why it does not.
#[inline(always)]
fn check_xdp(ctx: &XdpContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    vxlan_from_a_peer(&Frame::new(ctx.data(), ctx.data_end()), config)?;
    Ok(Counter::RxChecked)
}
