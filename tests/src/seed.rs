//! The seed document's two hosts, each running an agent, with one container on each.
//!
//! ```text
//!   host1 172.20.62.104, lease 10.2.41.0/24: bbox1 10.2.41.2
//!   host2 172.20.62.105, lease 10.2.54.0/24: bbox2 10.2.54.2
//! ```
//! Both subnets come from reservations, as the seed's records do.
use anyhow::{Context, Result, ensure};

use crate::{
    agent::{Agent, READY_TIMEOUT},
    cluster::{Cluster, Host},
    frames::{BBOX2_IP, ETH_P_IPV4, HOST1_VTEP_MAC, bbox1_ping, ethernet, vxlan},
    netns::Netns,
    wait::wait_for,
};

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
    pub address: String,
    pub netns: Netns,
}

impl Container {
    /// Attaches a container with `address` (in the host's /24) to the host's docker0.
    pub fn attach(host: &Host, name: &str, address: &str) -> Result<Self> {
        let netns = Netns::new(name)?;
        let gateway = format!(
            "{}.1",
            address
                .rsplit_once('.')
                .map_or(address, |(network, _)| network)
        );
        host.netns.plug(
            "docker0",
            &format!("veth-{name}"),
            &netns,
            &format!("{address}/24"),
            &gateway,
        )?;
        // As `dockerd --mtu=${FLANNEL_MTU}` sets it: the overlay's MTU.
        host.netns
            .ip(&["link", "set", &format!("veth-{name}"), "mtu", CONTAINER_MTU])?;
        netns.ip(&["link", "set", "eth0", "mtu", CONTAINER_MTU])?;
        Ok(Self {
            address: address.to_string(),
            netns,
        })
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

    /// Starts the seed with `agent_flags` given to both agents.
    pub fn start(tag: &str, agent_flags: &[&str]) -> Result<Self> {
        Self::start_on(Cluster::new(tag)?, agent_flags)
    }

    /// Starts the seed on `cluster`, whose etcd holds the seed's network config.
    pub fn start_on(mut cluster: Cluster, agent_flags: &[&str]) -> Result<Self> {
        let [(host1, agent1), (host2, agent2)] = start_hosts(&mut cluster, agent_flags)?;
        let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
        let bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;
        Ok(Self {
            bbox1,
            bbox2,
            agent1,
            agent2,
            host1,
            host2,
            cluster,
        })
    }
}

/// The seed's two hosts on `cluster`, each with its agent (given `agent_flags`) ready on its
/// reserved subnet and holding the route to the other's: the seed before any container.
pub fn start_hosts(cluster: &mut Cluster, agent_flags: &[&str]) -> Result<[(Host, Agent); 2]> {
    cluster.reserve(SUBNET1, HOST1)?;
    cluster.reserve(SUBNET2, HOST2)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let mut agent1 = Agent::start(cluster, &host1, agent_flags)?;
    let mut agent2 = Agent::start(cluster, &host2, agent_flags)?;
    ensure!(
        agent1.wait_ready()? == SUBNET1,
        "host1 did not get its reservation"
    );
    ensure!(
        agent2.wait_ready()? == SUBNET2,
        "host2 did not get its reservation"
    );
    for (host, remote) in [(&host1, SUBNET2), (&host2, SUBNET1)] {
        wait_for(
            &format!("{}'s route to {remote}", host.name),
            READY_TIMEOUT,
            || host.netns.has_route(remote),
        )?;
    }
    Ok([(host1, agent1), (host2, agent2)])
}
