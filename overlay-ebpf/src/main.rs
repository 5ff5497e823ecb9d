//! The overlay dataplane, built for `bpfel-unknown-none` by `cargo xtask build`:
//! `encap` (tc, container veths and VXLAN device egress) and `decap` (tc or XDP, uplink), over
//! `parse`, `maps` and `verdict`.
#![no_std]
#![no_main]

mod decap;
mod encap;
mod maps;
mod parse;
mod verdict;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}
