//! `cargo xtask run`, as a user runs it: the agent on a host (a test namespace, entered with
//! nsenter), ready, and stopped by Ctrl-C's SIGINT with its lease kept; refused to a user who
//! is not root. `cargo xtask bench` hands the benchmarks the flags the README gives them.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Result, ensure};
use overlay_tests::{agent::Agent, cluster::Cluster};

/// Long enough for `cargo xtask run` to bring a stale build up to date before the agent starts.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn cargo_xtask_run_starts_the_agent_and_sigint_stops_it_keeping_the_lease() -> Result<()> {
    let mut cluster = Cluster::new("xtask-run")?;
    let host = cluster.add_host("host1", "172.20.62.104")?;
    let args: Vec<String> = ["xtask", "run", "--"]
        .map(String::from)
        .into_iter()
        .chain(Agent::flags(&cluster, &host, &[]))
        .collect();
    let mut agent = Agent::start_through(&host, Path::new("cargo"), &args, &[])?;
    // cargo builds the agent first.
    let subnet = agent.wait_ready_within(BUILD_TIMEOUT)?;

    agent.process.signal(libc::SIGINT)?;
    let status = agent.process.wait_exit(EXIT_TIMEOUT)?;
    ensure!(
        status.success(),
        "SIGINT is a clean shutdown: {status}\n{}",
        agent.log()
    );
    agent.wait_for_log(
        &format!("SIGINT; shutting down and keeping lease {subnet}"),
        1,
        EXIT_TIMEOUT,
    )?;
    ensure!(
        cluster.etcd.get(&cluster.subnet_key(&subnet))?.is_some(),
        "the lease of {subnet} is gone from etcd"
    );
    Ok(())
}

#[test]
fn cargo_xtask_run_refuses_a_user_who_is_not_root() -> Result<()> {
    overlay_tests::require_root()?;
    let xtask = built_xtask()?;
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&xtask)
        .args(["run", "--", "--help"])
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success() && stderr.contains("run it as root") && output.stdout.is_empty(),
        "{} run as nobody ({}):\n{stderr}{}",
        xtask.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(())
}

/// Each flag reaches the benchmark it is for: a value the benchmark refuses comes back as
/// its own refusal, not as a flag `cargo xtask bench` does not know.
#[test]
fn cargo_xtask_bench_hands_its_flags_to_the_benchmarks() -> Result<()> {
    let refused: [(&[&str], &str); 2] = [
        (
            &["--control-rounds", "0"],
            "--control-rounds must be at least 1",
        ),
        (
            &[
                "--micro",
                "--only",
                "ARP",
                "--samples",
                "0",
                "--out",
                "target/bench-refused",
            ],
            "--samples must be at least 1",
        ),
    ];
    for (args, refusal) in refused {
        let output = Command::new("cargo")
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .args(["xtask", "bench"])
            .args(args)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains(refusal),
            "cargo xtask bench {args:?} ({}) did not end in the refusal {refusal:?}:\n{stderr}",
            output.status
        );
    }
    Ok(())
}

/// The xtask binary `cargo xtask` built to run the tests.
fn built_xtask() -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xtask");
    ensure!(
        path.exists(),
        "{} does not exist: run the tests with `cargo xtask test`",
        path.display()
    );
    Ok(path)
}
