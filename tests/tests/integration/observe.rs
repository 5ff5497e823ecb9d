//! What the overlay carries, as an operator sees it: each remote lease's packets and bytes in
//! `overlay-agent status` and `/metrics`, and `overlay-agent monitor --trace`, one line per
//! packet to or from an address with the path it took, on a dual-stack seed; in kernel mode,
//! `status` against flannel's own kernel entries.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aya::maps::{Array, Map, MapData, RingBuf};
use overlay_common::Trace;
use overlay_tests::{
    agent::{Agent, HEALTH_PORT},
    cluster::Host,
    ipv6::{BBOX1_V6, BBOX2_V6, HOST2_V6, SUBNET2_V6},
    metrics::{scrape, value_of},
    seed::{BBOX1, BBOX2, HOST2, SUBNET1, SUBNET2, Seed},
    wait::wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(20);
/// host2's lease's gateway on flannel.1: its subnet's network address.
const GATEWAY2: &str = "10.2.54.0";
const PINGS: u64 = 5;
/// An IPv4 ping's packet: 56 bytes of data, the ICMP header and the IPv4 header.
const PING_BYTES: u64 = 56 + 8 + 20;
/// An IPv6 ping's: 56 bytes of data, the ICMPv6 header and the IPv6 header.
const PING6_BYTES: u64 = 56 + 8 + 40;

/// One remote lease's counters: sent packets and bytes, received packets and bytes.
type PeerCounts = [u64; 4];

/// `peer`'s lease `subnet`, as `/metrics` on `host` counts it.
fn peer_metrics(host: &Host, peer: &str, subnet: &str) -> Result<PeerCounts> {
    let samples = scrape(&host.netns, HEALTH_PORT)?;
    let labels = [("peer", peer), ("subnet", subnet)];
    let mut counts = [0; 4];
    let names = ["tx_packets", "tx_bytes", "rx_packets", "rx_bytes"];
    for (count, name) in counts.iter_mut().zip(names) {
        let metric = format!("overlay_peer_{name}_total");
        *count = value_of(&samples, &metric, &labels)
            .with_context(|| format!("/metrics has no {metric} for {peer} {subnet}"))?
            as u64;
    }
    Ok(counts)
}

/// `peer`'s lease `subnet`, as `overlay-agent status` on `host` counts it: the four numbers
/// of its line under `peers:`.
fn peer_status(seed: &Seed, host: &Host, peer: &str, subnet: &str) -> Result<PeerCounts> {
    let report = Agent::status_report(&seed.cluster, host)?;
    let prefix = format!("  {peer} {subnet}: ");
    let line = report
        .lines()
        .find(|line| line.starts_with(&prefix))
        .with_context(|| format!("status has no line for {peer} {subnet}:\n{report}"))?;
    let numbers: Vec<u64> = line[prefix.len()..]
        .split_whitespace()
        .filter_map(|word| {
            word.trim_matches(|c| c == '(' || c == ')' || c == ',')
                .parse()
                .ok()
        })
        .collect();
    numbers
        .try_into()
        .map_err(|numbers| anyhow::anyhow!("not four counts in {line:?}: {numbers:?}"))
}

fn moved(before: PeerCounts, after: PeerCounts) -> PeerCounts {
    [0, 1, 2, 3].map(|index| after[index] - before[index])
}

test_matrix!(check_peer_counters {
    /// Encapsulated at the containers' veths.
    peer_counters_move_by_the_pings_each_way_in_status_and_metrics: ("peers", &[]),
    /// Encapsulated at flannel.1 and flannel-v6.1, after the stack routed them.
    peer_counters_count_the_routed_path_too: ("peers-routed", &["--fast-path=false"]),
});

/// Five pings of each family from bbox1 to bbox2 move host1's counters of host2's two leases
/// by five packets and their bytes each way in `status`, and `/metrics`, read every few
/// seconds, comes to the same counts.
fn check_peer_counters(tag: &str, agent_flags: &[&str]) -> Result<()> {
    let seed = Seed::start_dual_stack(tag, [agent_flags, agent_flags])?;
    let host1 = &seed.host1;
    let peers = [(HOST2, SUBNET2), (HOST2_V6, SUBNET2_V6)];
    let mut before = Vec::new();
    for (peer, subnet) in peers {
        before.push(peer_status(&seed, host1, peer, subnet)?);
    }
    let count = PINGS.to_string();
    seed.bbox1
        .netns
        .exec(&["ping", "-n", "-q", "-c", &count, "-i", "0.2", BBOX2])?;
    seed.bbox1.netns.exec(&[
        "ping", "-6", "-n", "-q", "-c", &count, "-i", "0.2", BBOX2_V6,
    ])?;
    let expected = [
        [PINGS, PINGS * PING_BYTES, PINGS, PINGS * PING_BYTES],
        [PINGS, PINGS * PING6_BYTES, PINGS, PINGS * PING6_BYTES],
    ];
    for (((peer, subnet), before), expected) in peers.into_iter().zip(before).zip(expected) {
        let after = peer_status(&seed, host1, peer, subnet)?;
        assert_eq!(
            moved(before, after),
            expected,
            "status of {peer} {subnet}: tx, rx"
        );
        let mut exported = None;
        wait_for("/metrics to count what status counts", TIMEOUT, || {
            exported = peer_metrics(host1, peer, subnet).ok();
            Ok(exported == Some(after))
        })
        .with_context(|| format!("{peer} {subnet}: status {after:?}, /metrics {exported:?}"))?;
    }
    Ok(())
}

/// `overlay-agent monitor --trace prefix` on host1, started and tracing.
fn start_trace(seed: &Seed, prefix: &str) -> Result<Agent> {
    let flags = [
        "monitor".to_string(),
        format!("--trace={prefix}"),
        format!("--bpf-pin-dir={}", seed.host1.pin_dir().display()),
    ];
    let monitor = Agent::start_with(&seed.host1, &flags, &[])?;
    monitor
        .wait_for_log(&format!("tracing {prefix}"), 1, TIMEOUT)
        .with_context(|| format!("monitor log:\n{}", monitor.log()))?;
    Ok(monitor)
}

/// The monitor's lines about packets from `source` to `destination` over `protocol`.
fn lines_between(log: &str, source: &str, destination: &str, protocol: &str) -> Vec<String> {
    let needle = format!(" {source} -> {destination} {protocol} ");
    log.lines()
        .filter(|line| line.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Each of `pings` pings to `destination` traced once each way on the fast path.
fn check_traced_pings(log: &str, source: &str, destination: &str, protocol: &str) -> Result<()> {
    let requests = lines_between(log, source, destination, protocol);
    let replies = lines_between(log, destination, source, protocol);
    ensure!(
        requests.len() == PINGS as usize && replies.len() == PINGS as usize,
        "{PINGS} lines each way for {source} <-> {destination}:\n{log}"
    );
    for line in &requests {
        ensure!(line.starts_with("fast path: tx_direct on "), "{line}");
    }
    for line in &replies {
        ensure!(
            line.starts_with("fast path: rx_delivered on eth0: "),
            "{line}"
        );
    }
    Ok(())
}

fn pinned_trace(host: &Host) -> Result<Trace> {
    let path = host.pin_dir().join("trace");
    let data =
        MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let trace: Array<MapData, Trace> = Array::try_from(Map::Array(data))?;
    Ok(trace.get(&0, 0)?)
}

#[test]
fn a_trace_prints_each_ping_each_way_with_its_path_and_nothing_else() -> Result<()> {
    let seed = Seed::start_dual_stack("trace", [&[], &[]])?;
    let count = PINGS.to_string();
    let ping = |destination: &str| {
        seed.bbox1
            .netns
            .exec(&["ping", "-n", "-q", "-c", &count, "-i", "0.2", destination])
    };
    // Once untraced, so that both hosts know the containers and every traced ping takes
    // the fast path.
    ping(BBOX2)?;
    ping(BBOX2_V6)?;

    let mut monitor = start_trace(&seed, BBOX2)?;
    let mut second = Agent::start_with(
        &seed.host1,
        &[
            "monitor".to_string(),
            format!("--bpf-pin-dir={}", seed.host1.pin_dir().display()),
        ],
        &[],
    )?;
    ensure!(
        !second.process.wait_exit(TIMEOUT)?.success(),
        "a second monitor is refused"
    );
    ensure!(
        second.log().contains("one monitor at a time"),
        "{}",
        second.log()
    );
    // Another address of the same peer, and the traced container's IPv6 address, first: their
    // lines would come before those of the traced pings.
    ping("10.2.54.1")?;
    ping(BBOX2_V6)?;
    ping(BBOX2)?;
    monitor.wait_for_log(
        &format!(" {BBOX2} -> {BBOX1} icmp "),
        PINGS as usize,
        TIMEOUT,
    )?;
    ensure!(
        monitor.process.terminate(TIMEOUT)?.success(),
        "{}",
        monitor.log()
    );
    let log = monitor.log();
    check_traced_pings(&log, BBOX1, BBOX2, "icmp")?;
    let traced = log.lines().filter(|line| line.contains(" -> ")).count();
    assert_eq!(traced, 2 * PINGS as usize, "nothing else is traced:\n{log}");

    // Off once the monitor is gone: no event for the same pings.
    assert_eq!(pinned_trace(&seed.host1)?, Trace::default());
    let path = seed.host1.pin_dir().join("drop_events");
    let data = MapData::from_pin(&path)?;
    let mut events = RingBuf::try_from(Map::RingBuf(data))?;
    while events.next().is_some() {}
    ping(BBOX2)?;
    assert!(events.next().is_none(), "an event without a monitor");

    let mut monitor6 = start_trace(&seed, BBOX2_V6)?;
    ping(BBOX2_V6)?;
    monitor6.wait_for_log(
        &format!(" {BBOX2_V6} -> {BBOX1_V6} icmp6 "),
        PINGS as usize,
        TIMEOUT,
    )?;
    ensure!(
        monitor6.process.terminate(TIMEOUT)?.success(),
        "{}",
        monitor6.log()
    );
    check_traced_pings(&monitor6.log(), BBOX1_V6, BBOX2_V6, "icmp6")?;
    Ok(())
}

/// Whether `status` on `host` lists `peer`'s lease `subnet` under `peers:`.
fn status_lists(seed: &Seed, host: &Host, peer: &str, subnet: &str) -> Result<bool> {
    let report = Agent::status_report(&seed.cluster, host)?;
    Ok(report.contains(&format!("  {peer} {subnet}: ")))
}

#[test]
fn peer_counts_survive_a_restart_and_go_with_the_lease() -> Result<()> {
    let mut seed = Seed::start("peers-life", &[])?;
    let ping = |count: u64| {
        let count = count.to_string();
        seed.bbox1
            .netns
            .exec(&["ping", "-n", "-q", "-c", &count, "-i", "0.2", BBOX2])
    };
    ping(PINGS)?;
    let counted = peer_status(&seed, &seed.host1, HOST2, SUBNET2)?;
    ensure!(counted[0] >= PINGS && counted[2] >= PINGS, "{counted:?}");

    // An agent restarted over its pins takes each lease's slot back, counts and all: one
    // more ping adds to them, rather than starting a slot of its own.
    seed.agent1.process.kill();
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &[])?;
    seed.agent1.wait_ready()?;
    ping(1)?;
    let one_more = [
        counted[0] + 1,
        counted[1] + PING_BYTES,
        counted[2] + 1,
        counted[3] + PING_BYTES,
    ];
    assert_eq!(
        peer_status(&seed, &seed.host1, HOST2, SUBNET2)?,
        one_more,
        "after a restart"
    );
    wait_for(
        "/metrics to export the same after a restart",
        TIMEOUT,
        || Ok(peer_metrics(&seed.host1, HOST2, SUBNET2).ok() == Some(one_more)),
    )?;

    // The lease goes: so do its counts; back, it starts from zero.
    seed.agent2.process.kill();
    seed.cluster
        .etcd
        .etcdctl(&["del", &seed.cluster.subnet_key(SUBNET2)])?;
    wait_for("host2's lease to leave host1's status", TIMEOUT, || {
        Ok(!status_lists(&seed, &seed.host1, HOST2, SUBNET2)?)
    })?;
    wait_for("host2's lease to leave host1's /metrics", TIMEOUT, || {
        Ok(peer_metrics(&seed.host1, HOST2, SUBNET2).is_err())
    })?;
    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &[])?;
    assert_eq!(seed.agent2.wait_ready()?, SUBNET2);
    wait_for("host2's lease back in host1's status", TIMEOUT, || {
        status_lists(&seed, &seed.host1, HOST2, SUBNET2)
    })?;
    assert_eq!(
        peer_status(&seed, &seed.host1, HOST2, SUBNET2)?,
        [0; 4],
        "a returning lease"
    );
    Ok(())
}

/// In kernel mode nothing is pinned, and `status` holds each remote lease against flannel's
/// own entries instead of the maps: the route into flannel.1 (flannel-v6.1), the gateway's
/// neighbour and the VTEP's FDB entry, each named `MISSING` when it is not there.
#[test]
fn status_in_kernel_mode_holds_each_lease_against_flannels_kernel_entries() -> Result<()> {
    let kernel = ["--dataplane=kernel"].as_slice();
    let mut seed = Seed::start_dual_stack("status-kernel", [kernel, kernel])?;
    let (mac2, mac2_v6) = (seed.host2.vtep_mac()?, seed.host2.vtep6_mac()?);
    let gateway_v6 = SUBNET2_V6.trim_end_matches("/64");
    let report = Agent::status_report(&seed.cluster, &seed.host1)?;
    for line in [
        format!("lease: {SUBNET1}"),
        "dataplane: nothing pinned under".to_string(),
        "remote leases (1):".to_string(),
        format!(
            "{SUBNET2} via {HOST2} (VTEP {mac2}): route via {GATEWAY2} dev flannel.1, neighbour, \
             FDB entry; {SUBNET2_V6} via {HOST2_V6} (VTEP {mac2_v6}): route via {gateway_v6} dev \
             flannel-v6.1, neighbour, FDB entry\n"
        ),
        "programs:".to_string(),
    ] {
        ensure!(report.contains(&line), "status lacks {line:?}:\n{report}");
    }
    ensure!(!report.contains("MISSING"), "{report}");

    // Stopped (the entries stay), so that it does not put back what is taken away here.
    seed.agent1.process.terminate(TIMEOUT)?;
    let host1 = &seed.host1.netns;
    host1.ip(&["neigh", "del", GATEWAY2, "dev", "flannel.1"])?;
    host1.exec(&[
        "bridge",
        "fdb",
        "del",
        &mac2,
        "dev",
        "flannel.1",
        "dst",
        HOST2,
    ])?;
    host1.ip(&["-6", "route", "del", SUBNET2_V6])?;
    let report = Agent::status_report(&seed.cluster, &seed.host1)?;
    let line = format!(
        "{SUBNET2} via {HOST2} (VTEP {mac2}): route via {GATEWAY2} dev flannel.1, neighbour \
         MISSING from flannel.1, FDB entry MISSING from flannel.1; {SUBNET2_V6} via {HOST2_V6} \
         (VTEP {mac2_v6}): route MISSING\n"
    );
    ensure!(report.contains(&line), "status lacks {line:?}:\n{report}");
    Ok(())
}
