//! `cargo xtask bench [--quick]`: setup, a release build of the agent, then the benchmark,
//! which measures ebpf, kernel and host-gw side by side (throughput over IPv4 and IPv6) and
//! writes `target/bench/`.
use std::path::Path;

use anyhow::Result;

use crate::{build, cmd, setup};

pub fn run(root: &Path, quick: bool) -> Result<()> {
    setup::run(root)?;
    build::build(root, true)?;
    let mut bench = cmd::cargo();
    bench
        .current_dir(root)
        .args([
            "run",
            "--quiet",
            "--package",
            "overlay-tests",
            "--bin",
            "overlay-bench",
            "--",
        ])
        .env(
            "OVERLAY_AGENT_BIN",
            root.join("target/release/overlay-agent"),
        );
    if quick {
        bench.arg("--quick");
    }
    cmd::run(&mut bench)
}
