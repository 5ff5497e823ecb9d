//! overlay-agent processes on test hosts.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    cluster::{Cluster, Host, PREFIX},
    health::Answer,
    process::Process,
    wait::wait_for,
};

pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The port of /healthz, /readyz and /metrics of every agent `Agent::start` starts, on the
/// host namespace's loopback.
pub const HEALTH_PORT: u16 = 8471;

/// The sources of each build product the agent binary is made of, by product: the agent's own
/// crates, and the eBPF object it embeds, which `cargo build -p overlay-agent` embeds as it
/// finds it (only `cargo xtask build` builds it again).
const AGENT_PARTS: [(&str, &[&str]); 2] = [
    (
        "target/debug/overlay-agent",
        &["overlay-agent/src", "overlay-common/src"],
    ),
    (
        "target/ebpf/bpfel-unknown-none/release/overlay-ebpf",
        &["overlay-ebpf/src", "overlay-common/src"],
    ),
];

/// The agent binary `cargo xtask build` produced (OVERLAY_AGENT_BIN overrides it). `cargo test`
/// does not build it, so one older than the sources is refused rather than tested.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("OVERLAY_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate sits in the workspace")?;
    for (product, sources) in AGENT_PARTS {
        let path = workspace.join(product);
        let built = std::fs::metadata(&path)
            .and_then(|metadata| metadata.modified())
            .with_context(|| {
                format!(
                    "{} does not exist: run the tests with `cargo xtask test`, which builds it",
                    path.display()
                )
            })?;
        for sources in sources {
            if let Some(newer) = newer_file(&workspace.join(sources), built)? {
                bail!(
                    "{} is older than {}: `cargo xtask build` rebuilds it (`cargo test` does \
                     not)",
                    path.display(),
                    newer.display()
                );
            }
        }
    }
    Ok(workspace.join(AGENT_PARTS[0].0))
}

/// A Rust source under `dir` modified after `than`, if any.
fn newer_file(dir: &Path, than: std::time::SystemTime) -> Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        let newer = if metadata.is_dir() {
            newer_file(&entry.path(), than)?
        } else {
            let source = entry.path().extension().is_some_and(|ext| ext == "rs");
            (source && metadata.modified()? > than).then(|| entry.path())
        };
        if newer.is_some() {
            return Ok(newer);
        }
    }
    Ok(None)
}

pub struct Agent {
    pub process: Process,
    pub subnet_file: PathBuf,
    netns: String,
    /// The health port, if the agent serves one.
    health_port: Option<u16>,
}

impl Agent {
    /// Starts the agent on `host` against the cluster's etcd with the seed's prefix, the
    /// host's subnet file, and `extra` flags.
    pub fn start(cluster: &Cluster, host: &Host, extra: &[&str]) -> Result<Self> {
        Self::start_with(host, &Self::flags(cluster, host, extra), &[])
    }

    /// The flags [`Agent::start`] gives: the cluster's etcd, the seed's prefix, the host's
    /// subnet file, pin directory and health port, then `extra`.
    pub fn flags(cluster: &Cluster, host: &Host, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--etcd-endpoints={}", cluster.endpoints()),
            format!("--etcd-prefix={PREFIX}"),
            format!("--subnet-file={}", host.subnet_file().display()),
            format!("--bpf-pin-dir={}", host.pin_dir().display()),
            "--healthz-ip=127.0.0.1".to_string(),
            format!("--healthz-port={HEALTH_PORT}"),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        args
    }

    /// What `overlay-agent status` prints on `host`, a member of `cluster`.
    pub fn status_report(cluster: &Cluster, host: &Host) -> Result<String> {
        let flags = [
            "status".to_string(),
            format!("--etcd-endpoints={}", cluster.endpoints()),
            format!("--etcd-prefix={PREFIX}"),
            format!("--subnet-file={}", host.subnet_file().display()),
            format!("--bpf-pin-dir={}", host.pin_dir().display()),
        ];
        let mut status = Self::start_with(host, &flags, &[])?;
        ensure!(
            status.process.wait_exit(Duration::from_secs(20))?.success(),
            "{}",
            status.log()
        );
        Ok(status.log())
    }

    /// Starts the agent on `host` with exactly `args` and environment `envs`.
    pub fn start_with(host: &Host, args: &[String], envs: &[(&str, &str)]) -> Result<Self> {
        Self::start_through(host, &agent_binary()?, args, envs)
    }

    /// Starts `program` on `host` with `args` and `envs`, where `program` is, or becomes, the
    /// agent: the agent binary itself, or a command that runs it in its own place.
    pub fn start_through(
        host: &Host,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = host.dir.join(format!("agent-{start}.log"));
        let process = Process::spawn(host.netns.name(), program, args, envs, &log)?;
        Ok(Self {
            process,
            subnet_file: host.subnet_file(),
            netns: host.netns.name().to_string(),
            health_port: health_port(args, envs),
        })
    }

    /// Waits until this agent's /readyz says it has written its subnet file (a file left by
    /// an earlier run does not count); returns the lease's subnet as "a.b.c.0/len".
    pub fn wait_ready(&mut self) -> Result<String> {
        self.wait_ready_within(READY_TIMEOUT)
    }

    /// As [`Agent::wait_ready`], for a network with IPv6: returns the lease's IPv6 subnet
    /// (FLANNEL_IPV6_SUBNET) as "fd00:2:0:41::/64".
    pub fn wait_ready_ipv6(&mut self) -> Result<String> {
        self.wait_until_ready()?;
        subnet6_from_file(&self.subnet_file)
            .context("the agent said it was ready but wrote no FLANNEL_IPV6_SUBNET")
    }

