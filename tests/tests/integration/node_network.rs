//! The node network in kernel mode: the agent builds docker0, flannel.1 and the per-lease
//! entries exactly as stock flannel does, keeps them right, and removes them on teardown.
use std::time::Duration;

use anyhow::{Context, Result};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::Counter;
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host, PREFIX},
    process::iperf3_server,
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2, Seed},
    stock_flannel::{self, Peer},
    wait::{WITHIN_A_SECOND, wait_for},
};

const KERNEL: &[&str] = &["--dataplane=kernel"];
const HEAL_TIMEOUT: Duration = Duration::from_secs(5);
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn tx_packets(host: &Host, device: &str) -> Result<u64> {
    let counter = host.netns.exec(&[
        "cat",
        &format!("/sys/class/net/{device}/statistics/tx_packets"),
    ])?;
    counter.trim().parse().context("tx_packets is not a number")
}

#[test]
fn the_seed_topology_behaves_as_the_document_shows() -> Result<()> {
    let seed = Seed::start("seed-kernel", KERNEL)?;
    let ping = seed.bbox1.ping(BBOX2, 2)?;
    assert_eq!(ping.matches("ttl=62").count(), 2, "{ping}");
    assert_eq!(
        seed.bbox1.traceroute(BBOX2)?,
        ["10.2.41.1", "10.2.54.0", "10.2.54.2"]
    );

    let routes = seed.host1.netns.ip(&["route"])?;
    assert!(
        routes.contains("10.2.41.0/24 dev docker0 proto kernel scope link src 10.2.41.1"),
        "{routes}"
    );
    assert!(
        routes.contains("10.2.54.0/24 via 10.2.54.0 dev flannel.1 onlink"),
        "{routes}"
    );
    let routes2 = seed.host2.netns.ip(&["route"])?;
    assert!(
        routes2.contains("10.2.41.0/24 via 10.2.41.0 dev flannel.1 onlink"),
        "{routes2}"
    );
    assert!(
        routes2.contains("10.2.54.0/24 dev docker0 proto kernel scope link src 10.2.54.1"),
        "{routes2}"
    );

    let device = seed.host1.netns.ip(&["-d", "link", "show", "flannel.1"])?;
    for attribute in [
        "mtu 1450",
        "vxlan id 1 local 172.20.62.104 dev eth0",
        "dstport 8472",
        "nolearning",
        "noudpcsum",
    ] {
        assert!(
            device.contains(attribute),
            "flannel.1 lacks {attribute:?}:\n{device}"
        );
    }
    let mac = seed.host1.vtep_mac()?;
    let first_octet = u8::from_str_radix(&mac[..2], 16)?;
    assert_eq!(
        first_octet & 0x03,
        0x02,
        "{mac} is locally administered unicast"
    );
    let record = seed
        .cluster
        .etcd
        .get(&seed.cluster.subnet_key(SUBNET1))?
        .context("no record")?;
    assert!(
        record.contains(&format!(r#""VtepMAC":"{mac}""#)),
        "{record}"
    );
    assert!(
        seed.host1
            .netns
            .ip(&["addr", "show", "flannel.1"])?
            .contains("inet 10.2.41.0/32")
    );
    let neighbours = seed
        .host1
        .netns
        .ip(&["neigh", "show", "dev", "flannel.1"])?;
    assert!(
        neighbours.contains(&format!(
            "10.2.54.0 lladdr {} PERMANENT",
            seed.host2.vtep_mac()?
        )),
        "{neighbours}"
    );
    let fdb = seed
        .host1
        .netns
        .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
    assert!(
        fdb.contains(&format!(
            "{} dst {HOST2} self permanent",
            seed.host2.vtep_mac()?
        )),
        "{fdb}"
    );
    Ok(())
}

#[test]
fn containers_on_one_host_talk_through_docker0_alone() -> Result<()> {
    let seed = Seed::start("same-host", KERNEL)?;
    let bbox3 = Container::attach(&seed.host1, "bbox3", "10.2.41.3")?;
    let before = tx_packets(&seed.host1, "flannel.1")?;
    let ping = seed.bbox1.ping(&bbox3.address, 3)?;
    assert_eq!(
        ping.matches("ttl=64").count(),
        3,
        "one L2 hop, no routing: {ping}"
    );
    assert_eq!(
        tx_packets(&seed.host1, "flannel.1")?,
        before,
        "nothing went through flannel.1"
    );
    Ok(())
}

/// Neighbour entries written in one burst on a device that is none of the overlay's: more
/// notifications than the agent's netlink socket holds (ENOBUFS), yet nothing it must act on.
const BURST_ENTRIES: u32 = 20_000;
const LOST: &str = "netlink notifications were lost; re-listing";

/// Notifications the kernel could not queue (ENOBUFS) are made up for by listing everything:
/// a route deleted at the end of a burst that overflowed the agent's netlink socket comes back
/// within a second, though its notification may be among the lost.
#[test]
fn notifications_lost_in_a_burst_are_made_up_for_by_a_listing() -> Result<()> {
    let mut seed = Seed::start("overrun", KERNEL)?;
    let host = &seed.host1;
    host.netns.ip(&[
        "link", "add", "burst0", "type", "veth", "peer", "name", "burst1",
    ])?;
    host.netns.ip(&["link", "set", "burst0", "up"])?;
    let mut batch: String = (0..BURST_ENTRIES)
        .map(|index| {
            let [_, _, high, low] = index.to_be_bytes();
            format!(
                "neigh add 198.18.{high}.{low} lladdr 02:00:00:00:{high:02x}:{low:02x} dev \
                 burst0 nud permanent\n"
            )
        })
        .collect();
    batch.push_str(&format!("route del {SUBNET2}\n"));
    let path = host.dir.join("burst.batch");
    std::fs::write(&path, batch)?;
    let path = path.to_str().context("a scratch path that is not UTF-8")?;
    host.netns.ip(&["-batch", path])?;
    seed.agent1
        .wait_for_log(LOST, 1, HEAL_TIMEOUT)
        .context("the burst overflowed nothing, or the agent did not say so")?;
    wait_for("the route deleted in the burst", WITHIN_A_SECOND, || {
        host.netns.has_route(SUBNET2)
    })?;
    let exited = seed.agent1.process.try_exit_status()?;
    anyhow::ensure!(exited.is_none(), "the agent exited: {exited:?}");
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

#[test]
fn deleted_devices_and_entries_come_back() -> Result<()> {
    let seed = Seed::start("self-heal", KERNEL)?;
    let mac = seed.host1.vtep_mac()?;

    seed.host1.netns.ip(&["link", "del", "flannel.1"])?;
    wait_for("flannel.1 to come back", WITHIN_A_SECOND, || {
        Ok(seed
            .host1
            .netns
            .ip(&["route", "show", SUBNET2])
            .is_ok_and(|route| route.contains("flannel.1")))
    })?;
    assert_eq!(
        seed.host1.vtep_mac()?,
        mac,
        "the VTEP MAC survives the device"
    );
    seed.bbox1.ping(BBOX2, 1)?;

    seed.host2.netns.ip(&["route", "del", SUBNET1])?;
    wait_for("the route to come back", WITHIN_A_SECOND, || {
        seed.host2.netns.has_route(SUBNET1)
    })?;
    seed.bbox1.ping(BBOX2, 1)?;

    let fdb_entry = format!("{mac} dst {HOST1}");
    let fdb = |host: &Host| {
        host.netns
            .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])
    };
    seed.host2.netns.exec(&[
        "bridge",
        "fdb",
        "del",
        &mac,
        "dev",
        "flannel.1",
        "dst",
        HOST1,
    ])?;
    // `bridge fdb del` fails unless it deleted the entry; the agent may put it back before
    // anything here could look.
    wait_for("the FDB entry to come back", WITHIN_A_SECOND, || {
        Ok(fdb(&seed.host2)?.contains(&fdb_entry))
    })?;
    seed.bbox1.ping(BBOX2, 1)?;

    let neighbours = |host: &Host| host.netns.ip(&["neigh", "show", "dev", "flannel.1"]);
    seed.host1
        .netns
        .ip(&["neigh", "del", "10.2.54.0", "dev", "flannel.1"])?;
    wait_for("the neighbour entry to come back", WITHIN_A_SECOND, || {
        Ok(neighbours(&seed.host1)?.contains("10.2.54.0 lladdr"))
    })?;

    // An uplink flap takes routes with it in flannel; here they come back.
    seed.host1.netns.ip(&["link", "set", "eth0", "down"])?;
    seed.host1.netns.ip(&["link", "set", "flannel.1", "down"])?;
    seed.host1.netns.ip(&["link", "set", "eth0", "up"])?;
    seed.host1
        .netns
        .ip(&["route", "replace", "default", "via", "172.20.62.1"])?;
    wait_for(
        "the overlay to recover from the flap",
        WITHIN_A_SECOND,
        || seed.host1.netns.has_route(SUBNET2),
    )?;
    wait_for("bbox1 to reach bbox2 after the flap", HEAL_TIMEOUT, || {
        Ok(seed.bbox1.ping(BBOX2, 1).is_ok())
    })?;

    // Last, as deleting a bridge also detaches the containers plugged into it.
    seed.host1.netns.ip(&["link", "del", "docker0"])?;
    wait_for("docker0 to come back", WITHIN_A_SECOND, || {
        Ok(seed
            .host1
            .netns
            .ip(&["addr", "show", "docker0"])
            .is_ok_and(|addr| addr.contains("10.2.41.1/24")))
    })?;
    Ok(())
}

#[test]
fn entries_no_lease_justifies_go_and_foreign_routes_stay() -> Result<()> {
    let seed = Seed::start("unjustified", KERNEL)?;
    let host1 = &seed.host1.netns;
    host1.ip(&[
        "neigh",
        "add",
        "10.2.99.0",
        "lladdr",
        "1a:4b:d7:f7:16:99",
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ])?;
    host1.exec(&[
        "bridge",
        "fdb",
        "append",
        "1a:4b:d7:f7:16:99",
        "dev",
        "flannel.1",
        "dst",
        "172.20.62.199",
    ])?;
    host1.ip(&[
        "route",
        "add",
        "10.2.99.0/24",
        "via",
        "10.2.99.0",
        "dev",
        "flannel.1",
        "onlink",
    ])?;
    host1.ip(&["route", "add", "192.0.2.0/24", "via", "172.20.62.1"])?;
    wait_for("the unjustified entries to go", HEAL_TIMEOUT, || {
        let neighbours = host1.ip(&["neigh", "show", "dev", "flannel.1"])?;
        let fdb = host1.exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
        Ok(!host1.has_route("10.2.99.0/24")?
            && !neighbours.contains("10.2.99.0")
            && !fdb.contains("1a:4b:d7:f7:16:99"))
    })?;
    assert!(
        host1.has_route("192.0.2.0/24")?,
        "a route the agent did not create stays"
    );
    assert!(host1.has_route(SUBNET2)?);
    Ok(())
}

#[test]
fn an_incompatible_vxlan_device_is_recreated() -> Result<()> {
    let mut cluster = Cluster::new("incompatible")?;
    let host1 = cluster.add_host("host1", HOST1)?;
    host1.netns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "4789",
        "dev",
        "eth0",
    ])?;
    let mut agent = Agent::start(&cluster, &host1, KERNEL)?;
    agent.wait_ready()?;
    let device = host1.netns.ip(&["-d", "link", "show", "flannel.1"])?;
    assert!(
        device.contains("vxlan id 1 local 172.20.62.104 dev eth0")
            && device.contains("dstport 8472"),
        "{device}"
    );
    assert!(device.contains("nolearning"), "{device}");
    Ok(())
}

