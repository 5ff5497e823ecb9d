//! The encapsulating tc programs on hand-built frames through BPF_PROG_TEST_RUN.
//! - flannel.1's egress: a packet for a remote subnet leaves in flannel's wire format,
//!   redirected to the uplink; anything else is dropped and counted.
//! - A container veth's ingress (the fast path): a container's packet for a remote subnet
//!   leaves exactly as the routed path would have sent it; what a router must handle itself
//!   goes to the stack, and everything else to the bridge, untouched. What a container may not
//!   send (a source outside its lease or the host's own, a MAC that is not one, VXLAN) is
//!   dropped and counted, with or without the fast path.
use std::collections::HashSet;

use anyhow::Result;
use overlay_common::{CONFIG_FAST_PATH, Counter, VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, dataplane_of,
        dataplane_with, run_container, run_vtep,
    },
    frames::*,
    netns::Netns,
};

const OUTER_IP: usize = ETH_HEADER_LEN;
const OUTER_UDP: usize = OUTER_IP + IPV4_HEADER_LEN;
const VXLAN: usize = OUTER_UDP + UDP_HEADER_LEN;
const INNER: usize = VXLAN + VXLAN_HEADER_LEN;

/// bbox1's ping to bbox2 as it reaches flannel.1 on host1: routed (TTL 63), addressed from
/// our VTEP to host2's by the permanent neighbour entry.
fn routed_ping(tos: u8) -> Vec<u8> {
    let mut ping = bbox1_ping(BBOX2_IP, 63);
    ping[1] = tos;
    ethernet(HOST2_VTEP_MAC, HOST1_VTEP_MAC, ETH_P_IPV4, &ping)
}

/// host1 sending `frame` out of flannel.1, with host2 as its only peer.
fn send(frame: &[u8]) -> Result<Outcome> {
    run_vtep(&dataplane_of(&HOST1, &[&HOST2])?, frame)
}

/// `packet` as bbox1 puts it on its veth: to its gateway, docker0.
fn from_bbox1(packet: &[u8]) -> Vec<u8> {
    ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ETH_P_IPV4, packet)
}

/// host1's container veth receiving `frame` from bbox1, with host2 as its only peer.
fn from_container(frame: &[u8]) -> Result<Outcome> {
    run_container(&dataplane_of(&HOST1, &[&HOST2])?, frame)
}

fn assert_left_to_the_bridge(frame: &[u8]) -> Result<()> {
    let outcome = from_container(frame)?;
    assert_eq!(outcome.verdict, TC_ACT_OK);
    assert_eq!(outcome.frame, frame, "untouched");
    outcome.assert_uncounted();
    Ok(())
}

fn source_port(encapsulated: &[u8]) -> u16 {
    u16::from_be_bytes([encapsulated[OUTER_UDP], encapsulated[OUTER_UDP + 1]])
}

#[test]
fn a_packet_for_a_remote_subnet_leaves_in_flannels_wire_format() -> Result<()> {
    let inner = routed_ping(0);
    let outcome = send(&inner)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT, "redirected to the uplink");
    outcome.assert_only(Counter::TxEncapsulated);
    let out = &outcome.frame;
    assert_eq!(out.len(), inner.len() + 50);

    let ip = &out[OUTER_IP..OUTER_UDP];
    let total_len = (inner.len() + 36) as u16;
    assert_eq!(
        ip[..4],
        [0x45, 0x00, (total_len >> 8) as u8, total_len as u8],
        "version, IHL, TOS, length"
    );
    assert_eq!(ip[6..10], [0, 0, 64, IPPROTO_UDP], "no DF, TTL 64, UDP");
    assert_eq!(
        internet_checksum(ip),
        0,
        "the outer header checksum is valid"
    );
    assert_eq!(ip[12..16], HOST1_IP);
    assert_eq!(ip[16..20], HOST2_IP);

    let port = source_port(out);
    assert!(
        (VXLAN_SOURCE_PORT_MIN..VXLAN_SOURCE_PORT_MAX).contains(&port),
        "source port {port}"
    );
    let udp_len = (inner.len() + 16) as u16;
    assert_eq!(
        out[OUTER_UDP + 2..VXLAN],
        [0x21, 0x18, (udp_len >> 8) as u8, udp_len as u8, 0, 0],
        "to 8472, checksum 0"
    );
    assert_eq!(
        out[VXLAN..INNER],
        [0x08, 0, 0, 0, 0, 0, 1, 0],
        "flags 0x08, VNI 1"
    );
    assert_eq!(
        out[INNER..],
        inner[..],
        "the inner frame goes from our VTEP MAC to host2's"
    );
    assert_eq!(
        out[..ETH_HEADER_LEN],
        inner[..ETH_HEADER_LEN],
        "the outer Ethernet header is the neighbour table's to fill"
    );
    Ok(())
}

