//! Network namespaces owned by one test: unique names, removed on drop (also when the test
//! fails), and stale ones from crashed runs removed before new ones are made.
use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Output},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, bail, ensure};
use futures::TryStreamExt;
use rtnetlink::{packet_core::Nla, packet_route::link::LinkAttribute};

/// Every namespace the harness makes is named `ovt<pid>-<n>-<tag>`.
const NAME_PREFIX: &str = "ovt";
/// The IPv6 settings of [`Netns::with_ipv6`], for every interface (`all`) and every new one
/// (`default`): the kernel takes the larger of the two for `accept_dad`.
const IPV6_QUIET: [(&str, &str); 4] = [
    ("accept_dad", "0"),
    ("dad_transmits", "0"),
    ("router_solicitations", "0"),
    ("accept_ra", "0"),
];
const NETNS_DIR: &str = "/run/netns";

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with loopback up and IPv6 off, so tests see only the traffic they
    /// send.
    pub fn new(tag: &str) -> Result<Self> {
        let netns = Self::create(tag)?;
        netns.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        Ok(netns)
    }

    /// Creates a namespace with loopback up and IPv6 on, quiet and usable at once: addresses
    /// skip duplicate address detection (no "tentative" wait), and interfaces send no router
    /// solicitations and accept no router advertisements, so captures hold only what the
    /// test sends (and the kernel's own neighbour discovery).
    pub fn with_ipv6(tag: &str) -> Result<Self> {
        let netns = Self::create(tag)?;
        let mut settings = Vec::new();
        for scope in ["all", "default"] {
            for (key, value) in IPV6_QUIET {
                settings.push(format!("net.ipv6.conf.{scope}.{key}={value}"));
            }
        }
        let args: Vec<&str> = ["sysctl", "-qw"]
            .into_iter()
            .chain(settings.iter().map(String::as_str))
            .collect();
        netns.exec(&args)?;
        Ok(netns)
    }

    /// [`Netns::with_ipv6`] if `ipv6`, else [`Netns::new`].
    pub fn with_ipv6_if(tag: &str, ipv6: bool) -> Result<Self> {
        if ipv6 {
            Self::with_ipv6(tag)
        } else {
            Self::new(tag)
        }
    }

    /// An empty namespace with loopback up, named uniquely for this run.
    fn create(tag: &str) -> Result<Self> {
        static STALE_REMOVED: Once = Once::new();
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        STALE_REMOVED.call_once(remove_stale_namespaces);
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}-{sequence}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `args` inside the namespace and fails unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run(&mut self.command(args))
    }

    /// Runs `args` inside the namespace and returns its output whatever its exit status.
    pub fn exec_unchecked(&self, args: &[&str]) -> Result<Output> {
        let mut command = self.command(args);
        command
            .output()
            .with_context(|| format!("cannot run {args:?} in {}", self.name))
    }

    /// A command that runs `args` inside the namespace, for callers that set its environment
    /// or stdin.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    /// Plugs `inner` into `bridge` of this namespace: a veth whose end here is `port` (a
    /// bridge port) and whose end in `inner` is `eth0` with `address` (CIDR) and a default
    /// route via `gateway`.
    /// A veth pair: `name` here, `peer_name` in `peer`; both down.
    pub fn add_veth(&self, name: &str, peer: &Netns, peer_name: &str) -> Result<()> {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer.name(),
        ])?;
        Ok(())
    }

    pub fn plug(
        &self,
        bridge: &str,
        port: &str,
        inner: &Netns,
        address: &str,
        gateway: &str,
    ) -> Result<()> {
        self.add_veth(port, inner, "eth0")?;
        self.ip(&["link", "set", port, "master", bridge, "up"])?;
        inner.ip(&["addr", "add", address, "dev", "eth0"])?;
        inner.ip(&["link", "set", "eth0", "up"])?;
        inner.ip(&["route", "add", "default", "via", gateway])?;
        Ok(())
    }

    /// Gives `device`, already up, a further `address` (CIDR) and a default route via
    /// `gateway`, of either family.
    pub fn add_address_and_default_route(
        &self,
        device: &str,
        address: &str,
        gateway: &str,
    ) -> Result<()> {
        self.ip(&["addr", "add", address, "dev", device])?;
        self.ip(&["route", "add", "default", "via", gateway])?;
        Ok(())
    }

    /// Whether the main table has a route to exactly `destination`.
    pub fn has_route(&self, destination: &str) -> Result<bool> {
        // `ip route show` lists IPv4 unless told the family, whatever the selector says.
        let family = if destination.contains(':') {
            "-6"
        } else {
            "-4"
        };
        Ok(!self
            .ip(&[family, "route", "show", destination])?
            .trim()
            .is_empty())
    }

    /// `ping -c count` to `destination`; returns ping's output, failing unless every reply came.
    pub fn ping(&self, destination: &str, count: u32) -> Result<String> {
        self.ping_with(&[], destination, count)
    }

    /// `ping -6 -c count` to `destination`; returns ping's output (the hop limit of each reply
    /// reads `ttl=`), failing unless every reply came.
    pub fn ping6(&self, destination: &str, count: u32) -> Result<String> {
        self.ping_with(&["-6"], destination, count)
    }

    /// `ping flags... -c count destination`.
    fn ping_with(&self, flags: &[&str], destination: &str, count: u32) -> Result<String> {
        let count = count.to_string();
        let rest = ["-n", "-c", &count, "-i", "0.2", "-W", "2", destination];
        let output = self.exec_unchecked(&[&["ping"], flags, &rest].concat())?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(
            output.status.success(),
            "ping {destination} from {} failed:\n{text}",
            self.name
        );
        Ok(text)
    }

    /// The MAC of interface `name` in this namespace.
    pub fn mac(&self, name: &str) -> Result<[u8; 6]> {
        let text = self.exec(&["cat", &format!("/sys/class/net/{name}/address")])?;
        crate::frames::parse_mac(&text).with_context(|| format!("{name}'s MAC"))
    }

    /// Raises the GSO limits of interface `name` to `size` bytes, for IPv4 too (BIG TCP), as
    /// `ip link set gso_max_size gso_ipv4_max_size` does with an iproute2 newer than Debian
    /// 12's, which lacks the second.
    pub fn set_gso_max_size(&self, name: &str, size: u32) -> Result<()> {
        let index = self.ifindex(name)?;
        self.netlink(|handle| async move {
            let change = rtnetlink::LinkUnspec::new_with_index(index)
                .append_extra_attribute(LinkAttribute::GsoMaxSize(size))
                .append_extra_attribute(LinkAttribute::GsoIpv4MaxSize(size))
                .build();
            handle
                .link()
                .set(change)
                .execute()
                .await
                .with_context(|| format!("cannot raise {name}'s GSO limits"))
        })
    }

    /// The headroom interface `name` asks of packets sent through it (`IFLA_HEADROOM`, which
    /// Debian 12's iproute2 does not print): the room a socket reserves before the Ethernet
    /// header, beyond the header itself.
    pub fn headroom(&self, name: &str) -> Result<u16> {
        const IFLA_HEADROOM: u16 = 68;
        let index = self.ifindex(name)?;
        let link = self.netlink(|handle| async move {
            let mut links = handle.link().get().match_index(index).execute();
            links
                .try_next()
                .await
                .with_context(|| format!("cannot read {name}"))?
                .with_context(|| format!("no link {name}"))
        })?;
        let value = link
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Other(nla) if nla.kind() == IFLA_HEADROOM => {
                    let mut value = vec![0; nla.value_len()];
                    nla.emit_value(&mut value);
                    Some(value)
                }
                _ => None,
            });
        match value.as_deref() {
            Some([low, high, ..]) => Ok(u16::from_ne_bytes([*low, *high])),
            _ => bail!("the kernel reports no headroom for {name}"),
        }
    }

    /// Runs `f` with a netlink handle inside this namespace.
    fn netlink<T: Send, F: std::future::Future<Output = Result<T>>>(
        &self,
        f: impl FnOnce(rtnetlink::Handle) -> F + Send,
    ) -> Result<T> {
        self.run_inside(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (connection, handle, _) = rtnetlink::new_connection()?;
                tokio::spawn(connection);
                f(handle).await
            })
        })
    }

    /// The index of interface `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let link = self.ip(&["-o", "link", "show", "dev", name])?;
        let index = link.split_once(':').map(|(index, _)| index.parse());
        match index {
            Some(Ok(index)) => Ok(index),
            _ => bail!("no ifindex in {link:?}"),
        }
    }

    /// Runs `f` on a thread that has entered this namespace, e.g. to attach a program to one
    /// of its interfaces. The caller's thread stays where it is.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a thread that has entered the namespace `name`.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(name)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread inside {name} panicked"))?
    })
}

