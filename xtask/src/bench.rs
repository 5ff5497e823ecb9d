//! `cargo xtask bench [--quick] [--only ROWS] [--rounds N] [--control-rounds N]
//! [--rebuild-every N] [--seed N] [--out DIR] | --micro [--only TEXT] [--samples N] [--out DIR]`,
//! either with `[--profile]`: setup, a release build of the agent, then the benchmark, which
//! measures ebpf, kernel and host-gw in interleaved rounds (throughput over IPv4 and IPv6) on
//! clusters built afresh every few rounds, or with `--micro` only each program's ns per
//! packet; the reports go to `target/bench/`. `--profile` runs it under overlay-profile
//! (`perf record`), which adds `profile.md`: each program's samples by source line and by the
//! kernel function it called. Each flag is handed to the benchmark binary as given, so what it
//! takes and refuses (an unknown row, a count of 0) is the binary's own.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{build, cmd, setup};

/// What `cargo xtask bench` was given.
pub struct Options {
    pub quick: bool,
    pub micro: bool,
    pub only: Option<String>,
    pub rounds: Option<u32>,
    pub control_rounds: Option<u32>,
    pub rebuild_every: Option<u32>,
    pub seed: Option<u64>,
    pub out: Option<PathBuf>,
    pub samples: Option<u32>,
    pub profile: bool,
}

impl Options {
    /// The benchmark's own arguments, `--out` made absolute: the benchmark runs in the
    /// workspace's root, not where the user is.
    fn bench_args(&self) -> Result<Vec<OsString>> {
        let mut args = Vec::new();
        if self.quick {
            args.push("--quick".into());
        }
        let out = self.absolute_out()?;
        let number = |value: Option<u64>| value.map(|value| OsString::from(value.to_string()));
        let valued = [
            ("--only", self.only.clone().map(OsString::from)),
            ("--rounds", number(self.rounds.map(u64::from))),
            (
                "--control-rounds",
                number(self.control_rounds.map(u64::from)),
            ),
            ("--rebuild-every", number(self.rebuild_every.map(u64::from))),
            ("--seed", number(self.seed)),
            ("--out", out),
            ("--samples", number(self.samples.map(u64::from))),
        ];
        for (flag, value) in valued {
            if let Some(value) = value {
                args.extend([flag.into(), value]);
            }
        }
        Ok(args)
    }

    /// `--out` made absolute, if given.
    fn absolute_out(&self) -> Result<Option<OsString>> {
        let Some(out) = &self.out else {
            return Ok(None);
        };
        let out = std::path::absolute(out).with_context(|| format!("--out {}", out.display()))?;
        Ok(Some(out.into_os_string()))
    }

    /// With `--profile`, the profiler's own arguments before the benchmark's command: the
    /// profile goes where the report goes.
    fn profiler_args(&self) -> Result<Vec<OsString>> {
        Ok(match self.absolute_out()? {
            Some(out) => vec!["--out".into(), out],
            None => Vec::new(),
        })
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
    let mut bench = if options.profile {
        profiled(root, binary, options)?
    } else {
        let mut bench = cmd::cargo();
        bench.args([
            "run",
            "--quiet",
            "--package",
            "overlay-tests",
            "--bin",
            binary,
            "--",
        ]);
        bench
    };
    bench.current_dir(root).env(
        "OVERLAY_AGENT_BIN",
        root.join("target/release/overlay-agent"),
    );
    bench.args(options.bench_args()?);
    cmd::run(&mut bench)
}

/// overlay-profile running `binary`, both built first: perf then records the benchmark
/// alone, not cargo.
fn profiled(root: &Path, binary: &str, options: &Options) -> Result<Command> {
    let mut build = cmd::cargo();
    build.current_dir(root).args([
        "build",
        "--quiet",
        "--package",
        "overlay-tests",
        "--bin",
        binary,
        "--bin",
        "overlay-profile",
    ]);
    cmd::run(&mut build)?;
    let binaries = root.join("target/debug");
    let mut profiler = Command::new(binaries.join("overlay-profile"));
    profiler
        .args(options.profiler_args()?)
        .arg("--")
        .arg(binaries.join(binary));
    Ok(profiler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_given_reaches_the_benchmark_and_out_is_made_absolute() {
        let options = Options {
            quick: true,
            micro: false,
            only: Some("tcp4,control-plane".into()),
            rounds: Some(4),
            control_rounds: Some(2),
            rebuild_every: Some(1),
            seed: Some(7),
            out: Some("report".into()),
            samples: Some(500),
            profile: true,
        };
        let out = std::env::current_dir().unwrap().join("report");
        let expected: Vec<OsString> = [
            "--quick",
            "--only",
            "tcp4,control-plane",
            "--rounds",
            "4",
            "--control-rounds",
            "2",
            "--rebuild-every",
            "1",
            "--seed",
            "7",
            "--out",
        ]
        .into_iter()
        .map(OsString::from)
        .chain([
            out.clone().into_os_string(),
            "--samples".into(),
            "500".into(),
        ])
        .collect();
        assert_eq!(options.bench_args().unwrap(), expected);
        assert_eq!(
            options.profiler_args().unwrap(),
            [OsString::from("--out"), out.into_os_string()]
        );
    }
}
