//! `cargo xtask bench [--quick] [--only ROWS] [--rounds N] [--rebuild-every N] [--seed N] |
//! --micro`: setup, a release build of the agent, then the benchmark, which measures ebpf,
//! kernel and host-gw in interleaved rounds (throughput over IPv4 and IPv6) on clusters built
//! afresh every few rounds, or with `--micro` only each program's ns per packet; the reports
//! go to `target/bench/`. The row names `--only` takes are the benchmark's own: an unknown one
//! fails, naming them.
use std::path::Path;

use anyhow::Result;

use crate::{build, cmd, setup};

/// What `cargo xtask bench` was given.
pub struct Options {
    pub quick: bool,
    pub micro: bool,
    pub only: Option<String>,
    pub rounds: Option<u32>,
    pub rebuild_every: Option<u32>,
    pub seed: Option<u64>,
}

impl Options {
    /// The benchmark's own arguments.
    fn bench_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.quick {
            args.push("--quick".to_string());
        }
        let valued = [
            ("--only", self.only.clone()),
            ("--rounds", self.rounds.map(|rounds| rounds.to_string())),
            (
                "--rebuild-every",
                self.rebuild_every.map(|rounds| rounds.to_string()),
            ),
            ("--seed", self.seed.map(|seed| seed.to_string())),
        ];
        for (flag, value) in valued {
            if let Some(value) = value {
                args.extend([flag.to_string(), value]);
            }
        }
        args
    }
}

pub fn run(root: &Path, options: &Options) -> Result<()> {
    setup::run(root)?;
    build::build(root, true)?;
    let binary = if options.micro {
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
    bench.args(options.bench_args());
    cmd::run(&mut bench)
}
