//! `tc_bridge_egress`, on the container bridge's egress, where the stack hands packets to the
//! containers: each flow it carries from a remote subnet, unless the programs handed it over
//! as it arrived, was translated on the way, and its replies must take the routed path (see
//! `flows`).
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use core::mem::size_of;

use crate::{
    maps,
    parse::{
        EthHdr, EthIpv4Headers, EthIpv6Headers, Frame, IPV6_FLOW_HEADERS_LEN, TransportHead,
        flow_at, flow_of, linear_frame,
    },
};

#[classifier]
pub fn tc_bridge_egress(ctx: TcContext) -> i32 {
    let frame = linear_frame(&ctx, IPV6_FLOW_HEADERS_LEN);
    // SAFETY: the context's skb is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match frame.header::<EthHdr>(0) {
        Some(eth) if eth.is_ipv4() => remember_translated_ipv4(&frame, ifindex),
        Some(eth) if eth.is_ipv6() => remember_translated_ipv6(&frame, ifindex),
        _ => {}
    }
    TC_ACT_OK as i32
}

#[inline(always)]
fn remember_translated_ipv4(frame: &Frame, ifindex: u32) {
    let Some(headers) = frame.header::<EthIpv4Headers>(0) else {
        return;
    };
    if maps::remote_vtep(headers.ip.src).is_none() {
        return;
    }
    let transport = frame.header::<TransportHead>(size_of::<EthIpv4Headers>());
    if let Some(flow) = flow_of(&headers.ip, transport)
        && !maps::was_handed(&flow)
    {
        maps::remember_routed(&flow.reversed(), ifindex);
    }
}

/// As `remember_translated_ipv4`; every IPv6 flow from a remote subnet comes through the
/// stack, and the uplink program noted each as it arrived.
#[inline(always)]
fn remember_translated_ipv6(frame: &Frame, ifindex: u32) {
    if let Some(flow) = flow_at::<EthIpv6Headers>(frame, 0)
        && maps::remote_vtep6(&flow.src).is_some()
        && !maps::was_handed(&flow)
    {
        maps::remember_routed(&flow.reversed(), ifindex);
    }
}
