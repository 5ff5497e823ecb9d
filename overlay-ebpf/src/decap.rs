//! Decapsulation of flannel's VXLAN arriving on the uplink, at one of two hooks (the agent's
//! `--decap-hook`):
//!
//! - `tc_uplink_ingress` (the default): strips the outer headers of a GSO packet as a whole, so
//!   superpackets stay large, and puts a packet for a known local container straight into it
//!   with `bpf_redirect_peer`, routed as docker0 would (TTL − 1). Anything else it hands to the
//!   stack decapsulated, which routes it.
//! - `xdp_uplink`: decapsulates before the stack allocates anything and hands every inner
//!   packet to the stack. On veth uplinks an XDP program costs the peer its GSO, which is why it
//!   is not the default.
//!
//! Both check the sender against the leases first. Each outcome is a counter whose declared
//! verdict decides the action: what is not ours passes untouched, ours that fails a check is
//! dropped.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, bpf_adj_room_mode, xdp_action,
    },
    helpers::{bpf_redirect_peer, bpf_xdp_adjust_head},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use overlay_common::{Counter, OverlayConfig};

use crate::{
    maps,
    parse::{
        ETH_HEADER_LEN, EthHdr, EthIpv4Headers, Frame, IPV4_MAX_HEADER_LEN, Ipv4Hdr, UdpHdr,
        VxlanFrame, VxlanHdr, classify_vxlan, linear_frame,
    },
    verdict::{tc_act, xdp_act},
};

/// The most a VXLAN frame's headers can take up: outer Ethernet, IPv4 with options, UDP,
/// VXLAN, inner Ethernet and IPv4.
const MAX_HEADERS_LEN: usize = ETH_HEADER_LEN
    + IPV4_MAX_HEADER_LEN
    + size_of::<UdpHdr>()
    + size_of::<VxlanHdr>()
    + ETH_HEADER_LEN
    + size_of::<Ipv4Hdr>();

#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_OK as i32;
    };
    tc_act(
        &ctx,
        decapsulate_skb(&ctx, config).unwrap_or_else(|outcome| outcome),
    )
}

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return xdp_action::XDP_PASS;
    };
    xdp_act(
        &ctx,
        decapsulate_xdp(&ctx, config).unwrap_or_else(|outcome| outcome),
    )
}

/// A well-formed VXLAN frame for us, from a host holding a lease, carrying IPv4 from inside
/// that host's subnet.
#[inline(always)]
fn vxlan_from_a_peer(frame: &Frame, config: &OverlayConfig) -> Result<VxlanFrame, Counter> {
    let vxlan = classify_vxlan(frame, config)?;
    let sender = maps::vtep_subnet(vxlan.outer_src).ok_or(Counter::RxUnknownVtep)?;
    if !vxlan.inner_is_ipv4 {
        return Err(Counter::RxInnerNotIpv4);
    }
    if !sender.contains(vxlan.inner_src) {
        return Err(Counter::RxSpoofedSource);
    }
    Ok(vxlan)
}

/// Decapsulates, then puts a packet for a known local container straight into it
/// (`RxDelivered`) or leaves it to the stack (`RxDecapsulated`); `Err` is why it did neither.
#[inline(always)]
fn decapsulate_skb(ctx: &TcContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    let vxlan = vxlan_from_a_peer(&linear_frame(ctx, MAX_HEADERS_LEN), config)?;
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
    let headers: &mut EthIpv4Headers = frame.header_mut(0).ok_or(Counter::RxError)?;
    let Some(endpoint) = maps::local_endpoint(headers.ip.dst) else {
        return Ok(Counter::RxDecapsulated);
    };
    // The stack answers a packet whose TTL runs out here with ICMP time exceeded.
    if headers.ip.ttl <= 1 {
        return Ok(Counter::RxDecapsulated);
    }
    headers.ip.decrement_ttl();
    headers.eth.src = config.bridge_mac;
    headers.eth.dst = endpoint.mac;
    // SAFETY: a plain helper call; the kernel checks that the index is a veth.
    let verdict = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::RxError);
    }
    Ok(Counter::RxDelivered)
}

/// Decapsulates for the stack (`RxDecapsulated`); `Err` is why it did not.
#[inline(always)]
fn decapsulate_xdp(ctx: &XdpContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    let vxlan = vxlan_from_a_peer(&Frame::new(ctx.data(), ctx.data_end()), config)?;
    // SAFETY: ctx.ctx is the xdp_md the kernel passed in; the offset lies inside the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, vxlan.inner_offset as i32) } != 0 {
        return Err(Counter::RxError);
    }
    // The inner frame is addressed to our VTEP; readdress it to the uplink, or the stack would
    // take it for another host's frame and drop it.
    let mut inner = Frame::new(ctx.data(), ctx.data_end());
    let eth: &mut EthHdr = inner.header_mut(0).ok_or(Counter::RxError)?;
    eth.dst = config.uplink_mac;
    Ok(Counter::RxDecapsulated)
}
