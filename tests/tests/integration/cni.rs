//! A CNI host: pods attached by Debian's containernetworking-plugins, configured from the
//! subnet file as flannel's CNI plugin configures them, on the overlay with `--bridge cni0`.
use std::time::Duration;

use anyhow::Result;
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::Counter;
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host},
    cni::{CNI_BRIDGE, Pod},
    process::iperf3_server,
    seed::{HOST1, HOST2, SUBNET1, SUBNET2},
};
use serde_json::json;

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// `ping -c count` from `from` to `to`; fails unless every reply came, returns the output.
fn ping(from: &Pod, to: &Pod, count: u32) -> Result<String> {
    from.netns.ping(&to.address, count)
}

/// The bridge's IPv4 addresses, as `ip` prints them.
fn bridge_addresses(host: &Host) -> Result<Vec<String>> {
    let listing = host
        .netns
        .ip(&["-4", "-o", "addr", "show", "dev", CNI_BRIDGE])?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3).map(str::to_string))
        .collect())
}

#[test]
fn pods_attached_by_the_cni_plugins_get_the_overlay_the_fast_path_and_port_maps() -> Result<()> {
    let mut cluster = Cluster::new("cni")?;
    cluster.reserve(SUBNET1, HOST1)?;
    cluster.reserve(SUBNET2, HOST2)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    // As kube-flannel runs flanneld: with --ip-masq, so the bridge plugin masquerades nothing.
    let bridge = format!("--bridge={CNI_BRIDGE}");
    let mut agents = Vec::new();
    let mut made_by_agents = Vec::new();
    for host in [&host1, &host2] {
        let mut agent = Agent::start(&cluster, host, &[&bridge, "--ip-masq"])?;
        agent.wait_ready()?;
        agents.push(agent);
        made_by_agents.push(host.netns.ifindex(CNI_BRIDGE)?);
    }
    let web = json!([{"hostPort": 8080, "containerPort": 5201, "protocol": "tcp"}]);
    let pod1a = Pod::attach(&host1, "pod1a", json!([]))?;
    let pod1b = Pod::attach(&host1, "pod1b", json!([]))?;
    let pod2a = Pod::attach(&host2, "pod2a", web)?;
    let pod2b = Pod::attach(&host2, "pod2b", json!([]))?;

    for (from, to) in [(&pod1a, &pod2a), (&pod1b, &pod2b), (&pod2b, &pod1a)] {
        let replies = ping(from, to, 3)?;
        assert_eq!(replies.matches("ttl=62").count(), 3, "{replies}");
    }
    let local = ping(&pod1a, &pod1b, 2)?;
    assert_eq!(local.matches("ttl=64").count(), 2, "{local}");
    // Once learned, pods are served by the programs, not by cni0 and the routing table.
    let before = PinnedDataplane::open(&host1.pin_dir())?.counters()?;
    ping(&pod1a, &pod2a, 3)?;
    let after = PinnedDataplane::open(&host1.pin_dir())?.counters()?;
    assert!(
        after.get(Counter::TxDirect) >= before.get(Counter::TxDirect) + 3,
        "the fast path carried the pings"
    );

    // portmap's DNAT on host2 reaches pod2a from a host outside the overlay.
    let outside = cluster.add_host("outside", "172.20.62.200")?;
    let log = cluster.scratch.path().join("iperf-pod2a.log");
    let mut server = iperf3_server(&pod2a.netns, &log, true)?;
    outside
        .netns
        .exec(&["iperf3", "-c", HOST2, "-p", "8080", "-t", "1"])?;
    assert!(
        server.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        server.log()
    );

    // The agent and the bridge plugin agree on the bridge: one address, the gateway, on the
    // bridge the agent made.
    for (host, gateway, made) in [
        (&host1, "10.2.41.1/24", made_by_agents[0]),
        (&host2, "10.2.54.1/24", made_by_agents[1]),
    ] {
        assert_eq!(bridge_addresses(host)?, [gateway]);
        assert_eq!(
            host.netns.ifindex(CNI_BRIDGE)?,
            made,
            "{}'s {CNI_BRIDGE} is the bridge its agent made",
            host.name
        );
    }
    Ok(())
}
