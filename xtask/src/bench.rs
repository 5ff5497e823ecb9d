//! `cargo xtask bench [--quick | --micro]`: setup, a release build of the agent, then the
//! benchmark, which measures ebpf, kernel and host-gw side by side (throughput over IPv4 and
//! IPv6), or with `--micro` only each program's ns per packet; the reports go to
//! `target/bench/`.
use std::path::Path;

use anyhow::Result;

use crate::{build, cmd, setup};

pub fn run(root: &Path, quick: bool, micro: bool) -> Result<()> {
    setup::run(root)?;
    build::build(root, true)?;
    let binary = if micro {
        "overlay-microbench"
    } else {
        "overlay-bench"
    };
    let mut bench = cmd::cargo();
    bench
        .current_dir(root)
        .args([
            "run",
            "--quiet",
            "--package",
            "overlay-tests",
            "--bin",
            binary,
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
