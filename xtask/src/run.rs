//! `cargo xtask run [--release] -- <agent flags>`: build, then overlay-agent on this host in
//! place of this process. cargo runs xtask in its own place too, so Ctrl-C (SIGINT) reaches the
//! agent itself, which keeps its lease and pinned dataplane, and its exit status is the run's.
use std::{ffi::OsString, os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{build, setup};

pub fn run(root: &Path, release: bool, agent_args: &[OsString]) -> Result<()> {
    setup::ensure_linux_root(
        "the agent loads eBPF programs and changes this host's network: run it as root, \
         e.g. `sudo -E cargo xtask run -- <flags>`",
    )?;
    setup::ensure_bpffs()?;
    build::run(root, release)?;
    let agent = build::agent_binary(root, release);
    let error = Command::new(&agent).args(agent_args).exec();
    bail!("cannot start {}: {error}", agent.display())
}
