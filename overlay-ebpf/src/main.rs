//! The overlay dataplane, built for `bpfel-unknown-none` by `cargo xtask build`:
//! `encap` and `encap6` (tc, container veths and VXLAN device egress), `claims` (what containers may send,
//! checked at their veths), `decap` and `decap6` (tc or XDP, uplink; tc, VXLAN device ingress) and
//! `routed` (tc, container bridge egress), over `parse`, `maps` and `verdict`.
#![no_std]
#![no_main]

mod claims;
mod decap;
mod decap6;
mod encap;
mod encap6;
mod maps;
mod parse;
mod routed;
mod verdict;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}
