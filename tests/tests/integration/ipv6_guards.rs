//! The IPv6 guards in ebpf mode, on hand-built and captured frames through BPF_PROG_TEST_RUN:
//! the kernel's flannel-v6.1 decapsulates VXLAN over IPv6, and the uplink's programs (tc and
//! XDP, which must agree) let through to its socket only what a member sends from inside its
//! IPv6 subnet, marked for flannel-v6.1's guard; a container's IPv6 must come from this host's
//! IPv6 lease, a link-local address or none, and never go to the VXLAN port.
use anyhow::Result;
use overlay_common::{CHECKED_MARK, CONFIG_IPV6, Counter, Counters};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, TC_ACT_OK, TC_ACT_SHOT, UplinkHook, assert_host2_drops,
        assert_host2_passes, dataplane_of, dataplane_with, host2_receives, run_container,
        run_uplink, write_leases,
    },
    frames::*,
};

/// Asserts both hooks pass `frame` on as it is, counted as `expected`; tc marks it for
/// flannel-v6.1's guard when `marked`.
fn assert_passed(frame: &[u8], expected: Counter, marked: bool) -> Result<()> {
    assert_host2_passes(frame, expected, if marked { CHECKED_MARK } else { 0 })
}

/// The captured frame with the IPv6 address at `offset` replaced.
fn with_address(offset: usize, address: [u8; 16]) -> Vec<u8> {
    let mut frame = FLANNEL_V6_PING.to_vec();
    frame[offset..offset + 16].copy_from_slice(&address);
    frame
}

#[test]
fn a_member_s_vxlan_over_ipv6_goes_on_to_flannel_v6_marked() -> Result<()> {
    assert_passed(&FLANNEL_V6_PING, Counter::RxChecked, true)
}

#[test]
fn vxlan_over_ipv6_from_a_host_with_no_lease_is_dropped() -> Result<()> {
    let stranger = [0xfd, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x66];
    assert_host2_drops(
        &with_address(V6_OUTER_IP + IPV6_SRC, stranger),
        Counter::RxIpv6NonMember,
    )?;
    // host1's IPv4 PublicIP mapped into IPv6 is not its PublicIPv6 either.
    let mut mapped = [0; 16];
    mapped[10..12].copy_from_slice(&[0xff, 0xff]);
    mapped[12..].copy_from_slice(&HOST1_IP);
    assert_host2_drops(
        &with_address(V6_OUTER_IP + IPV6_SRC, mapped),
        Counter::RxIpv6NonMember,
    )?;
    // A peer that holds no lease any more is unknown too.
    for hook in UplinkHook::ALL {
        let outcome = run_uplink(hook, &dataplane_of(&HOST2, &[])?, &FLANNEL_V6_PING)?;
        assert_eq!(outcome.verdict, hook.drop(), "{hook:?}");
        outcome.assert_only(Counter::RxIpv6NonMember);
    }
    Ok(())
}

#[test]
fn an_inner_ipv6_source_outside_the_sender_s_subnet_is_dropped() -> Result<()> {
    // host2's own subnet, host1's IPv4 lease's prefix in IPv6 clothing, a link-local address.
    let mut link_local = [0; 16];
    link_local[..2].copy_from_slice(&[0xfe, 0x80]);
    link_local[15] = 2;
    for source in [
        BBOX2_IPV6,
        [0xfd, 0, 0, 2, 0, 0, 0, 0x42, 0, 0, 0, 0, 0, 0, 0, 2],
        link_local,
    ] {
        assert_host2_drops(
            &with_address(V6_INNER_IP + IPV6_SRC, source),
            Counter::RxIpv6SpoofedInner,
        )?;
    }
    Ok(())
}

/// Issue 28: `vteps6` named one IPv6 subnet per PublicIPv6, the greatest, and the inner source
/// had to lie in it: a second lease of host1 with a greater IPv6 subnet made both hooks drop
/// host1's VXLAN from its first (`rx_ipv6_spoofed_inner`).
#[test]
fn an_inner_ipv6_source_in_any_lease_of_the_sender_goes_on() -> Result<()> {
    let mut second = HOST1.lease();
    second.subnet = "10.2.99.0/24".parse()?;
    second.ipv6_subnet = Some("fd00:2:0:99::/64".parse()?);
    for hook in UplinkHook::ALL {
        let mut dataplane = dataplane_of(&HOST2, &[])?;
        write_leases(&mut dataplane, &[HOST1.lease(), second.clone()])?;
        let outcome = run_uplink(hook, &dataplane, &FLANNEL_V6_PING)?;
        assert_eq!(outcome.verdict, hook.pass(), "{hook:?}");
        outcome.assert_only(Counter::RxChecked);
    }
    Ok(())
}

