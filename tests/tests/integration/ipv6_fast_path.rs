//! The IPv6 fast path in namespaces: the dual-stack seed's IPv6 leaves through it and comes
//! in through it with flannel's hops, and every packet on the wire, from the fast path or
//! the routed path, carries an outer UDP checksum a stock kernel verifies, superpackets
//! segmented after encapsulation included, while the receiving fast path verifies what a
//! kernel sends. Flows conntrack translates over IPv6 (a service address, a published port)
//! keep working. An IPv6-only network takes the same paths.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    agent::Agent,
    cluster::Host,
    ipv6::{BBOX2_V6, HOST2_V6, SUBNET1_V6, SUBNET2_V6},
    netns::Netns,
    process::iperf3_server,
    seed::{Container, Seed, check_ipv6_path, iperf3_through},
    wait::wait_for,
};

const EBPF: &[&str] = &["--dataplane=ebpf"];
const KERNEL: &[&str] = &["--dataplane=kernel"];
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

/// Pings `destination` from `from` until `host` delivers straight into a container: the
/// first packets to a container the host has not yet talked to go through docker0, which
/// learns its address by NDP.
fn warm_up(from: &Container, destination: &str, host: &Host) -> Result<()> {
    let before = counters(host)?;
    wait_for("delivery by the IPv6 fast path", EVENT_TIMEOUT, || {
        from.netns
            .exec_unchecked(&["ping", "-6", "-n", "-c", "1", "-W", "1", destination])?;
        Ok(delta(&before, &counters(host)?, Counter::RxDelivered) > 0)
    })
}

/// Pings from bbox1 to bbox2 and back once both hosts deliver straight into the containers,
/// then checks that 3 pings and their replies took the fast path at both ends, with hop
/// limit 62.
fn check_fast_path_both_ways(seed: &Seed) -> Result<()> {
    let bbox1 = seed.bbox1.address6.as_deref().context("bbox1 has IPv6")?;
    let bbox2 = seed.bbox2.address6.as_deref().context("bbox2 has IPv6")?;
    warm_up(&seed.bbox1, bbox2, &seed.host2)?;
    warm_up(&seed.bbox2, bbox1, &seed.host1)?;
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    let output = seed.bbox1.ping6(bbox2, 3)?;
    ensure!(output.matches("ttl=62").count() == 3, "{output}");
    let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    for (host, before, after) in [("host1", before1, after1), ("host2", before2, after2)] {
        for counter in [Counter::TxDirect, Counter::RxDelivered] {
            ensure!(
                delta(&before, &after, counter) == 3,
                "{host}: {} for the requests or replies: {after:?}",
                counter.name()
            );
        }
    }
    Ok(())
}

#[test]
fn the_seeds_ipv6_takes_the_fast_path_both_ways_with_flannels_hops() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-fast", [EBPF, EBPF])?;
    check_fast_path_both_ways(&seed)?;
    // What a router must answer still comes from the stack: docker0's gateway, then host2's
    // flannel-v6.1, then bbox2.
    let gateway1 = SUBNET1_V6.replace("::/64", "::1");
    let vtep2 = SUBNET2_V6.replace("/64", "");
    check_ipv6_path(&seed.bbox1, BBOX2_V6, [&gateway1, &vtep2])
}

#[test]
fn an_ipv6_only_network_takes_the_fast_path_and_refuses_a_containers_ipv4() -> Result<()> {
    let seed = Seed::start_ipv6_only("v6-only-fast", EBPF)?;
    check_fast_path_both_ways(&seed)?;
    // host1's own IPv6 goes through flannel-v6.1, whose egress program wraps it.
    let bbox2 = seed.bbox2.address6.as_deref().context("bbox2 has IPv6")?;
    let before = counters(&seed.host1)?;
    seed.host1
        .netns
        .exec(&["ping", "-6", "-n", "-c", "2", "-W", "2", bbox2])?;
    let after = counters(&seed.host1)?;
    ensure!(
        delta(&before, &after, Counter::TxEncapsulated) == 2,
        "host1's pings encapsulated on flannel-v6.1's egress: {after:?}"
    );
    // The lease has no IPv4 address for a container: one that takes some anyway gets nowhere.
    seed.bbox1
        .netns
        .ip(&["addr", "add", "10.2.41.2/24", "dev", "eth0"])?;
    seed.bbox1
        .netns
        .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", "10.2.41.1"])?;
    let refused = delta(&after, &counters(&seed.host1)?, Counter::TxSpoofedSource);
    ensure!(refused > 0, "bbox1's IPv4 (its ARP) was not refused");
    // status shows host2's IPv6-only lease in both IPv6 maps, and no IPv4 half.
    let report = Agent::status_report(&seed.cluster, &seed.host1)?;
    for line in [
        format!("via {HOST2_V6} (VTEP ").as_str(),
        "in the IPv6 subnet map\n",
        "tc_vtep_egress on flannel-v6.1 (ifindex",
    ] {
        ensure!(report.contains(line), "status lacks {line:?}:\n{report}");
    }
    ensure!(!report.contains("MISSING"), "{report}");
    Ok(())
}

