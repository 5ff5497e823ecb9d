//! Flows the kernel's stack translates, remembered so that the fast path leaves their other
//! direction to the stack too: conntrack must see every packet of a flow it translates (a
//! service address DNATed to a remote container, a port DNATed to a local one) or it cannot
//! undo the translation on the replies.
//!
//! The stack's exits toward the overlay and the containers are watched: `tc_vtep_egress`
//! (encap) notes everything flannel.1 sends, `tc_bridge_egress` what the stack sends into the
//! container bridge from a remote subnet, unless the programs handed it to the stack under
//! the same key (a container not yet learned, a DirectRouting peer's packet): that one was not
//! translated, and its flow may keep the fast path.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use core::mem::size_of;

use crate::{
    maps,
    parse::{EthIpv4Headers, FLOW_HEADERS_LEN, Frame, TransportHead, flow_of, linear_frame},
};

#[classifier]
pub fn tc_bridge_egress(ctx: TcContext) -> i32 {
    let frame = linear_frame(&ctx, FLOW_HEADERS_LEN);
    let Some(headers) = frame.header::<EthIpv4Headers>(0) else {
        return TC_ACT_OK as i32;
    };
    if !headers.eth.is_ipv4() || maps::remote_vtep(headers.ip.src).is_none() {
        return TC_ACT_OK as i32;
    }
    let transport = frame.header::<TransportHead>(size_of::<EthIpv4Headers>());
    if let Some(flow) = flow_of(&headers.ip, transport)
        && !maps::was_handed(&flow)
    {
        // SAFETY: the context's skb is valid for the whole program run.
        maps::remember_routed(&flow.reversed(), unsafe { (*ctx.skb.skb).ifindex });
    }
    TC_ACT_OK as i32
}

/// Notes that the stack sent the IPv4 packet in `frame` out of `ifindex`, so that the
/// packets answering it take the routed path as well.
#[inline(always)]
pub fn remember_replies(frame: &Frame, ifindex: u32) {
    if let Some(flow) = flow_of_frame(frame) {
        maps::remember_routed(&flow.reversed(), ifindex);
    }
}

/// Notes that the IPv4 packet in `frame`, arrived on `ifindex`, goes to the stack as it is.
#[inline(always)]
pub fn note_handed(frame: &Frame, ifindex: u32) {
    if let Some(flow) = flow_of_frame(frame) {
        maps::note_handed(&flow, ifindex);
    }
}

/// The flow of the IPv4 packet in `frame`, which starts with its Ethernet header.
#[inline(always)]
fn flow_of_frame(frame: &Frame) -> Option<overlay_common::FlowKey> {
    let headers = frame.header::<EthIpv4Headers>(0)?;
    flow_of(
        &headers.ip,
        frame.header::<TransportHead>(size_of::<EthIpv4Headers>()),
    )
}
