//! Every value of a subnet record is checked, and one record never fails a round: a PublicIP
//! no route leads to under DirectRouting, public addresses and VTEP MACs no host can have, a
//! VtepMAC copied from another lease, and a bad record written again and again. Each time a
//! lease written after the hostile record is routed (and pinged through where a second host
//! runs), the hostile one is not, and `/metrics` counts it in `overlay_leases_skipped`. A
//! second lease of one PublicIPv6 is no hostile record: the host stays reachable from both.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::Counter;
use overlay_tests::{
    agent::{Agent, HEALTH_PORT},
    cluster::{Cluster, Host, NFTABLES_NETWORK_CONFIG, PREFIX, UNDERLAY_GATEWAY},
    ipv6::{BBOX1_V6, BBOX2_V6, HOST2_V6},
    metrics,
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2, Seed},
    stock_flannel::{Vtep, lease_value},
    wait::wait_for,
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
const DIRECT_ROUTING_CONFIG: &str =
    r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#;
/// A lease written after the hostile records: the positive control.
const LATER_SUBNET: &str = "10.2.60.0/24";
const LATER_PUBLIC_IP: &str = "172.20.62.106";
const LATER_MAC: &str = "1a:4b:d7:f7:16:8a";

fn record(public_ip: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

fn put(cluster: &Cluster, subnet: &str, value: &str) -> Result<()> {
    cluster.etcd.put(&cluster.subnet_key(subnet), value)
}

/// The seed's network where host1 holds SUBNET1 by reservation, its agent started with
/// `flags` and ready.
fn lone_host(tag: &str, flags: &[&str]) -> Result<(Cluster, Host, Agent)> {
    let mut cluster = Cluster::new(tag)?;
    cluster.reserve(SUBNET1, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let mut agent = Agent::start(&cluster, &host1, flags)?;
    ensure!(agent.wait_ready()? == SUBNET1, "host1 kept its reservation");
    Ok((cluster, host1, agent))
}

/// Waits until `/metrics` on `agent`'s host says `overlay_leases_skipped` is `expected`.
fn wait_for_skipped(host: &Host, expected: f64) -> Result<()> {
    let mut seen = None;
    wait_for("overlay_leases_skipped", EVENT_TIMEOUT, || {
        let samples = metrics::scrape(&host.netns, HEALTH_PORT)?;
        seen = metrics::value_of(&samples, "overlay_leases_skipped", &[]);
        Ok(seen == Some(expected))
    })
    .with_context(|| format!("overlay_leases_skipped was {seen:?}, not {expected}"))
}

/// Records whose PublicIP the hosts have no route to: (subnet, PublicIP, VtepMAC).
const UNREACHABLE: [(&str, &str, &str); 2] = [
    ("10.2.90.0/24", "0.1.2.3", "1a:4b:d7:f7:16:90"),
    ("10.2.89.0/24", "198.51.100.7", "1a:4b:d7:f7:16:8f"),
];

/// Routes that leave the hosts without a way to UNREACHABLE's addresses, as on a host without
/// a default route: "Network is unreachable" and "No route to host".
fn cut_off_unreachable(host: &Host) -> Result<()> {
    host.netns.ip(&["route", "add", "throw", "0.1.2.0/24"])?;
    host.netns
        .ip(&["route", "add", "unreachable", "198.51.100.0/24"])?;
    Ok(())
}

/// Issue 28: with DirectRouting, a PublicIP the kernel has no route to made every round fail,
/// so a host started after it never came up and no lease written after it got a route.
#[test]
fn a_public_ip_without_a_route_stops_no_direct_routing_host() -> Result<()> {
    let mut cluster = Cluster::with_etcd("unreachable-ip", false, Some(DIRECT_ROUTING_CONFIG))?;
    cluster.reserve(SUBNET1, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    cut_off_unreachable(&host1)?;
    let mut agent1 = Agent::start(&cluster, &host1, &[])?;
    ensure!(
        agent1.wait_ready()? == SUBNET1,
        "host1 kept its reservation"
    );

    for (subnet, public_ip, mac) in UNREACHABLE {
        put(&cluster, subnet, &record(public_ip, mac))?;
    }
    cluster.reserve(SUBNET2, HOST2)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    cut_off_unreachable(&host2)?;
    let mut agent2 = Agent::start(&cluster, &host2, &[])?;
    ensure!(agent2.wait_ready()? == SUBNET2, "host2 came up");
    host1.wait_for_route(SUBNET2)?;
    host2.wait_for_route(SUBNET1)?;
    let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
    let _bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;
    bbox1.ping(BBOX2, 2)?;

    for (host, agent) in [(&host1, &agent1), (&host2, &agent2)] {
        wait_for_skipped(host, UNREACHABLE.len() as f64)?;
        let log = agent.log();
        for (subnet, public_ip, _) in UNREACHABLE {
            ensure!(
                !host.netns.has_route(subnet)?,
                "{} routes {subnet}",
                host.name
            );
            ensure!(
                log.contains(&format!("skipping the record of lease {subnet}"))
                    && log.contains(public_ip),
                "no warning names {subnet} and {public_ip}:\n{log}"
            );
        }
    }

    // A route to one of them appears: its lease comes back, through flannel.1 (the way there
    // has a gateway, so it is no direct route).
    let (subnet, public_ip, _) = UNREACHABLE[1];
    host1
        .netns
        .ip(&["route", "del", "unreachable", "198.51.100.0/24"])?;
    host1.netns.ip(&[
        "route",
        "add",
        "198.51.100.0/24",
        "via",
        UNDERLAY_GATEWAY,
        "dev",
        "eth0",
    ])?;
    wait_for(&format!("host1's route to {subnet}"), EVENT_TIMEOUT, || {
        host1.netns.has_route(subnet)
    })
    .with_context(|| format!("agent log:\n{}", agent1.log()))?;
    let routes = host1.netns.ip(&["route", "show", subnet])?;
    ensure!(
        routes.contains("dev flannel.1"),
        "{subnet} via {public_ip}: {routes}"
    );
    wait_for_skipped(&host1, (UNREACHABLE.len() - 1) as f64)?;
    agent1.wait_for_log(
        &format!("lease {subnet}'s public address has a route again"),
        1,
        EVENT_TIMEOUT,
    )?;
    Ok(())
}

/// Each a record value no host can have, under its own subnet: (subnet, PublicIP, VtepMAC).
/// 172.20.62.104 is host1's own PublicIP.
const UNUSABLE_VALUES: [(&str, &str, &str); 8] = [
    ("10.2.91.0/24", "127.0.0.1", "1a:4b:d7:f7:16:91"),
    ("10.2.92.0/24", "224.0.0.1", "1a:4b:d7:f7:16:92"),
    ("10.2.93.0/24", "255.255.255.255", "1a:4b:d7:f7:16:93"),
    ("10.2.94.0/24", "169.254.1.1", "1a:4b:d7:f7:16:94"),
    ("10.2.95.0/24", "0.0.0.0", "1a:4b:d7:f7:16:95"),
    ("10.2.96.0/24", HOST1, "1a:4b:d7:f7:16:96"),
    ("10.2.97.0/24", "172.20.62.107", "00:00:00:00:00:00"),
    ("10.2.98.0/24", "172.20.62.108", "ff:ff:ff:ff:ff:ff"),
];

#[test]
fn record_values_no_host_can_have_are_skipped_and_counted() -> Result<()> {
    let (cluster, host1, mut agent) = lone_host("unusable-values", &[])?;

    for (subnet, public_ip, mac) in UNUSABLE_VALUES {
        put(&cluster, subnet, &record(public_ip, mac))?;
    }
    put(&cluster, LATER_SUBNET, &record(LATER_PUBLIC_IP, LATER_MAC))?;
    host1.wait_for_peer(LATER_SUBNET, LATER_PUBLIC_IP, LATER_MAC)?;
    wait_for_skipped(&host1, UNUSABLE_VALUES.len() as f64)?;
    for (subnet, ..) in UNUSABLE_VALUES {
        ensure!(host1.holds_no_peer(subnet)?, "host1 routes {subnet}");
    }
    let names: Vec<String> = UNUSABLE_VALUES
        .iter()
        .map(|(subnet, ..)| subnet.replace('/', "-"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    agent.ensure_running_and_skipping(&names)?;
    let report = Agent::status_report(&cluster, &host1)?;
    for (subnet, public_ip, mac) in UNUSABLE_VALUES {
        let key = cluster.subnet_key(subnet);
        let named = report
            .lines()
            .any(|line| line.contains(&key) && (line.contains(public_ip) || line.contains(mac)));
        ensure!(named, "status names {key} and its value:\n{report}");
    }
    Ok(())
}

/// A record copying another lease's VtepMAC would make the FDB entry of that MAC flip between
/// the two PublicIPs, one reconcile round per flip. The record etcd created later is skipped,
/// here under a key that sorts first, also after a restart.
#[test]
fn a_copied_vtep_mac_is_skipped_in_the_later_record() -> Result<()> {
    let (cluster, host1, mut agent) = lone_host("copied-mac", &["--dataplane=kernel"])?;

    let mac = "1a:4b:d7:f7:16:89";
    put(&cluster, SUBNET2, &record(HOST2, mac))?;
    host1.wait_for_peer(SUBNET2, HOST2, mac)?;
    let copy = "10.2.3.0/24";
    put(&cluster, copy, &record("172.20.62.66", mac))?;
    put(&cluster, LATER_SUBNET, &record(LATER_PUBLIC_IP, LATER_MAC))?;
    host1.wait_for_peer(LATER_SUBNET, LATER_PUBLIC_IP, LATER_MAC)?;
    wait_for_skipped(&host1, 1.0)?;
    ensure!(host1.holds_no_peer(copy)?, "host1 routes the copy {copy}");
    let fdb = host1
        .netns
        .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
    let entries: Vec<&str> = fdb.lines().filter(|line| line.starts_with(mac)).collect();
    ensure!(
        entries.len() == 1 && entries[0].contains(&format!("dst {HOST2}")),
        "{mac} goes to {HOST2} alone:\n{fdb}"
    );

    agent.process.terminate(EVENT_TIMEOUT)?;
    let mut restarted = Agent::start(&cluster, &host1, &["--dataplane=kernel"])?;
    ensure!(
        restarted.wait_ready()? == SUBNET1,
        "the restart kept the lease"
    );
    host1.wait_for_peer(LATER_SUBNET, LATER_PUBLIC_IP, LATER_MAC)?;
    host1.wait_for_peer(SUBNET2, HOST2, mac)?;
    wait_for_skipped(&host1, 1.0)?;
    ensure!(
        host1.holds_no_peer(copy)?,
        "after the restart host1 routes {copy}"
    );
    Ok(())
}

/// A record rewritten with the same bad value is warned about once, not at every write; a
/// usable value in between, and a bad one after it, is news again.
#[test]
fn a_bad_record_written_again_is_warned_about_once() -> Result<()> {
    let (cluster, host1, agent) = lone_host("warn-once", &["--dataplane=kernel"])?;

    let key = format!("{PREFIX}/subnets/10.2.54.0-24");
    let warning = format!("skipping record {key}");
    for _ in 0..5 {
        cluster.etcd.put(&key, "{not json")?;
    }
    put(&cluster, LATER_SUBNET, &record(LATER_PUBLIC_IP, LATER_MAC))?;
    host1.wait_for_peer(LATER_SUBNET, LATER_PUBLIC_IP, LATER_MAC)?;
    ensure!(
        agent.count_in_log(&warning) == 1,
        "the warning came {} times:\n{}",
        agent.count_in_log(&warning),
        agent.log()
    );

    let mac = "1a:4b:d7:f7:16:89";
    cluster.etcd.put(&key, &record(HOST2, mac))?;
    host1.wait_for_peer(SUBNET2, HOST2, mac)?;
    cluster.etcd.put(&key, "{not json")?;
    cluster.etcd.put(&key, "{not json")?;
    host1.wait_for_no_peer(SUBNET2)?;
    agent.wait_for_log(&warning, 2, EVENT_TIMEOUT)?;
    put(
        &cluster,
        "10.2.61.0/24",
        &record("172.20.62.109", "1a:4b:d7:f7:16:61"),
    )?;
    host1.wait_for_peer("10.2.61.0/24", "172.20.62.109", "1a:4b:d7:f7:16:61")?;
    ensure!(
        agent.count_in_log(&warning) == 2,
        "the warning came {} times:\n{}",
        agent.count_in_log(&warning),
        agent.log()
    );
    Ok(())
}

/// Issue 28: the uplink checked the inner source of VXLAN over IPv6 against one IPv6 subnet
/// per PublicIPv6, the greatest, so a record naming host2's PublicIPv6 with a greater IPv6
/// subnet (here one left behind at an old PublicIP, as a host whose PublicIP changed leaves
/// it) made host1 drop all IPv6 from host2's containers (`rx_ipv6_spoofed_inner`).
#[test]
fn a_second_lease_of_a_public_ipv6_leaves_its_first_one_reachable() -> Result<()> {
    let seed = Seed::start_dual_stack("second-ipv6-lease", [&[], &[]])?;
    seed.bbox2.ping6(BBOX1_V6, 1)?;
    let (subnet, subnet6) = ("10.2.99.0/24", "fd00:2:0:99::/64");
    let left_behind = lease_value(
        Some(Vtep {
            public_ip: "172.20.62.66",
            mac: "1a:4b:d7:f7:16:99",
        }),
        Some(Vtep {
            public_ip: HOST2_V6,
            mac: "1a:4b:d7:f7:66:99",
        }),
    );
    seed.cluster.etcd.put(
        &seed.cluster.subnet_key6(Some(subnet), subnet6),
        &left_behind,
    )?;
    seed.host1.wait_for_route(subnet6)?;

    let before = PinnedDataplane::open(&seed.host1.pin_dir())?.counters()?;
    seed.bbox2.ping6(BBOX1_V6, 3)?;
    seed.bbox1.ping6(BBOX2_V6, 3)?;
    let after = PinnedDataplane::open(&seed.host1.pin_dir())?.counters()?;
    let spoofed = Counter::RxIpv6SpoofedInner;
    ensure!(
        after.get(spoofed) == before.get(spoofed),
        "host1 counted host2's IPv6 as {}",
        spoofed.name()
    );
    Ok(())
}

/// An administrator's own nftables tables, named as iptables-nft names its tables: on a host
/// whose iptables is iptables-legacy they are nobody's but the administrator's.
const ADMIN_TABLES: [(&str, &str); 2] = [("ip", "nat"), ("ip6", "filter")];

fn nft_table_exists(host: &Host, family: &str, name: &str) -> Result<bool> {
    Ok(host
        .netns
        .exec_unchecked(&["nft", "list", "table", family, name])?
        .status
        .success())
}

/// Issue 28: with iptables-legacy, the agent took an nftables table named `ip nat` or `ip6
/// filter` for iptables-nft's own, emptied by the removal of our chains, and deleted it at
/// start (EnableNFTables) and at teardown.
#[test]
fn an_administrators_nftables_tables_survive_start_and_teardown() -> Result<()> {
    let mut cluster = Cluster::with_etcd("admin-tables", false, Some(NFTABLES_NETWORK_CONFIG))?;
    cluster.reserve(SUBNET1, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    for (family, name) in ADMIN_TABLES {
        host1.netns.exec(&["nft", "add", "table", family, name])?;
        host1
            .netns
            .exec(&["nft", "add", "chain", family, name, "admin"])?;
        host1
            .netns
            .exec(&["nft", "add", "rule", family, name, "admin", "counter"])?;
    }
    let path = host1.legacy_iptables_path()?;
    let envs = [("PATH", path.as_str())];
    let mut agent = Agent::start_with(&host1, &Agent::flags(&cluster, &host1, &[]), &envs)?;
    ensure!(agent.wait_ready()? == SUBNET1, "host1 kept its reservation");
    // Our own table is there: the rules were written, after the clean-up at start.
    wait_for("our nftables table", EVENT_TIMEOUT, || {
        nft_table_exists(&host1, "ip", "flannel-ipv4")
    })?;
    for (family, name) in ADMIN_TABLES {
        ensure!(
            nft_table_exists(&host1, family, name)?,
            "the start deleted the administrator's table {family} {name}"
        );
    }

    agent.process.terminate(EVENT_TIMEOUT)?;
    let flags = [
        "teardown".to_string(),
        format!("--subnet-file={}", host1.subnet_file().display()),
        format!("--bpf-pin-dir={}", host1.pin_dir().display()),
    ];
    let mut teardown = Agent::start_with(&host1, &flags, &envs)?;
    ensure!(
        teardown.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        teardown.log()
    );
    ensure!(
        !nft_table_exists(&host1, "ip", "flannel-ipv4")?,
        "teardown removes our table"
    );
    for (family, name) in ADMIN_TABLES {
        ensure!(
            nft_table_exists(&host1, family, name)?,
            "teardown deleted the administrator's table {family} {name}"
        );
    }
    Ok(())
}