#[test]
fn ipv4_inside_vxlan_over_ipv6_is_dropped() -> Result<()> {
    let mut frame = FLANNEL_V6_PING.to_vec();
    frame[V6_INNER_IP - 2..V6_INNER_IP].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    assert_host2_drops(&frame, Counter::RxInnerOtherFamily)
}

/// A first fragment carries every header the checks read: checked and marked, as IPv4's; the
/// stack reassembles it, and the datagram keeps the first fragment's mark.
#[test]
fn a_first_ipv6_fragment_is_checked_and_later_ones_left_to_the_stack() -> Result<()> {
    let first = with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_FRAGMENT, ipv6_fragment(0));
    assert_passed(&first, Counter::RxChecked, true)?;
    let mut stranger = first.clone();
    stranger[V6_OUTER_IP + IPV6_SRC + 15] = 0x66;
    assert_host2_drops(&stranger, Counter::RxIpv6NonMember)?;
    let later = with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_FRAGMENT, ipv6_fragment(185));
    assert_passed(&later, Counter::RxIpv6Fragment, false)
}

/// flannel-v6.1 never sends extension headers but a fragment header: UDP behind any other is
/// not looked for, and goes on unmarked, so flannel-v6.1's guard drops what the socket finds
/// behind it.
#[test]
fn vxlan_behind_another_ipv6_extension_header_goes_on_unmarked() -> Result<()> {
    let padding = [0, 1, 4, 0, 0, 0, 0];
    let frame = with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_DSTOPTS, padding);
    assert_passed(&frame, Counter::RxNotUdp, false)
}

#[test]
fn ipv6_that_is_not_our_vxlan_passes_untouched() -> Result<()> {
    let mut other_port = FLANNEL_V6_PING.to_vec();
    other_port[V6_OUTER_IP + IPV6_HEADER_LEN + 2..][..2].copy_from_slice(&4789u16.to_be_bytes());
    assert_passed(&other_port, Counter::RxOtherPort, false)?;
    let mut other_vni = FLANNEL_V6_PING.to_vec();
    other_vni[V6_OUTER_IP + IPV6_HEADER_LEN + UDP_HEADER_LEN + 6] = 7;
    assert_passed(&other_vni, Counter::RxVxlanForeignVni, false)?;
    // To another of the host's addresses: flannel-v6.1's guard drops it if the socket takes it.
    let other_destination = with_address(V6_OUTER_IP + 24, HOST1_IPV6);
    assert_passed(&other_destination, Counter::RxOtherDestination, false)?;
    let ping = ipv6(
        HOST1_IPV6,
        HOST2_IPV6,
        IPPROTO_ICMPV6,
        &[128, 0, 0, 0, 0, 1, 0, 1],
    );
    let frame = ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV6, &ping);
    assert_passed(&frame, Counter::RxNotUdp, false)
}

/// Cut at every header boundary and inside each header, or with a payload length beyond the
/// frame: dropped as malformed, never passed on marked. (The kernel refuses tc test frames
/// shorter than an IPv6 header.)
#[test]
fn malformed_vxlan_over_ipv6_is_dropped() -> Result<()> {
    let udp = V6_OUTER_IP + IPV6_HEADER_LEN;
    let vxlan = udp + UDP_HEADER_LEN;
    let inner = vxlan + VXLAN_HEADER_LEN;
    for cut in [
        udp,
        udp + 4,
        vxlan,
        vxlan + 4,
        inner,
        inner + ETH_HEADER_LEN,
        V6_INNER_IP + IPV6_HEADER_LEN - 1,
    ] {
        assert_host2_drops(&FLANNEL_V6_PING[..cut], Counter::RxMalformed)?;
    }
    let fragment = with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_FRAGMENT, ipv6_fragment(0));
    assert_host2_drops(&fragment[..udp + 4], Counter::RxMalformed)?;
    type Corruption = fn(&mut Vec<u8>);
    let cases: [(&str, Corruption); 3] = [
        ("IP version 4 in an IPv6 ethertype", |frame| {
            frame[V6_OUTER_IP] = 0x40
        }),
        ("payload length beyond the frame", |frame| {
            frame[V6_OUTER_IP + 4] = 0xff
        }),
        ("UDP length beyond the payload", |frame| {
            frame[V6_OUTER_IP + IPV6_HEADER_LEN + 4] = 0xff
        }),
    ];
    for (what, corrupt) in cases {
        let mut frame = FLANNEL_V6_PING.to_vec();
        corrupt(&mut frame);
        for hook in UplinkHook::ALL {
            let outcome = host2_receives(hook, &frame)?;
            assert_eq!(outcome.verdict, hook.drop(), "{hook:?}: {what}");
            outcome.assert_only(Counter::RxMalformed);
        }
    }
    Ok(())
}

