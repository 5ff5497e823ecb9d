//! The uplink's programs, tc and XDP, on hand-built frames through BPF_PROG_TEST_RUN: VXLAN
//! from a known peer goes to flannel.1 (tc decapsulates it and puts it into flannel.1, or
//! straight into a known local container; XDP passes it on to the tc program behind it);
//! everything not ours passes untouched; every bad or hostile frame is dropped; each outcome
//! moves exactly its counter. Both hooks must agree on all of it. flannel.1's ingress lets
//! through only what tc marked.
use anyhow::Result;
use overlay_common::{CHECKED_MARK, CONFIG_ACCEPT_NAT_PEERS, Counter};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, UplinkHook, assert_host2_drops,
        assert_host2_passes, dataplane_of, dataplane_with, host2_receives, host2_with_bbox2,
        run_uplink, run_vtep_ingress, write_leases,
    },
    frames::*,
};

/// Where the seed frame's inner Ethernet header starts.
const SEED_INNER: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN;

fn assert_passed_untouched(frame: &[u8], expected: Counter) -> Result<()> {
    assert_host2_passes(frame, expected, 0)
}

/// Asserts both hooks hand `frame` to flannel.1 for the stack.
fn assert_handed_to_the_vtep(frame: &[u8], inner_offset: usize) -> Result<()> {
    for hook in UplinkHook::ALL {
        let outcome = host2_receives(hook, frame)?;
        assert_eq!(outcome.verdict, hook.to_vtep(), "{hook:?}");
        assert_eq!(
            outcome.frame,
            hook.handed_to_vtep(frame, inner_offset, HOST2_VTEP_MAC),
            "{hook:?}"
        );
        outcome.assert_only(hook.to_vtep_counter(Counter::RxDecapsulated));
        if hook == UplinkHook::Tc {
            assert_eq!(outcome.mark, CHECKED_MARK, "flannel.1 lets it through");
        }
    }
    Ok(())
}

/// Asserts tc decapsulates `frame` into flannel.1, for the stack to route, on host2 with bbox2
/// known (`why` says why it must not go into bbox2).
fn assert_tc_hands_to_the_stack_beside_bbox2(frame: &[u8], why: &str) -> Result<()> {
    let outcome = run_uplink(UplinkHook::Tc, &host2_with_bbox2()?, frame)?;
    assert_eq!(outcome.verdict, UplinkHook::Tc.to_vtep());
    assert_eq!(
        outcome.frame,
        UplinkHook::Tc.handed_to_vtep(frame, SEED_INNER, HOST2_VTEP_MAC),
        "{why}"
    );
    outcome.assert_only(Counter::RxDecapsulated);
    Ok(())
}

/// Asserts both hooks pass `frame` on, checked but still encapsulated, for the stack to
/// finish; tc marks it for flannel.1's socket.
fn assert_checked_for_the_socket(frame: &[u8]) -> Result<()> {
    assert_host2_passes(frame, Counter::RxChecked, CHECKED_MARK)
}

