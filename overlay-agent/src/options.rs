//! Command-line flags, named and defaulted as flanneld's. Each flag can also come from
//! `FLANNELD_<FLAG>` (dashes as underscores), so an existing flanneld env file works, and
//! flanneld's Go flag syntax is read as well as clap's: `-flag`, `-flag=value`,
//! `--flag value`, `-bool=false`. flanneld's Kubernetes flags are refused by name.
use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{
    ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum,
    builder::BoolishValueParser,
    error::{ContextKind, ContextValue, ErrorKind},
};

use anyhow::Result;

use crate::{
    dataplane::{self, pins},
    model,
    subnet::etcd::EtcdOptions,
};

#[derive(Parser, Debug)]
#[command(
    name = "overlay-agent",
    version,
    about = "flannel-compatible VXLAN overlay with an eBPF dataplane"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub agent: AgentOptions,
}

/// flanneld flags overlay-agent refuses, each with the reason its refusal gives.
const REFUSED: &[(&str, &str)] = &[
    ("kube-subnet-mgr", KUBERNETES),
    ("kube-api-url", KUBERNETES),
    ("kube-annotation-prefix", KUBERNETES),
    ("kubeconfig-file", KUBERNETES),
    ("net-config-path", KUBERNETES),
    ("set-node-network-unavailable", KUBERNETES),
    ("vmodule", "set per-module log levels with RUST_LOG"),
    ("log_backtrace_at", "overlay-agent logs no backtraces"),
];
const KUBERNETES: &str =
    "overlay-agent runs in flanneld's etcd mode only, not with the Kubernetes subnet manager";
/// Flags that take no value.
const VALUELESS: &[&str] = &["help", "h", "version", "V", "release-lease"];
/// Boolean flags, which Go's syntax writes as `-flag` or `-flag=false`.
const BOOLEAN: &[&str] = &[
    "ip-masq",
    "ip-masq-fully-random-disable",
    "iptables-forward-rules",
    "ip-blackhole-route",
    "fast-path",
    "container-vlans",
    "accept-nat-peers",
    "bpf-log",
];

impl Cli {
    /// Parses a command line in flanneld's syntax or clap's; unknown flags are refused in
    /// flanneld's words, flanneld's Kubernetes flags (on the command line or in `FLANNELD_*`)
    /// by name and reason.
    pub fn parse_flanneld_style(
        args: impl IntoIterator<Item = OsString>,
    ) -> Result<Self, clap::Error> {
        let args = go_style(args.into_iter().collect());
        refuse_unsupported(&args, |name| std::env::var(name).ok())?;
        Self::try_parse_from(args).map_err(in_flanneld_words)
    }
}