    /// As [`Agent::wait_ready`], allowing `timeout` instead of [`READY_TIMEOUT`] (for an agent
    /// that is built first).
    pub fn wait_ready_within(&mut self, timeout: Duration) -> Result<String> {
        self.wait_until_ready_within(timeout)?;
        subnet_from_file(&self.subnet_file)
            .context("the agent said it was ready but wrote no FLANNEL_SUBNET")
    }

    /// Waits until this agent's /readyz answers 200.
    fn wait_until_ready(&mut self) -> Result<()> {
        self.wait_until_ready_within(READY_TIMEOUT)
    }

    fn wait_until_ready_within(&mut self, timeout: Duration) -> Result<()> {
        let port = self
            .health_port
            .context("waiting for readiness needs an agent that serves /readyz")?;
        wait_for("the agent's /readyz to answer 200", timeout, || {
            if let Some(status) = self.process.try_exit_status()? {
                bail!("the agent exited ({status}) before it was ready");
            }
            let answer = crate::health::get(&self.netns, port, "/readyz")?;
            Ok(answer.is_some_and(|answer| answer.status == 200))
        })
        .with_context(|| format!("agent log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Fails unless the agent still runs and has warned that it skips the record of each of
    /// `names` (keys under `<prefix>/subnets/`).
    pub fn ensure_running_and_skipping(&mut self, names: &[&str]) -> Result<()> {
        ensure!(
            self.process.try_exit_status()?.is_none(),
            "the agent exited:\n{}",
            self.log()
        );
        let log = self.log();
        for name in names {
            ensure!(
                log.contains(&format!("skipping record {PREFIX}/subnets/{name}")),
                "no warning names {name}:\n{log}"
            );
        }
        Ok(())
    }

    /// What GET `path` on this agent's health port answers; `None` while nothing answers.
    pub fn health(&self, path: &str) -> Result<Option<Answer>> {
        let port = self
            .health_port
            .context("this agent serves no health port")?;
        crate::health::get(&self.netns, port, path)
    }

    /// Waits up to `timeout` until `path` answers `status` with a body holding every one of
    /// `phrases`; returns that answer.
    pub fn wait_for_health(
        &self,
        path: &str,
        status: u16,
        phrases: &[&str],
        timeout: Duration,
    ) -> Result<Answer> {
        let mut last = None;
        wait_for(
            &format!("{path} to answer {status} naming {phrases:?}"),
            timeout,
            || {
                last = self.health(path)?;
                Ok(last.as_ref().is_some_and(|answer| {
                    answer.status == status
                        && phrases.iter().all(|phrase| answer.body.contains(phrase))
                }))
            },
        )
        .with_context(|| format!("last answer: {last:?}\nagent log:\n{}", self.log()))?;
        last.context("an answer")
    }

    /// Waits for the agent to exit and asserts it failed, saying `message`; returns how.
    pub fn expect_failure(&mut self, message: &str) -> Result<ExitStatus> {
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
        Ok(status)
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

    /// `strace` of every thread's `calls` (strace's `trace=` list) into `trace`, attached.
    /// It decodes netlink requests, so a dump shows as `NLM_F_DUMP`.
    pub fn strace(&self, host: &Host, calls: &str, trace: &Path) -> Result<Process> {
        let args = [
            "-f".to_string(),
            "-e".to_string(),
            format!("trace={calls}"),
            "-o".to_string(),
            trace.display().to_string(),
            "-p".to_string(),
            self.process.id().to_string(),
        ];
        let log = host.dir.join("strace.log");
        let strace = Process::spawn(host.netns.name(), Path::new("strace"), &args, &[], &log)?;
        wait_for("strace to attach", STRACE_ATTACH_TIMEOUT, || {
            Ok(strace.log().contains("attached"))
        })?;
        Ok(strace)
    }
}

/// How long `strace` may take to attach to every thread of an agent.
const STRACE_ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// The health port an agent started with `args` and `envs` serves on, if any.
fn health_port(args: &[String], envs: &[(&str, &str)]) -> Option<u16> {
    let from_flag = args
        .iter()
        .rev()
        .find_map(|arg| arg.strip_prefix("--healthz-port="));
    let from_env = || {
        envs.iter()
            .find(|(name, _)| *name == "FLANNELD_HEALTHZ_PORT")
            .map(|(_, value)| *value)
    };
    from_flag
        .or_else(from_env)?
        .parse()
        .ok()
        .filter(|port| *port != 0)
}

/// The subnet named by FLANNEL_SUBNET ("10.2.41.1/24" gives "10.2.41.0/24").
pub fn subnet_from_file(path: &Path) -> Option<String> {
    let value = subnet_file_value(path, "FLANNEL_SUBNET")?;
    let (address, len) = value.split_once('/')?;
    let address: Ipv4Addr = address.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Some(format!(
        "{}/{len}",
        Ipv4Addr::from(u32::from(address) & mask)
    ))
}

/// The IPv6 subnet named by FLANNEL_IPV6_SUBNET ("fd00:2:0:41::1/64" gives
/// "fd00:2:0:41::/64").
pub fn subnet6_from_file(path: &Path) -> Option<String> {
    let value = subnet_file_value(path, "FLANNEL_IPV6_SUBNET")?;
    let network: ipnetwork::Ipv6Network = value.parse().ok()?;
    Some(format!("{}/{}", network.network(), network.prefix()))
}

/// The value of `name` in the subnet file at `path`.
fn subnet_file_value(path: &Path, name: &str) -> Option<String> {
    let contents = std::fs::read_to_string(path).ok()?;
    contents.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key == name).then(|| value.to_string())
    })
}
