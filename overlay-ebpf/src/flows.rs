//! Flows the kernel's stack translates, remembered so that the fast path leaves their other
//! direction to the stack too: conntrack must see every packet of a flow it translates (a
//! service address DNATed to a remote container, a port DNATed to a local one) or it cannot
//! undo the translation on the replies.
//!
//! The stack's exits toward the overlay and the containers are watched: `tc_vtep_egress`
//! notes everything flannel.1 and flannel-v6.1 send, `tc_bridge_egress` what the stack sends
//! into the container bridge from a remote subnet, unless the programs handed it to the stack
//! under the same key (a container not yet learned, a DirectRouting peer's packet, any IPv6
//! from a peer the fast path does not deliver): that one was not translated, and its flow may
//! keep the fast path.
use core::mem::size_of;

use overlay_common::{FlowKey, FlowKey6};

use crate::{
    maps,
    parse::{EthIpv4Headers, EthIpv6Headers, Frame, TransportHead, flow_of, flow_of6},
};

/// Notes that the stack sent the IPv6 packet in `frame` out of `ifindex`, as
/// `remember_replies` does IPv4.
#[inline(always)]
pub fn remember_replies6(frame: &Frame, ifindex: u32) {
    if let Some(flow) = ipv6_flow_at(frame, 0) {
        maps::remember_routed6(&flow.reversed(), ifindex);
    }
}

/// Notes that the IPv6 packet behind the Ethernet header at `offset` in `frame` goes to the
/// stack as it arrived, on `ifindex`.
#[inline(always)]
pub fn note_handed6(frame: &Frame, offset: usize, ifindex: u32) {
    if let Some(flow) = ipv6_flow_at(frame, offset) {
        maps::note_handed6(&flow, ifindex);
    }
}

/// The flow of the IPv6 packet behind the Ethernet header at `offset` in `frame`.
#[inline(always)]
pub fn ipv6_flow_at(frame: &Frame, offset: usize) -> Option<FlowKey6> {
    let headers = frame.header::<EthIpv6Headers>(offset)?;
    flow_of6(
        &headers.ip,
        frame.header::<TransportHead>(offset + size_of::<EthIpv6Headers>()),
    )
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
fn flow_of_frame(frame: &Frame) -> Option<FlowKey> {
    let headers = frame.header::<EthIpv4Headers>(0)?;
    flow_of(
        &headers.ip,
        frame.header::<TransportHead>(size_of::<EthIpv4Headers>()),
    )
}