/// Rewrites Go's flag syntax into clap's: a single dash before a long name becomes two, a
/// boolean flag without a value gets `=true`, and a flag's value in the next argument is joined
/// to it with `=`, so that a value starting with a dash stays a value, as in Go. Everything
/// after `--` is left alone.
fn go_style(args: Vec<OsString>) -> Vec<OsString> {
    let mut rewritten = Vec::with_capacity(args.len());
    let mut args = args.into_iter();
    rewritten.extend(args.next());
    // The flag, dashes and all, whose value is the next argument.
    let mut awaiting_value: Option<String> = None;
    for arg in args.by_ref() {
        if let Some(flag) = awaiting_value.take() {
            let mut joined = OsString::from(format!("{flag}="));
            joined.push(&arg);
            rewritten.push(joined);
            continue;
        }
        let Some(text) = arg.to_str() else {
            rewritten.push(arg);
            continue;
        };
        if text == "--" {
            rewritten.push(arg);
            break;
        }
        let Some(flag) = text.strip_prefix("--").or_else(|| text.strip_prefix('-')) else {
            rewritten.push(arg);
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        // A short flag such as -v keeps its single dash.
        let dashes = if name.len() == 1 { "-" } else { "--" };
        let rewritten_flag = match value {
            Some(value) => format!("{dashes}{name}={value}"),
            None if BOOLEAN.contains(&name) => format!("--{name}=true"),
            None if name.is_empty() => text.to_string(),
            None if VALUELESS.contains(&name) => format!("{dashes}{name}"),
            None => {
                awaiting_value = Some(format!("{dashes}{name}"));
                continue;
            }
        };
        rewritten.push(rewritten_flag.into());
    }
    // A flag left without its value: clap names the problem.
    rewritten.extend(awaiting_value.map(OsString::from));
    rewritten.extend(args);
    rewritten
}

/// Refuses flanneld's flags that overlay-agent does not implement, from the command line or
/// from their `FLANNELD_*` variables (`env` looks one up).
fn refuse_unsupported(
    args: &[OsString],
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), clap::Error> {
    let on_command_line = |name: &str| {
        args.iter().any(|arg| {
            arg.to_str()
                .and_then(|text| text.strip_prefix("--"))
                .is_some_and(|flag| flag.split('=').next() == Some(name))
        })
    };
    for (name, reason) in REFUSED {
        let variable = format!("FLANNELD_{}", name.to_uppercase().replace('-', "_"));
        let from_env = env(&variable).filter(|value| !matches!(value.as_str(), "" | "false" | "0"));
        let source = if on_command_line(name) {
            format!("flag -{name}")
        } else if from_env.is_some() {
            format!("{variable} (flag -{name})")
        } else {
            continue;
        };
        return Err(Cli::command().error(
            ErrorKind::ArgumentConflict,
            format!("{source} is not supported: {reason}"),
        ));
    }
    Ok(())
}

/// An unknown flag, reported as flanneld's Go flag package reports it.
fn in_flanneld_words(error: clap::Error) -> clap::Error {
    if error.kind() != ErrorKind::UnknownArgument {
        return error;
    }
    let Some(ContextValue::String(flag)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let name = flag
        .trim_start_matches('-')
        .split('=')
        .next()
        .unwrap_or_default();
    Cli::command().error(
        ErrorKind::UnknownArgument,
        format!("flag provided but not defined: -{name}"),
    )
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print this host's lease, every remote lease with its map entry, the attached programs
    /// and the dataplane counters.
    Status {
        #[command(flatten)]
        agent: AgentOptions,
    },
    /// Print one line per packet the programs drop, with the reason, the interface and the
    /// outer and inner addresses and ports, until Ctrl-C. Drops are reported only while a
    /// monitor runs. With --trace, one line per packet to or from an address or subnet
    /// instead, with the path it took. One monitor at a time.
    Monitor {
        /// Trace every packet to or from this address or subnet (IPv4 or IPv6, outer or inner
        /// addresses), whatever its outcome, instead of reporting drops.
        #[arg(long, value_name = "ADDRESS|SUBNET")]
        trace: Option<ipnetwork::IpNetwork>,
        #[command(flatten)]
        agent: AgentOptions,
    },
    /// Remove everything the agent created on this host: devices, routes, neighbour and FDB
    /// entries, the forward and masquerade rules. The etcd lease stays unless --release-lease
    /// is given.
    Teardown {
        /// Also delete this host's subnet record from etcd.
        #[arg(long)]
        release_lease: bool,
        #[command(flatten)]
        agent: AgentOptions,
    },
}

/// Who carries packets between hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dataplane {
    /// Our eBPF programs: encapsulation at the containers' veths (and on flannel.1 for
    /// routed traffic), decapsulation on the uplink.
    Ebpf,
    /// The kernel's vxlan device, configured exactly as stock flannel configures it.
    Kernel,
}

/// Where the uplink decapsulates, as `--decap-hook` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecapHook {
    /// tc ingress: keeps GSO superpackets whole and delivers straight into containers.
    Tc,
    /// XDP in front of tc: drops what fails a check before the stack allocates anything.
    Xdp,
}

impl From<DecapHook> for model::DecapHook {
    fn from(hook: DecapHook) -> Self {
        match hook {
            DecapHook::Tc => Self::Tc,
            DecapHook::Xdp => Self::Xdp,
        }
    }
}

/// How the uplink's XDP program attaches, as `--xdp-mode` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeChoice {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

impl From<XdpModeChoice> for model::XdpModeChoice {
    fn from(mode: XdpModeChoice) -> Self {
        match mode {
            XdpModeChoice::Auto => Self::Auto,
            XdpModeChoice::Native => Self::Native,
            XdpModeChoice::Generic => Self::Generic,
        }
    }
}

/// How the tc programs attach, as `--tc-attach` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TcAttach {
    /// tcx where the kernel has it (6.6 and later), netlink filters before.
    Auto,
    /// tcx links, pinned.
    Tcx,
    /// netlink filters in the clsact qdisc; adding the qdisc to a live container port drops
    /// the packet it is handing its container at that instant.
    Netlink,
}