#[test]
fn a_congestion_mark_becomes_ect0_outside() -> Result<()> {
    for (inner_tos, outer_tos) in [
        (0x00, 0x00),
        (0x01, 0x01),
        (0x02, 0x02),
        (0x03, 0x02),
        (0xb8, 0x00),
        (0xbb, 0x02),
    ] {
        let outcome = send(&routed_ping(inner_tos))?;
        assert_eq!(
            outcome.frame[OUTER_IP + 1],
            outer_tos,
            "inner TOS {inner_tos:#x}"
        );
    }
    Ok(())
}

#[test]
fn each_flow_keeps_its_own_source_port() -> Result<()> {
    let datagram = |port: u16| {
        let packet = ipv4(
            BBOX1_IP,
            BBOX2_IP,
            IPPROTO_UDP,
            &[],
            &udp(port, 9000, b"flow"),
        );
        ethernet(HOST2_VTEP_MAC, HOST1_VTEP_MAC, ETH_P_IPV4, &packet)
    };
    let ports: Vec<u16> = (40000..40032)
        .map(|port| send(&datagram(port)).map(|outcome| source_port(&outcome.frame)))
        .collect::<Result<_>>()?;
    assert_eq!(
        source_port(&send(&datagram(40000))?.frame),
        ports[0],
        "a flow keeps its port"
    );
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() > 16,
        "32 flows spread over the range: {ports:?}"
    );
    Ok(())
}

#[test]
fn a_destination_no_lease_covers_is_dropped() -> Result<()> {
    let packet = ipv4(
        BBOX1_IP,
        [10, 2, 99, 2],
        IPPROTO_ICMP,
        &[],
        &icmp_echo_request(1, 1, b"nowhere"),
    );
    let outcome = send(&ethernet(
        HOST2_VTEP_MAC,
        HOST1_VTEP_MAC,
        ETH_P_IPV4,
        &packet,
    ))?;
    assert_eq!(outcome.verdict, TC_ACT_SHOT);
    outcome.assert_only(Counter::TxNoRoute);
    Ok(())
}

#[test]
fn anything_but_ipv4_is_dropped() -> Result<()> {
    let arp = [
        &[0, 1, 8, 0, 6, 4, 0, 1][..],
        &HOST1_VTEP_MAC,
        &[10, 2, 41, 0],
        &[0; 6],
        &[10, 2, 54, 0],
    ]
    .concat();
    let outcome = send(&ethernet([0xff; 6], HOST1_VTEP_MAC, ETH_P_ARP, &arp))?;
    assert_eq!(outcome.verdict, TC_ACT_SHOT);
    outcome.assert_only(Counter::TxNotIpv4);
    Ok(())
}

#[test]
fn a_full_sized_packet_is_encapsulated_whole() -> Result<()> {
    let payload = vec![0x5a; 1400];
    let packet = ipv4(
        BBOX1_IP,
        BBOX2_IP,
        IPPROTO_UDP,
        &[],
        &udp(40000, 9000, &payload),
    );
    let inner = ethernet(HOST2_VTEP_MAC, HOST1_VTEP_MAC, ETH_P_IPV4, &packet);
    let outcome = send(&inner)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    assert_eq!(outcome.frame[INNER..], inner[..]);
    Ok(())
}

