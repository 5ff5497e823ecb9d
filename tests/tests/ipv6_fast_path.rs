//! The IPv6 fast path in namespaces: the dual-stack seed's IPv6 leaves through it, keeps
//! flannel's hops, and every packet on the wire carries an outer UDP checksum the receiving
//! kernel verifies, superpackets segmented after encapsulation included.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    cluster::Host,
    ipv6::{BBOX2_V6, SUBNET1_V6, SUBNET2_V6},
    process::iperf3_server,
    seed::{Seed, check_ipv6_path},
};

const EBPF: &[&str] = &["--dataplane=ebpf"];
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn counters(host: &Host) -> Result<Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

fn delta(before: &Counters, after: &Counters, counter: Counter) -> u64 {
    after.get(counter) - before.get(counter)
}

/// One counter of the host's IPv6 UDP statistics (`/proc/net/snmp6`, per namespace).
fn udp6_stat(host: &Host, name: &str) -> Result<u64> {
    let table = host.netns.exec(&["cat", "/proc/net/snmp6"])?;
    table
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .with_context(|| format!("{}'s snmp6 has no {name}", host.name))
}

#[test]
fn the_seeds_ipv6_takes_the_fast_path_with_flannels_hops() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-fast", [EBPF, EBPF])?;
    let gateway1 = SUBNET1_V6.replace("::/64", "::1");
    let vtep2 = SUBNET2_V6.replace("/64", "");
    check_ipv6_path(&seed.bbox1, BBOX2_V6, [&gateway1, &vtep2])?;
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    let output = seed.bbox1.ping6(BBOX2_V6, 3)?;
    ensure!(output.contains("3 received"), "{output}");
    let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    for (host, before, after) in [("host1", before1, after1), ("host2", before2, after2)] {
        ensure!(
            delta(&before, &after, Counter::TxDirect) >= 3,
            "{host} sent the requests or replies past flannel-v6.1: {after:?}"
        );
    }
    Ok(())
}

#[test]
fn every_segment_on_the_wire_carries_a_valid_outer_udp_checksum() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-csum", [EBPF, EBPF])?;
    // No offloads on the uplinks: superpackets are cut and every checksum completed in
    // software before the wire, and the receivers verify each datagram's in software.
    for host in [&seed.host1, &seed.host2] {
        host.netns.exec(&[
            "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off",
        ])?;
    }
    let errors_before = udp6_stat(&seed.host2, "Udp6InCsumErrors")?;
    let datagrams_before = udp6_stat(&seed.host2, "Udp6InDatagrams")?;
    let log = seed.cluster.scratch.path().join("iperf3-v6.log");
    let mut server = iperf3_server(&seed.bbox2.netns, &log, true)?;
    let before = counters(&seed.host1)?;
    let report = seed
        .bbox1
        .netns
        .exec(&["iperf3", "-6", "-c", BBOX2_V6, "-t", "2", "-J"])?;
    server.wait_exit(EVENT_TIMEOUT)?;
    let after = counters(&seed.host1)?;
    let json: serde_json::Value =
        serde_json::from_str(&report).context("iperf3 -J printed no JSON")?;
    let received = json["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("no bytes received")?;
    ensure!(
        received > 10_000_000,
        "at least 10 MB in 2 s, got {received}"
    );

    let errors = udp6_stat(&seed.host2, "Udp6InCsumErrors")? - errors_before;
    ensure!(errors == 0, "host2 found {errors} bad outer UDP checksums");
    let fast = delta(&before, &after, Counter::TxDirect);
    let datagrams = udp6_stat(&seed.host2, "Udp6InDatagrams")? - datagrams_before;
    ensure!(
        fast > 0,
        "host1's fast path carried the transfer: {after:?}"
    );
    // Fewer packets left the fast path than reached host2: superpackets, cut up after our
    // encapsulation, each segment with the checksum written before.
    ensure!(
        datagrams > fast,
        "{datagrams} datagrams reached host2 from {fast} fast-path packets"
    );
    Ok(())
}