#[test]
fn a_stock_kernel_verifies_every_segment_of_both_paths_and_we_verify_the_kernels() -> Result<()> {
    // host2 in kernel mode is flannel-v6.1 as stock flannel builds it: its UDP layer checks
    // every outer checksum host1 sends, and host1's fast path those host2 sends.
    let seed = Seed::start_dual_stack("v6-csum", [EBPF, KERNEL])?;
    // No offloads on the uplinks: superpackets are cut and every checksum completed in
    // software before the wire, so the receivers get the final bytes and check them.
    for host in [&seed.host1, &seed.host2] {
        host.netns.exec(&[
            "ethtool", "-K", "eth0", "tx", "off", "tso", "off", "gso", "off",
        ])?;
    }
    let bbox1 = seed.bbox1.address6.clone().context("bbox1 has IPv6")?;
    warm_up(&seed.bbox2, &bbox1, &seed.host1)?;
    // The fast path: bbox1's transfer, encapsulated at its veth.
    let delivered = checked_transfer(&seed, &seed.bbox1.netns, Counter::TxDirect)?;
    // host2's ACKs, checksummed by its kernel, passed host1's check and went straight in.
    ensure!(delivered > 0, "host1 delivered host2's packets into bbox1");
    // The routed path: host1's own transfer, encapsulated on flannel-v6.1's egress.
    checked_transfer(&seed, &seed.host1.netns, Counter::TxEncapsulated)?;
    Ok(())
}