/// `frame` with byte `at` of the IPv4 header at `ip_offset` set to `value`, the header
/// checksum recomputed.
fn with_ipv4_byte(mut frame: Vec<u8>, ip_offset: usize, at: usize, value: u8) -> Vec<u8> {
    let header = &mut frame[ip_offset..ip_offset + IPV4_HEADER_LEN];
    header[at] = value;
    header[10..12].fill(0);
    let checksum = internet_checksum(header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    frame
}

#[test]
fn vxlan_from_a_known_peer_goes_to_flannel_1() -> Result<()> {
    assert_handed_to_the_vtep(&seed_vxlan_frame(1, 8472), SEED_INNER)
}

#[test]
fn tc_delivers_to_a_known_container_routed_as_docker0_would() -> Result<()> {
    let frame = seed_vxlan_frame(1, 8472);
    let outcome = run_uplink(UplinkHook::Tc, &host2_with_bbox2()?, &frame)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    outcome.assert_only(Counter::RxDelivered);

    // What docker0 would put on bbox2's wire: TTL − 1, checksum patched, from the bridge.
    let mut inner_ip = frame[SEED_INNER + ETH_HEADER_LEN..].to_vec();
    inner_ip[8] -= 1;
    inner_ip[10..12].fill(0);
    let checksum = internet_checksum(&inner_ip[..IPV4_HEADER_LEN]);
    inner_ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    assert_eq!(
        outcome.frame,
        ethernet(BBOX2_MAC, HOST2_BRIDGE_MAC, ETH_P_IPV4, &inner_ip)
    );
    Ok(())
}

/// The endpoint map finds a container by its address's host part; a packet for another
/// address with bbox2's host part (10.2.99.2, outside host2's lease) is not bbox2's: the
/// stack routes it as the kernel's decapsulation would have.
#[test]
fn a_packet_for_another_address_with_a_container_s_host_part_goes_to_the_stack() -> Result<()> {
    let inner_ip = SEED_INNER + ETH_HEADER_LEN;
    let frame = with_ipv4_byte(seed_vxlan_frame(1, 8472), inner_ip, 18, 99);
    assert_tc_hands_to_the_stack_beside_bbox2(&frame, "decapsulated into flannel.1, not into bbox2")
}

#[test]
fn a_packet_whose_ttl_runs_out_here_goes_to_the_stack() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    let ttl = SEED_INNER + ETH_HEADER_LEN + 8;
    frame[ttl] = 1;
    assert_tc_hands_to_the_stack_beside_bbox2(
        &frame,
        "decapsulated into flannel.1, TTL untouched: the stack answers with time exceeded",
    )
}

#[test]
fn ipv4_options_on_the_outer_header_are_skipped() -> Result<()> {
    let inner = seed_vxlan_frame(1, 8472)[SEED_INNER..].to_vec();
    // Router alert, then end-of-options padding: two 4-byte words, so IHL 7.
    let frame = outer_udp_frame(
        &[0x94, 0x04, 0, 0, 0, 0, 0, 0],
        49152,
        8472,
        &vxlan(1, &inner),
    );
    assert_eq!(
        frame[ETH_HEADER_LEN] & 0x0f,
        7,
        "the frame carries IPv4 options"
    );
    assert_handed_to_the_vtep(&frame, SEED_INNER + 8)
}

#[test]
fn vxlan_with_another_vni_passes_to_the_stack() -> Result<()> {
    assert_passed_untouched(&seed_vxlan_frame(7, 8472), Counter::RxVxlanForeignVni)
}

#[test]
fn port_and_vni_come_from_the_config_map() -> Result<()> {
    for hook in UplinkHook::ALL {
        let cases = [
            (
                seed_vxlan_frame(7, 4789),
                hook.to_vtep_counter(Counter::RxDecapsulated),
            ),
            (seed_vxlan_frame(1, 4789), Counter::RxVxlanForeignVni),
            (seed_vxlan_frame(7, 8472), Counter::RxOtherPort),
        ];
        for (frame, expected) in &cases {
            let iana = dataplane_with(HOST2.config(7, 4789), &[&HOST1])?;
            run_uplink(hook, &iana, frame)?.assert_only(*expected);
        }
    }
    Ok(())
}

#[test]
fn traffic_that_is_not_vxlan_passes_untouched() -> Result<()> {
    assert_passed_untouched(
        &outer_udp_frame(&[], 40000, 53, b"a dns query"),
        Counter::RxOtherPort,
    )?;
    let segment = [&[0xc3, 0x50, 0x00, 0x50][..], &[0; 16]].concat();
    let tcp = ipv4(HOST1_IP, HOST2_IP, IPPROTO_TCP, &[], &segment);
    assert_passed_untouched(
        &ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV4, &tcp),
        Counter::RxNotUdp,
    )?;
    let request = [
        &[0, 1, 8, 0, 6, 4, 0, 1][..],
        &HOST1_MAC,
        &HOST1_IP,
        &[0; 6],
        &HOST2_IP,
    ]
    .concat();
    assert_passed_untouched(
        &ethernet([0xff; 6], HOST1_MAC, ETH_P_ARP, &request),
        Counter::RxNotIp,
    )
}

