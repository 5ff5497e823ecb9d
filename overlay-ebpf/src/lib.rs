//! The dataplane's pure arithmetic: checksums, ECN, header lengths, VXLAN field values and
//! the trace's address match.
//! Nothing here touches a packet or a kernel helper, so the library needs no aya and builds for
//! the host too, where `cargo xtask test` runs its unit tests; the programs (`main.rs`) build
//! it for `bpfel-unknown-none` and inline every function.
#![no_std]

pub mod checksum;
pub mod ecn;
pub mod lengths;
pub mod trace_match;
pub mod vxlan_fields;
