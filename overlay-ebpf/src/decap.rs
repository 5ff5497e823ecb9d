//! The XDP program on the host's uplink: strips VXLAN from frames of known peers and hands the
//! inner packet to the stack, which routes it to docker0 exactly as if flannel.1 had
//! decapsulated it. Everything that is not ours passes untouched.
use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};
use overlay_common::{Counter, OverlayConfig};

use crate::{
    maps,
    parse::{EthHdr, Frame, classify_vxlan},
};

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return xdp_action::XDP_PASS;
    };
    let counter = match decapsulate(&ctx, config) {
        Ok(()) => Counter::RxDecapsulated,
        Err(counter) => counter,
    };
    maps::count(counter);
    verdict(counter)
}

/// Frames that are not ours go on to the stack; ours that fail a check are dropped.
#[inline(always)]
fn verdict(counter: Counter) -> u32 {
    match counter {
        Counter::RxNotIpv4
        | Counter::RxNotUdp
        | Counter::RxIpv4Fragment
        | Counter::RxOtherPort
        | Counter::RxVxlanForeignVni
        | Counter::RxDecapsulated => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn decapsulate(ctx: &XdpContext, config: &OverlayConfig) -> Result<(), Counter> {
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let vxlan = classify_vxlan(&frame, config)?;
    let sender = maps::vtep_subnet(vxlan.outer_src).ok_or(Counter::RxUnknownVtep)?;
    if !vxlan.inner_is_ipv4 {
        return Err(Counter::RxInnerNotIpv4);
    }
    if !sender.contains(vxlan.inner_src) {
        return Err(Counter::RxSpoofedSource);
    }

    // SAFETY: ctx.ctx is the xdp_md the kernel passed in; the offset lies inside the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, vxlan.inner_offset as i32) } != 0 {
        return Err(Counter::RxError);
    }
    // The inner frame is addressed to our VTEP; readdress it to the uplink, or the stack would
    // take it for another host's frame and drop it.
    let mut inner = Frame::new(ctx.data(), ctx.data_end());
    let eth: &mut EthHdr = inner.header_mut(0).ok_or(Counter::RxError)?;
    eth.dst = config.uplink_mac;
    Ok(())
}