#[test]
fn a_container_s_packet_leaves_its_veth_as_the_routed_path_sends_it() -> Result<()> {
    let fast = from_container(&from_bbox1(&bbox1_ping(BBOX2_IP, 64)))?;
    assert_eq!(fast.verdict, TC_ACT_REDIRECT, "redirected to the uplink");
    fast.assert_only(Counter::TxDirect);
    // The routed path: docker0 forwards (TTL 63), flannel.1 addresses it VTEP to VTEP.
    let routed = send(&ethernet(
        HOST2_VTEP_MAC,
        HOST1_VTEP_MAC,
        ETH_P_IPV4,
        &bbox1_ping(BBOX2_IP, 63),
    ))?;
    // The outer Ethernet header is the neighbour's, filled in when the frame leaves; each
    // datagram has its own IP ID, and so its own header checksum.
    let without_id = |frame: &[u8]| {
        assert_eq!(internet_checksum(&frame[OUTER_IP..OUTER_UDP]), 0);
        let mut frame = frame[ETH_HEADER_LEN..].to_vec();
        frame[4..6].fill(0);
        frame[10..12].fill(0);
        frame
    };
    assert_eq!(
        without_id(&fast.frame),
        without_id(&routed.frame),
        "the same frame, source port included"
    );
    Ok(())
}

#[test]
fn each_outer_datagram_has_its_own_ip_id() -> Result<()> {
    // RFC 6864: DF is clear, as the kernel's vxlan device sends it, so the ID must tell
    // datagrams apart. Three equal random IDs would be a one in four billion chance.
    let ids: HashSet<[u8; 2]> = (0..3)
        .map(|_| {
            let outcome = send(&routed_ping(0))?;
            Ok([outcome.frame[OUTER_IP + 4], outcome.frame[OUTER_IP + 5]])
        })
        .collect::<Result<_>>()?;
    assert!(ids.len() > 1, "IDs {ids:?}");
    Ok(())
}

#[test]
fn what_a_router_must_answer_goes_to_the_stack() -> Result<()> {
    let cases = [
        ("TTL 1: time exceeded", bbox1_ping(BBOX2_IP, 1)),
        ("IPv4 options", {
            let payload = icmp_echo_request(1, 1, b"options");
            ipv4(BBOX1_IP, BBOX2_IP, IPPROTO_ICMP, &[0x94, 4, 0, 0], &payload)
        }),
    ];
    for (what, packet) in cases {
        let frame = from_bbox1(&packet);
        let outcome = from_container(&frame)?;
        assert_eq!(outcome.verdict, TC_ACT_OK, "{what}");
        assert_eq!(outcome.frame, frame, "{what}: untouched");
        outcome.assert_only(Counter::TxSlowPath);
    }
    Ok(())
}

#[test]
fn a_packet_too_big_for_the_overlay_goes_to_the_stack() -> Result<()> {
    // The VXLAN device's MTU, as flannel sets it on a 1500-byte underlay.
    let netns = Netns::new("mtu")?;
    netns.ip(&[
        "link", "add", "vtep0", "mtu", "1450", "type", "veth", "peer", "name", "vtep1",
    ])?;
    let vtep_ifindex: u32 = netns
        .exec(&["cat", "/sys/class/net/vtep0/ifindex"])?
        .trim()
        .parse()?;
    let packet_of = |ip_len: usize| {
        let payload = vec![0x5a; ip_len - IPV4_HEADER_LEN - UDP_HEADER_LEN];
        from_bbox1(&ipv4(
            BBOX1_IP,
            BBOX2_IP,
            IPPROTO_UDP,
            &[],
            &udp(40000, 9000, &payload),
        ))
    };
    netns.run_inside(|| {
        let config = overlay_common::OverlayConfig {
            vtep_ifindex,
            vtep_mtu: 1450,
            ..HOST1.config(1, 8472)
        };
        let fits = run_container(&dataplane_with(config, &[&HOST2])?, &packet_of(1450))?;
        assert_eq!(fits.verdict, TC_ACT_REDIRECT);
        fits.assert_only(Counter::TxDirect);
        let too_big = packet_of(1451);
        let outcome = run_container(&dataplane_with(config, &[&HOST2])?, &too_big)?;
        assert_eq!(outcome.verdict, TC_ACT_OK);
        assert_eq!(outcome.frame, too_big, "untouched");
        outcome.assert_only(Counter::TxSlowPath);
        Ok(())
    })
}

#[test]
fn everything_else_goes_on_to_the_bridge_untouched() -> Result<()> {
    // Local, outside the overlay, to another container's MAC (a router on the bridge), ARP.
    assert_left_to_the_bridge(&from_bbox1(&bbox1_ping([10, 2, 41, 3], 64)))?;
    assert_left_to_the_bridge(&from_bbox1(&bbox1_ping([192, 0, 2, 1], 64)))?;
    assert_left_to_the_bridge(&ethernet(
        [0x02, 0x42, 0x0a, 0x02, 0x29, 0x03],
        BBOX1_MAC,
        ETH_P_IPV4,
        &bbox1_ping(BBOX2_IP, 64),
    ))?;
    let arp = [
        &[0, 1, 8, 0, 6, 4, 0, 1][..],
        &BBOX1_MAC,
        &BBOX1_IP,
        &[0; 6],
        &[10, 2, 41, 1],
    ]
    .concat();
    assert_left_to_the_bridge(&ethernet([0xff; 6], BBOX1_MAC, ETH_P_ARP, &arp))
}