#[test]
fn a_removed_lease_takes_its_entries_along() -> Result<()> {
    let mut seed = Seed::start("lease-removed", KERNEL)?;
    let mac2 = seed.host2.vtep_mac()?;
    seed.agent2.process.kill();
    seed.cluster
        .etcd
        .etcdctl(&["del", &seed.cluster.subnet_key(SUBNET2)])?;
    wait_for("host1 to drop host2's entries", HEAL_TIMEOUT, || {
        let route = seed.host1.netns.ip(&["route", "show", SUBNET2])?;
        let neighbours = seed
            .host1
            .netns
            .ip(&["neigh", "show", "dev", "flannel.1"])?;
        let fdb = seed
            .host1
            .netns
            .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
        Ok(route.trim().is_empty() && !neighbours.contains("10.2.54.0") && !fdb.contains(&mac2))
    })?;
    Ok(())
}

#[test]
fn a_changed_vtep_mac_leaves_no_stale_entry() -> Result<()> {
    let mut seed = Seed::start("mac-change", KERNEL)?;
    let old_mac = seed.host2.vtep_mac()?;
    // host2 comes back with a new VTEP: its device is gone and its record names a new MAC,
    // which the restarted agent adopts.
    seed.agent2.process.kill();
    seed.host2.netns.ip(&["link", "del", "flannel.1"])?;
    let new_mac = "1a:4b:d7:f7:16:89";
    let record = format!(
        r#"{{"PublicIP":"{HOST2}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{new_mac}"}}}}"#
    );
    seed.cluster
        .etcd
        .put(&seed.cluster.subnet_key(SUBNET2), &record)?;
    wait_for("host1 to switch to the new MAC", HEAL_TIMEOUT, || {
        let neighbours = seed
            .host1
            .netns
            .ip(&["neigh", "show", "dev", "flannel.1"])?;
        let fdb = seed
            .host1
            .netns
            .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
        Ok(
            neighbours.contains(&format!("10.2.54.0 lladdr {new_mac} PERMANENT"))
                && fdb.contains(&format!("{new_mac} dst {HOST2}"))
                && !fdb.contains(&old_mac)
                && !neighbours.contains(&old_mac),
        )
    })?;
    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, KERNEL)?;
    assert_eq!(seed.agent2.wait_ready()?, SUBNET2);
    assert_eq!(
        seed.host2.vtep_mac()?,
        new_mac,
        "the agent takes the MAC its record names"
    );
    wait_for("host2's route back", HEAL_TIMEOUT, || {
        seed.host2.netns.has_route(SUBNET1)
    })?;
    seed.bbox1.ping(BBOX2, 2)?;
    Ok(())
}

