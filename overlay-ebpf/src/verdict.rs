//! From an outcome to the kernel's action code. Every program ends here: it names the counter
//! that describes what happened, the counter is incremented, and its declared verdict (see
//! `overlay_common::Counter::verdict`) picks the action.
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action};
use overlay_common::{Counter, Verdict};

use crate::maps;

/// Counts `outcome` and returns its tc action. A redirect verdict means the program already
/// asked for the redirect and the helper accepted it.
#[inline(always)]
pub fn tc_act(outcome: Counter) -> i32 {
    maps::count(outcome);
    let action = match outcome.verdict() {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Redirect => TC_ACT_REDIRECT,
    };
    action as i32
}

/// Counts `outcome` and returns its XDP action. The XDP decapsulator never redirects; were it
/// to name such an outcome, the packet would go on to the stack.
#[inline(always)]
pub fn xdp_act(outcome: Counter) -> u32 {
    maps::count(outcome);
    match outcome.verdict() {
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Pass | Verdict::Redirect => xdp_action::XDP_PASS,
    }
}