#[test]
fn a_first_fragment_is_checked_and_left_to_the_stack_to_reassemble() -> Result<()> {
    // More-fragments set, offset 0: the first fragment of a larger datagram.
    let frame = with_ipv4_byte(seed_vxlan_frame(1, 8472), ETH_HEADER_LEN, 6, 0x20);
    assert_checked_for_the_socket(&frame)?;
    // From a host with no lease, it is dropped like any of its frames.
    let mut stranger = frame;
    stranger[ETH_HEADER_LEN + 12..][..4].copy_from_slice(&[172, 20, 62, 99]);
    assert_host2_drops(&stranger, Counter::RxUnknownVtep)
}

/// A first fragment that ends right after the VXLAN header, padded out with a harmless
/// inner header (bbox1's ping) where Ethernet padding goes: the real inner headers, spoofing
/// a neighbour of bbox2, come in the second fragment. The check reads only the fragment's own
/// bytes, so the first is dropped and the stack never completes the datagram.
#[test]
fn a_first_fragment_is_judged_on_its_own_bytes_not_on_padding() -> Result<()> {
    let inner = ping_to_bbox2_from(BBOX2_NEIGHBOUR_IP, HOST2_VTEP_MAC);
    let datagram = udp(49152, 8472, &vxlan(1, &inner));
    let packet = ipv4(HOST1_IP, HOST2_IP, IPPROTO_UDP, &[], &datagram);
    let [first, second] = ipv4_fragments(&packet, UDP_HEADER_LEN + VXLAN_HEADER_LEN, 0x4444);
    let harmless = &seed_vxlan_frame(1, 8472)[SEED_INNER..];
    let padded = [&first[..], harmless].concat();
    assert_host2_drops(
        &ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV4, &padded),
        Counter::RxMalformed,
    )?;
    assert_passed_untouched(
        &ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV4, &second),
        Counter::RxIpv4Fragment,
    )
}

#[test]
fn later_fragments_are_left_to_the_stack() -> Result<()> {
    // Offset 185 (× 8 bytes): no headers to check. The reassembled datagram carries its first
    // fragment's mark, or none.
    let frame = with_ipv4_byte(seed_vxlan_frame(1, 8472), ETH_HEADER_LEN, 7, 185);
    assert_passed_untouched(&frame, Counter::RxIpv4Fragment)
}

#[test]
fn a_udp_checksum_is_left_to_the_stack_to_verify() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    frame[ETH_HEADER_LEN + IPV4_HEADER_LEN + 6..][..2].copy_from_slice(&[0x12, 0x34]);
    assert_checked_for_the_socket(&frame)
}

#[test]
fn vxlan_for_another_address_passes_to_the_stack() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    frame[ETH_HEADER_LEN + 16..][..4].copy_from_slice(&[172, 20, 62, 200]);
    assert_passed_untouched(&frame, Counter::RxOtherDestination)
}

/// VXLAN with the group-based policy extension (flags 0x88, a policy ID in the first reserved
/// field) is someone else's when it goes to another address or carries another VNI: it passes
/// to the stack as any VXLAN that is not ours, before the checks of our own.
#[test]
fn vxlan_with_extensions_that_is_not_ours_passes_to_the_stack() -> Result<()> {
    let with_policy = |mut frame: Vec<u8>| {
        let vxlan_header = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
        frame[vxlan_header..vxlan_header + 4].copy_from_slice(&[0x88, 0, 0x12, 0x34]);
        frame
    };
    let mut transit = with_policy(seed_vxlan_frame(1, 8472));
    transit[ETH_HEADER_LEN + 16..][..4].copy_from_slice(&[172, 20, 62, 200]);
    assert_passed_untouched(&transit, Counter::RxOtherDestination)?;
    assert_passed_untouched(
        &with_policy(seed_vxlan_frame(7, 8472)),
        Counter::RxVxlanForeignVni,
    )
}

