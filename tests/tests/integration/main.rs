//! Every integration test in one binary, as aya's integration-test crate does: one link of the
//! harness in `tests/src/` instead of one per file, and one libtest run whose threads share
//! the whole suite. Each module is the file it was; a test's name starts with its module
//! (`isolation::a_container_cannot_send_vxlan`), so `cargo test -p overlay-tests isolation::`
//! runs one file's tests.

/// A matrix of cases as a table, one `#[test]` per row: `name: (arguments...)` calls
/// `check(arguments...)`. Each row runs, passes and fails under its own name, in parallel with
/// the rest, and the table shows at a glance what differs between the cases.
macro_rules! test_matrix {
    ($check:ident { $($(#[$doc:meta])* $name:ident: ($($argument:expr),* $(,)?)),+ $(,)? }) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() -> anyhow::Result<()> {
                $check($($argument),*)
            }
        )+
    };
}

mod bench;
mod cni;
mod container_vlans;
mod control_plane;
mod docker;
mod ebpf_dataplane;
mod fail_closed;
mod firewall;
mod fuzz;
mod health;
mod hostile_container;
mod hostile_records;
mod ipv6;
mod ipv6_fast_path;
mod ipv6_guards;
mod isolation;
mod kernel_frames;
mod layout;
mod lifecycle;
mod node_network;
mod observe;
mod operator_page;
mod package;
mod pinned_upgrade;
mod public_ip;
mod record_checks;
mod routed_flows;
mod stack_path;
mod swap;
mod tc_encap;
mod tc_encap6;
mod trouble;
mod uplink_decap;
mod uplink_decap6;
mod uplink_live;
mod xtask_run;