/// Two hosts on one segment under DirectRouting, in the mode `flags` choose, with a container
/// each. Field order is drop order.
struct DirectPair {
    bbox1: Container,
    bbox2: Container,
    _agents: [Agent; 2],
    host1: Host,
    host2: Host,
    _cluster: Cluster,
}

fn direct_routing_pair(tag: &str, flags: &[&str]) -> Result<DirectPair> {
    let config =
        r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#;
    let mut cluster = Cluster::with_etcd(tag, false, Some(config))?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let mut agent1 = Agent::start(&cluster, &host1, flags)?;
    let mut agent2 = Agent::start(&cluster, &host2, flags)?;
    let subnet1 = agent1.wait_ready()?;
    let subnet2 = agent2.wait_ready()?;
    wait_for("host1's direct route", EVENT_TIMEOUT, || {
        Ok(host1
            .netns
            .ip(&["route", "show", &subnet2])?
            .contains(&format!("via {HOST2} dev eth0")))
    })?;
    wait_for("host2's direct route", EVENT_TIMEOUT, || {
        host2.netns.has_route(&subnet1)
    })?;
    let address = |subnet: &str| subnet.replace(".0/24", ".2");
    Ok(DirectPair {
        bbox1: Container::attach(&host1, "bbox1", &address(&subnet1))?,
        bbox2: Container::attach(&host2, "bbox2", &address(&subnet2))?,
        _agents: [agent1, agent2],
        host1,
        host2,
        _cluster: cluster,
    })
}

