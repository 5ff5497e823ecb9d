//! Hostile senders against the isolation the README claims, with real agents in namespaces:
//! VXLAN that goes around the uplink's program (a second NIC, a local sender, fragments),
//! VXLAN from a container, and containers sending from addresses or MACs that are not theirs;
//! over IPv6 too, where the kernel's flannel-v6.1 decapsulates: VXLAN over IPv6 from a host
//! with no lease or around the uplink, and containers sending IPv6 from outside the lease.
//! `tcpdump` in the target container shows nothing arrives before a control ping that must
//! arrive the same way; the counters say where each frame went. The agent's warning naming
//! a refusal is checked once, for a container's VXLAN.
use std::time::Duration;

use anyhow::{Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    absence::{assert_nothing_but_control, seen_besides_control},
    agent::Agent,
    capture::Sniffer,
    cluster::Host,
    frames::*,
    inject::{send_frame, send_ipv4, send_udp},
    ipv6::{BBOX1_V6, BBOX2_V6, HOST2_V6},
    netns::Netns,
    seed::{BBOX1, BBOX2, Container, HOST2, Seed},
    wait::wait_for,
};

const FRAMES: u64 = 5;
const BBOX3: &str = "10.2.41.3";
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn counters(host: &Host) -> Result<Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

fn moved(before: &Counters, after: &Counters, counter: Counter) -> u64 {
    after.get(counter) - before.get(counter)
}

/// A tcpdump in bbox2 for the echo requests the hostile frames carry.
fn watch_bbox2(seed: &Seed) -> Result<Sniffer> {
    Sniffer::start(&seed.bbox2.netns, "eth0", "icmp[icmptype] == icmp-echo")
}

/// Fails if bbox2 saw an echo request before a control ping from bbox1 to `bbox2_address`,
/// sent after the hostile frames, arrived.
fn assert_bbox2_saw_nothing(seed: &Seed, sniffer: Sniffer, bbox2_address: &str) -> Result<()> {
    assert_nothing_but_control(sniffer, &seed.bbox1.netns, bbox2_address, "bbox2")
}

/// The agent names `counter` in its log (the README promises a warning naming the counter),
/// and the seed's own traffic still flows.
fn assert_refusal_logged(seed: &Seed, agent: &Agent, counter: Counter) -> Result<()> {
    agent.wait_for_log(&format!("as {}", counter.name()), 1, EVENT_TIMEOUT)?;
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

fn rx_packets(host: &Host, device: &str) -> Result<u64> {
    let text = host.netns.exec(&[
        "cat",
        &format!("/sys/class/net/{device}/statistics/rx_packets"),
    ])?;
    Ok(text.trim().parse()?)
}

/// Waits until `device` on `host` has received `count` packets since it had received
/// `before`, and fails if it received more: the frames sent to it have all arrived.
fn assert_received(host: &Host, device: &str, before: u64, count: u64) -> Result<()> {
    wait_for(
        &format!("{count} packets on {device}"),
        EVENT_TIMEOUT,
        || Ok(rx_packets(host, device)? - before >= count),
    )?;
    let received = rx_packets(host, device)? - before;
    ensure!(
        received == count,
        "{device} received {received}, not {count}"
    );
    Ok(())
}

const EBPF: &[&str] = &["--dataplane=ebpf"];

/// A tcpdump in bbox2 for IPv6 echo requests.
fn watch_bbox2_ipv6(seed: &Seed) -> Result<Sniffer> {
    Sniffer::start(&seed.bbox2.netns, "eth0", "icmp6 and ip6[40] == 128")
}

/// flannel-v6.1 keeps a socket of the kernel's on UDP 8472 over IPv6: VXLAN over IPv6 from a
/// host on the underlay that holds no lease is dropped at the uplink, and VXLAN over IPv6 that
/// goes around the uplink (a local sender) at flannel-v6.1's ingress.
#[test]
fn vxlan_over_ipv6_from_a_non_member_cannot_reach_a_container() -> Result<()> {
    let mut seed = Seed::start_dual_stack("v6-intruder", [EBPF, EBPF])?;
    seed.bbox1.ping6(BBOX2_V6, 1)?;
    let payload = seed.forged_vxlan6_ping()?;
    let intruder = seed.cluster.add_host("intruder", "172.20.62.66")?;
    let destination = format!("[{HOST2_V6}]:8472");

    // What bbox2 sees comes first, so that the test says why it fails against an agent
    // without these guards (whose counters this one cannot read); until now no frame was
    // refused.
    let rx_before = rx_packets(&seed.host2, "flannel-v6.1")?;
    let sniffer = watch_bbox2_ipv6(&seed)?;
    send_udp(&intruder.netns, &destination, &payload, FRAMES)?;
    send_udp(&seed.host2.netns, &destination, &payload, FRAMES)?;
    // The local sender's frames reach flannel-v6.1's socket, whose guard drops each.
    assert_received(&seed.host2, "flannel-v6.1", rx_before, FRAMES)?;
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2_V6)?;

    let after = counters(&seed.host2)?;
    assert_eq!(after.get(Counter::RxIpv6NonMember), FRAMES, "{after:?}");
    assert_eq!(after.get(Counter::RxUncheckedVxlan), FRAMES, "{after:?}");
    seed.bbox1.ping6(BBOX2_V6, 1)?;
    Ok(())
}

