//! IPv6 encapsulation on hand-built frames through BPF_PROG_TEST_RUN. The fast path: a
//! container's IPv6 packet for a remote subnet leaves as flannel-v6.1 sends it (compared with
//! a kernel capture of flannel-v6.1, the UDP checksum included), for every transport the fast
//! path takes. What it cannot checksum from the headers (a superpacket with a short last
//! segment among them), what a router must answer itself, and flows conntrack translated go
//! on to the bridge untouched. The routed path, on flannel-v6.1's egress: what the stack
//! routed leaves the same way, and what the headers cannot checksum goes on to flannel-v6.1.
//! (A test run cannot make a TCP superpacket; `ipv6_fast_path` has the kernel cut real ones
//! and check every segment's checksum.)
use anyhow::Result;
use overlay_common::{Counter, VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, UplinkHook, dataplane_of, run_bridge,
        run_container, run_container_gso, run_uplink, run_vtep, run_vtep_gso,
    },
    frames::*,
};

const OUTER_UDP: usize = V6_OUTER_IP + IPV6_HEADER_LEN;
const UDP_CHECKSUM: usize = OUTER_UDP + 6;
/// What the encapsulation adds: outer IPv6, UDP, VXLAN and the inner Ethernet header.
const ENCAP6_LEN: usize = IPV6_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN + ETH_HEADER_LEN;
const HOP_LIMIT: usize = 7;
const TRAFFIC_CLASS_LOW: usize = 1;

/// `packet` as bbox1 puts it on its veth: to its gateway, docker0.
fn from_bbox1(packet: &[u8]) -> Vec<u8> {
    ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ETH_P_IPV6, packet)
}

/// bbox1's IPv6 packet as it reaches the container program: one hop before `routed`, which
/// is what leaves inside the VXLAN frame.
fn before_the_hop(routed: &[u8]) -> Vec<u8> {
    let mut packet = routed.to_vec();
    packet[HOP_LIMIT] += 1;
    from_bbox1(&packet)
}

/// The inner IPv6 packet of flannel-v6.1's captured frame.
fn captured_inner() -> &'static [u8] {
    &FLANNEL_V6_PING[V6_INNER_IP..]
}

/// host1's container program on `frame`, host2 its only peer.
fn from_container(frame: &[u8]) -> Result<Outcome> {
    run_container(&dataplane_of(&HOST1, &[&HOST2])?, frame)
}

fn source_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[OUTER_UDP], frame[OUTER_UDP + 1]])
}

/// The UDP checksum of the VXLAN frame `frame` computed over every byte, 0 when it is right.
fn outer_checksum_over_everything(frame: &[u8]) -> u16 {
    let ip = &frame[V6_OUTER_IP..];
    let [src, dst]: [[u8; 16]; 2] = [8, 24].map(|at| ip[at..at + 16].try_into().expect("16 bytes"));
    ipv6_upper_layer_checksum(src, dst, IPPROTO_UDP, &frame[OUTER_UDP..])
}

/// Asserts `outcome` is `routed` encapsulated for host2, as flannel-v6.1 would send it, and
/// counted as `counter`.
fn assert_encapsulated(outcome: &Outcome, routed: &[u8], counter: Counter) {
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT, "redirected to the uplink");
    outcome.assert_only(counter);
    let out = &outcome.frame;
    assert_eq!(out.len(), ETH_HEADER_LEN + ENCAP6_LEN + routed.len());
    assert_eq!(
        out[ETH_HEADER_LEN + ENCAP6_LEN..],
        routed[..],
        "the inner packet"
    );
    assert_eq!(
        outer_checksum_over_everything(out),
        0,
        "the outer UDP checksum is right over the whole datagram"
    );
    assert_ne!(
        out[UDP_CHECKSUM..UDP_CHECKSUM + 2],
        [0, 0],
        "never left out"
    );
}

fn assert_left_to_the_stack(frame: &[u8], counter: Counter) -> Result<()> {
    let outcome = from_container(frame)?;
    assert_eq!(outcome.verdict, TC_ACT_OK, "{}", counter.name());
    assert_eq!(outcome.frame, frame, "untouched: {}", counter.name());
    outcome.assert_only(counter);
    Ok(())
}