impl From<TcAttach> for dataplane::TcAttach {
    fn from(choice: TcAttach) -> Self {
        match choice {
            TcAttach::Auto => Self::Auto,
            TcAttach::Tcx => Self::Tcx,
            TcAttach::Netlink => Self::Netlink,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct AgentOptions {
    /// etcd endpoints, comma separated.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix under which the config and the subnet records live.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// TLS key file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,

    /// TLS certificate file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,

    /// TLS CA file for etcd.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,

    /// etcd user name.
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password.
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// Interface (name or IP address) for inter-host traffic; repeatable, first match wins.
    /// Without it, --iface-regex or --iface-can-reach: the interface holding --public-ip, else
    /// the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,

    /// Regex matched against interface IPs, then names, after every --iface; repeatable,
    /// first match wins. Taken whole: a comma is part of the regex.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,

    /// Use the interface, and its source address, of the route to this IPv4 or IPv6 address
    /// (`ip route get`), after every --iface and --iface-regex.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,

    /// IP other hosts reach this one at (defaults to the interface's address). Where the
    /// interface holds it, it is also the tunnel's source, as in flanneld since v0.27.4.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address other hosts reach this one at, when the network config enables IPv6
    /// (defaults to the interface's first global, else link-local, IPv6 address).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// Where to write the subnet environment for docker and the CNI plugin.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Minutes before the lease expires at which it is renewed.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(1..=1439)
    )]
    pub subnet_lease_renew_margin: u32,

    /// Lifetime of the subnet lease, e.g. 24h, 30m or 5s (short values are for tests).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,

    /// Masquerade traffic leaving the overlay network.
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub ip_masq: bool,

    /// Disable fully-random port mapping for MASQUERADE.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub ip_masq_fully_random_disable: bool,

    /// Add forward-accept rules for the overlay network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value_t = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub iptables_forward_rules: bool,

    /// Add a blackhole route for our own subnet, so that traffic to its unused addresses is
    /// dropped here instead of following the default route.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub ip_blackhole_route: bool,

    /// How often the forward and masquerade rules are checked and restored, in seconds.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub iptables_resync: u64,

    /// Address the health endpoints listen on, IPv4 or IPv6 (`::` for every address).
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// Port of /healthz and /readyz; 0 disables them.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// How long the lease renewal, the lease watch or the reconciler may keep failing before
    /// /healthz answers 503, e.g. 30s (ours).
    #[arg(long, env = "FLANNELD_HEALTHZ_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub healthz_grace: Duration,

    /// Name of the container bridge, which carries the first address of the lease.
    #[arg(long, env = "FLANNELD_BRIDGE", default_value = "docker0")]
    pub bridge: String,

    /// Who carries packets between hosts.
    #[arg(long, env = "FLANNELD_DATAPLANE", value_enum, default_value = "ebpf")]
    pub dataplane: Dataplane,

    /// bpffs directory where the eBPF maps and links are pinned, so forwarding survives the
    /// agent. One agent at a time may use it. [default: /sys/fs/bpf/overlay in the host's
    /// network namespace, /sys/fs/bpf/overlay-netns-<inode> in any other]
    #[arg(long, env = "FLANNELD_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,

    /// How the tc programs attach: tcx links on the host's devices on kernels from 6.6, netlink
    /// filters before and on the container ports (auto), or one of them everywhere whatever
    /// the kernel.
    #[arg(long, env = "FLANNELD_TC_ATTACH", value_enum, default_value = "auto")]
    pub tc_attach: TcAttach,

    /// In ebpf mode, carry container traffic past docker0, routing and flannel.1 (and so past
    /// netfilter's FORWARD hook). Off, every packet is routed by the stack, as in flannel.
    #[arg(long, env = "FLANNELD_FAST_PATH", default_value_t = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub fast_path: bool,

    /// In ebpf mode, let VLAN-tagged frames from containers through unchecked, for containers
    /// that carry VLANs over docker0. Off (the default), they are dropped and counted
    /// (`tx_vlan`): a container's claims are checked only on untagged frames.
    #[arg(long, env = "FLANNELD_CONTAINER_VLANS", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub container_vlans: bool,

    /// In ebpf mode, accept VXLAN from a peer whose outer source is not its PublicIP (a host
    /// behind NAT) when the inner Ethernet source is the VtepMAC of the lease holding the
    /// inner IPv4 source, as flannel accepts it. Off (the default), the outer source must be
    /// a lease's PublicIP: a VtepMAC is public in etcd, so with it on anyone who can reach the
    /// VXLAN port and read etcd can send as any lease.
    #[arg(long, env = "FLANNELD_ACCEPT_NAT_PEERS", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub accept_nat_peers: bool,

    /// Where the uplink decapsulates in ebpf mode: tc keeps GSO superpackets whole and puts
    /// packets straight into containers; xdp acts before the stack allocates anything, but on
    /// a veth uplink it costs the peer its GSO.
    #[arg(long, env = "FLANNELD_DECAP_HOOK", value_enum, default_value = "tc")]
    pub decap_hook: DecapHook,

    /// How the XDP program attaches to the uplink, with --decap-hook xdp.
    #[arg(long, env = "FLANNELD_XDP_MODE", value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeChoice,

    /// Log every packet's outcome from the eBPF programs (aya-log, target `overlay_ebpf`), e.g.
    /// "rx_unknown_vtep on ifindex 2 (92 bytes)". For debugging only: off, the kernel removes the
    /// logging code when it loads the programs.
    #[arg(long, env = "FLANNELD_BPF_LOG", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub bpf_log: bool,

    /// Log verbosity: 0 info, 1 debug, 2 and up trace.
    #[arg(short = 'v', env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,
}

impl AgentOptions {
    pub fn etcd(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            keyfile: self.etcd_keyfile.clone(),
            certfile: self.etcd_certfile.clone(),
            cafile: self.etcd_cafile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        }
    }

