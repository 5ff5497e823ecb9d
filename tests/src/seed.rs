//! The seed document's two hosts, each running an agent, with one container on each.
//!
//! ```text
//!   host1 172.20.62.104, lease 10.2.41.0/24: bbox1 10.2.41.2
//!   host2 172.20.62.105, lease 10.2.54.0/24: bbox2 10.2.54.2
//! ```
//! Both subnets come from reservations, as the seed's records do.
use anyhow::{Context, Result, ensure};

use crate::{
    agent::Agent,
    cluster::{Cluster, Host},
    frames::{
        BBOX1_IPV6, BBOX2_IP, BBOX2_IPV6, ETH_P_IPV4, ETH_P_IPV6, HOST1_VTEP_MAC, HOST1_VTEP6_MAC,
        bbox1_ping, ethernet, ipv6_ping, vxlan,
    },
    ipv6::{
        BBOX1_V6, BBOX2_V6, DUAL_STACK_NETWORK_CONFIG, IPV6_ONLY_NETWORK_CONFIG, IPV6_SUBNET_LEN,
        SUBNET1_V6, SUBNET2_V6, address_in, bridge_gateway6, subnet6_of,
    },
    netns::Netns,
    process::iperf3_server,
};

/// How long a one-off iperf3 server may take to finish.
const IPERF3_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub const HOST1: &str = "172.20.62.104";
pub const HOST2: &str = "172.20.62.105";
pub const SUBNET1: &str = "10.2.41.0/24";
pub const SUBNET2: &str = "10.2.54.0/24";
pub const BBOX1: &str = "10.2.41.2";
pub const BBOX2: &str = "10.2.54.2";
/// FLANNEL_MTU for a 1500-byte underlay.
const CONTAINER_MTU: &str = "1450";

/// A container: a namespace whose eth0 is a veth into its host's bridge.
pub struct Container {
    /// Its IPv4 address; in an IPv6-only network, its IPv6 address.
    pub address: String,
    /// Its IPv6 address, in a network with IPv6.
    pub address6: Option<String>,
    pub netns: Netns,
}

impl Container {
    /// Attaches a container with `address` (in the host's /24) to the host's docker0.
    pub fn attach(host: &Host, name: &str, address: &str) -> Result<Self> {
        Self::attach_with(host, name, Some(address), None)
    }

    /// Attaches a container with `address` (in the host's /24) and `address6` (in the host's
    /// IPv6 /64) to the host's docker0, with a default route of each family through docker0.
    pub fn attach_dual_stack(
        host: &Host,
        name: &str,
        address: &str,
        address6: &str,
    ) -> Result<Self> {
        Self::attach_with(host, name, Some(address), Some(address6))
    }

    /// Attaches a container with only `address6` (in the host's IPv6 /64) to the host's
    /// docker0.
    pub fn attach_ipv6_only(host: &Host, name: &str, address6: &str) -> Result<Self> {
        Self::attach_with(host, name, None, Some(address6))
    }

    fn attach_with(
        host: &Host,
        name: &str,
        address: Option<&str>,
        address6: Option<&str>,
    ) -> Result<Self> {
        let netns = Netns::with_ipv6_if(name, address6.is_some())?;
        let port = format!("veth-{name}");
        host.netns.add_veth(&port, &netns, "eth0")?;
        // As `dockerd --mtu=${FLANNEL_MTU}` sets it: the overlay's MTU.
        host.netns.ip(&[
            "link",
            "set",
            &port,
            "master",
            "docker0",
            "mtu",
            CONTAINER_MTU,
            "up",
        ])?;
        netns.ip(&["link", "set", "eth0", "mtu", CONTAINER_MTU, "up"])?;
        if let Some(address) = address {
            let gateway = format!(
                "{}.1",
                address
                    .rsplit_once('.')
                    .map_or(address, |(network, _)| network)
            );
            netns.add_address_and_default_route("eth0", &format!("{address}/24"), &gateway)?;
        }
        if let Some(address6) = address6 {
            netns.add_address_and_default_route(
                "eth0",
                &format!("{address6}/{IPV6_SUBNET_LEN}"),
                &bridge_gateway6(&subnet6_of(address6)?)?,
            )?;
        }
        Ok(Self {
            address: address.or(address6).unwrap_or_default().to_string(),
            address6: address6.map(str::to_string),
            netns,
        })
    }