/// Asserts the container program drops `frame`, counting it as `expected`.
fn assert_refused(frame: &[u8], expected: Counter) -> Result<()> {
    let outcome = from_container(frame)?;
    assert_eq!(outcome.verdict, TC_ACT_SHOT, "{}", expected.name());
    outcome.assert_only(expected);
    Ok(())
}

/// bbox1's ARP message with `sender_mac` and `sender_ip`, framed from `source`.
fn arp_from(source: [u8; 6], sender_mac: [u8; 6], sender_ip: [u8; 4]) -> Vec<u8> {
    let reply = [
        &[0, 1, 8, 0, 6, 4, 0, 2][..],
        &sender_mac,
        &sender_ip,
        &HOST1_BRIDGE_MAC,
        &[10, 2, 41, 1],
    ]
    .concat();
    ethernet(HOST1_BRIDGE_MAC, source, ETH_P_ARP, &reply)
}

#[test]
fn a_container_sends_only_from_its_own_lease_and_never_the_host_s_addresses() -> Result<()> {
    // Another host's subnet, the bridge's address, the lease's network and broadcast address.
    for source in [
        [10, 2, 54, 7],
        [10, 2, 41, 1],
        [10, 2, 41, 0],
        [10, 2, 41, 255],
    ] {
        let mut ping = bbox1_ping(BBOX2_IP, 64);
        ping[12..16].copy_from_slice(&source);
        assert_refused(&from_bbox1(&ping), Counter::TxSpoofedSource)?;
        assert_refused(
            &arp_from(BBOX1_MAC, BBOX1_MAC, source),
            Counter::TxSpoofedSource,
        )?;
    }
    Ok(())
}

#[test]
fn a_container_s_frames_name_one_mac() -> Result<()> {
    // An ARP sender other than the frame's source, a group address, the bridge's own MAC.
    assert_refused(
        &arp_from(BBOX1_MAC, BBOX2_MAC, BBOX1_IP),
        Counter::TxSpoofedMac,
    )?;
    let group = [0x03, 0, 0, 0, 0, 1];
    let ping = bbox1_ping(BBOX2_IP, 64);
    for source in [group, HOST1_BRIDGE_MAC] {
        assert_refused(
            &ethernet(HOST1_BRIDGE_MAC, source, ETH_P_IPV4, &ping),
            Counter::TxSpoofedMac,
        )?;
    }
    // An address probe claims no address.
    let probe = from_container(&arp_from(BBOX1_MAC, BBOX1_MAC, [0; 4]))?;
    assert_eq!(probe.verdict, TC_ACT_OK);
    probe.assert_uncounted();
    Ok(())
}

/// An ARP reply from bbox1 whose first six bytes (hardware type, protocol, address lengths)
/// are `shape`, with `sender_mac` and `sender_ip`.
fn arp_shaped(shape: [u8; 6], sender_mac: [u8; 6], sender_ip: [u8; 4]) -> Vec<u8> {
    let mut frame = arp_from(BBOX1_MAC, sender_mac, sender_ip);
    frame[ETH_HEADER_LEN..ETH_HEADER_LEN + 6].copy_from_slice(&shape);
    frame
}

