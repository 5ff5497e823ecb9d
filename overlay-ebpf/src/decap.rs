//! The XDP program on the host's uplink.
//!
//! For now it classifies and counts every frame and passes it on; decapsulation grows here.
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use overlay_common::Counter;

use crate::{
    maps,
    parse::{Frame, classify_vxlan},
};

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return xdp_action::XDP_PASS;
    };
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let counter = match classify_vxlan(&frame, config) {
        Ok(()) => Counter::RxVxlan,
        Err(counter) => counter,
    };
    maps::count(counter);
    xdp_action::XDP_PASS
}