/// Moves the calling thread, and only it, into the namespace `name`: for a thread of its own
/// whose sockets must live there.
pub fn enter(name: &str) -> Result<()> {
    let handle = File::open(Path::new(NETNS_DIR).join(name))
        .with_context(|| format!("cannot open namespace {name}"))?;
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "cannot enter namespace {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: cannot remove namespace {}: {error:#}", self.name);
        }
    }
}

/// Removes harness namespaces, the processes a killed run left in them (etcd, agents), and the
/// bpffs pin directories named after them, whose creating process no longer exists.
fn remove_stale_namespaces() {
    for name in stale_names(NETNS_DIR) {
        kill_processes_in(&name);
        let _ = run(Command::new("ip").args(["netns", "del", &name]));
    }
    for name in stale_names(crate::cluster::BPFFS) {
        let _ = fs::remove_dir_all(Path::new(crate::cluster::BPFFS).join(name));
    }
}

/// SIGKILLs every process in namespace `name`.
fn kill_processes_in(name: &str) {
    let Ok(pids) = run(Command::new("ip").args(["netns", "pids", name])) else {
        return;
    };
    let pids: Vec<&str> = pids.split_whitespace().collect();
    if !pids.is_empty() {
        let _ = run(Command::new("kill").arg("-KILL").args(pids));
    }
}

/// Entries of `dir` named by the harness for a process that is gone.
pub(crate) fn stale_names(dir: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| {
            let pid = name
                .strip_prefix(NAME_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .unwrap_or_default();
            pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()
        })
        .collect()
}

/// Runs `command`, failing with its stderr unless it exits 0; returns stdout.
pub fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