/// Asserts `sent` is flannel-v6.1's captured ping from the outer IPv6 header on, the
/// source port aside: that comes from the flow hash, and the checksum covers it, so the
/// capture with our port, its checksum computed anew over every byte, must be what we sent.
fn assert_as_flannel_v6_sent_it(sent: &[u8]) {
    let port = source_port(sent);
    assert!(
        (VXLAN_SOURCE_PORT_MIN..VXLAN_SOURCE_PORT_MAX).contains(&port),
        "source port {port}"
    );
    let mut expected = FLANNEL_V6_PING.to_vec();
    expected[OUTER_UDP..OUTER_UDP + 2].copy_from_slice(&port.to_be_bytes());
    expected[UDP_CHECKSUM..UDP_CHECKSUM + 2].fill(0);
    let checksum = outer_checksum_over_everything(&expected);
    expected[UDP_CHECKSUM..UDP_CHECKSUM + 2].copy_from_slice(&checksum.to_be_bytes());
    assert_eq!(
        sent[ETH_HEADER_LEN..],
        expected[ETH_HEADER_LEN..],
        "the frame flannel-v6.1 sent, from the outer IPv6 header on"
    );
}

#[test]
fn bbox1s_ping_leaves_as_flannel_v6_sends_it() -> Result<()> {
    let outcome = from_container(&before_the_hop(captured_inner()))?;
    assert_encapsulated(&outcome, captured_inner(), Counter::TxDirect);
    assert_as_flannel_v6_sent_it(&outcome.frame);
    assert_eq!(
        outcome.frame[..ETH_HEADER_LEN],
        before_the_hop(captured_inner())[..ETH_HEADER_LEN],
        "the outer Ethernet header is the neighbour table's to fill"
    );
    Ok(())
}

/// `packet` as host1's stack routes it into flannel-v6.1: to host2's VTEP from ours.
fn into_flannel_v6(packet: &[u8]) -> Vec<u8> {
    ethernet(HOST2_VTEP6_MAC, HOST1_VTEP6_MAC, ETH_P_IPV6, packet)
}

/// host1's flannel-v6.1 egress program on `frame`, host2 its only peer.
fn through_flannel_v6(frame: &[u8]) -> Result<Outcome> {
    run_vtep(&dataplane_of(&HOST1, &[&HOST2])?, frame)
}

#[test]
fn what_the_stack_routes_into_flannel_v6_leaves_as_flannel_v6_sends_it() -> Result<()> {
    let outcome = through_flannel_v6(&into_flannel_v6(captured_inner()))?;
    assert_encapsulated(&outcome, captured_inner(), Counter::TxEncapsulated);
    assert_as_flannel_v6_sent_it(&outcome.frame);
    // The stack has routed it already: no hop is taken here, even the last.
    for len in [0, 1, 17, 1200] {
        let mut last_hop = tcp6(&pattern(len));
        last_hop[HOP_LIMIT] = 1;
        for routed in [last_hop, udp6(&pattern(len))] {
            let outcome = through_flannel_v6(&into_flannel_v6(&routed))?;
            assert_encapsulated(&outcome, &routed, Counter::TxEncapsulated);
        }
    }
    Ok(())
}

#[test]
fn what_the_headers_cannot_checksum_or_no_lease_covers_goes_on_to_flannel_v6() -> Result<()> {
    let ping = into_flannel_v6(captured_inner());
    let mut no_udp_checksum = into_flannel_v6(&udp6(b"zero"));
    no_udp_checksum[ETH_HEADER_LEN + IPV6_HEADER_LEN + 6..][..2].fill(0);
    // The kernel's own multicast listener report, which no lease covers.
    let all_routers = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
    let cases = [
        ("an extension header", {
            with_ipv6_extension(&ping, IPPROTO_DSTOPTS, [0, 1, 4, 0, 0, 0, 0])
        }),
        ("UDP without a checksum", no_udp_checksum),
        ("bytes behind the packet", [&ping[..], &[0; 6]].concat()),
        ("no lease", {
            into_flannel_v6(&ipv6(BBOX1_IPV6, all_routers, IPPROTO_ICMPV6, &[143; 8]))
        }),
    ];
    for (what, frame) in cases {
        let outcome = through_flannel_v6(&frame)?;
        assert_eq!(outcome.verdict, TC_ACT_OK, "{what}");
        assert_eq!(outcome.frame, frame, "{what}: untouched");
        outcome.assert_only(Counter::TxIpv6Routed);
    }
    let short_tail = into_flannel_v6(&tcp6(&pattern(250)));
    let outcome = run_vtep_gso(&dataplane_of(&HOST1, &[&HOST2])?, &short_tail, 100)?;
    assert_eq!(outcome.verdict, TC_ACT_OK, "a short last segment");
    assert_eq!(outcome.frame, short_tail, "untouched");
    outcome.assert_only(Counter::TxIpv6Routed);
    Ok(())
}

