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
use crate::{
    maps::{self, Flow},
    parse::{EthIpHeaders, Frame, flow_at},
};

/// Notes that the stack sent the packet in `frame` out of `ifindex`, so that the packets
/// answering it take the routed path as well.
#[inline(always)]
pub fn remember_replies<H: EthIpHeaders>(frame: &Frame, ifindex: u32)
where
    H::Flow: Flow,
{
    if let Some(flow) = flow_at::<H>(frame, 0) {
        maps::remember_routed(&flow.reversed(), ifindex);
    }
}

/// Notes that the packet behind the Ethernet header at `offset` in `frame` goes to the stack
/// as it arrived, on `ifindex`.
#[inline(always)]
pub fn note_handed<H: EthIpHeaders>(frame: &Frame, offset: usize, ifindex: u32)
where
    H::Flow: Flow,
{
    if let Some(flow) = flow_at::<H>(frame, offset) {
        maps::note_handed(&flow, ifindex);
    }
}
