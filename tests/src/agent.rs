//! overlay-agent processes on test hosts.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    cluster::{Cluster, Host, PREFIX},
    process::Process,
    wait::wait_for,
};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent binary `cargo xtask build` produced (OVERLAY_AGENT_BIN overrides it).
pub fn agent_binary() -> Result<PathBuf> {
    let path = std::env::var_os("OVERLAY_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/overlay-agent")
        });
    if !path.exists() {
        bail!(
            "{} does not exist: run the tests with `cargo xtask test`, which builds it",
            path.display()
        );
    }
    Ok(path)
}

pub struct Agent {
    pub process: Process,
    pub subnet_file: PathBuf,
}

impl Agent {
    /// Starts the agent on `host` against the cluster's etcd with the seed's prefix, the
    /// host's subnet file, and `extra` flags.
    pub fn start(cluster: &Cluster, host: &Host, extra: &[&str]) -> Result<Self> {
        let mut args = vec![
            format!("--etcd-endpoints={}", cluster.endpoints()),
            format!("--etcd-prefix={PREFIX}"),
            format!("--subnet-file={}", host.subnet_file().display()),
            format!("--bpf-pin-dir={}", host.pin_dir().display()),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        Self::start_with(host, &args, &[])
    }

    /// Starts the agent on `host` with exactly `args` and environment `envs`.
    pub fn start_with(host: &Host, args: &[String], envs: &[(&str, &str)]) -> Result<Self> {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = host.dir.join(format!("agent-{start}.log"));
        let process = Process::spawn(host.netns.name(), &agent_binary()?, args, envs, &log)?;
        Ok(Self {
            process,
            subnet_file: host.subnet_file(),
        })
    }

    /// Waits until this agent reports it has written its subnet file (a file left by an
    /// earlier run does not count); returns the lease's subnet as "a.b.c.0/len".
    pub fn wait_ready(&mut self) -> Result<String> {
        wait_for("the agent to be ready", READY_TIMEOUT, || {
            if let Some(status) = self.process.try_exit_status()? {
                bail!("the agent exited ({status}) before it was ready");
            }
            Ok(self.log().contains("ready: subnet"))
        })
        .with_context(|| format!("agent log:\n{}", self.log()))?;
        subnet_from_file(&self.subnet_file)
            .context("the agent said it was ready but wrote no subnet file")
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits for the agent to exit and asserts it failed, saying `message`.
    pub fn expect_failure(&mut self, message: &str) -> Result<()> {
        let status = self.process.wait_exit(READY_TIMEOUT)?;
        ensure!(
            !status.success(),
            "the agent exited successfully:\n{}",
            self.log()
        );
        ensure!(
            self.log().contains(message),
            "the agent did not say {message:?}:\n{}",
            self.log()
        );
        Ok(())
    }

    /// Waits until the agent's log contains `needle` at least `count` times.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("{count}× {needle:?} in the agent log"),
            timeout,
            || Ok(self.count_in_log(needle) >= count),
        )
        .with_context(|| format!("agent log:\n{}", self.log()))
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }
}

/// The subnet named by FLANNEL_SUBNET ("10.2.41.1/24" gives "10.2.41.0/24").
pub fn subnet_from_file(path: &Path) -> Option<String> {
    let contents = std::fs::read_to_string(path).ok()?;
    let value = contents
        .lines()
        .find_map(|line| line.strip_prefix("FLANNEL_SUBNET="))?;
    let (address, len) = value.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Some(format!(
        "{}/{len}",
        Ipv4Addr::from(u32::from(address) & mask)
    ))
}