/// A TCP segment from bbox1 to bbox2 with `payload`, its checksum complete.
fn tcp6(payload: &[u8]) -> Vec<u8> {
    let segment = [&tcp_segment(40000, 5201)[..], payload].concat();
    ipv6_checksummed(BBOX1_IPV6, BBOX2_IPV6, IPPROTO_TCP, segment, 16)
}

fn udp6(payload: &[u8]) -> Vec<u8> {
    let datagram = udp(40000, 5201, payload);
    ipv6_checksummed(BBOX1_IPV6, BBOX2_IPV6, IPPROTO_UDP, datagram, 6)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|index| (index * 7 + 3) as u8).collect()
}

#[test]
fn every_transport_and_length_gets_its_checksum_right() -> Result<()> {
    for len in [0, 1, 2, 3, 17, 64, 511, 1200] {
        let payload = pattern(len);
        let packets = [
            tcp6(&payload),
            udp6(&payload),
            ipv6_ping(BBOX1_IPV6, BBOX2_IPV6, &payload),
        ];
        for routed in packets {
            let outcome = from_container(&before_the_hop(&routed))?;
            assert_encapsulated(&outcome, &routed, Counter::TxDirect);
        }
    }
    Ok(())
}

#[test]
fn a_congestion_mark_becomes_ect0_outside_and_the_flow_label_stays_inside() -> Result<()> {
    // The traffic class's low four bits (ECN and two of DSCP) sit in the second byte's
    // upper half, beside the flow label's first four bits.
    for (inner, outer) in [
        (0x0f, 0x00),
        (0x1f, 0x10),
        (0x2a, 0x20),
        (0x35, 0x20),
        (0x85, 0x00),
    ] {
        let mut routed = ipv6_ping(BBOX1_IPV6, BBOX2_IPV6, b"ecn");
        routed[TRAFFIC_CLASS_LOW] = inner;
        let outcome = from_container(&before_the_hop(&routed))?;
        assert_encapsulated(&outcome, &routed, Counter::TxDirect);
        assert_eq!(
            outcome.frame[V6_OUTER_IP..V6_OUTER_IP + 4],
            [0x60, outer, 0, 0],
            "inner {inner:#x}: ECN only, no flow label"
        );
    }
    Ok(())
}

#[test]
fn a_superpacket_with_a_short_last_segment_takes_the_routed_path() -> Result<()> {
    let frame = before_the_hop(&tcp6(&pattern(250)));
    let outcome = run_container_gso(&dataplane_of(&HOST1, &[&HOST2])?, &frame, 100)?;
    assert_eq!(outcome.verdict, TC_ACT_OK);
    assert_eq!(outcome.frame, frame, "untouched");
    outcome.assert_only(Counter::TxIpv6PartialSegment);
    Ok(())
}

#[test]
fn what_the_headers_cannot_checksum_or_a_router_must_answer_goes_to_the_stack() -> Result<()> {
    let ping = before_the_hop(captured_inner());
    let mut last_hop = ping.clone();
    last_hop[ETH_HEADER_LEN + HOP_LIMIT] = 1;
    let mut no_udp_checksum = before_the_hop(&udp6(b"zero"));
    no_udp_checksum[ETH_HEADER_LEN + IPV6_HEADER_LEN + 6..][..2].fill(0);
    let trailing_bytes = [&ping[..], &[0; 6]].concat();
    let sctp = before_the_hop(&ipv6(BBOX1_IPV6, BBOX2_IPV6, 132, &[0; 32]));
    let cases = [
        ("hop limit 1", last_hop),
        ("a destination options header", {
            with_ipv6_extension(&ping, IPPROTO_DSTOPTS, [0, 1, 4, 0, 0, 0, 0])
        }),
        ("a fragment", {
            with_ipv6_extension(&ping, IPPROTO_FRAGMENT, ipv6_fragment(0))
        }),
        ("UDP without a checksum", no_udp_checksum),
        ("bytes behind the packet", trailing_bytes),
        ("SCTP", sctp),
    ];
    for (what, frame) in cases {
        let outcome = from_container(&frame)?;
        assert_eq!(outcome.verdict, TC_ACT_OK, "{what}");
        assert_eq!(outcome.frame, frame, "{what}: untouched");
        outcome.assert_only(Counter::TxSlowPath);
    }
    Ok(())
}

#[test]
fn an_icmpv6_error_takes_the_routed_path() -> Result<()> {
    // Destination unreachable, quoting a packet of another flow.
    let quoted = udp6(b"quoted");
    let message = [&[1, 4, 0, 0, 0, 0, 0, 0][..], &quoted].concat();
    let error = ipv6_checksummed(BBOX1_IPV6, BBOX2_IPV6, IPPROTO_ICMPV6, message, 2);
    assert_left_to_the_stack(&before_the_hop(&error), Counter::TxRoutedFlow)
}

