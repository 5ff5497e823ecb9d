//! `cargo xtask`: everything from a fresh Debian machine to a tested build.
mod bench;
mod build;
mod cmd;
mod demo;
mod package;
mod run;
mod setup;
mod test;

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and run the overlay project")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check and install every prerequisite (Debian packages, rust-src, bpf-linker, cargo-deb,
    /// rustfmt and clippy, bpffs): what the build, the package, the tests and the demo need.
    Setup,
    /// Install what the build needs if it is missing (protoc, nightly rust-src, bpf-linker),
    /// then build the eBPF object and the agent that embeds it.
    Build {
        /// Build the agent with the release profile (the eBPF object is always optimised).
        #[arg(long)]
        release: bool,
    },
    /// Setup and build, then formatting and lint checks, the Debian package, every test in the
    /// workspace and the demo once; every failure is shown, and the last line counts them.
    Test,
    /// Build, then run overlay-agent on this host, as root, with the flags after `--`; Ctrl-C
    /// stops it as SIGINT does, keeping the lease and the pinned dataplane.
    Run {
        /// Build and run the agent with the release profile.
        #[arg(long)]
        release: bool,
        /// The agent's own flags, `--help` included, passed through untouched.
        #[arg(last = true)]
        agent_args: Vec<OsString>,
    },
    /// Install what the build and cargo-deb need if it is missing, then build the release agent
    /// and its Debian package (binary, systemd unit, env file) into target/debian/.
    Package,
    /// Measure ebpf, kernel and host-gw side by side, over IPv4 and IPv6, in interleaved
    /// rounds; the report goes to target/bench/.
    Bench {
        /// Two rounds of short runs: proves the benchmark works, measures little.
        #[arg(long, conflicts_with = "micro")]
        quick: bool,
        /// Only each program's ns per packet from BPF_PROG_TEST_RUN, in seconds: the A/B tool
        /// for a change to the fast path (target/bench/microbench.md).
        #[arg(long)]
        micro: bool,
        /// Only these rows, comma separated: tcp1, tcp4, tcp1-pinned, tcp4-pinned, udp64, the
        /// same with -v6 (tcp1-v6, ..., udp64-v6), tcp1-one-cpu, latency, latency-pinned,
        /// bpf-stats, control-plane. With --micro: only the rows whose program or frame contains ROWS.
        #[arg(long, value_name = "ROWS")]
        only: Option<String>,
        /// Rounds of interleaved runs (default 10, 2 with --quick).
        #[arg(long, conflicts_with = "micro")]
        rounds: Option<u32>,
        /// Rounds of the control plane's runs (default 4, 2 with --quick).
        #[arg(long, value_name = "N", conflicts_with = "micro")]
        control_rounds: Option<u32>,
        /// Build the three clusters afresh every N rounds (default 2, 1 with --quick).
        #[arg(long, value_name = "N", conflicts_with = "micro")]
        rebuild_every: Option<u32>,
        /// The seed of each round's shuffled order of the modes, to repeat a run's order.
        #[arg(long, conflicts_with = "micro")]
        seed: Option<u64>,
        /// Where the report goes instead of target/bench/ (with --micro too).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// With --micro: runs timed per row (default 20,000).
        #[arg(long, value_name = "N", requires = "micro")]
        samples: Option<u32>,
        /// Run it under `perf record` and attribute each program's samples to its source
        /// lines and the kernel functions it calls (profile.md beside the report).
        #[arg(long)]
        profile: bool,
    },
    /// The seed document, live: two hosts, three containers, etcd, our dataplane.
    Demo {
        /// Run the checks, tear down and exit with their status instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let root = workspace_root();
    let succeeded = |outcome: anyhow::Result<()>| outcome.map(|()| ExitCode::SUCCESS);
    let outcome = match Cli::parse().task {
        Task::Setup => succeeded(setup::run(&root)),
        Task::Build { release } => succeeded(build::run(&root, release)),
        Task::Test => test::run(&root),
        Task::Run {
            release,
            agent_args,
        } => succeeded(run::run(&root, release, &agent_args)),
        Task::Package => succeeded(package::run(&root)),
        Task::Demo { once } => succeeded(demo::run(&root, once)),
        Task::Bench {
            quick,
            micro,
            only,
            rounds,
            control_rounds,
            rebuild_every,
            seed,
            out,
            samples,
            profile,
        } => {
            let options = bench::Options {
                quick,
                micro,
                only,
                rounds,
                control_rounds,
                rebuild_every,
                seed,
                out,
                samples,
                profile,
            };
            succeeded(bench::run(&root, &options))
        }
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
