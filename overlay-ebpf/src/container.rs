//! `tc_container_ingress`, on the host side of every container's veth: first the checks of
//! what a container may send (see `claims`), then, with `--fast-path`, the fast path. A
//! packet a container sends to its gateway for a remote subnet is routed here as docker0
//! would (TTL or hop limit − 1), wrapped (see `encap`) and sent straight out of the uplink,
//! past docker0, routing and flannel.1. What a router must answer itself (TTL running out, a
//! packet too big for the overlay) and everything not for a remote subnet goes on to the
//! bridge untouched.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::{
    claims::check_container_frame,
    encap, maps,
    parse::{EthHdr, FLOW_HEADERS_LEN, linear_frame},
    verdict::tc_act,
};

#[classifier]
pub fn tc_container_ingress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_OK as i32;
    };
    let mut frame = linear_frame(&ctx, FLOW_HEADERS_LEN);
    if let Err(refused) = check_container_frame(&ctx, &frame, config) {
        return tc_act(&ctx, refused);
    }
    if !config.fast_path() {
        return TC_ACT_OK as i32;
    }
    let outcome = match frame.header::<EthHdr>(0) {
        Some(eth) if eth.is_ipv6() => encap::v6::from_container(&ctx, config),
        _ => encap::v4::from_container(&ctx, &mut frame, config),
    };
    match outcome {
        // Not for a remote subnet: the bridge takes it, uncounted.
        Ok(None) => TC_ACT_OK as i32,
        Ok(Some(outcome)) | Err(outcome) => tc_act(&ctx, outcome),
    }
}
