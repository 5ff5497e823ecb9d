//! The uplink's tc program on VXLAN over IPv6 through BPF_PROG_TEST_RUN, with host2 knowing
//! bbox2: flannel-v6.1's frame (a kernel capture) is decapsulated, routed (hop limit − 1) and
//! put straight into bbox2, byte for byte what docker0 would hand it; whatever the fast path
//! must leave to the kernel goes on, marked and still encapsulated, to flannel-v6.1's socket.
use anyhow::Result;
use overlay_common::{CHECKED_MARK, CONFIG_FAST_PATH, Counter, LocalEndpoint};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, UplinkHook, assert_host2_drops,
        assert_host2_passes, dataplane_of, dataplane_with, host2_with_bbox2, run_uplink, run_vtep,
    },
    frames::*,
};

const OUTER_UDP: usize = V6_OUTER_IP + IPV6_HEADER_LEN;
const HOP_LIMIT: usize = 7;

fn host2_receives(frame: &[u8]) -> Result<Outcome> {
    run_uplink(UplinkHook::Tc, &host2_with_bbox2()?, frame)
}

fn assert_handed_to_the_socket(frame: &[u8], what: &str) -> Result<()> {
    let outcome = host2_receives(frame)?;
    assert_eq!(outcome.verdict, TC_ACT_OK, "{what}");
    assert_eq!(outcome.frame, frame, "{what}: still encapsulated");
    assert_eq!(
        outcome.mark, CHECKED_MARK,
        "{what}: marked for flannel-v6.1"
    );
    outcome.assert_only(Counter::RxChecked);
    Ok(())
}

#[test]
fn flannel_v6s_frame_goes_straight_into_bbox2_as_docker0_would_hand_it() -> Result<()> {
    let outcome = host2_receives(&FLANNEL_V6_PING)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT, "into bbox2's veth");
    outcome.assert_only(Counter::RxDelivered);
    let mut routed = FLANNEL_V6_PING[V6_INNER_IP..].to_vec();
    routed[HOP_LIMIT] -= 1;
    assert_eq!(
        outcome.frame,
        ethernet(BBOX2_MAC, HOST2_BRIDGE_MAC, ETH_P_IPV6, &routed),
        "from docker0's MAC to bbox2's, hop limit 63"
    );
    Ok(())
}

/// FLANNEL_V6_PING with its outer UDP checksum fixed up after `change`.
fn changed(change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = FLANNEL_V6_PING.to_vec();
    change(&mut frame);
    frame[OUTER_UDP + 6..OUTER_UDP + 8].fill(0);
    let checksum =
        ipv6_upper_layer_checksum(HOST1_IPV6, HOST2_IPV6, IPPROTO_UDP, &frame[OUTER_UDP..]);
    frame[OUTER_UDP + 6..OUTER_UDP + 8].copy_from_slice(&checksum.to_be_bytes());
    frame
}

#[test]
fn what_the_fast_path_leaves_to_the_kernel_goes_to_flannel_v6s_socket() -> Result<()> {
    let mut bad_checksum = FLANNEL_V6_PING.to_vec();
    bad_checksum[OUTER_UDP + 7] ^= 0x10;
    let mut no_checksum = FLANNEL_V6_PING.to_vec();
    no_checksum[OUTER_UDP + 6..OUTER_UDP + 8].fill(0);
    let last_hop = changed(|frame| frame[V6_INNER_IP + HOP_LIMIT] = 1);
    let congested = changed(|frame| frame[V6_OUTER_IP + 1] |= 0x30);
    let cases = [
        ("an outer checksum that does not verify", bad_checksum),
        ("no outer checksum", no_checksum),
        ("hop limit 1", last_hop),
        ("congestion marked outside", congested),
        ("a first fragment", {
            with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_FRAGMENT, ipv6_fragment(0))
        }),
    ];
    for (what, frame) in cases {
        assert_handed_to_the_socket(&frame, what)?;
    }
    let not_learned = run_uplink(
        UplinkHook::Tc,
        &dataplane_of(&HOST2, &[&HOST1])?,
        &FLANNEL_V6_PING,
    )?;
    assert_eq!(not_learned.verdict, TC_ACT_OK, "a container not learned");
    not_learned.assert_only(Counter::RxChecked);
    Ok(())
}

#[test]
fn without_the_fast_path_every_frame_goes_to_flannel_v6s_socket() -> Result<()> {
    let mut config = HOST2.config(1, 8472);
    config.flags &= !CONFIG_FAST_PATH;
    let mut dataplane = dataplane_with(config, &[&HOST1])?;
    let bbox2 = LocalEndpoint {
        ifindex: 42,
        mac: BBOX2_MAC,
        reserved: 0,
    };
    dataplane.sync_endpoints(&Default::default(), &[(BBOX2_IPV6, bbox2)].into())?;
    let outcome = run_uplink(UplinkHook::Tc, &dataplane, &FLANNEL_V6_PING)?;
    assert_eq!(outcome.verdict, TC_ACT_OK);
    outcome.assert_only(Counter::RxChecked);
    Ok(())
}