    /// `ping -6 -c count` to `destination`; returns ping's output, failing unless every reply
    /// came.
    pub fn ping6(&self, destination: &str, count: u32) -> Result<String> {
        self.netns
            .ping6(destination, count)
            .with_context(|| format!("from container {}", self.address))
    }

    /// The hops `traceroute -6 -n` reports, one address per hop.
    pub fn traceroute6(&self, destination: &str) -> Result<Vec<String>> {
        let [program, flags @ ..] = traceroute_args(destination);
        let output = self.netns.exec(&[&[program, "-6"], &flags[..]].concat())?;
        Ok(traceroute_hops(&output))
    }

    /// `ping -c count` to `destination`; returns ping's output, failing unless every reply came.
    pub fn ping(&self, destination: &str, count: u32) -> Result<String> {
        self.netns
            .ping(destination, count)
            .with_context(|| format!("from container {}", self.address))
    }

    /// The hops `traceroute -n` reports, one address per hop.
    pub fn traceroute(&self, destination: &str) -> Result<Vec<String>> {
        let output = self.netns.exec(&traceroute_args(destination))?;
        Ok(traceroute_hops(&output))
    }
}

/// `traceroute -n` to `destination`, one probe per hop. iputils' and busybox's traceroute take
/// the same flags and print the same lines.
pub fn traceroute_args(destination: &str) -> [&str; 7] {
    ["traceroute", "-n", "-q", "1", "-w", "2", destination]
}

