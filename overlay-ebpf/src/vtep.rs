//! The VXLAN devices' own hooks, on flannel.1 and flannel-v6.1:
//!
//! - `tc_vtep_egress`, on their egress: the routed path, for whatever the kernel routes into
//!   the overlay (the host's own traffic, the fast path's leftovers, flows conntrack
//!   translated). The kernel has already routed the packet and given it its Ethernet header;
//!   it is encapsulated as on the fast path (see `encap`), its flow remembered (see `flows`).
//!   On flannel-v6.1, what the headers cannot give an outer checksum for goes on to the
//!   kernel's device.
//! - `tc_vtep_ingress`, on their ingress: the devices keep their kernel VXLAN sockets, which
//!   decapsulate whatever reaches UDP 8472 on any address (VXLAN from another interface or a
//!   local sender, datagrams the stack reassembled). Only what carries `CHECKED_MARK`, what the
//!   uplink program checked and handed on (see `decap`), gets through.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use overlay_common::{CHECKED_MARK, Counter, OverlayConfig};

use crate::{
    encap, maps,
    parse::{EthHdr, FLOW_HEADERS_LEN, linear_frame},
    verdict::tc_act,
};

#[classifier]
pub fn tc_vtep_egress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_SHOT as i32;
    };
    tc_act(
        &ctx,
        encapsulate_routed(&ctx, config).unwrap_or_else(|outcome| outcome),
    )
}

/// What their sockets decapsulated without our checks goes no further.
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

/// The routed path, by the device and the packet's family: IPv6 on flannel-v6.<VNI>, IPv4
/// anywhere else. `Ok(TxEncapsulated)`: encapsulated and sent.
#[inline(always)]
fn encapsulate_routed(ctx: &TcContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    let frame = linear_frame(ctx, FLOW_HEADERS_LEN);
    let eth: &EthHdr = frame.header(0).ok_or(Counter::TxMalformed)?;
    // SAFETY: the context's skb is valid for the whole program run.
    let on_vtep6 = config.ipv6() && unsafe { (*ctx.skb.skb).ifindex } == config.vtep6_ifindex;
    if on_vtep6 && eth.is_ipv6() {
        return Ok(encap::v6::routed(ctx, config));
    }
    if !eth.is_ipv4() {
        return Err(Counter::TxNotIpv4);
    }
    encap::v4::routed(ctx, &frame, config)
}
