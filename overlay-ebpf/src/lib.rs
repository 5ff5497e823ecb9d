//! The dataplane's pure arithmetic: checksums, ECN, header lengths and VXLAN field values.
//! Nothing here touches a packet or a kernel helper, so the library needs no aya and builds for
//! the host too, where `cargo xtask test` runs its unit tests; the programs (`main.rs`) build
//! it for `bpfel-unknown-none` and inline every function.
#![no_std]

pub mod checksum;
pub mod ecn;
pub mod lengths;
pub mod vxlan_fields;
