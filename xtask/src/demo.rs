//! `cargo xtask demo [--once]`: setup, build, then the demo binary in place of this process, so
//! Ctrl-C reaches the demo alone and it can tear down before exiting.
use std::{os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Result, bail};

use crate::{build, cmd, setup};

pub fn run(root: &Path, once: bool) -> Result<()> {
    setup::run(root)?;
    build::build(root, false)?;
    let error = command(root, once).exec();
    bail!("cannot start the demo: {error}")
}

/// `cargo run` of the demo binary; `once` runs its checks and exits with their status.
pub fn command(root: &Path, once: bool) -> Command {
    let mut demo = cmd::cargo();
    demo.current_dir(root).args([
        "run",
        "--quiet",
        "--package",
        "overlay-tests",
        "--bin",
        "overlay-demo",
        "--",
    ]);
    if once {
        demo.arg("--once");
    }
    demo
}