#[test]
fn the_other_direction_of_a_flow_the_stack_translated_goes_to_the_stack() -> Result<()> {
    let dataplane = host2_with_bbox2()?;
    // The stack sent bbox2's ping to bbox1 out through flannel-v6.1, after translating it
    // (bbox2 had pinged another address): its replies must meet conntrack.
    let mut reply = FLANNEL_V6_PING[V6_INNER_IP..].to_vec();
    reply[8..24].copy_from_slice(&BBOX2_IPV6);
    reply[24..40].copy_from_slice(&BBOX1_IPV6);
    let egress = ethernet(HOST1_VTEP6_MAC, HOST2_VTEP6_MAC, ETH_P_IPV6, &reply);
    let noted = run_vtep(&dataplane, &egress)?;
    assert_eq!(
        noted.verdict, TC_ACT_REDIRECT,
        "encapsulated on the routed path"
    );
    noted.assert_only(Counter::TxEncapsulated);
    let outcome = run_uplink(UplinkHook::Tc, &dataplane, &FLANNEL_V6_PING)?;
    assert_eq!(outcome.verdict, TC_ACT_OK);
    assert_eq!(outcome.mark, CHECKED_MARK);
    assert_eq!(outcome.counters.get(Counter::RxChecked), 1);
    Ok(())
}

#[test]
fn a_reply_from_the_senders_own_public_ipv6_is_let_in() -> Result<()> {
    // What host1's conntrack sends once it has undone a DNAT to its PublicIPv6 (a published
    // port bbox2 connected to).
    let reply = ipv6_ping(HOST1_IPV6, BBOX2_IPV6, b"published");
    let inner = ethernet(HOST2_VTEP6_MAC, HOST1_VTEP6_MAC, ETH_P_IPV6, &reply);
    let datagram = udp(40000, 8472, &vxlan(1, &inner));
    let outer = ipv6_checksummed(HOST1_IPV6, HOST2_IPV6, IPPROTO_UDP, datagram, 6);
    let outcome = host2_receives(&ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV6, &outer))?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    outcome.assert_only(Counter::RxDelivered);
    Ok(())
}

/// bbox2's neighbour fd00:0:2:54::7 on host2: an address host1 does not lease.
const BBOX2_NEIGHBOUR_IPV6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0x54, 0, 0, 0, 0, 0, 0, 0, 7];

/// A first fragment that ends right after the VXLAN header, padded out with a harmless inner
/// header (bbox1's ping) where Ethernet padding goes, the real inner headers (spoofing bbox2's
/// neighbour) in the second fragment: the check reads only the fragment's own bytes.
#[test]
fn a_first_fragment_is_judged_on_its_own_bytes_not_on_padding() -> Result<()> {
    let spoofed = ipv6_ping(BBOX2_NEIGHBOUR_IPV6, BBOX2_IPV6, b"spoof");
    let inner = ethernet(HOST2_VTEP6_MAC, HOST1_VTEP6_MAC, ETH_P_IPV6, &spoofed);
    let datagram = udp(40000, 8472, &vxlan(1, &inner));
    let (headers, rest) = datagram.split_at(UDP_HEADER_LEN + VXLAN_HEADER_LEN);
    let fragment = |offset: u16, part: &[u8]| {
        let header = [&[IPPROTO_UDP][..], &ipv6_fragment(offset)].concat();
        ipv6(
            HOST1_IPV6,
            HOST2_IPV6,
            IPPROTO_FRAGMENT,
            &[&header[..], part].concat(),
        )
    };
    let harmless = &FLANNEL_V6_PING[V6_INNER_IP - ETH_HEADER_LEN..];
    let padded = [&fragment(0, headers)[..], harmless].concat();
    assert_host2_drops(
        &ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV6, &padded),
        Counter::RxMalformed,
    )?;
    let mut last = fragment(2, rest);
    // The last fragment: more-fragments clear.
    last[IPV6_HEADER_LEN + 3] &= !1;
    assert_host2_passes(
        &ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV6, &last),
        Counter::RxIpv6Fragment,
        0,
    )
}

/// VXLAN over IPv6 with the group-based policy extension for another VNI is someone else's:
/// it passes to the stack before the checks of our own.
#[test]
fn vxlan_with_extensions_for_another_vni_passes_to_the_stack() -> Result<()> {
    let frame = changed(|frame| {
        frame[OUTER_UDP + UDP_HEADER_LEN..][..8]
            .copy_from_slice(&[0x88, 0, 0x12, 0x34, 0, 0, 7, 0]);
    });
    assert_host2_passes(&frame, Counter::RxVxlanForeignVni, 0)
}