/// One address per hop, from the output of `traceroute -n -q 1`.
pub fn traceroute_hops(output: &str) -> Vec<String> {
    output
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

/// A container the seed's checks can run from, however it was made.
pub trait Probe {
    /// `ping -c count` to `destination`; returns ping's output, failing unless every reply
    /// came.
    fn ping(&self, destination: &str, count: u32) -> Result<String>;
    /// The hops `traceroute -n` reports, one address per hop.
    fn traceroute(&self, destination: &str) -> Result<Vec<String>>;
}

impl Probe for Container {
    fn ping(&self, destination: &str, count: u32) -> Result<String> {
        Container::ping(self, destination, count)
    }

    fn traceroute(&self, destination: &str) -> Result<Vec<String>> {
        Container::traceroute(self, destination)
    }
}

/// The seed document's walk-through from a container on host1 to `destination` on host2:
/// two pings answered with ttl=62, and traceroute through docker0 on host1 (10.2.41.1) and
/// flannel.1 on host2 (10.2.54.0) to `destination`.
pub fn check_seed_path(from: &impl Probe, destination: &str) -> Result<()> {
    let ping = from.ping(destination, 2)?;
    ensure!(
        ping.matches("ttl=62").count() == 2,
        "not two ttl=62 replies:\n{ping}"
    );
    let hops = from.traceroute(destination)?;
    ensure!(
        hops == ["10.2.41.1", "10.2.54.0", destination],
        "traceroute to {destination} went through {hops:?}"
    );
    Ok(())
}

/// The IPv6 walk-through from `from` to `destination` on another host: two pings answered
/// with hop limit 62 (ping prints it as `ttl=`), and traceroute through `hops` (docker0's
/// IPv6 gateway on the sending host, then flannel-v6.1's address on the receiving one) to
/// `destination`.
pub fn check_ipv6_path(from: &Container, destination: &str, hops: [&str; 2]) -> Result<()> {
    let ping = from.ping6(destination, 2)?;
    ensure!(
        ping.matches("ttl=62").count() == 2,
        "not two replies with hop limit 62:\n{ping}"
    );
    let seen = from.traceroute6(destination)?;
    ensure!(
        seen == [hops[0], hops[1], destination],
        "traceroute -6 to {destination} went through {seen:?}"
    );
    Ok(())
}

/// Field order is drop order: containers and agents go before the hosts and the cluster.
pub struct Seed {
    pub bbox1: Container,
    pub bbox2: Container,
    pub agent1: Agent,
    pub agent2: Agent,
    pub host1: Host,
    pub host2: Host,
    pub cluster: Cluster,
}

impl Seed {
    /// bbox1's ping to bbox2 as host1 would wrap it for host2's flannel.1: the payload of a
    /// forged VXLAN datagram.
    pub fn forged_vxlan_ping(&self) -> Result<Vec<u8>> {
        let inner = ethernet(
            self.host2.netns.mac("flannel.1")?,
            HOST1_VTEP_MAC,
            ETH_P_IPV4,
            &bbox1_ping(BBOX2_IP, 64),
        );
        Ok(vxlan(1, &inner))
    }

    /// bbox1's IPv6 ping to bbox2 as host1 would wrap it for host2's flannel-v6.1: the payload
    /// of a forged datagram of VXLAN over IPv6.
    pub fn forged_vxlan6_ping(&self) -> Result<Vec<u8>> {
        let inner = ethernet(
            self.host2.netns.mac("flannel-v6.1")?,
            HOST1_VTEP6_MAC,
            ETH_P_IPV6,
            &ipv6_ping(BBOX1_IPV6, BBOX2_IPV6, b"overlay!"),
        );
        Ok(vxlan(1, &inner))
    }

    /// Starts the seed with `agent_flags` given to both agents.
    pub fn start(tag: &str, agent_flags: &[&str]) -> Result<Self> {
        Self::start_on(Cluster::new(tag)?, agent_flags)
    }

    /// The seed in flannel's dual-stack network ([`DUAL_STACK_NETWORK_CONFIG`]): each host's
    /// IPv4 and IPv6 subnets reserved together under flannel's dual-stack key, host1's agent
    /// given `agent_flags[0]` and host2's `agent_flags[1]`, and bbox1 and bbox2 with an
    /// address of each family (see [`crate::ipv6`]).
    pub fn start_dual_stack(tag: &str, agent_flags: [&[&str]; 2]) -> Result<Self> {
        Self::start_dual_stack_on(
            Cluster::with_ipv6(tag, DUAL_STACK_NETWORK_CONFIG)?,
            agent_flags,
        )
    }

    /// [`Self::start_dual_stack`] on `cluster` (from [`Cluster::with_ipv6`]), whose etcd holds
    /// a dual-stack config of the seed's networks with a backend of the caller's choosing.
    pub fn start_dual_stack_on(mut cluster: Cluster, agent_flags: [&[&str]; 2]) -> Result<Self> {
        cluster.reserve_dual_stack(SUBNET1, SUBNET1_V6, HOST1)?;
        cluster.reserve_dual_stack(SUBNET2, SUBNET2_V6, HOST2)?;
        let hosts = start_reserved_hosts(&mut cluster, agent_flags)?;
        let [(host1, _), (host2, _)] = &hosts;
        host1.wait_for_route(SUBNET2_V6)?;
        host2.wait_for_route(SUBNET1_V6)?;
        let containers = [
            Container::attach_dual_stack(host1, "bbox1", BBOX1, BBOX1_V6)?,
            Container::attach_dual_stack(host2, "bbox2", BBOX2, BBOX2_V6)?,
        ];
        Ok(Self::assemble(cluster, hosts, containers))
    }

    /// The seed's hosts in an IPv6-only network ([`IPV6_ONLY_NETWORK_CONFIG`]), both agents
    /// given `agent_flags`; each takes a /64 of its own choosing, and bbox1 and bbox2 get the
    /// second address of their host's (`<subnet>::2`), IPv6 alone.
    pub fn start_ipv6_only(tag: &str, agent_flags: &[&str]) -> Result<Self> {
        let mut cluster = Cluster::with_ipv6(tag, IPV6_ONLY_NETWORK_CONFIG)?;
        let host1 = cluster.add_host("host1", HOST1)?;
        let host2 = cluster.add_host("host2", HOST2)?;
        let mut agent1 = Agent::start(&cluster, &host1, agent_flags)?;
        let mut agent2 = Agent::start(&cluster, &host2, agent_flags)?;
        let subnet1 = agent1.wait_ready_ipv6()?;
        let subnet2 = agent2.wait_ready_ipv6()?;
        host1.wait_for_route(&subnet2)?;
        host2.wait_for_route(&subnet1)?;
        let containers = [
            Container::attach_ipv6_only(&host1, "bbox1", &address_in(&subnet1, 2)?)?,
            Container::attach_ipv6_only(&host2, "bbox2", &address_in(&subnet2, 2)?)?,
        ];
        Ok(Self::assemble(
            cluster,
            [(host1, agent1), (host2, agent2)],
            containers,
        ))
    }

    /// Starts the seed on `cluster`, whose etcd holds the seed's network config.
    pub fn start_on(mut cluster: Cluster, agent_flags: &[&str]) -> Result<Self> {
        let hosts = start_hosts(&mut cluster, agent_flags)?;
        let containers = [
            Container::attach(&hosts[0].0, "bbox1", BBOX1)?,
            Container::attach(&hosts[1].0, "bbox2", BBOX2)?,
        ];
        Ok(Self::assemble(cluster, hosts, containers))
    }

    /// The seed from its parts: host1 and host2 with their agents, bbox1 and bbox2.
    fn assemble(cluster: Cluster, hosts: [(Host, Agent); 2], containers: [Container; 2]) -> Self {
        let [(host1, agent1), (host2, agent2)] = hosts;
        let [bbox1, bbox2] = containers;
        Self {
            bbox1,
            bbox2,
            agent1,
            agent2,
            host1,
            host2,
            cluster,
        }
    }
}

/// The seed's two hosts on `cluster`, each with its agent (given `agent_flags`) ready on its
/// reserved subnet and holding the route to the other's: the seed before any container.
pub fn start_hosts(cluster: &mut Cluster, agent_flags: &[&str]) -> Result<[(Host, Agent); 2]> {
    cluster.reserve(SUBNET1, HOST1)?;
    cluster.reserve(SUBNET2, HOST2)?;
    start_reserved_hosts(cluster, [agent_flags, agent_flags])
}

/// host1 and host2 on `cluster`, whose etcd reserves them SUBNET1 and SUBNET2, each with its
/// agent (host1's given `agent_flags[0]`, host2's `agent_flags[1]`) ready on its reservation
/// and holding the route to the other's.
pub fn start_reserved_hosts(
    cluster: &mut Cluster,
    agent_flags: [&[&str]; 2],
) -> Result<[(Host, Agent); 2]> {
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let mut agent1 = Agent::start(cluster, &host1, agent_flags[0])?;
    let mut agent2 = Agent::start(cluster, &host2, agent_flags[1])?;
    ensure!(
        agent1.wait_ready()? == SUBNET1,
        "host1 did not get its reservation"
    );
    ensure!(
        agent2.wait_ready()? == SUBNET2,
        "host2 did not get its reservation"
    );
    host1.wait_for_route(SUBNET2)?;
    host2.wait_for_route(SUBNET1)?;
    Ok([(host1, agent1), (host2, agent2)])
}

/// `iperf3 -c destination -p port` for a second from `client`, against a one-off server in
/// `server`'s namespace.
pub fn iperf3_through(
    seed: &Seed,
    client: &Container,
    server: &Container,
    destination: &str,
    port: &str,
) -> Result<()> {
    let log = seed
        .cluster
        .scratch
        .path()
        .join(format!("iperf-{}-{destination}-{port}.log", server.address));
    let mut process = iperf3_server(&server.netns, &log, true)?;
    client
        .netns
        .exec(&[
            "iperf3",
            "-c",
            destination,
            "-p",
            port,
            "-t",
            "1",
            "--connect-timeout",
            "5000",
        ])
        .with_context(|| format!("iperf3 to {destination}:{port}"))?;
    ensure!(
        process.wait_exit(IPERF3_TIMEOUT)?.success(),
        "{}",
        process.log()
    );
    Ok(())
}
