//! `cargo xtask test`: setup, build, format and lint checks, every test, then the demo once.
use std::path::Path;

use anyhow::Result;

use crate::{build, cmd, demo, setup};

/// The crates that run in user space; overlay-ebpf only builds for the BPF target.
const USERSPACE_CRATES: &[&str] = &["overlay-common", "overlay-agent", "xtask", "overlay-tests"];

pub fn run(root: &Path) -> Result<()> {
    setup::run(root)?;
    build::run(root, false)?;
    cmd::run(
        cmd::cargo()
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    )?;
    cmd::run(
        cmd::cargo()
            .current_dir(root)
            .arg("clippy")
            .args(package_args())
            .args(["--all-targets", "--all-features", "--", "-D", "warnings"]),
    )?;
    cmd::run(
        cmd::cargo()
            .current_dir(root)
            .arg("test")
            .args(package_args())
            .arg("--all-features"),
    )?;
    println!("\nThe demo, once, as a user would run it:");
    cmd::run(&mut demo::command(root, true))
}

fn package_args() -> Vec<&'static str> {
    USERSPACE_CRATES
        .iter()
        .flat_map(|name| ["--package", name])
        .collect()
}
