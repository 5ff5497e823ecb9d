//! Flows the kernel's stack forwards, remembered so that the fast path leaves their other
//! direction to the stack too: conntrack must see every packet of a flow it translates (a
//! service address DNATed to a remote container, a port DNATed to a local one) or it cannot
//! undo the translation on the replies.
//!
//! The stack's exits toward the overlay and the containers are watched: `tc_vtep_egress`
//! (encap) notes what flannel.1 sends, `tc_bridge_egress` what the stack sends into the
//! container bridge from a remote subnet. The fast path skips docker0's egress and flannel.1,
//! so only flows the stack carried are noted.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use core::mem::size_of;

use crate::{
    maps,
    parse::{EthIpv4Headers, FLOW_HEADERS_LEN, Frame, TransportHead, flow_of, linear_frame},
};

#[classifier]
pub fn tc_bridge_egress(ctx: TcContext) -> i32 {
    let frame = linear_frame(&ctx, FLOW_HEADERS_LEN);
    let from_remote_subnet = frame.header::<EthIpv4Headers>(0).is_some_and(|headers| {
        headers.eth.is_ipv4() && maps::remote_vtep(headers.ip.src).is_some()
    });
    if from_remote_subnet {
        // SAFETY: the context's skb is valid for the whole program run.
        remember_replies(&frame, unsafe { (*ctx.skb.skb).ifindex });
    }
    TC_ACT_OK as i32
}

/// Notes that the stack sent the IPv4 packet in `frame` out of `ifindex`, so that the
/// packets answering it take the routed path as well.
#[inline(always)]
pub fn remember_replies(frame: &Frame, ifindex: u32) {
    let Some(headers) = frame.header::<EthIpv4Headers>(0) else {
        return;
    };
    let transport = frame.header::<TransportHead>(size_of::<EthIpv4Headers>());
    if let Some(flow) = flow_of(&headers.ip, transport) {
        maps::remember_routed(&flow.reversed(), ifindex);
    }
}