#[test]
fn what_is_not_for_a_remote_subnet_stays_on_the_bridge() -> Result<()> {
    let local = ipv6_ping(
        BBOX1_IPV6,
        [0xfd, 0, 0, 2, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 3],
        b"",
    );
    let elsewhere = ipv6_ping(
        BBOX1_IPV6,
        [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        b"",
    );
    let mut to_a_neighbour = before_the_hop(captured_inner());
    to_a_neighbour[..6].copy_from_slice(&BBOX2_MAC);
    for frame in [
        before_the_hop(&local),
        before_the_hop(&elsewhere),
        to_a_neighbour,
    ] {
        let outcome = from_container(&frame)?;
        assert_eq!(outcome.verdict, TC_ACT_OK);
        assert_eq!(outcome.frame, frame, "untouched");
        outcome.assert_uncounted();
    }
    Ok(())
}

/// bbox2's ping to bbox1 as host1's stack puts it into the bridge, from bbox1's gateway.
fn into_the_bridge(packet: &[u8]) -> Vec<u8> {
    ethernet(BBOX1_MAC, HOST1_BRIDGE_MAC, ETH_P_IPV6, packet)
}

#[test]
fn the_replies_of_a_flow_the_stack_translated_take_the_routed_path() -> Result<()> {
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    // bbox2 pinged an address the stack translated to bbox1's (a DNAT): host1's uplink saw
    // the packet to the other address, its bridge sees it to bbox1.
    let service = [0xfd, 0, 0, 2, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 0x80];
    let to_service = ipv6_ping(BBOX2_IPV6, service, b"dnat");
    let vxlan = host1_receives_from_host2(&to_service);
    assert_eq!(
        run_uplink(UplinkHook::Tc, &dataplane, &vxlan)?.verdict,
        TC_ACT_OK
    );
    run_bridge(
        &dataplane,
        &into_the_bridge(&ipv6_ping(BBOX2_IPV6, BBOX1_IPV6, b"dnat")),
    )?;
    let reply = echo_reply(&ipv6_ping(BBOX1_IPV6, BBOX2_IPV6, b"dnat"));
    let outcome = run_container(&dataplane, &before_the_hop(&reply))?;
    assert_eq!(
        outcome.verdict, TC_ACT_OK,
        "the stack undoes the translation"
    );
    assert_eq!(outcome.counters.get(Counter::TxRoutedFlow), 1);
    Ok(())
}

#[test]
fn the_replies_of_a_flow_the_stack_did_not_translate_keep_the_fast_path() -> Result<()> {
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    let request = ipv6_ping(BBOX2_IPV6, BBOX1_IPV6, b"plain");
    let vxlan = host1_receives_from_host2(&request);
    assert_eq!(
        run_uplink(UplinkHook::Tc, &dataplane, &vxlan)?.verdict,
        TC_ACT_OK
    );
    run_bridge(&dataplane, &into_the_bridge(&request))?;
    let reply = echo_reply(&ipv6_ping(BBOX1_IPV6, BBOX2_IPV6, b"plain"));
    let outcome = run_container(&dataplane, &before_the_hop(&reply))?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    assert_eq!(outcome.counters.get(Counter::TxDirect), 1);
    Ok(())
}

/// `request` (an echo request) turned into its reply: type 129, checksum patched.
fn echo_reply(request: &[u8]) -> Vec<u8> {
    let src: [u8; 16] = request[8..24].try_into().expect("16 bytes");
    let dst: [u8; 16] = request[24..40].try_into().expect("16 bytes");
    let mut message = request[IPV6_HEADER_LEN..].to_vec();
    message[0] = 129;
    ipv6_checksummed(src, dst, IPPROTO_ICMPV6, message, 2)
}

/// `packet` from host2's container, as VXLAN over IPv6 reaches host1's uplink.
fn host1_receives_from_host2(packet: &[u8]) -> Vec<u8> {
    let inner = ethernet(HOST1_VTEP6_MAC, HOST2_VTEP6_MAC, ETH_P_IPV6, packet);
    let datagram = udp(40000, 8472, &vxlan(1, &inner));
    let outer = ipv6_checksummed(HOST2_IPV6, HOST1_IPV6, IPPROTO_UDP, datagram, 6);
    ethernet(HOST1_MAC, HOST2_MAC, ETH_P_IPV6, &outer)
}