    /// The pin directory: `--bpf-pin-dir`, or the default for this network namespace.
    pub fn pin_dir(&self) -> Result<PathBuf> {
        match &self.bpf_pin_dir {
            Some(dir) => Ok(dir.clone()),
            None => pins::default_dir(),
        }
    }

    pub fn renew_margin(&self) -> Duration {
        Duration::from_secs(u64::from(self.subnet_lease_renew_margin) * 60)
    }
}

/// A duration such as "24h", "30m", "5s" or "1500ms"; a bare number means seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 24h, 30m or 5s"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?}: use ms, s, m or h"
            ));
        }
    };
    if duration < Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is shorter than etcd's smallest lease, one second"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_flanneld_s() {
        let cli = Cli::try_parse_from(["overlay-agent"]).unwrap();
        let agent = cli.agent;
        assert_eq!(
            agent.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(agent.etcd_prefix, "/coreos.com/network");
        assert_eq!(agent.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(agent.subnet_lease_renew_margin, 60);
        assert_eq!(agent.subnet_lease_ttl, Duration::from_secs(86400));
        assert!(!agent.ip_masq);
        assert!(agent.iptables_forward_rules);
        assert!(!agent.ip_masq_fully_random_disable);
        assert_eq!(agent.iptables_resync, 5);
        assert_eq!(agent.healthz_port, 0);
        assert_eq!(agent.bridge, "docker0");
        assert_eq!(agent.dataplane, Dataplane::Ebpf);
        assert_eq!(agent.bpf_pin_dir, None);
        assert_eq!(agent.tc_attach, TcAttach::Auto);
        assert_eq!(agent.xdp_mode, XdpModeChoice::Auto);
        assert_eq!(agent.decap_hook, DecapHook::Tc);
        assert!(!agent.bpf_log);
        assert!(agent.fast_path);
    }

    #[test]
    fn teardown_takes_the_agent_flags_after_it() {
        let cli = Cli::try_parse_from([
            "overlay-agent",
            "teardown",
            "--release-lease",
            "--bridge=cbr0",
        ])
        .unwrap();
        let Some(Command::Teardown {
            release_lease,
            agent,
        }) = cli.command
        else {
            panic!("teardown was not parsed");
        };
        assert!(release_lease);
        assert_eq!(agent.bridge, "cbr0");
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let args = std::iter::once("overlay-agent").chain(args.iter().copied());
        Cli::parse_flanneld_style(args.map(OsString::from))
    }

    #[test]
    fn go_flag_syntax_reads_as_flanneld_s() {
        let cli = parse(&[
            "-etcd-endpoints=http://172.20.62.1:2379",
            "-etcd-prefix",
            "/docker-test/network",
            "-ip-masq",
            "--iptables-forward-rules=false",
            "-ip-blackhole-route=true",
            "-iface",
            "eth1",
            "--iface-regex=eth[0-9],br.*",
            "-iface-can-reach=172.20.62.1",
            "-etcd-password",
            "-starts-with-a-dash",
            "-v=2",
        ])
        .unwrap();
        assert!(parse(&["-version"]).is_err_and(|shown| shown.kind() == ErrorKind::DisplayVersion));
        let agent = cli.agent;
        assert_eq!(agent.etcd_endpoints, ["http://172.20.62.1:2379"]);
        assert_eq!(agent.etcd_prefix, "/docker-test/network");
        assert!(agent.ip_masq);
        assert!(!agent.iptables_forward_rules);
        assert!(agent.ip_blackhole_route);
        assert_eq!(agent.iface, ["eth1"]);
        assert_eq!(agent.iface_regex, ["eth[0-9],br.*"], "taken whole");
        assert_eq!(
            agent.iface_can_reach,
            Some(IpAddr::V4(Ipv4Addr::new(172, 20, 62, 1)))
        );
        assert_eq!(agent.etcd_password.as_deref(), Some("-starts-with-a-dash"));
        assert_eq!(agent.verbosity, 2);
    }

    #[test]
    fn every_boolean_flag_takes_go_s_forms() {
        for flag in BOOLEAN {
            for form in [
                format!("-{flag}"),
                format!("--{flag}"),
                format!("-{flag}=false"),
                format!("--{flag}=1"),
            ] {
                parse(&[&form]).unwrap_or_else(|error| panic!("{form}: {error}"));
            }
        }
        assert!(!parse(&["-ip-masq=false"]).unwrap().agent.ip_masq);
    }

    #[test]
    fn unknown_and_unsupported_flags_are_refused_by_name() {
        for (args, complaint) in [
            (
                &["-no-such-flag"][..],
                "flag provided but not defined: -no-such-flag",
            ),
            (
                &["--no-such-flag=3"][..],
                "flag provided but not defined: -no-such-flag",
            ),
            (
                &["-kube-subnet-mgr"][..],
                "flag -kube-subnet-mgr is not supported",
            ),
            (
                &["--public-ipv6=10.2.0.1"][..],
                "invalid value '10.2.0.1' for '--public-ipv6",
            ),
        ] {
            let error = parse(args).unwrap_err().to_string();
            assert!(error.contains(complaint), "{args:?}: {error}");
        }
        let from_env =
            |name: &str| (name == "FLANNELD_KUBE_SUBNET_MGR").then(|| "true".to_string());
        let error = refuse_unsupported(&[], from_env).unwrap_err().to_string();
        assert!(
            error.contains("FLANNELD_KUBE_SUBNET_MGR (flag -kube-subnet-mgr) is not supported"),
            "{error}"
        );
        let disabled =
            |name: &str| (name == "FLANNELD_KUBE_SUBNET_MGR").then(|| "false".to_string());
        assert!(refuse_unsupported(&[], disabled).is_ok());
    }

    #[test]
    fn flags_parse_and_bad_ones_are_named() {
        let cli = parse(&[
            "--etcd-endpoints=http://172.20.62.1:2379",
            "--iface=eth1",
            "--iface=172.20.62.104",
            "--subnet-lease-ttl=5s",
            "--ip-masq",
            "--iptables-forward-rules=false",
            "-v",
            "2",
        ])
        .unwrap();
        assert_eq!(cli.agent.iface, ["eth1", "172.20.62.104"]);
        assert_eq!(cli.agent.subnet_lease_ttl, Duration::from_secs(5));
        assert!(cli.agent.ip_masq);
        assert!(!cli.agent.iptables_forward_rules);
        assert_eq!(cli.agent.verbosity, 2);

        for (flag, complaint) in [
            (
                "--subnet-lease-renew-margin=0",
                "--subnet-lease-renew-margin",
            ),
            (
                "--subnet-lease-renew-margin=1440",
                "--subnet-lease-renew-margin",
            ),
            ("--subnet-lease-ttl=5y", "unknown unit"),
            ("--public-ip=172.20.62", "--public-ip"),
            ("--no-such-flag", "--no-such-flag"),
        ] {
            let error = Cli::try_parse_from(["overlay-agent", flag])
                .unwrap_err()
                .to_string();
            assert!(error.contains(complaint), "{flag}: {error}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("500ms").is_err());
        assert!(parse_duration("h").is_err());
    }
}