#[test]
fn direct_routing_skips_vxlan_for_peers_on_the_same_segment() -> Result<()> {
    let pair = direct_routing_pair("direct", KERNEL)?;
    let before = tx_packets(&pair.host1, "flannel.1")?;
    assert!(pair.bbox1.ping(&pair.bbox2.address, 2)?.contains("ttl=62"));
    assert_eq!(
        tx_packets(&pair.host1, "flannel.1")?,
        before,
        "no VXLAN on a shared segment"
    );
    Ok(())
}

#[test]
fn direct_routing_holds_on_the_fast_path_too() -> Result<()> {
    let pair = direct_routing_pair("direct-ebpf", &["--dataplane=ebpf"])?;
    let counters = |host: &Host| PinnedDataplane::open(&host.pin_dir())?.counters();
    // The first echoes teach host2 where bbox2 is; the rest take the fast path. The replies
    // arrive through host1's stack (nothing to decapsulate), untranslated: the flow stays
    // on the fast path.
    pair.bbox1.ping(&pair.bbox2.address, 2)?;
    let (sent, received) = (counters(&pair.host1)?, counters(&pair.host2)?);
    let replies = pair.bbox1.ping(&pair.bbox2.address, 5)?;
    assert_eq!(replies.matches("ttl=62").count(), 5, "{replies}");
    let (sent_after, received_after) = (counters(&pair.host1)?, counters(&pair.host2)?);
    assert!(
        sent_after.get(Counter::TxDirect) >= sent.get(Counter::TxDirect) + 5,
        "host1's programs sent the echoes"
    );
    // They reached host2 as plain IPv4, not as VXLAN: nothing was decapsulated there.
    for counter in [Counter::RxDelivered, Counter::RxDecapsulated] {
        assert_eq!(
            received_after.get(counter),
            received.get(counter),
            "{} moved: VXLAN on a shared segment",
            counter.name()
        );
    }
    assert!(received_after.get(Counter::RxNotUdp) >= received.get(Counter::RxNotUdp) + 5);
    Ok(())
}

