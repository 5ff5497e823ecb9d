//! The uplink XDP program attached to a real interface, seeing real traffic: host1 sends
//! through kernel VXLAN devices (flannel's own wire format) and plain sockets, and host2's
//! counters must account for every frame. host2 knows no peer, so its program must refuse
//! host1's VXLAN while the rest passes.
use anyhow::Result;
use overlay_agent::dataplane::XdpModeChoice;
use overlay_common::Counter;
use overlay_tests::{
    dataplane::{HOST2, dataplane_of},
    netns::Netns,
    require_root,
};

/// Two hosts joined by a veth pair, with the seed's underlay addresses.
struct TwoHosts {
    host1: Netns,
    host2: Netns,
}

impl TwoHosts {
    fn new() -> Result<Self> {
        let hosts = Self {
            host1: Netns::new("host1")?,
            host2: Netns::new("host2")?,
        };
        hosts.host1.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            hosts.host2.name(),
        ])?;
        for (host, address) in [
            (&hosts.host1, "172.20.62.104/24"),
            (&hosts.host2, "172.20.62.105/24"),
        ] {
            host.ip(&["addr", "add", address, "dev", "eth0"])?;
            host.ip(&["link", "set", "eth0", "up"])?;
        }
        Ok(hosts)
    }

    /// A flannel-style VXLAN device on host1 whose `remote_subnet` lies behind host2.
    fn add_vxlan_route(&self, vni: &str, remote_subnet: &str, remote_gateway: &str) -> Result<()> {
        let host1 = &self.host1;
        let device = format!("vx{vni}");
        let vtep_mac = "1a:4b:d7:f7:16:89";
        host1.ip(&[
            "link",
            "add",
            &device,
            "type",
            "vxlan",
            "id",
            vni,
            "local",
            "172.20.62.104",
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ])?;
        host1.ip(&["link", "set", &device, "up"])?;
        host1.ip(&[
            "neigh",
            "add",
            remote_gateway,
            "lladdr",
            vtep_mac,
            "dev",
            &device,
            "nud",
            "permanent",
        ])?;
        host1.exec(&[
            "bridge",
            "fdb",
            "append",
            vtep_mac,
            "dev",
            &device,
            "dst",
            "172.20.62.105",
        ])?;
        host1.ip(&[
            "route",
            "add",
            remote_subnet,
            "via",
            remote_gateway,
            "dev",
            &device,
            "onlink",
        ])?;
        Ok(())
    }

    /// Sends `count` pings from host1 to `destination`; replies do not matter here.
    fn ping(&self, destination: &str, count: u32) -> Result<()> {
        self.host1.exec_unchecked(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            destination,
        ])?;
        Ok(())
    }
}

#[test]
fn real_traffic_is_classified_on_the_uplink() -> Result<()> {
    require_root()?;
    let hosts = TwoHosts::new()?;
    hosts.add_vxlan_route("1", "10.2.54.0/24", "10.2.54.0")?;
    hosts.add_vxlan_route("7", "10.7.54.0/24", "10.7.54.0")?;

    // host2 knows no peer: VXLAN for our VNI from host1 is an unknown VTEP's.
    let mut dataplane = dataplane_of(&HOST2, &[])?;
    let ifindex: u32 = hosts
        .host2
        .exec(&["cat", "/sys/class/net/eth0/ifindex"])?
        .trim()
        .parse()?;
    hosts
        .host2
        .run_inside(|| dataplane.ensure_uplink_attached("eth0", ifindex, XdpModeChoice::Auto))?;

    hosts.ping("172.20.62.105", 2)?;
    hosts.ping("10.2.54.2", 3)?;
    hosts.ping("10.7.54.2", 4)?;
    hosts
        .host1
        .exec(&["bash", "-c", "echo overlay > /dev/udp/172.20.62.105/9999"])?;

    let counters = dataplane.counters()?;
    assert!(
        counters.get(Counter::RxNotIpv4) >= 1,
        "host1's ARP for host2 crossed the uplink: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxNotUdp),
        2,
        "direct pings: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxUnknownVtep),
        3,
        "pings through VNI 1, from a host with no lease: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxVxlanForeignVni),
        4,
        "pings through VNI 7: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxOtherPort),
        1,
        "one UDP datagram to port 9999: {counters:?}"
    );
    assert_eq!(counters.get(Counter::RxMalformed), 0, "{counters:?}");
    assert_eq!(counters.get(Counter::RxIpv4Fragment), 0, "{counters:?}");

    let replies =
        hosts
            .host1
            .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", "172.20.62.105"])?;
    assert!(
        replies.status.success(),
        "XDP_PASS must leave host2 reachable"
    );
    Ok(())
}