#[test]
fn vxlan_flags_and_reserved_bits_the_kernel_refuses_are_dropped() -> Result<()> {
    let vxlan_header = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
    // Another flag next to "VNI valid"; a bit in each reserved field.
    for (at, value) in [(0, 0x0c), (1, 0x01), (3, 0x80), (7, 0x01)] {
        let mut frame = seed_vxlan_frame(1, 8472);
        frame[vxlan_header + at] = value;
        assert_host2_drops(&frame, Counter::RxMalformed)?;
    }
    Ok(())
}

#[test]
fn congestion_the_outer_header_met_is_marked_on_the_inner_packet() -> Result<()> {
    let inner_ip = SEED_INNER + ETH_HEADER_LEN;
    // RFC 6040: outer CE onto an ECT(0) inner packet.
    let ect = with_ipv4_byte(seed_vxlan_frame(1, 8472), inner_ip, 1, 0x02);
    let frame = with_ipv4_byte(ect, ETH_HEADER_LEN, 1, 0x03);
    let outcome = run_uplink(UplinkHook::Tc, &host2_with_bbox2()?, &frame)?;
    outcome.assert_only(Counter::RxDelivered);
    let delivered = &outcome.frame[ETH_HEADER_LEN..ETH_HEADER_LEN + IPV4_HEADER_LEN];
    assert_eq!(delivered[1], 0x03, "CE on the inner packet");
    assert_eq!(internet_checksum(delivered), 0, "a valid header checksum");
    Ok(())
}

#[test]
fn congestion_on_a_packet_that_is_not_ecn_capable_drops_it() -> Result<()> {
    let frame = with_ipv4_byte(seed_vxlan_frame(1, 8472), ETH_HEADER_LEN, 1, 0x03);
    assert_host2_drops(&frame, Counter::RxCeNotEct)
}

#[test]
fn flannel_1_lets_through_only_what_the_uplink_checked() -> Result<()> {
    let dataplane = dataplane_of(&HOST2, &[&HOST1])?;
    let decapsulated = &seed_vxlan_frame(1, 8472)[SEED_INNER..];
    // Another program's mark bit stays; ours is cleared.
    let other_mark = 0x4000;
    let checked = run_vtep_ingress(&dataplane, decapsulated, CHECKED_MARK | other_mark)?;
    assert_eq!(checked.verdict, TC_ACT_OK);
    assert_eq!(checked.mark, other_mark);
    checked.assert_uncounted();
    let unchecked = run_vtep_ingress(&dataplane, decapsulated, other_mark)?;
    assert_eq!(unchecked.verdict, TC_ACT_SHOT);
    unchecked.assert_only(Counter::RxUncheckedVxlan);
    Ok(())
}

#[test]
fn vxlan_from_an_unknown_host_is_dropped() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    frame[ETH_HEADER_LEN + 12..][..4].copy_from_slice(&[172, 20, 62, 99]);
    assert_host2_drops(&frame, Counter::RxUnknownVtep)?;
    // A peer that holds no lease any more is unknown too.
    for hook in UplinkHook::ALL {
        let outcome = run_uplink(
            hook,
            &dataplane_of(&HOST2, &[])?,
            &seed_vxlan_frame(1, 8472),
        )?;
        assert_eq!(outcome.verdict, hook.drop(), "{hook:?}");
    }
    Ok(())
}