#[test]
fn a_kernel_mode_agent_and_a_stock_flannel_host_interoperate() -> Result<()> {
    let mut cluster = Cluster::new("interop-kernel")?;
    cluster.reserve(SUBNET1, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let mut agent1 = Agent::start(&cluster, &host1, KERNEL)?;
    assert_eq!(agent1.wait_ready()?, SUBNET1);
    let agent_mac = host1.vtep_mac()?;
    let peer = Peer {
        subnet: SUBNET1,
        public_ip: HOST1,
        vtep_mac: &agent_mac,
    };
    stock_flannel::configure(&cluster, &host2, SUBNET2, "1a:4b:d7:f7:16:89", &[peer])?;
    host1.wait_for_peer(SUBNET2, HOST2, "1a:4b:d7:f7:16:89")?;
    let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
    let bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;
    wait_for("host1's route to the flannel host", HEAL_TIMEOUT, || {
        host1.netns.has_route(SUBNET2)
    })?;
    assert!(bbox1.ping(BBOX2, 2)?.contains("ttl=62"));
    assert!(bbox2.ping(BBOX1, 2)?.contains("ttl=62"));
    Ok(())
}

#[test]
fn ip_masq_lets_containers_out_and_port_mappings_in() -> Result<()> {
    let mut seed = Seed::start("masq", &["--dataplane=kernel", "--ip-masq"])?;
    // A host outside the overlay: no agent, no route to 10.2.0.0/16.
    let outside = seed.cluster.add_host("outside", "172.20.62.200")?;
    let outside = &outside.netns;
    let nat = seed
        .host1
        .netns
        .exec(&["iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    assert!(nat.contains("-j MASQUERADE"), "{nat}");

    // A container reaches the outside host, which sees host1's public IP.
    let log = seed.cluster.scratch.path().join("iperf-outside.log");
    let mut server = iperf3_server(outside, &log, true)?;
    seed.bbox1
        .netns
        .exec(&["iperf3", "-c", "172.20.62.200", "-t", "1"])?;
    server.wait_exit(EVENT_TIMEOUT)?;
    assert!(
        server
            .log()
            .contains(&format!("Accepted connection from {HOST1}")),
        "{}",
        server.log()
    );

    // A port mapping on host2, as Docker sets one up, reaches bbox2 from the outside host.
    seed.host2.netns.exec(&[
        "nft",
        "add table ip portmap; add chain ip portmap prerouting { type nat hook prerouting priority dstnat; }; \
         add rule ip portmap prerouting tcp dport 8080 dnat to 10.2.54.2:5201",
    ])?;
    let log = seed.cluster.scratch.path().join("iperf-bbox2.log");
    let mut mapped = iperf3_server(&seed.bbox2.netns, &log, true)?;
    outside.exec(&["iperf3", "-c", HOST2, "-p", "8080", "-t", "1"])?;
    mapped.wait_exit(EVENT_TIMEOUT)?;
    assert!(
        mapped
            .log()
            .contains("Accepted connection from 172.20.62.200"),
        "{}",
        mapped.log()
    );
    Ok(())
}

/// What a host namespace looks like, in the terms the teardown test compares.
fn snapshot(host: &Host) -> Result<Vec<String>> {
    Ok(vec![
        host.netns.ip(&["-d", "link", "show"])?,
        host.netns.ip(&["addr", "show"])?,
        host.netns.ip(&["route", "show", "table", "all"])?,
        host.netns.ip(&["neigh", "show", "nud", "permanent"])?,
        host.netns.exec(&["bridge", "fdb", "show"])?,
        host.netns.exec(&["nft", "list", "ruleset"])?,
    ])
}

#[test]
fn teardown_leaves_the_host_as_it_found_it() -> Result<()> {
    let mut cluster = Cluster::new("teardown")?;
    cluster.etcd.put(&cluster.subnet_key(SUBNET2), &format!(r#"{{"PublicIP":"{HOST2}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}}}"#))?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let before = snapshot(&host1)?;
    let mut agent = Agent::start(&cluster, &host1, &["--dataplane=kernel", "--ip-masq"])?;
    let subnet = agent.wait_ready()?;
    wait_for("the route to host2's subnet", EVENT_TIMEOUT, || {
        host1.netns.has_route(SUBNET2)
    })?;
    agent.process.terminate(EVENT_TIMEOUT)?;

    let flags = [
        format!("--etcd-endpoints={}", cluster.etcd.endpoint()),
        format!("--etcd-prefix={PREFIX}"),
        format!("--subnet-file={}", host1.subnet_file().display()),
    ];
    let mut keep = Agent::start_with(
        &host1,
        &[&["teardown".to_string()][..], &flags].concat(),
        &[],
    )?;
    assert!(
        keep.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        keep.log()
    );
    assert_eq!(snapshot(&host1)?, before);
    assert!(
        cluster.etcd.get(&cluster.subnet_key(&subnet))?.is_some(),
        "the lease is kept by default"
    );

    let release = [
        &["teardown".to_string(), "--release-lease".to_string()][..],
        &flags,
    ]
    .concat();
    let mut released = Agent::start_with(&host1, &release, &[])?;
    assert!(
        released.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        released.log()
    );
    assert!(
        cluster.etcd.get(&cluster.subnet_key(&subnet))?.is_none(),
        "--release-lease deletes the record"
    );
    Ok(())
}

/// Runs `overlay-agent teardown --release-lease` on `host` to a successful end.
fn release_lease(cluster: &Cluster, host: &Host) -> Result<Agent> {
    let release = [
        "teardown".to_string(),
        "--release-lease".to_string(),
        format!("--etcd-endpoints={}", cluster.etcd.endpoint()),
        format!("--etcd-prefix={PREFIX}"),
        format!("--subnet-file={}", host.subnet_file().display()),
    ];
    let mut released = Agent::start_with(host, &release, &[])?;
    assert!(
        released.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "teardown --release-lease failed: {}",
        released.log()
    );
    Ok(released)
}

/// After a reboot /run/flannel/subnet.env is gone; `teardown --release-lease` still finds
/// this host's record, the one naming its address, and leaves every other host's.
#[test]
fn release_lease_without_the_subnet_file_deletes_the_record_naming_this_host() -> Result<()> {
    let mut cluster = Cluster::new("release-reboot")?;
    let other = cluster.subnet_key(SUBNET2);
    cluster.etcd.put(&other, &format!(r#"{{"PublicIP":"{HOST2}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}}}"#))?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let mut agent = Agent::start(&cluster, &host1, KERNEL)?;
    let own = cluster.subnet_key(&agent.wait_ready()?);
    agent.process.kill();
    std::fs::remove_file(host1.subnet_file()).context("cannot remove the subnet file")?;

    release_lease(&cluster, &host1)?;
    assert!(
        cluster.etcd.get(&own)?.is_none(),
        "the record naming host1 is released"
    );
    assert!(cluster.etcd.get(&other)?.is_some(), "host2's record stays");
    Ok(())
}

/// A reservation (a record without etcd lease) is the operator's: the agent takes it as its
/// lease, and `teardown --release-lease` keeps it and says so.
#[test]
fn release_lease_keeps_a_reservation() -> Result<()> {
    let mut cluster = Cluster::new("release-reserved")?;
    let reserved = cluster.subnet_key(SUBNET1);
    cluster
        .etcd
        .put(&reserved, &format!(r#"{{"PublicIP":"{HOST1}"}}"#))?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let mut agent = Agent::start(&cluster, &host1, KERNEL)?;
    assert_eq!(
        agent.wait_ready()?,
        SUBNET1,
        "the agent takes its reservation"
    );
    agent.process.terminate(EVENT_TIMEOUT)?;

    let released = release_lease(&cluster, &host1)?;
    assert!(
        cluster.etcd.get(&reserved)?.is_some(),
        "teardown --release-lease deleted the reservation {SUBNET1}: {}",
        released.log()
    );
    assert!(
        released.log().contains("is reserved for"),
        "teardown does not say why the record stays: {}",
        released.log()
    );
    Ok(())
}

#[test]
fn ip_blackhole_route_backs_the_subnet_when_the_bridge_route_is_gone() -> Result<()> {
    let seed = Seed::start("blackhole", &["--dataplane=kernel", "--ip-blackhole-route"])?;
    let host = &seed.host1;
    // docker0's own route covers the subnet; the kernel allows no second one for it.
    assert!(
        !host
            .netns
            .ip(&["route", "show", "type", "blackhole"])?
            .contains(SUBNET1)
    );
    host.netns
        .ip(&["route", "del", SUBNET1, "dev", "docker0"])?;
    wait_for("the blackhole route", HEAL_TIMEOUT, || {
        Ok(host
            .netns
            .ip(&["route", "show", "type", "blackhole"])?
            .contains(&format!("blackhole {SUBNET1}")))
    })?;
    Ok(())
}

#[test]
fn gbp_and_learning_reach_flannel_1_in_kernel_mode_and_are_refused_in_ebpf_mode() -> Result<()> {
    let config = r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "GBP": true, "Learning": true}}"#;
    let mut cluster = Cluster::with_etcd("gbp", false, Some(config))?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let mut kernel = Agent::start(&cluster, &host1, KERNEL)?;
    kernel.wait_ready()?;
    let device = host1.netns.ip(&["-d", "link", "show", "flannel.1"])?;
    assert!(device.contains(" gbp"), "{device}");
    assert!(!device.contains("nolearning"), "{device}");
    kernel.process.terminate(EVENT_TIMEOUT)?;

    let host2 = cluster.add_host("host2", HOST2)?;
    Agent::start(&cluster, &host2, &["--dataplane=ebpf"])?.expect_failure(
        "Backend.GBP and Backend.Learning are not supported by the ebpf dataplane",
    )?;
    Ok(())
}

#[test]
fn a_restart_into_another_subnet_leaves_no_address_of_the_old_one() -> Result<()> {
    let mut cluster = Cluster::new("resubnet")?;
    cluster.reserve(SUBNET1, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    assert_eq!(agent.wait_ready()?, SUBNET1);
    // The operator's own address on docker0, outside the overlay network, stays.
    host1
        .netns
        .ip(&["addr", "add", "192.0.2.1/24", "dev", "docker0"])?;
    agent.process.terminate(EVENT_TIMEOUT)?;

    // The reservation moves, and the agent starts again into it.
    cluster
        .etcd
        .etcdctl(&["del", &cluster.subnet_key(SUBNET1)])?;
    cluster.reserve("10.2.77.0/24", HOST1)?;
    std::fs::remove_file(host1.subnet_file())?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    assert_eq!(agent.wait_ready()?, "10.2.77.0/24");

    let addresses = |device: &str| host1.netns.ip(&["-4", "-o", "addr", "show", "dev", device]);
    let docker0 = addresses("docker0")?;
    assert!(
        docker0.contains("10.2.77.1/24")
            && !docker0.contains("10.2.41.1/24")
            && docker0.contains("192.0.2.1/24"),
        "{docker0}"
    );
    let vtep = addresses("flannel.1")?;
    assert!(
        vtep.contains("10.2.77.0/32") && !vtep.contains("10.2.41.0/32"),
        "{vtep}"
    );
    Ok(())
}

#[test]
fn a_network_config_changed_in_etcd_stops_the_agent_naming_the_change() -> Result<()> {
    let mut seed = Seed::start("config-change", &[])?;
    seed.cluster.etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan"}}"#,
    )?;
    // The config is read again every 10 s.
    let status = seed.agent1.process.wait_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "a non-zero exit");
    assert!(
        seed.agent1.log().contains(
            "the network config in etcd changed (EnableIPv4 true, Network 10.2.0.0/16, SubnetLen 24"
        ),
        "{}",
        seed.agent1.log()
    );
    // Until the supervisor starts it again, the node keeps forwarding.
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

/// `cat /sys/class/net/<device>/mtu` on `host`.
fn mtu_of(host: &Host, device: &str) -> Result<u32> {
    let mtu = host
        .netns
        .exec(&["cat", &format!("/sys/class/net/{device}/mtu")])?;
    mtu.trim()
        .parse()
        .with_context(|| format!("{device}'s MTU {mtu:?}"))
}

/// flannel.1's MTU is the underlay's less 50, flannel-v6.1's less 70, and FLANNEL_MTU the
/// former: on a jumbo-frame uplink as on any, and from the network config's `Backend.MTU`
/// when it names one (flannel's "MTU" of the vxlan backend).
#[test]
fn the_vxlan_devices_take_their_mtu_from_the_uplink_or_the_backend() -> Result<()> {
    for (backend, underlay) in [
        (r#""Type":"vxlan""#, 9000),
        (r#""Type":"vxlan","MTU":1400"#, 1400),
    ] {
        let config = format!(
            r#"{{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:2::/48","Backend":{{{backend}}}}}"#
        );
        let mut cluster = Cluster::with_ipv6("mtu", &config)?;
        let host1 = cluster.add_host("host1", HOST1)?;
        host1.netns.ip(&["link", "set", "eth0", "mtu", "9000"])?;
        let mut agent = Agent::start(&cluster, &host1, &[])?;
        agent.wait_ready()?;
        let devices = [
            ("flannel.1", underlay - 50),
            ("flannel-v6.1", underlay - 70),
        ];
        for (device, expected) in devices {
            let mtu = mtu_of(&host1, device)?;
            anyhow::ensure!(
                mtu == expected,
                "{backend}: {device}'s MTU is {mtu}, not {expected}"
            );
        }
        let file = std::fs::read_to_string(host1.subnet_file())?;
        let line = format!("FLANNEL_MTU={}\n", underlay - 50);
        anyhow::ensure!(file.contains(&line), "{backend}: no {line:?} in\n{file}");
    }
    Ok(())
}
