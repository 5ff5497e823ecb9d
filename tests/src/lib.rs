//! Test harness: hand-built frames, network namespaces that clean up after themselves, a real
//! etcd, agent processes, and the checks every privileged test makes first.
pub mod absence;
pub mod agent;
pub mod attached;
pub mod capture;
pub mod cluster;
pub mod cni;
pub mod dataplane;
pub mod docker;
pub mod etcd;
pub mod frames;
pub mod health;
pub mod inject;
pub mod ipv6;
pub mod loss;
pub mod metrics;
pub mod netns;
pub mod package;
pub mod process;
pub mod random;
pub mod scratch;
pub mod seed;
pub mod stock_flannel;
pub mod tls;
pub mod wait;
pub mod walkthrough;

use anyhow::{Result, bail};

/// Fails, saying why, when the test cannot run here: these tests load eBPF programs and create
/// network namespaces, which needs root.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "this test loads eBPF programs and creates network namespaces: run it as root (euid {euid})"
        );
    }
    Ok(())
}
