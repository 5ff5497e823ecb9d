//! `cargo xtask demo [--once]`: setup, build, then the demo binary in place of this process, so
//! Ctrl-C reaches the demo alone and it can tear down before exiting.
use std::{os::unix::process::CommandExt, path::Path};

use anyhow::{Result, bail};

use crate::{build, cmd, setup};

pub fn run(root: &Path, once: bool) -> Result<()> {
    setup::run(root)?;
    build::run(root, false)?;
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
    let error = demo.exec();
    bail!("cannot start the demo: {error}")
}
