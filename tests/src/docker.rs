//! Real Docker engines on the test hosts: one dockerd per host namespace, started as flannel's
//! documentation starts it, `dockerd --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU --ip-masq=false`
//! from the agent's subnet file, with a data root, exec root, pidfile, socket and daemon.json of
//! its own under the host's scratch directory, and a busybox image made from busybox-static.
//!
//! What Debian's docker.io 20.10 does in a host namespace: it adopts the docker0 the agent made
//! (its address is `--bip`), adds its DOCKER chains to iptables' filter and nat tables, and sets
//! the filter table's FORWARD policy to DROP only when it has to turn ip_forward on itself. The
//! agent has already turned it on, so Docker leaves the policy as it was: tests that want a
//! policy set it themselves.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Once,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;

use crate::{
    agent::Agent,
    cluster::{Cluster, Host},
    netns::{run, stale_names},
    process::Process,
    seed::{BBOX1, BBOX2, Probe, start_hosts, traceroute_args, traceroute_hops},
    wait::wait_for,
};

/// docker.io's client, by path: a newer `docker` in /usr/local/bin may shadow it on PATH.
pub const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
/// busybox-static's binary: the one program in the containers' image.
const BUSYBOX: &str = "/bin/busybox";
/// The image every dockerd imports and every container runs.
pub const IMAGE: &str = "busybox";
/// The busybox applets the containers run, linked to /bin/busybox in the image.
const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "sleep",
    "ip",
    "ping",
    "traceroute",
    "nc",
    "netstat",
];
const STORAGE_DRIVER: &str = "overlay2";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The Docker CLI pointed at one dockerd's socket, with a client configuration of its own.
#[derive(Clone)]
struct DockerCli {
    socket: PathBuf,
    config: PathBuf,
}

impl DockerCli {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(DOCKER);
        command
            .env("DOCKER_CONFIG", &self.config)
            .arg(format!("--host=unix://{}", self.socket.display()))
            .args(args);
        command
    }

    /// Runs `docker args...`, failing with its stderr unless it exits 0; returns stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        run(&mut self.command(args))
    }

    /// Runs `docker args...` and returns its output whatever its exit status.
    fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("cannot run {DOCKER} {args:?}"))
    }
}

/// A dockerd running in a host's namespace; stopped, with its containers and state, on drop.
pub struct Dockerd {
    cli: DockerCli,
    process: Process,
    /// The data root, exec root, pidfile, socket and configuration.
    state: PathBuf,
}