/// `packet` (IPv6) as bbox1 puts it on its veth, to docker0.
fn from_bbox1(packet: &[u8]) -> Vec<u8> {
    ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ETH_P_IPV6, packet)
}

fn echo_request_from(source: [u8; 16]) -> Vec<u8> {
    from_bbox1(&ipv6(
        source,
        BBOX2_IPV6,
        IPPROTO_ICMPV6,
        &[128, 0, 0, 0, 0, 1, 0, 1],
    ))
}

fn from_container(frame: &[u8]) -> Result<Outcome> {
    run_container(&dataplane_of(&HOST1, &[&HOST2])?, frame)
}

fn assert_refused(frame: &[u8], expected: Counter) -> Result<()> {
    let outcome = from_container(frame)?;
    assert_eq!(outcome.verdict, TC_ACT_SHOT, "{}", expected.name());
    outcome.assert_only(expected);
    Ok(())
}

/// The checks let `frame` through: on to the bridge, or (for bbox2) onto the fast path.
fn assert_allowed(frame: &[u8]) -> Result<()> {
    let outcome = from_container(frame)?;
    assert_ne!(outcome.verdict, TC_ACT_SHOT);
    for &counter in Counter::ALL {
        if counter.is_drop() {
            assert_eq!(outcome.counters.get(counter), 0, "{}", counter.name());
        }
    }
    Ok(())
}

#[test]
fn a_container_sends_ipv6_only_from_its_host_s_ipv6_lease() -> Result<()> {
    let mut link_local = [0; 16];
    link_local[..2].copy_from_slice(&[0xfe, 0x80]);
    link_local[8..].copy_from_slice(&[0, 0x42, 0x0a, 0xff, 0xfe, 0x02, 0x29, 0x02]);
    // Its own address, a neighbour's (bound first come, and no other port sent from it),
    // link-local, and none (DAD).
    let mut neighbour = BBOX1_IPV6;
    neighbour[15] = 3;
    for source in [BBOX1_IPV6, neighbour, link_local, [0; 16]] {
        assert_allowed(&echo_request_from(source))?;
    }
    // Another host's subnet, the bridge's address, the lease's network address, an address
    // outside the overlay, the bridge's link-local address.
    let mut bridge = BBOX1_IPV6;
    bridge[15] = 1;
    let mut network = BBOX1_IPV6;
    network[15] = 0;
    let outside = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    for source in [BBOX2_IPV6, bridge, network, outside, BRIDGE_LINK_LOCAL] {
        assert_refused(&echo_request_from(source), Counter::TxIpv6SpoofedSource)?;
    }
    Ok(())
}

/// In a network without IPv6 the agent gives the programs no IPv6 lease and no IPv6 tunnel
/// address: IPv6 is not the overlay's, and goes on unchecked.
#[test]
fn without_ipv6_in_the_network_ipv6_is_not_ours_to_check() -> Result<()> {
    let mut config = HOST1.config(1, 8472);
    config.flags &= !CONFIG_IPV6;
    config.public_ipv6 = [0; 16];
    let dataplane = dataplane_with(config, &[&HOST2])?;
    let outside = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let outcome = run_container(&dataplane, &echo_request_from(outside))?;
    assert_eq!(outcome.verdict, TC_ACT_OK);
    outcome.assert_uncounted();
    for hook in UplinkHook::ALL {
        let outcome = run_uplink(
            hook,
            &dataplane,
            &with_address(V6_OUTER_IP + 24, HOST1_IPV6),
        )?;
        assert_eq!(outcome.verdict, hook.pass(), "{hook:?}");
        assert_eq!(outcome.mark, 0, "{hook:?}");
    }
    Ok(())
}

#[test]
fn a_container_cannot_send_vxlan_over_ipv6() -> Result<()> {
    let datagram = udp(
        40000,
        8472,
        &FLANNEL_V6_PING[V6_OUTER_IP + IPV6_HEADER_LEN + 8..],
    );
    let packet = from_bbox1(&ipv6(BBOX1_IPV6, HOST2_IPV6, IPPROTO_UDP, &datagram));
    assert_refused(&packet, Counter::TxVxlanFromContainer)?;
    // The first fragment carries the port too.
    let first = with_ipv6_extension(&packet, IPPROTO_FRAGMENT, ipv6_fragment(0));
    assert_refused(&first, Counter::TxVxlanFromContainer)
}

