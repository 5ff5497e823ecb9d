//! The overlay dataplane, built for `bpfel-unknown-none` by `cargo xtask build`. One file per
//! hook holds its entry points and nothing else does:
//!
//! - `container`: `tc_container_ingress` (container veths: the claims, the fast path out);
//! - `uplink`: `tc_uplink_ingress` and `xdp_uplink` (the uplink: checks and decapsulation);
//! - `vtep`: `tc_vtep_egress` and `tc_vtep_ingress` (flannel.1 and flannel-v6.1: the routed
//!   path out, the guard of their sockets);
//! - `bridge`: `tc_bridge_egress` (the container bridge: flows the stack translates).
//!
//! Below them, and never importing them: `encap` (`v4`, `v6`) and `decap` (`v4`, `v6`), over
//! `claims` (with `claims6` and `ipv6_chain` for IPv6), `classify` (the uplink's VXLAN
//! classifier), `vxlan` (the headers VXLAN adds and the IPv6 outer checksum), `redirect`,
//! `flows`, `verdict`, `parse` and `maps`. The pure
//! arithmetic (checksums, ECN, lengths, VXLAN field values) is the library next to this
//! (`lib.rs`), which the host builds and tests too.
#![no_std]
#![no_main]

mod bridge;
mod claims;
mod claims6;
mod classify;
mod container;
mod decap;
mod encap;
mod flows;
mod ipv6_chain;
mod maps;
mod parse;
mod redirect;
mod uplink;
mod verdict;
mod vtep;
mod vxlan;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}
