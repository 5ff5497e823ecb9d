//! From an outcome to the kernel's action code. Every program ends here: it names the counter
//! that describes what happened, the counter is incremented, and its declared verdict (see
//! `overlay_common::Counter::verdict`) picks the action. A drop is also reported to a
//! monitor, if one is attached, and any outcome of a packet to or from the prefix a monitor
//! traces; every outcome is logged with aya-log under `--bpf-log`.
use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::info;
use overlay_common::{Counter, DROP_HEAD_LEN, Trace, Verdict};
use overlay_ebpf::{lengths::drop_head_len, trace_match::head_matches};

use crate::maps;

/// Counts `outcome`, reports it to a monitor that asks (see [`wanted_report`]) and returns
/// its tc action. A redirect verdict means the program already asked for the redirect and the
/// helper accepted it.
#[inline(always)]
pub fn tc_act(ctx: &TcContext, outcome: Counter) -> i32 {
    maps::count(outcome);
    let action = match outcome.verdict() {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Redirect => TC_ACT_REDIRECT,
    };
    report_skb(ctx, opaque(outcome as u8));
    // SAFETY: the context's skb is valid for the whole program run.
    log_outcome(
        ctx,
        outcome,
        || unsafe { (*ctx.skb.skb).ifindex },
        || ctx.len(),
    );
    action as i32
}

/// Counts `outcome`, reports a drop to a monitor that asks and returns its XDP action. The
/// XDP decapsulator never redirects; were it to name such an outcome, the packet would go on
/// to the stack.
#[inline(always)]
pub fn xdp_act(ctx: &XdpContext, outcome: Counter) -> u32 {
    maps::count(outcome);
    let action = match outcome.verdict() {
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Pass | Verdict::Redirect => xdp_action::XDP_PASS,
    };
    report_xdp(ctx, opaque(outcome as u8));
    // SAFETY: ctx.ctx is the xdp_md the kernel passed in.
    log_outcome(
        ctx,
        outcome,
        || unsafe { (*ctx.ctx).ingress_ifindex },
        || (ctx.data_end() - ctx.data()) as u32,
    );
    action
}

/// Where an outcome is reached. What the XDP hook passes, the tc program behind it reports.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Tc,
    Xdp,
}

/// What a monitor wants of a packet with `outcome`.
enum Report {
    /// A drop, while drops are monitored.
    Always,
    /// Any outcome, if the packet is to or from the traced prefix.
    IfTraced(Trace),
}

/// The outcome of index `outcome` and what a monitor wants reported of it, `None` for
/// nothing: one array lookup (the trace) for a packet that is not dropped, two for a drop.
#[inline(always)]
fn wanted_report(outcome: u8, hook: Hook) -> Option<(Counter, Report)> {
    let outcome = Counter::from_index(outcome.into())?;
    let report = match maps::trace() {
        Some(trace) if hook == Hook::Tc || outcome.is_drop() => Report::IfTraced(*trace),
        Some(_) => return None,
        None if outcome.is_drop() && maps::monitoring() => Report::Always,
        None => return None,
    };
    Some((outcome, report))
}

/// Whether the packet whose first bytes are `head` is wanted, as `report` says.
#[inline(always)]
fn head_wanted(report: &Report, head: &[u8; DROP_HEAD_LEN]) -> bool {
    match report {
        Report::Always => true,
        Report::IfTraced(trace) => {
            maps::config().is_some_and(|config| head_matches(head, trace, config.vxlan_port))
        }
    }
}

/// One aya-log line per packet, naming its outcome. Without `--bpf-log` the agent loads the
/// programs with aya-log's level global at 0, a read-only constant, so the verifier removes
/// this code; the arguments are evaluated inside the macro's level check so that they go with
/// it. It comes last, after everything that needs `outcome` itself, and names a copy of it the
/// verifier cannot see through (see `opaque`): then every path to here is one state per
/// action, and the byte-by-byte copy of the name is verified once per name, not once per path
/// (which exceeds the verifier's budget of a million instructions).
#[inline(always)]
fn log_outcome<C: EbpfContext>(
    ctx: &C,
    outcome: Counter,
    ifindex: impl Fn() -> u32,
    len: impl Fn() -> u32,
) {
    info!(
        ctx,
        "{} on ifindex {} ({} bytes)",
        Counter::from_index(opaque(outcome as u8).into()).map_or("unknown", Counter::name),
        ifindex(),
        len()
    );
}

/// `value`, through a stack byte: the verifier keeps track of constants in registers but not of
/// a byte stored to the stack, so what comes back is any `u8` to it.
#[inline(always)]
fn opaque(value: u8) -> u8 {
    let mut slot = value;
    // SAFETY: `slot` is a local this function owns, valid for both accesses.
    unsafe {
        core::ptr::write_volatile(&mut slot, value);
        core::ptr::read_volatile(&slot)
    }
}

/// Reports the packet whose outcome is the counter of index `outcome` to a monitor that wants
/// it. Like `log_outcome`, it takes the outcome through `opaque` and comes after the action
/// is known: the trace's matching is then verified once per action, not once for every path
/// that ends in a verdict (which took the container program's verification from 13 to 156
/// ms).
#[inline(always)]
fn report_skb(ctx: &TcContext, outcome: u8) {
    let Some((outcome, report)) = wanted_report(outcome, Hook::Tc) else {
        return;
    };
    let len = ctx.len();
    // SAFETY: the context's skb is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let copy_head = |head: &mut [u8; DROP_HEAD_LEN]| {
        let wanted = drop_head_len(len);
        // SAFETY: `head` holds DROP_HEAD_LEN bytes and `wanted` is at most that.
        let loaded =
            unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, head.as_mut_ptr().cast(), wanted) };
        if loaded == 0 { wanted } else { 0 }
    };
    maps::report(outcome, ifindex, len, copy_head, |head| {
        head_wanted(&report, head)
    });
}

/// As [`report_skb`], for the XDP hook.
#[inline(always)]
fn report_xdp(ctx: &XdpContext, outcome: u8) {
    let Some((outcome, report)) = wanted_report(outcome, Hook::Xdp) else {
        return;
    };
    let len = (ctx.data_end() - ctx.data()) as u32;
    // SAFETY: ctx.ctx is the xdp_md the kernel passed in.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let copy_head = |head: &mut [u8; DROP_HEAD_LEN]| {
        let wanted = drop_head_len(len);
        // SAFETY: `head` holds DROP_HEAD_LEN bytes and `wanted` is at most that.
        let loaded = unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, head.as_mut_ptr().cast(), wanted) };
        if loaded == 0 { wanted } else { 0 }
    };
    maps::report(outcome, ifindex, len, copy_head, |head| {
        head_wanted(&report, head)
    });
}