/// host1's docker0's link-local address, from its MAC by EUI-64 as the kernel makes it.
const BRIDGE_LINK_LOCAL: [u8; 16] = [
    0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x00, 0x42, 0, 0xff, 0xfe, 0, 0x41, 0x01,
];

/// bbox1's neighbour discovery message of `kind` about `target`, from `source` to all nodes,
/// its link-layer address option naming `mac`, behind `chain`.
fn ndp_from_bbox1(
    kind: u8,
    source: [u8; 16],
    target: [u8; 16],
    mac: [u8; 6],
    chain: &[(u8, [u8; 7])],
) -> Vec<u8> {
    let message = ndp_message(kind, OVERRIDE, target, mac);
    let packet = Ipv6Chain {
        src: source,
        dst: ALL_NODES,
        hop_limit: NDP_HOP_LIMIT,
        chain,
    }
    .carrying(IPPROTO_ICMPV6, message, 2);
    ethernet(ALL_NODES_MAC, BBOX1_MAC, ETH_P_IPV6, &packet)
}

/// Sends `frames` in turn from one container port of a fresh dataplane: each is refused as
/// its counter says, or, without one, let through.
fn sent_in_turn(frames: &[(&[u8], Option<Counter>)]) -> Result<()> {
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    for (index, (frame, refusal)) in frames.iter().enumerate() {
        let before = dataplane.counters()?;
        let outcome = run_container(&dataplane, frame)?;
        assert_judged(&outcome, &before, *refusal, &format!("frame {index}"));
    }
    Ok(())
}

/// Asserts `outcome` dropped its frame, counted as `refusal` alone since `before`, or, with
/// no `refusal`, let it through; `what` names the frame.
fn assert_judged(outcome: &Outcome, before: &Counters, refusal: Option<Counter>, what: &str) {
    match refusal {
        Some(counter) => {
            assert_eq!(outcome.verdict, TC_ACT_SHOT, "{what}");
            outcome.assert_only_since(before, counter);
        }
        None => assert_ne!(outcome.verdict, TC_ACT_SHOT, "{what}"),
    }
}

#[test]
fn a_container_s_neighbour_discovery_names_its_own_mac_and_addresses() -> Result<()> {
    let own = BBOX1_IPV6;
    let mut bridge = BBOX1_IPV6;
    bridge[15] = 1;
    let behind_options = [(IPPROTO_DSTOPTS, PADDING_OPTIONS)];
    let cases: [(&str, Vec<u8>, Option<Counter>); 10] = [
        (
            "solicitation",
            ndp_from_bbox1(NEIGHBOUR_SOLICITATION, own, BBOX2_IPV6, BBOX1_MAC, &[]),
            None,
        ),
        (
            "solicitation naming another MAC",
            ndp_from_bbox1(NEIGHBOUR_SOLICITATION, own, BBOX2_IPV6, BBOX2_MAC, &[]),
            Some(Counter::TxSpoofedMac),
        ),
        (
            "router solicitation naming another MAC",
            ndp_from_bbox1(ROUTER_SOLICITATION, own, own, BBOX2_MAC, &[]),
            Some(Counter::TxSpoofedMac),
        ),
        (
            "advertisement of its own address",
            ndp_from_bbox1(NEIGHBOUR_ADVERTISEMENT, own, own, BBOX1_MAC, &[]),
            None,
        ),
        (
            "advertisement naming another MAC",
            ndp_from_bbox1(NEIGHBOUR_ADVERTISEMENT, own, own, BBOX2_MAC, &[]),
            Some(Counter::TxSpoofedMac),
        ),
        (
            "advertisement naming another MAC behind destination options",
            ndp_from_bbox1(
                NEIGHBOUR_ADVERTISEMENT,
                own,
                own,
                BBOX2_MAC,
                &behind_options,
            ),
            Some(Counter::TxSpoofedMac),
        ),
        (
            "advertisement of the bridge's address",
            ndp_from_bbox1(NEIGHBOUR_ADVERTISEMENT, own, bridge, BBOX1_MAC, &[]),
            Some(Counter::TxIpv6SpoofedSource),
        ),
        (
            "advertisement of the bridge's link-local address",
            ndp_from_bbox1(
                NEIGHBOUR_ADVERTISEMENT,
                own,
                BRIDGE_LINK_LOCAL,
                BBOX1_MAC,
                &[],
            ),
            Some(Counter::TxIpv6SpoofedSource),
        ),
        (
            "router advertisement",
            ndp_from_bbox1(ROUTER_ADVERTISEMENT, own, own, BBOX1_MAC, &[]),
            Some(Counter::TxRouterMessage),
        ),
        (
            "redirect",
            ndp_from_bbox1(REDIRECT, own, BBOX2_IPV6, BBOX1_MAC, &[]),
            Some(Counter::TxRouterMessage),
        ),
    ];
    for (what, frame, refusal) in cases {
        let outcome = from_container(&frame)?;
        assert_judged(&outcome, &Counters::default(), refusal, what);
    }
    // Duplicate address detection: from no address, binding none.
    let probe = ndp_from_bbox1(NEIGHBOUR_SOLICITATION, [0; 16], own, BBOX1_MAC, &[]);
    let without_option = probe[..probe.len() - 8].to_vec();
    assert_allowed(&fix_payload_length(without_option))?;
    // In a fragment the kernel may take it where `suppress_frag_ndisc` is off.
    let fragment = [(IPPROTO_FRAGMENT, ipv6_fragment(0))];
    let fragmented = ndp_from_bbox1(NEIGHBOUR_ADVERTISEMENT, own, own, BBOX1_MAC, &fragment);
    assert_refused(&fragmented, Counter::TxIpv6Unchecked)
}