impl Dockerd {
    /// Starts dockerd in `host`'s namespace with `--bip` and `--mtu` from the host's subnet
    /// file, waits until it answers, and imports the busybox image.
    pub fn start(host: &Host) -> Result<Self> {
        static STALE_RELEASED: Once = Once::new();
        STALE_RELEASED.call_once(release_stale_states);
        for binary in [DOCKERD, DOCKER, BUSYBOX] {
            ensure!(
                Path::new(binary).exists(),
                "{binary} does not exist: `cargo xtask setup` installs docker.io and busybox-static"
            );
        }
        let (subnet, mtu) = docker_settings(&host.subnet_file())?;
        let state = host.dir.join("docker");
        fs::create_dir_all(&state).with_context(|| format!("cannot create {}", state.display()))?;
        // Only the daemon.json names where the engine's key goes; without it, /etc/docker.
        let config = state.join("daemon.json");
        let daemon_json = json!({"deprecated-key-path": state.join("key.json")});
        fs::write(&config, daemon_json.to_string())
            .with_context(|| format!("cannot write {}", config.display()))?;
        let cli = DockerCli {
            socket: state.join("docker.sock"),
            config: state.join("cli"),
        };
        let args = vec![
            format!("--bip={subnet}"),
            format!("--mtu={mtu}"),
            "--ip-masq=false".to_string(),
            format!("--config-file={}", config.display()),
            format!("--data-root={}", state.join("data").display()),
            format!("--exec-root={}", state.join("exec").display()),
            format!("--pidfile={}", state.join("docker.pid").display()),
            format!("--host=unix://{}", cli.socket.display()),
            format!("--storage-driver={STORAGE_DRIVER}"),
        ];
        let log = host.dir.join("dockerd.log");
        let process = Process::spawn(host.netns.name(), Path::new(DOCKERD), &args, &[], &log)?;
        let mut dockerd = Self {
            cli,
            process,
            state,
        };
        dockerd.wait_ready()?;
        dockerd.import_busybox()?;
        Ok(dockerd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let (cli, process) = (&self.cli, &mut self.process);
        wait_for("dockerd to answer `docker info`", START_TIMEOUT, || {
            if let Some(status) = process.try_exit_status()? {
                bail!("dockerd exited ({status})");
            }
            Ok(cli.output(&["info"])?.status.success())
        })
        .with_context(|| format!("dockerd log:\n{}", self.process.log()))
    }

    /// Imports [`busybox_image`] as the image [`IMAGE`].
    fn import_busybox(&self) -> Result<()> {
        let archive = busybox_image(&self.state)?;
        let archive = archive.display().to_string();
        self.cli.run(&["import", &archive, IMAGE])?;
        Ok(())
    }

    /// `docker run --detach --name <name> <options> busybox <command>`: a container that is up,
    /// with its address on docker0.
    pub fn run(&self, name: &str, options: &[&str], command: &[&str]) -> Result<DockerContainer> {
        let args = [
            &["run", "--detach", "--name", name],
            options,
            &[IMAGE],
            command,
        ]
        .concat();
        self.cli
            .run(&args)
            .with_context(|| format!("dockerd log:\n{}", self.process.log()))?;
        let format = "--format={{.NetworkSettings.IPAddress}}";
        let address = self.cli.run(&["inspect", format, name])?.trim().to_string();
        ensure!(!address.is_empty(), "container {name} has no address");
        Ok(DockerContainer {
            name: name.to_string(),
            address,
            cli: self.cli.clone(),
        })
    }

    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Removes every container, then stops dockerd: SIGTERM, a wait, then SIGKILL.
    fn stop(&mut self) {
        if let Ok(ids) = self.cli.run(&["ps", "--all", "--quiet"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.cli.run(&[&["rm", "--force"], &ids[..]].concat());
            }
        }
        if self.process.terminate(STOP_TIMEOUT).is_err() {
            self.process.kill();
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        release(&self.state);
    }
}

/// A root file system of busybox-static's binary with links for [`APPLETS`], as a tar archive
/// under `dir` for `docker import`; returns its path.
pub fn busybox_image(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    fs::copy(BUSYBOX, bin.join("busybox")).context("cannot copy busybox into the image")?;
    for applet in APPLETS {
        symlink("busybox", bin.join(applet))
            .with_context(|| format!("cannot link {applet} to busybox"))?;
    }
    let archive = dir.join("busybox.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&archive)
        .arg("."))?;
    Ok(archive)
}

/// A container one of our dockerds runs; it goes when its dockerd does.
pub struct DockerContainer {
    pub name: String,
    /// Its address on docker0.
    pub address: String,
    cli: DockerCli,
}

impl DockerContainer {
    /// `docker exec <name> <command>`; fails unless it exits 0, returns its stdout.
    pub fn exec(&self, command: &[&str]) -> Result<String> {
        self.cli
            .run(&[&["exec", &self.name], command].concat())
            .with_context(|| format!("in container {} ({})", self.name, self.address))
    }

    /// Waits until something in the container listens on TCP `port`.
    pub fn wait_listening(&self, port: u16) -> Result<()> {
        let suffix = format!(":{port}");
        wait_for(
            &format!("container {} to listen on {port}", self.name),
            LISTEN_TIMEOUT,
            || {
                let listening = self.exec(&["netstat", "-ltn"])?;
                Ok(listening.lines().any(|line| {
                    line.split_whitespace()
                        .nth(3)
                        .is_some_and(|local| local.ends_with(&suffix))
                }))
            },
        )
    }
}

impl Probe for DockerContainer {
    /// busybox's ping exits 0 on any reply, so the summary line decides.
    fn ping(&self, destination: &str, count: u32) -> Result<String> {
        let count = count.to_string();
        let ping = ["ping", "-c", &count, "-i", "0.2", "-W", "2", destination];
        let output = self
            .cli
            .output(&[&["exec", &self.name], &ping[..]].concat())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let every_reply = format!("{count} packets transmitted, {count} packets received");
        ensure!(
            text.contains(&every_reply),
            "ping {destination} from container {} ({}) lost replies:\n{text}{}",
            self.name,
            self.address,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(text)
    }

    fn traceroute(&self, destination: &str) -> Result<Vec<String>> {
        Ok(traceroute_hops(&self.exec(&traceroute_args(destination))?))
    }
}

/// The seed with real Docker: the seed's hosts and agents, a dockerd on each host, and bbox1
/// and bbox2 as Docker containers (each the first container on its host, so with the seed's
/// address). Field order is drop order.
pub struct DockerSeed {
    pub bbox1: DockerContainer,
    pub bbox2: DockerContainer,
    pub docker1: Dockerd,
    pub docker2: Dockerd,
    pub agent1: Agent,
    pub agent2: Agent,
    pub host1: Host,
    pub host2: Host,
    pub cluster: Cluster,
    /// docker0's interface index on host1 and host2 once the agents were ready, before
    /// dockerd started: the bridge the agents made.
    pub docker0_made_by_agents: [u32; 2],
}

impl DockerSeed {
    /// Starts the seed's hosts and agents (with `agent_flags`) on `cluster`, then a dockerd on
    /// each from its agent's subnet file, then bbox1 and bbox2.
    pub fn start_on(mut cluster: Cluster, agent_flags: &[&str]) -> Result<Self> {
        let [(host1, agent1), (host2, agent2)] = start_hosts(&mut cluster, agent_flags)?;
        let docker0_made_by_agents = [
            host1.netns.ifindex("docker0")?,
            host2.netns.ifindex("docker0")?,
        ];
        let docker1 = Dockerd::start(&host1)?;
        let docker2 = Dockerd::start(&host2)?;
        let idle = ["sleep", "86400"];
        let bbox1 = docker1.run("bbox1", &[], &idle)?;
        let bbox2 = docker2.run("bbox2", &[], &idle)?;
        ensure!(
            [bbox1.address.as_str(), bbox2.address.as_str()] == [BBOX1, BBOX2],
            "Docker gave bbox1 {} and bbox2 {}, not the seed's addresses",
            bbox1.address,
            bbox2.address
        );
        Ok(Self {
            bbox1,
            bbox2,
            docker1,
            docker2,
            agent1,
            agent2,
            host1,
            host2,
            cluster,
            docker0_made_by_agents,
        })
    }
}

/// `--bip` and `--mtu` for dockerd: FLANNEL_SUBNET and FLANNEL_MTU from the subnet file.
fn docker_settings(subnet_file: &Path) -> Result<(String, String)> {
    let contents = fs::read_to_string(subnet_file)
        .with_context(|| format!("cannot read {}", subnet_file.display()))?;
    let value = |key: &str| {
        contents
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
            .with_context(|| format!("{} has no {key}", subnet_file.display()))
    };
    Ok((value("FLANNEL_SUBNET")?, value("FLANNEL_MTU")?))
}

/// Ends what a dockerd with its state in `dir` left running (its containerd and container
/// shims, which outlive a dockerd that was killed), lazily unmounts everything below `dir`
/// (overlay layers, container namespaces), and removes `dir`.
fn release(dir: &Path) {
    let named = format!("{}/", dir.display());
    for pid in processes_naming(&named) {
        // SAFETY: kill has no memory effects; the pid runs a program with our state on its
        // command line.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for mount in mounts_under(&named) {
        if let Ok(path) = std::ffi::CString::new(mount) {
            // SAFETY: a valid NUL-terminated path; MNT_DETACH only detaches.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = fs::remove_dir_all(dir);
}

/// Processes whose command line contains `text`, other than this one.
fn processes_naming(text: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| u32::try_from(*pid).is_ok_and(|pid| pid != own))
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(text))
        })
        .collect()
}

/// Mount points that start with `prefix`, deepest first.
fn mounts_under(prefix: &str) -> Vec<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|mount| mount.starts_with(prefix))
        .map(str::to_string)
        .collect();
    mounts.sort_by_key(|mount| std::cmp::Reverse(mount.len()));
    mounts
}

/// Releases the dockerd state of test runs whose process is gone: a run that was killed
/// leaves its dockerd, containerd and mounts behind.
fn release_stale_states() {
    let temp = std::env::temp_dir();
    for scratch in stale_names(&temp.display().to_string()) {
        let Ok(hosts) = fs::read_dir(temp.join(scratch)) else {
            continue;
        };
        for host in hosts.filter_map(|entry| entry.ok()) {
            let state = host.path().join("docker");
            if state.is_dir() {
                release(&state);
            }
        }
    }
}