/// A container's IPv6 comes from its host's IPv6 lease, a link-local address (neighbour
/// discovery keeps working: the pings across resolve their gateway with it) or none.
#[test]
fn a_container_cannot_send_ipv6_from_outside_its_host_s_ipv6_lease() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-spoofed-source", [EBPF, EBPF])?;
    seed.bbox1.ping6(BBOX2_V6, 1)?;
    // As above, what bbox2 sees comes first; until now no frame was refused.
    let sniffer = watch_bbox2_ipv6(&seed)?;
    // An address of host2's lease, and one outside the overlay.
    for address in ["fd00:2:0:54::9", "2001:db8::1"] {
        seed.bbox1.netns.ip(&[
            "addr",
            "add",
            &format!("{address}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        let ping = seed.bbox1.netns.exec_unchecked(&[
            "ping", "-6", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", address, BBOX2_V6,
        ])?;
        ensure!(!ping.status.success(), "no reply to a ping from {address}");
        // Else the kernel picks it as the source closest to bbox2's address.
        seed.bbox1
            .netns
            .ip(&["addr", "del", &format!("{address}/128"), "dev", "eth0"])?;
    }
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2_V6)?;
    let after = counters(&seed.host1)?;
    ensure!(
        after.get(Counter::TxIpv6SpoofedSource) >= 6,
        "every spoofed ping was dropped: {after:?}"
    );
    seed.bbox1.ping6(BBOX2_V6, 2)?;
    seed.bbox2.ping6(BBOX1_V6, 2)?;
    Ok(())
}

#[test]
fn vxlan_that_goes_around_the_uplink_program_stops_at_flannel_1() -> Result<()> {
    let seed = Seed::start("around", &[])?;
    let payload = seed.forged_vxlan_ping()?;
    // A second NIC, whose traffic no program of ours sees.
    let nic2 = Netns::new("nic2")?;
    seed.host2.netns.add_veth("eth1", &nic2, "eth0")?;
    seed.host2
        .netns
        .ip(&["addr", "add", "192.168.77.1/24", "dev", "eth1"])?;
    seed.host2.netns.ip(&["link", "set", "eth1", "up"])?;
    nic2.ip(&["addr", "add", "192.168.77.2/24", "dev", "eth0"])?;
    nic2.ip(&["link", "set", "eth0", "up"])?;

    let before = counters(&seed.host2)?;
    let rx_before = rx_packets(&seed.host2, "flannel.1")?;
    let sniffer = watch_bbox2(&seed)?;
    send_udp(&nic2, "192.168.77.1:8472", &payload, FRAMES)?;
    // A local sender, to the host's own PublicIP.
    send_udp(
        &seed.host2.netns,
        &format!("{HOST2}:8472"),
        &payload,
        FRAMES,
    )?;
    // flannel.1's socket decapsulated every frame; its ingress program dropped each.
    assert_received(&seed.host2, "flannel.1", rx_before, 2 * FRAMES)?;
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2)?;

    let after = counters(&seed.host2)?;
    assert_eq!(
        moved(&before, &after, Counter::RxUncheckedVxlan),
        2 * FRAMES,
        "{after:?}"
    );
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