#[test]
fn every_arp_the_kernel_takes_is_checked_and_any_other_is_dropped() -> Result<()> {
    // Hardware type 6 (IEEE 802): Linux's ARP takes it on Ethernet as it takes type 1.
    let ieee802 = [0, 6, 8, 0, 6, 4];
    assert_refused(
        &arp_shaped(ieee802, BBOX1_MAC, [10, 2, 54, 7]),
        Counter::TxSpoofedSource,
    )?;
    assert_refused(
        &arp_shaped(ieee802, BBOX2_MAC, BBOX1_IP),
        Counter::TxSpoofedMac,
    )?;
    let own = from_container(&arp_shaped(ieee802, BBOX1_MAC, BBOX1_IP))?;
    assert_eq!(own.verdict, TC_ACT_OK, "bbox1's own ARP over IEEE 802");
    own.assert_uncounted();
    // Shapes no ARP of the kernel takes: another hardware type or protocol, other lengths.
    for shape in [
        [0, 7, 8, 0, 6, 4],
        [0, 1, 0x86, 0xdd, 6, 4],
        [0, 1, 8, 0, 6, 16],
        [0, 1, 8, 0, 8, 4],
    ] {
        assert_refused(
            &arp_shaped(shape, BBOX1_MAC, BBOX1_IP),
            Counter::TxUnexpectedFrame,
        )?;
    }
    Ok(())
}

#[test]
fn a_container_s_vlan_tags_and_other_ethertypes_are_dropped() -> Result<()> {
    let ping = bbox1_ping(BBOX2_IP, 64);
    // VID 0 ("priority tagged"): the stack takes the payload off the tag as its own.
    let tagged = [&[0, 0][..], &ETH_P_IPV4.to_be_bytes(), &ping].concat();
    for tag in [0x8100, 0x88a8, 0x9100] {
        assert_refused(
            &ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, tag, &tagged),
            Counter::TxVlan,
        )?;
    }
    // LLDP, PPPoE discovery, MPLS, and an 802.3 length field.
    for ether_type in [0x88cc, 0x8863, 0x8847, 0x0054] {
        assert_refused(
            &ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ether_type, &ping),
            Counter::TxUnexpectedFrame,
        )?;
    }
    Ok(())
}

/// The claims one container port may bind, addresses and MACs together.
const CLAIM_QUOTA: usize = 32;

#[test]
fn one_container_port_binds_no_more_than_its_quota() -> Result<()> {
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    // Address probes: each claims its source MAC alone.
    let probe_from = |index: usize| {
        let mac = [0x02, 0x42, 0x0a, 0, (index >> 8) as u8, index as u8];
        arp_from(mac, mac, [0; 4])
    };
    for index in 0..CLAIM_QUOTA {
        let outcome = run_container(&dataplane, &probe_from(index))?;
        assert_eq!(
            outcome.verdict, TC_ACT_OK,
            "claim {index} is within the quota"
        );
    }
    let before = dataplane.counters()?;
    let over = run_container(&dataplane, &probe_from(CLAIM_QUOTA))?;
    assert_eq!(over.verdict, TC_ACT_SHOT, "a claim past the quota");
    over.assert_only_since(&before, Counter::TxSpoofedMac);
    // What the port holds it keeps using.
    let known = run_container(&dataplane, &probe_from(0))?;
    assert_eq!(known.verdict, TC_ACT_OK, "a MAC the port holds");
    Ok(())
}

#[test]
fn a_container_cannot_send_to_the_vxlan_port() -> Result<()> {
    let forged = vxlan(1, &routed_ping(0));
    let datagram = udp(40000, 8472, &forged);
    let plain = ipv4(BBOX1_IP, HOST2_IP, IPPROTO_UDP, &[], &datagram);
    // Behind IPv4 options the port sits at a variable offset.
    let with_options = ipv4(BBOX1_IP, HOST2_IP, IPPROTO_UDP, &[1, 1, 1, 0], &datagram);
    for packet in [plain, with_options] {
        assert_refused(&from_bbox1(&packet), Counter::TxVxlanFromContainer)?;
    }
    Ok(())
}

#[test]
fn without_the_fast_path_the_container_program_only_checks() -> Result<()> {
    let mut config = HOST1.config(1, 8472);
    config.flags &= !CONFIG_FAST_PATH;
    let dataplane = dataplane_with(config, &[&HOST2])?;
    let ping = from_bbox1(&bbox1_ping(BBOX2_IP, 64));
    let outcome = run_container(&dataplane, &ping)?;
    assert_eq!(outcome.verdict, TC_ACT_OK, "on to the bridge");
    assert_eq!(outcome.frame, ping, "untouched");
    outcome.assert_uncounted();
    let mut spoofed = bbox1_ping(BBOX2_IP, 64);
    spoofed[12..16].copy_from_slice(&[10, 2, 54, 7]);
    let refused = run_container(&dataplane, &from_bbox1(&spoofed))?;
    assert_eq!(refused.verdict, TC_ACT_SHOT);
    Ok(())
}