/// With `--accept-nat-peers`, VXLAN from an outer source no lease names (a NAT's) is taken as
/// the lease's whose subnet holds the inner source, and only with that lease's VtepMAC.
#[test]
fn with_accept_nat_peers_an_unlisted_sender_needs_the_lease_s_vtep_mac() -> Result<()> {
    let mut config = HOST2.config(1, 8472);
    config.flags |= CONFIG_ACCEPT_NAT_PEERS;
    let mut nated = seed_vxlan_frame(1, 8472);
    nated[ETH_HEADER_LEN + 12..][..4].copy_from_slice(&[172, 20, 62, 99]);
    let mut other_mac = nated.clone();
    other_mac[SEED_INNER + 6..][..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    for hook in UplinkHook::ALL {
        let host2 = dataplane_with(config, &[&HOST1])?;
        let outcome = run_uplink(hook, &host2, &nated)?;
        assert_ne!(outcome.verdict, hook.drop(), "{hook:?}: the NATed frame");
        assert_eq!(outcome.counters.get(Counter::RxUnknownVtep), 0, "{hook:?}");
        let outcome = run_uplink(hook, &dataplane_with(config, &[&HOST1])?, &other_mac)?;
        assert_eq!(outcome.verdict, hook.drop(), "{hook:?}: another MAC");
        outcome.assert_only(Counter::RxUnknownVtep);
    }
    Ok(())
}

#[test]
fn an_inner_source_outside_the_sender_s_subnet_is_dropped() -> Result<()> {
    // host1 (10.2.41.0/24) claiming to send from host2's own subnet.
    let inner = ping_to_bbox2_from(BBOX2_NEIGHBOUR_IP, HOST2_VTEP_MAC);
    assert_host2_drops(
        &outer_udp_frame(&[], 49152, 8472, &vxlan(1, &inner)),
        Counter::RxSpoofedSource,
    )
}

/// A reply whose DNAT the sender's conntrack has undone comes from the sender's PublicIP (a
/// published port on host1, reached from bbox2): not a spoof.
#[test]
fn an_inner_source_that_is_the_sender_s_own_public_ip_is_accepted() -> Result<()> {
    let inner = ping_to_bbox2_from(HOST1_IP, HOST2_VTEP_MAC);
    let frame = outer_udp_frame(&[], 49152, 8472, &vxlan(1, &inner));
    let outcome = run_uplink(UplinkHook::Tc, &host2_with_bbox2()?, &frame)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    outcome.assert_only(Counter::RxDelivered);
    Ok(())
}

/// A host may hold more than one lease (re-leased while its old record lives on, say): it
/// may send from either subnet.
#[test]
fn a_host_holding_two_leases_may_send_from_both() -> Result<()> {
    let mut second = HOST1.lease();
    second.subnet = "10.2.42.0/24".parse()?;
    for hook in UplinkHook::ALL {
        let mut host2 = dataplane_of(&HOST2, &[])?;
        write_leases(&mut host2, &[HOST1.lease(), second.clone()])?;
        for source in [BBOX1_IP, [10, 2, 42, 7]] {
            let ping = ipv4(
                source,
                BBOX2_IP,
                IPPROTO_ICMP,
                &[],
                &icmp_echo_request(1, 1, b"two"),
            );
            let inner = ethernet(HOST2_VTEP_MAC, HOST1_VTEP_MAC, ETH_P_IPV4, &ping);
            let before = host2.counters()?;
            let outcome = run_uplink(
                hook,
                &host2,
                &outer_udp_frame(&[], 49152, 8472, &vxlan(1, &inner)),
            )?;
            assert_eq!(outcome.verdict, hook.to_vtep(), "{hook:?} from {source:?}");
            outcome.assert_only_since(&before, hook.to_vtep_counter(Counter::RxDecapsulated));
        }
    }
    Ok(())
}

#[test]
fn inner_frames_other_than_ipv4_are_dropped() -> Result<()> {
    let arp = [
        &[0, 1, 8, 0, 6, 4, 0, 1][..],
        &HOST1_VTEP_MAC,
        &BBOX1_IP,
        &[0; 6],
        &BBOX2_IP,
    ]
    .concat();
    let inner = ethernet([0xff; 6], HOST1_VTEP_MAC, ETH_P_ARP, &arp);
    assert_host2_drops(
        &outer_udp_frame(&[], 49152, 8472, &vxlan(1, &inner)),
        Counter::RxInnerOtherFamily,
    )
}

#[test]
fn vxlan_without_the_vni_flag_is_dropped() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    frame[ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN] = 0;
    assert_host2_drops(&frame, Counter::RxMalformed)
}