/// Runs 2 s of iperf3 over IPv6 from `client` on host1 to bbox2, and checks that host2 found
/// no bad outer UDP checksum while host1 encapsulated the transfer itself, counted as `path`,
/// and that its superpackets were cut after encapsulation. Returns how many packets host1
/// delivered into containers meanwhile.
fn checked_transfer(seed: &Seed, client: &Netns, path: Counter) -> Result<u64> {
    let errors_before = udp6_stat(&seed.host2, "Udp6InCsumErrors")?;
    let datagrams_before = udp6_stat(&seed.host2, "Udp6InDatagrams")?;
    let log = seed.cluster.scratch.path().join("iperf3-v6.log");
    let mut server = iperf3_server(&seed.bbox2.netns, &log, true)?;
    let before = counters(&seed.host1)?;
    let report = client.exec(&["iperf3", "-6", "-c", BBOX2_V6, "-t", "2", "-J"])?;
    server.wait_exit(EVENT_TIMEOUT)?;
    let after = counters(&seed.host1)?;
    let json: serde_json::Value =
        serde_json::from_str(&report).context("iperf3 -J printed no JSON")?;
    let received = json["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("no bytes received")?;
    ensure!(
        received > 10_000_000,
        "{}: at least 10 MB in 2 s, got {received}",
        path.name()
    );
    let errors = udp6_stat(&seed.host2, "Udp6InCsumErrors")? - errors_before;
    ensure!(errors == 0, "host2 found {errors} bad outer UDP checksums");
    let sent = delta(&before, &after, path);
    ensure!(
        sent > 0,
        "host1 carried the transfer by {}: {after:?}",
        path.name()
    );
    let others = [
        Counter::TxDirect,
        Counter::TxEncapsulated,
        Counter::TxIpv6Routed,
    ]
    .into_iter()
    .map(|counter| delta(&before, &after, counter))
    .sum::<u64>()
        - sent;
    // Each packet host1 sent arrives as one datagram or, a superpacket, as many. The others
    // (flannel-v6.1's) hold at most 64 KiB, so at most 66 segments of an MSS of 1,000 bytes
    // or more (the overlay's is about 1,360): more datagrams than that allows prove that
    // host1's own superpackets were cut, each segment with the checksum written before.
    let datagrams = udp6_stat(&seed.host2, "Udp6InDatagrams")? - datagrams_before;
    ensure!(
        datagrams > sent + 66 * others,
        "{datagrams} datagrams reached host2 from {sent} packets by {} and {others} others",
        path.name()
    );
    Ok(delta(&before, &after, Counter::RxDelivered))
}

/// A service address on host1, as kube-proxy would DNAT an IPv6 ClusterIP.
const SERVICE_VIP6: &str = "fd00:96::10";
const SERVICE_PORT: &str = "80";
const PUBLISHED_PORT: &str = "8080";
const IPERF3_PORT: &str = "5201";

/// Has `host` DNAT TCP over IPv6 to `address`:`port` to `to` (`[address]:port`), in nat
/// PREROUTING.
fn dnat6(host: &Host, address: &str, port: &str, to: &str) -> Result<()> {
    host.ip6tables(&[
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        address,
        "-p",
        "tcp",
        "--dport",
        port,
        "-j",
        "DNAT",
        "--to-destination",
        to,
    ])
    .map(drop)
}

#[test]
fn an_ipv6_service_address_dnated_to_another_host_works_on_the_fast_path() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-vip", [EBPF, EBPF])?;
    dnat6(
        &seed.host1,
        SERVICE_VIP6,
        SERVICE_PORT,
        &format!("[{BBOX2_V6}]:{IPERF3_PORT}"),
    )?;
    let before = counters(&seed.host1)?;
    iperf3_through(&seed, &seed.bbox1, &seed.bbox2, SERVICE_VIP6, SERVICE_PORT)?;
    let after = counters(&seed.host1)?;
    let routed = delta(&before, &after, Counter::TxEncapsulated)
        + delta(&before, &after, Counter::TxIpv6Routed);
    ensure!(
        routed > 0 && delta(&before, &after, Counter::RxChecked) > 0,
        "host1's stack carried the translated flow both ways: {after:?}"
    );
    Ok(())
}

/// host2's conntrack undoes the DNAT on bbox2's replies, which then come from host2's
/// PublicIPv6 over VXLAN: host1's guard must let them in, as it does over IPv4.
#[test]
fn an_ipv6_port_dnated_on_the_server_s_host_works_on_the_fast_path() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-published", [EBPF, EBPF])?;
    let host2 = seed.host2.ipv6()?.to_string();
    dnat6(
        &seed.host2,
        &host2,
        PUBLISHED_PORT,
        &format!("[{BBOX2_V6}]:{IPERF3_PORT}"),
    )?;
    let before = counters(&seed.host2)?;
    iperf3_through(&seed, &seed.bbox1, &seed.bbox2, &host2, PUBLISHED_PORT)?;
    let after = counters(&seed.host2)?;
    ensure!(
        delta(&before, &after, Counter::TxRoutedFlow) > 0,
        "host2 left bbox2's replies to its conntrack: {after:?}"
    );
    Ok(())
}

/// The VXLAN header's length over IPv6, beyond the veth's own Ethernet header.
const VXLAN6_OVERHEAD: u16 = 70;

/// Over an IPv6 underlay a container's end of its veth asks for room for the longer header.
#[test]
fn dual_stack_containers_leave_room_for_the_ipv6_vxlan_header() -> Result<()> {
    let seed = Seed::start_dual_stack("headroom6", [EBPF, EBPF])?;
    let headroom = seed.bbox1.netns.headroom("eth0")?;
    ensure!(
        headroom >= VXLAN6_OVERHEAD,
        "bbox1's eth0 asks for {headroom} bytes of headroom\n{}",
        seed.agent1.log()
    );
    let ping = seed.bbox1.ping6(BBOX2_V6, 3)?;
    ensure!(ping.matches("bytes from").count() == 3, "{ping}");
    Ok(())
}
