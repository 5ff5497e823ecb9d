//! `cargo xtask package`: the release agent as a Debian package, built by cargo-deb from the
//! `[package.metadata.deb]` of overlay-agent's Cargo.toml, into `target/debian/`.
use std::path::Path;

use anyhow::Result;

use crate::{build, cmd, setup};

pub fn run(root: &Path) -> Result<()> {
    setup::ensure(root, setup::Scope::Package)?;
    build(root)
}

/// The release build, then cargo-deb on it with `--no-build`: cargo-deb's own `cargo build`
/// would not build the eBPF object the agent embeds.
pub fn build(root: &Path) -> Result<()> {
    build::build(root, true)?;
    cmd::run(cmd::cargo().current_dir(root).args([
        "deb",
        "--package",
        "overlay-agent",
        "--no-build",
    ]))
}