#[test]
fn inconsistent_lengths_are_dropped() -> Result<()> {
    type Corruption = fn(&mut Vec<u8>);
    let cases: [(&str, Corruption); 5] = [
        ("IP version 6 in an IPv4 ethertype", |frame| {
            frame[ETH_HEADER_LEN] = 0x65
        }),
        ("IHL below 5", |frame| frame[ETH_HEADER_LEN] = 0x44),
        ("IP total length beyond the frame", |frame| {
            frame[ETH_HEADER_LEN + 2] = 0xff
        }),
        ("UDP length beyond the IP payload", |frame| {
            frame[ETH_HEADER_LEN + IPV4_HEADER_LEN + 4] = 0xff
        }),
        ("UDP length below its header", |frame| {
            frame[ETH_HEADER_LEN + IPV4_HEADER_LEN + 4..][..2].copy_from_slice(&[0, 4])
        }),
    ];
    for hook in UplinkHook::ALL {
        for (what, corrupt) in cases {
            let mut frame = seed_vxlan_frame(1, 8472);
            corrupt(&mut frame);
            let outcome = host2_receives(hook, &frame)?;
            assert_eq!(
                (outcome.verdict, outcome.counters.get(Counter::RxMalformed)),
                (hook.drop(), 1),
                "{hook:?}: {what}"
            );
        }
    }
    Ok(())
}

/// Cuts the seed frame at every header boundary (and inside each header), through the inner
/// IPv4 header: each cut is dropped as malformed. The kernel refuses test frames shorter than
/// an Ethernet header (for tc, than an IPv4 header), so cuts start there.
#[test]
fn frames_cut_short_are_dropped() -> Result<()> {
    let frame = seed_vxlan_frame(1, 8472);
    let udp = ETH_HEADER_LEN + IPV4_HEADER_LEN;
    let vxlan = udp + UDP_HEADER_LEN;
    let inner = vxlan + VXLAN_HEADER_LEN;
    let boundaries = [
        ETH_HEADER_LEN,
        udp - 1,
        udp,
        vxlan - 1,
        vxlan,
        inner - 1,
        inner,
        inner + ETH_HEADER_LEN - 1,
        inner + ETH_HEADER_LEN,
        inner + ETH_HEADER_LEN + IPV4_HEADER_LEN - 1,
    ];
    for cut in boundaries {
        assert_host2_drops(&frame[..cut], Counter::RxMalformed)?;
    }
    Ok(())
}

/// The same cuts, but with the IP and UDP lengths rewritten to match the shorter frame, so
/// only the header checks can catch them.
#[test]
fn consistent_but_short_datagrams_are_dropped() -> Result<()> {
    let full = seed_vxlan_frame(1, 8472);
    let vxlan_start = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
    let inner_headers = ETH_HEADER_LEN + IPV4_HEADER_LEN;
    for payload_len in [
        0,
        VXLAN_HEADER_LEN - 1,
        VXLAN_HEADER_LEN,
        VXLAN_HEADER_LEN + inner_headers - 1,
    ] {
        let payload = &full[vxlan_start..][..payload_len];
        assert_host2_drops(
            &outer_udp_frame(&[], 49152, 8472, payload),
            Counter::RxMalformed,
        )?;
    }
    Ok(())
}