/// `frame` (Ethernet, IPv6) with its payload length made to match what follows the header.
fn fix_payload_length(mut frame: Vec<u8>) -> Vec<u8> {
    let length = (frame.len() - ETH_HEADER_LEN - IPV6_HEADER_LEN) as u16;
    frame[ETH_HEADER_LEN + 4..ETH_HEADER_LEN + 6].copy_from_slice(&length.to_be_bytes());
    frame
}

/// bbox1's UDP datagram to host2's `port` behind `chain`.
fn udp_behind(chain: &[(u8, [u8; 7])], port: u16) -> Vec<u8> {
    let packet = Ipv6Chain {
        src: BBOX1_IPV6,
        dst: HOST2_IPV6,
        hop_limit: 64,
        chain,
    }
    .carrying(IPPROTO_UDP, udp(40000, port, b"overlay!"), 6);
    from_bbox1(&packet)
}

#[test]
fn udp_to_the_vxlan_port_is_found_behind_every_extension_header() -> Result<()> {
    for kind in [
        IPPROTO_HOPOPTS,
        IPPROTO_ROUTING,
        IPPROTO_AH,
        IPPROTO_DSTOPTS,
        IPPROTO_FRAGMENT,
    ] {
        let chain = [(kind, well_formed_extension(kind))];
        assert_refused(&udp_behind(&chain, 8472), Counter::TxVxlanFromContainer)?;
        assert_allowed(&udp_behind(&chain, 8473))?;
    }
    // Eight headers are walked; a ninth is more than any host sends.
    let options = (IPPROTO_DSTOPTS, PADDING_OPTIONS);
    assert_refused(
        &udp_behind(&[options; 8], 8472),
        Counter::TxVxlanFromContainer,
    )?;
    assert_refused(&udp_behind(&[options; 9], 8473), Counter::TxIpv6Unchecked)?;
    // A header longer than the packet hides what follows it.
    let overlong = (IPPROTO_DSTOPTS, [200, 1, 4, 0, 0, 0, 0]);
    assert_refused(&udp_behind(&[overlong], 8473), Counter::TxIpv6Unchecked)
}

#[test]
fn a_later_fragment_passes_only_behind_a_first_that_passed() -> Result<()> {
    let ping = echo_request_from(BBOX1_IPV6);
    let first = with_ipv6_extension(&ping, IPPROTO_FRAGMENT, ipv6_fragment(0));
    let later = with_ipv6_extension(&ping, IPPROTO_FRAGMENT, ipv6_fragment(2));
    let mut other_datagram = later.clone();
    other_datagram[ETH_HEADER_LEN + IPV6_HEADER_LEN + 7] ^= 1;
    sent_in_turn(&[(&later, Some(Counter::TxIpv6Unchecked))])?;
    sent_in_turn(&[
        (&first, None),
        (&later, None),
        (&other_datagram, Some(Counter::TxIpv6Unchecked)),
    ])?;
    // A first fragment the checks refused lets none of the rest through.
    let to_vxlan = udp_behind(&[(IPPROTO_FRAGMENT, ipv6_fragment(0))], 8472);
    let mut rest = to_vxlan.clone();
    rest[ETH_HEADER_LEN + IPV6_HEADER_LEN + 2..][..2].copy_from_slice(&[0, 1 << 3 | 1]);
    sent_in_turn(&[
        (&to_vxlan, Some(Counter::TxVxlanFromContainer)),
        (&rest, Some(Counter::TxIpv6Unchecked)),
    ])
}
