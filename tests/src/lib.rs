//! Test harness: hand-built frames, network namespaces that clean up after themselves, and
//! the checks every privileged test makes first.
pub mod frames;
pub mod netns;

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
