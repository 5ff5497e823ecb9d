//! The uplink's tc program in namespaces, on shapes of traffic only the kernel makes: TCP
//! superpackets GRO merged beyond 64 KiB (BIG TCP, an IPv4 total length of 0) between the
//! hosts themselves, VXLAN whose checksums GRO verified before tc runs, and VXLAN whose
//! headers run past the socket buffer's linear area.
use std::{net::TcpListener, time::Duration};

use anyhow::{Context, Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    attached::interfaces,
    capture::Sniffer,
    cluster::Host,
    frames::*,
    inject::{send_ipv4, send_split_frame},
    netns::Netns,
    process::iperf3_server,
    seed::{BBOX2, HOST2, Seed},
    wait::wait_for,
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// IPv4 BIG TCP's superpacket limit, well above the 64 KiB an IPv4 total length can state.
const BIG_TCP_SIZE: u32 = 185_000;

fn counters(host: &Host) -> Result<Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

fn delta(before: &Counters, after: &Counters, counter: Counter) -> u64 {
    after.get(counter) - before.get(counter)
}

/// Lets IPv4 superpackets of BIG_TCP_SIZE out of host1 and across the underlay bridge.
fn enable_big_tcp(seed: &Seed) -> Result<()> {
    seed.host1.netns.set_gso_max_size("eth0", BIG_TCP_SIZE)?;
    for device in interfaces(&seed.cluster.underlay)? {
        if device != "lo" {
            seed.cluster
                .underlay
                .set_gso_max_size(&device, BIG_TCP_SIZE)?;
        }
    }
    Ok(())
}

/// host1 sends host2 (the hosts themselves, not the overlay) 200 MB over TCP in superpackets
/// above 64 KiB. The uplink program on host2 leaves them to the stack: the transfer completes
/// and nothing counts as malformed.
#[test]
fn big_tcp_between_the_hosts_passes_the_uplink_untouched() -> Result<()> {
    let seed = Seed::start("big-tcp-hosts", &[])?;
    enable_big_tcp(&seed)?;
    let log = seed.cluster.scratch.path().join("iperf3-server.log");
    let mut server = iperf3_server(&seed.host2.netns, &log, true)?;
    let superpackets = Sniffer::start(&seed.host2.netns, "eth0", "tcp and ip[2:2] == 0")?;
    let before = counters(&seed.host2)?;
    let transfer = seed.host1.netns.exec_unchecked(&[
        "iperf3",
        "-c",
        HOST2,
        "-n",
        "200M",
        "--connect-timeout",
        "5000",
    ])?;
    let after = counters(&seed.host2)?;
    let _ = server.wait_exit(EVENT_TIMEOUT);
    let seen = superpackets.stop()?;
    ensure!(
        !seen.is_empty(),
        "no IPv4 packet with total length 0 reached host2's eth0: BIG TCP is not in effect"
    );
    assert_eq!(
        delta(&before, &after, Counter::RxMalformed),
        0,
        "host2's uplink program dropped superpackets as malformed: {after:?}"
    );
    ensure!(
        transfer.status.success(),
        "the transfer failed: {}{}",
        String::from_utf8_lossy(&transfer.stdout),
        String::from_utf8_lossy(&transfer.stderr)
    );
    ensure!(
        delta(&before, &after, Counter::RxNotUdp) > 0,
        "the superpackets passed as rx_not_udp: {after:?}"
    );
    Ok(())
}

/// TCP's counters in `netns`, from /proc/net/snmp: ("InSegs", n), ("InCsumErrors", n), ...
fn tcp_counter(netns: &Netns, name: &str) -> Result<u64> {
    let snmp = netns.exec(&["cat", "/proc/net/snmp"])?;
    let mut tcp_lines = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (
        tcp_lines.next().context("no Tcp: header")?,
        tcp_lines.next().context("no Tcp: values")?,
    );
    let at = names
        .split_whitespace()
        .position(|field| field == name)
        .with_context(|| format!("no Tcp counter {name}"))?;
    values
        .split_whitespace()
        .nth(at)
        .context("a Tcp value missing")?
        .parse()
        .context("a Tcp value that is no number")
}

/// host1 wrapping a TCP SYN from bbox1 to bbox2:`port` (source port `src_port`) in VXLAN for
/// host2, as flannel.1 does: outer UDP checksum 0.
fn vxlan_syn(seed: &Seed, src_port: u16, port: u16, bad_checksum: bool) -> Result<Vec<u8>> {
    let mut syn = tcp_syn(BBOX1_IP, BBOX2_IP, src_port, port);
    if bad_checksum {
        syn[16] ^= 0x5a;
    }
    from_host1(seed, &ipv4(BBOX1_IP, BBOX2_IP, IPPROTO_TCP, &[], &syn))
}

/// The IPv4 `packet` as host1 wraps it in VXLAN for host2: the outer IPv4 packet.
fn from_host1(seed: &Seed, packet: &[u8]) -> Result<Vec<u8>> {
    let inner = ethernet(
        seed.host2.netns.mac("flannel.1")?,
        HOST1_VTEP_MAC,
        ETH_P_IPV4,
        packet,
    );
    Ok(ipv4(
        HOST1_IP,
        HOST2_IP,
        IPPROTO_UDP,
        &[],
        &udp(49152, 8472, &vxlan(1, &inner)),
    ))
}

/// Makes host2's eth0 run GRO on what the underlay sends it: a veth merges only what a peer
/// without TSO sends (`veth_skb_is_eligible_for_gro`).
fn enable_gro_into_host2(seed: &Seed) -> Result<()> {
    seed.host2
        .netns
        .exec(&["ethtool", "-K", "eth0", "gro", "on"])?;
    for device in interfaces(&seed.cluster.underlay)? {
        if device != "lo" {
            seed.cluster
                .underlay
                .exec(&["ethtool", "-K", &device, "tso", "off"])?;
        }
    }
    Ok(())
}

/// GRO on host2's uplink verifies the outer UDP header (a checksum of 0 verifies) before tc
/// runs and marks the packet "checksum verified" for it; the inner TCP checksum it finds bad.
/// Decapsulation spends the outer level, so bbox2's TCP verifies the SYN itself and refuses
/// it; a good SYN after it shows both arrived.
#[test]
fn a_bad_inner_tcp_checksum_gro_did_not_verify_is_refused_by_the_container() -> Result<()> {
    let seed = Seed::start("gro-csum", &[])?;
    enable_gro_into_host2(&seed)?;
    let port = 7070;
    let _listener = seed
        .bbox2
        .netns
        .run_inside(|| Ok(TcpListener::bind(("0.0.0.0", port))?))?;
    let (in_segs, csum_errors) = (
        tcp_counter(&seed.bbox2.netns, "InSegs")?,
        tcp_counter(&seed.bbox2.netns, "InCsumErrors")?,
    );
    let packets = [
        vxlan_syn(&seed, 40001, port, true)?,
        vxlan_syn(&seed, 40002, port, false)?,
    ];
    seed.host1.netns.run_inside(|| {
        for packet in &packets {
            send_ipv4(packet, HOST2.parse()?)?;
        }
        Ok(())
    })?;
    wait_for("both SYNs in bbox2's TCP", EVENT_TIMEOUT, || {
        Ok(tcp_counter(&seed.bbox2.netns, "InSegs")? - in_segs >= 2)
    })?;
    assert_eq!(
        tcp_counter(&seed.bbox2.netns, "InCsumErrors")? - csum_errors,
        1,
        "bbox2's TCP took the SYN with a bad checksum as verified"
    );
    Ok(())
}

/// An MTU that lets a frame of more than a page cross the underlay unsegmented.
const JUMBO_MTU: &str = "9000";
/// What of a split frame lies in the linear area: its outer headers and VXLAN's, and the
/// inner Ethernet header's first two bytes.
const SPLIT_AT: u16 = 52;

/// host1 wrapping a UDP datagram of `payload_len` bytes from `inner_src` to bbox2 in VXLAN for
/// host2, as the Ethernet frame host1's uplink sends.
fn vxlan_frame(seed: &Seed, inner_src: [u8; 4], payload_len: usize) -> Result<Vec<u8>> {
    let datagram = udp(40000, 9, &vec![0; payload_len]);
    Ok(ethernet(
        seed.host2.netns.mac("eth0")?,
        seed.host1.netns.mac("eth0")?,
        ETH_P_IPV4,
        &from_host1(
            seed,
            &ipv4(inner_src, BBOX2_IP, IPPROTO_UDP, &[], &datagram),
        )?,
    ))
}

/// Raises the MTU of every device between host1's uplink and host2's.
fn jumbo_underlay(seed: &Seed) -> Result<()> {
    for device in interfaces(&seed.cluster.underlay)? {
        if device != "lo" {
            seed.cluster
                .underlay
                .ip(&["link", "set", &device, "mtu", JUMBO_MTU])?;
        }
    }
    for host in [&seed.host1, &seed.host2] {
        host.netns.ip(&["link", "set", "eth0", "mtu", JUMBO_MTU])?;
    }
    Ok(())
}

/// A NIC's scatter-gather receive or GRO can leave a frame's inner headers outside the linear
/// area the program reads directly: such a frame must be checked as fully as a linear one.
/// A frame from host1 whose inner source is bbox1 goes into bbox2; one whose inner source no
/// lease holds is dropped as spoofed, not waved through or taken for malformed.
#[test]
fn vxlan_split_before_its_inner_headers_is_checked_in_full() -> Result<()> {
    let seed = Seed::start("split", &[])?;
    seed.bbox1.ping(BBOX2, 2)?;
    jumbo_underlay(&seed)?;
    let payload_len = 4200;
    let frames = [
        vxlan_frame(&seed, BBOX1_IP, payload_len)?,
        vxlan_frame(&seed, [10, 2, 99, 5], payload_len)?,
    ];
    let before = counters(&seed.host2)?;
    seed.host1.netns.run_inside(|| {
        frames
            .iter()
            .try_for_each(|frame| send_split_frame("eth0", frame, SPLIT_AT))
    })?;
    wait_for("host2's uplink to count both frames", EVENT_TIMEOUT, || {
        let after = counters(&seed.host2)?;
        Ok(delta(&before, &after, Counter::RxDelivered) >= 1
            && delta(&before, &after, Counter::RxSpoofedSource) >= 1)
    })
    .with_context(|| format!("{:?}", counters(&seed.host2)))?;
    let after = counters(&seed.host2)?;
    ensure!(
        delta(&before, &after, Counter::RxMalformed) == 0,
        "a split frame was taken for malformed: {after:?}"
    );
    Ok(())
}