#[test]
fn fragments_are_checked_before_the_stack_reassembles_them() -> Result<()> {
    let mut seed = Seed::start("fragments", &[])?;
    let payload = seed.forged_vxlan_ping()?;
    // The first fragment carries every header our checks read: UDP, VXLAN, inner Ethernet
    // and IPv4 (50 bytes), rounded up to the 8-byte unit.
    let from = |source: [u8; 4]| {
        let packet = ipv4(
            source,
            HOST2_IP,
            IPPROTO_UDP,
            &[],
            &udp(49152, 8472, &payload),
        );
        ipv4_fragments(&packet, 56, 0x4242)
    };
    let send = |netns: &Netns, fragments: &[Vec<u8>]| {
        netns.run_inside(|| {
            for fragment in fragments {
                send_ipv4(fragment, HOST2.parse()?)?;
            }
            Ok(())
        })
    };

    // From a peer: checked, reassembled with the first fragment's mark, decapsulated by
    // flannel.1's socket, delivered.
    let before = counters(&seed.host2)?;
    let sniffer = watch_bbox2(&seed)?;
    send(&seed.host1.netns, &from(HOST1_IP))?;
    let seen = seen_besides_control(sniffer, &seed.bbox1.netns, BBOX2)?;
    ensure!(
        seen.len() == 1 && seen[0].contains(&format!("{BBOX1} > {BBOX2}")),
        "bbox2 received the reassembled ping: {seen:#?}"
    );
    let after = counters(&seed.host2)?;
    assert_eq!(moved(&before, &after, Counter::RxChecked), 1, "{after:?}");
    assert_eq!(moved(&before, &after, Counter::RxIpv4Fragment), 1);
    assert_eq!(moved(&before, &after, Counter::RxUncheckedVxlan), 0);

    // From a host with no lease: the first fragment is dropped, the rest never completes.
    // Then a first fragment too short to check, from a peer's address.
    let intruder = seed.cluster.add_host("intruder", "172.20.62.66")?;
    let before = counters(&seed.host2)?;
    let sniffer = watch_bbox2(&seed)?;
    send(&intruder.netns, &from([172, 20, 62, 66]))?;
    let packet = ipv4(
        HOST1_IP,
        HOST2_IP,
        IPPROTO_UDP,
        &[],
        &udp(49152, 8472, &payload),
    );
    send(&intruder.netns, &ipv4_fragments(&packet, 8, 0x4343))?;
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2)?;
    let after = counters(&seed.host2)?;
    assert_eq!(
        moved(&before, &after, Counter::RxUnknownVtep),
        1,
        "{after:?}"
    );
    assert_eq!(moved(&before, &after, Counter::RxMalformed), 1, "{after:?}");
    assert_eq!(moved(&before, &after, Counter::RxIpv4Fragment), 2);
    Ok(())
}

/// A first fragment from a peer that ends right after the VXLAN header, Ethernet padding
/// behind it holding a harmless inner header (bbox1's ping), and a second fragment carrying
/// the real inner headers: a ping to bbox2 from its neighbour 10.2.54.7, which host1 does not
/// lease. The first fragment is judged on its own bytes and dropped, so the stack never
/// reassembles the datagram.
#[test]
fn a_first_fragment_padded_with_a_harmless_inner_header_is_dropped() -> Result<()> {
    let seed = Seed::start("padded-fragment", &[])?;
    // The underlay's bridge would trim the padding where br_netfilter is loaded (it validates
    // IPv4 lengths for iptables): a switch does not.
    seed.cluster.underlay.exec(&[
        "sh",
        "-c",
        "[ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ] \
         || sysctl -qw net.bridge.bridge-nf-call-iptables=0",
    ])?;
    let inner = ping_to_bbox2_from(BBOX2_NEIGHBOUR_IP, seed.host2.netns.mac("flannel.1")?);
    let packet = ipv4(
        HOST1_IP,
        HOST2_IP,
        IPPROTO_UDP,
        &[],
        &udp(49152, 8472, &vxlan(1, &inner)),
    );
    let [first, second] = ipv4_fragments(&packet, UDP_HEADER_LEN + VXLAN_HEADER_LEN, 0x4545);
    let harmless = &seed.forged_vxlan_ping()?[VXLAN_HEADER_LEN..];
    let on_the_wire = |packet: &[u8]| -> Result<Vec<u8>> {
        Ok(ethernet(
            seed.host2.netns.mac("eth0")?,
            seed.host1.netns.mac("eth0")?,
            ETH_P_IPV4,
            packet,
        ))
    };
    let frames = [
        on_the_wire(&[&first[..], harmless].concat())?,
        on_the_wire(&second)?,
    ];

    let before = counters(&seed.host2)?;
    let sniffer = watch_bbox2(&seed)?;
    seed.host1.netns.run_inside(|| {
        for frame in &frames {
            send_frame("eth0", frame)?;
        }
        Ok(())
    })?;
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2)?;
    let after = counters(&seed.host2)?;
    assert_eq!(moved(&before, &after, Counter::RxMalformed), 1, "{after:?}");
    assert_eq!(moved(&before, &after, Counter::RxIpv4Fragment), 1);
    Ok(())
}

#[test]
fn a_container_cannot_send_vxlan() -> Result<()> {
    // With masquerade, a container's datagram to a peer leaves from this host's PublicIP.
    let seed = Seed::start("container-vxlan", &["--ip-masq"])?;
    let payload = seed.forged_vxlan_ping()?;
    let before = counters(&seed.host1)?;
    let sniffer = watch_bbox2(&seed)?;
    send_udp(
        &seed.bbox1.netns,
        &format!("{HOST2}:8472"),
        &payload,
        FRAMES,
    )?;
    send_udp(&seed.bbox1.netns, "10.2.41.1:8472", &payload, FRAMES)?;
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2)?;
    let after = counters(&seed.host1)?;
    assert_eq!(
        moved(&before, &after, Counter::TxVxlanFromContainer),
        2 * FRAMES,
        "{after:?}"
    );
    assert_refusal_logged(&seed, &seed.agent1, Counter::TxVxlanFromContainer)
}

/// The seed with a third container on host1, bbox3 (10.2.41.3), after bbox1 and bbox3 have
/// each sent from their own address.
fn seed_with_bbox3(tag: &str) -> Result<(Seed, Container)> {
    let seed = Seed::start(tag, &[])?;
    let bbox3 = Container::attach(&seed.host1, "bbox3", BBOX3)?;
    seed.bbox1.ping(BBOX2, 1)?;
    bbox3.ping(BBOX2, 1)?;
    Ok((seed, bbox3))
}

#[test]
fn a_container_cannot_send_from_an_address_not_its_own() -> Result<()> {
    let (seed, bbox3) = seed_with_bbox3("spoofed-source")?;
    let before = counters(&seed.host1)?;
    let sniffer = watch_bbox2(&seed)?;
    // A neighbour's address, and one of another host's subnet.
    for address in [BBOX1, "10.2.54.9"] {
        bbox3
            .netns
            .ip(&["addr", "add", &format!("{address}/32"), "dev", "eth0"])?;
        let ping = bbox3.netns.exec_unchecked(&[
            "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", address, BBOX2,
        ])?;
        ensure!(!ping.status.success(), "no reply to a ping from {address}");
    }
    assert_bbox2_saw_nothing(&seed, sniffer, BBOX2)?;
    let after = counters(&seed.host1)?;
    ensure!(
        moved(&before, &after, Counter::TxSpoofedSource) >= 6,
        "every spoofed ping was dropped: {after:?}"
    );
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

#[test]
fn arp_or_mac_spoofing_does_not_move_a_neighbour_s_traffic() -> Result<()> {
    let (seed, bbox3) = seed_with_bbox3("arp-spoof")?;
    seed.bbox2.ping(BBOX1, 1)?;
    let bbox1_mac = seed.bbox1.netns.mac("eth0")?;
    let bbox3_mac = bbox3.netns.mac("eth0")?;
    // bbox3 would answer for bbox1's address, were its traffic sent there.
    bbox3
        .netns
        .ip(&["addr", "add", &format!("{BBOX1}/32"), "dev", "eth0"])?;
    let before = counters(&seed.host1)?;

    // Unsolicited ARP replies: "10.2.41.2 is at bbox3's MAC".
    let claim = [
        &[0, 1, 8, 0, 6, 4, 0, 2][..],
        &bbox3_mac,
        &BBOX1_IP,
        &[0xff; 6],
        &[10, 2, 41, 1],
    ]
    .concat();
    let frame = ethernet([0xff; 6], bbox3_mac, ETH_P_ARP, &claim);
    bbox3.netns.run_inside(|| {
        for _ in 0..FRAMES {
            send_frame("eth0", &frame)?;
        }
        Ok(())
    })?;
    // Then bbox1's MAC as its own.
    bbox3
        .netns
        .ip(&["link", "set", "eth0", "address", &mac_text(bbox1_mac)])?;
    let _ = bbox3
        .netns
        .exec_unchecked(&["ping", "-n", "-c", "2", "-W", "1", "10.2.41.1"])?;

    // The control: bbox2's ping to bbox3's own address comes the same way, host2 to bbox3's
    // port on host1's docker0.
    let filter = format!("icmp and (dst {BBOX1} or dst {BBOX3})");
    let sniffer = Sniffer::start(&bbox3.netns, "eth0", &filter)?;
    seed.bbox2.ping(BBOX1, 3)?;
    assert_nothing_but_control(sniffer, &seed.bbox2.netns, BBOX3, "bbox3")?;

    let neighbour = seed.host1.container_neighbour(BBOX1)?;
    ensure!(
        neighbour.contains(&mac_text(bbox1_mac)),
        "host1 still resolves bbox1 to its MAC: {neighbour}"
    );
    let fdb = seed
        .host1
        .netns
        .exec(&["bridge", "fdb", "show", "br", "docker0"])?;
    ensure!(
        fdb.lines()
            .filter(|line| line.starts_with(&mac_text(bbox1_mac)))
            .all(|line| line.contains("dev veth-bbox1")),
        "docker0 keeps bbox1's MAC behind bbox1's port:\n{fdb}"
    );
    let after = counters(&seed.host1)?;
    ensure!(
        moved(&before, &after, Counter::TxSpoofedSource) >= FRAMES
            && moved(&before, &after, Counter::TxSpoofedMac) >= 1,
        "the claims were refused: {after:?}"
    );
    Ok(())
}
