//! Flows the stack carries stay with the stack, on hand-built frames through
//! BPF_PROG_TEST_RUN: once flannel.1 or the container bridge has seen the stack send one
//! direction of a flow, the fast path leaves the other direction to the stack too, so that
//! conntrack can undo a translation (a service address DNATed to a container elsewhere). Other
//! flows keep the fast path. Packets conntrack must see whatever their flow (ICMP errors,
//! fragments) never take it.
use anyhow::Result;
use overlay_agent::dataplane::Dataplane;
use overlay_common::Counter;
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, UplinkHook, dataplane_of,
        host2_with_bbox2, run_bridge, run_container, run_uplink, run_vtep,
    },
    frames::*,
};

const SERVICE_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40000;

fn tcp(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_TCP, &[], &tcp_segment(src_port, dst_port))
}

/// `packet` from bbox1 on host1 arriving at host2 in VXLAN.
fn from_host1(packet: &[u8]) -> Vec<u8> {
    let inner = ethernet(HOST2_VTEP_MAC, HOST1_VTEP_MAC, ETH_P_IPV4, packet);
    outer_udp_frame(&[], 49152, 8472, &vxlan(1, &inner))
}

/// `packet` as bbox2 puts it on its veth, to its gateway.
fn from_bbox2(packet: &[u8]) -> Vec<u8> {
    ethernet(HOST2_BRIDGE_MAC, BBOX2_MAC, ETH_P_IPV4, packet)
}

/// host2's container veth on `frame`, asserting it moved only `expected`.
fn container_sends(host2: &Dataplane, frame: &[u8], expected: Counter) -> Result<Outcome> {
    let before = host2.counters()?;
    let outcome = run_container(host2, frame)?;
    outcome.assert_only_since(&before, expected);
    Ok(outcome)
}

/// Asserts host2's container veth leaves `frame` untouched to the stack, counted as `reason`.
fn assert_left_to_the_stack(host2: &Dataplane, frame: &[u8], reason: Counter) -> Result<()> {
    let outcome = container_sends(host2, frame, reason)?;
    assert_eq!(outcome.verdict, TC_ACT_OK, "{}", reason.name());
    assert_eq!(outcome.frame, frame, "untouched");
    Ok(())
}

#[test]
fn the_reply_to_what_flannel_1_sent_goes_to_flannel_1() -> Result<()> {
    let host2 = host2_with_bbox2()?;
    // The stack sends bbox2's packet to bbox1 through flannel.1 (say, after a DNAT).
    let sent = ethernet(
        HOST1_VTEP_MAC,
        HOST2_VTEP_MAC,
        ETH_P_IPV4,
        &tcp(BBOX2_IP, BBOX1_IP, CLIENT_PORT, SERVICE_PORT),
    );
    assert_eq!(run_vtep(&host2, &sent)?.verdict, TC_ACT_REDIRECT);

    let reply = from_host1(&tcp(BBOX1_IP, BBOX2_IP, SERVICE_PORT, CLIENT_PORT));
    let outcome = run_uplink(UplinkHook::Tc, &host2, &reply)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    assert_eq!(
        outcome.frame,
        UplinkHook::Tc.handed_to_vtep(&reply, 50, HOST2_VTEP_MAC),
        "decapsulated into flannel.1, not into bbox2"
    );
    assert_eq!(outcome.counters.get(Counter::RxRoutedFlow), 1);
    assert_eq!(outcome.counters.get(Counter::RxDelivered), 0);

    // Another flow to the same container keeps the fast path.
    let other = from_host1(&tcp(BBOX1_IP, BBOX2_IP, SERVICE_PORT, CLIENT_PORT + 1));
    let before = host2.counters()?;
    run_uplink(UplinkHook::Tc, &host2, &other)?.assert_only_since(&before, Counter::RxDelivered);
    Ok(())
}

#[test]
fn the_reply_to_what_the_stack_put_into_the_bridge_takes_the_routed_path() -> Result<()> {
    let host2 = host2_with_bbox2()?;
    // The stack forwards bbox1's packet into docker0 for bbox2 (say, a port DNATed to it).
    let forwarded = ethernet(
        BBOX2_MAC,
        HOST2_BRIDGE_MAC,
        ETH_P_IPV4,
        &tcp(BBOX1_IP, BBOX2_IP, CLIENT_PORT, SERVICE_PORT),
    );
    let outcome = run_bridge(&host2, &forwarded)?;
    assert_eq!(outcome.verdict, TC_ACT_OK);
    assert_eq!(outcome.frame, forwarded, "the bridge's egress only looks");
    outcome.assert_uncounted();

    let reply = from_bbox2(&tcp(BBOX2_IP, BBOX1_IP, SERVICE_PORT, CLIENT_PORT));
    assert_left_to_the_stack(&host2, &reply, Counter::TxRoutedFlow)?;

    let other = from_bbox2(&tcp(BBOX2_IP, BBOX1_IP, SERVICE_PORT, CLIENT_PORT + 1));
    container_sends(&host2, &other, Counter::TxDirect)?;
    Ok(())
}

/// A packet for a container host2 has not learned yet goes to the stack, which puts it into
/// the bridge unchanged: its flow keeps the fast path once the container is known. One the
/// stack translated on the way (to a service address in host2's subnet, DNATed to bbox2) does
/// not.
#[test]
fn only_flows_the_stack_translated_leave_the_fast_path() -> Result<()> {
    let host2 = dataplane_of(&HOST2, &[&HOST1])?;
    let request = tcp(BBOX1_IP, BBOX2_IP, CLIENT_PORT, SERVICE_PORT);
    let before = host2.counters()?;
    run_uplink(UplinkHook::Tc, &host2, &from_host1(&request))?
        .assert_only_since(&before, Counter::RxDecapsulated);
    run_bridge(
        &host2,
        &ethernet(BBOX2_MAC, HOST2_BRIDGE_MAC, ETH_P_IPV4, &request),
    )?;
    let reply = from_bbox2(&tcp(BBOX2_IP, BBOX1_IP, SERVICE_PORT, CLIENT_PORT));
    container_sends(&host2, &reply, Counter::TxDirect)?;

    let service = [10, 2, 54, 100];
    let to_service = tcp(BBOX1_IP, service, CLIENT_PORT + 1, SERVICE_PORT);
    run_uplink(UplinkHook::Tc, &host2, &from_host1(&to_service))?;
    let translated = tcp(BBOX1_IP, BBOX2_IP, CLIENT_PORT + 1, SERVICE_PORT);
    run_bridge(
        &host2,
        &ethernet(BBOX2_MAC, HOST2_BRIDGE_MAC, ETH_P_IPV4, &translated),
    )?;
    let reply = from_bbox2(&tcp(BBOX2_IP, BBOX1_IP, SERVICE_PORT, CLIENT_PORT + 1));
    assert_left_to_the_stack(&host2, &reply, Counter::TxRoutedFlow)
}

#[test]
fn icmp_echo_flows_are_keyed_by_their_identifier() -> Result<()> {
    let host2 = host2_with_bbox2()?;
    let request = |id| {
        ipv4(
            BBOX1_IP,
            BBOX2_IP,
            IPPROTO_ICMP,
            &[],
            &icmp_echo_request(id, 1, b"overlay!"),
        )
    };
    let reply = |id: u16| {
        let mut packet = ipv4(
            BBOX2_IP,
            BBOX1_IP,
            IPPROTO_ICMP,
            &[],
            &icmp_echo_request(id, 1, b"overlay!"),
        );
        packet[IPV4_HEADER_LEN] = 0;
        from_bbox2(&packet)
    };
    let forwarded = ethernet(BBOX2_MAC, HOST2_BRIDGE_MAC, ETH_P_IPV4, &request(7));
    run_bridge(&host2, &forwarded)?;
    assert_left_to_the_stack(&host2, &reply(7), Counter::TxRoutedFlow)?;
    container_sends(&host2, &reply(8), Counter::TxDirect)?;
    Ok(())
}

/// ICMP errors carry another flow's headers, which conntrack translates; a fragment after the
/// first has no ports: conntrack must see both, whatever the flow.
#[test]
fn icmp_errors_and_fragments_always_take_the_routed_path() -> Result<()> {
    let host2 = host2_with_bbox2()?;
    let quoted = tcp(BBOX1_IP, BBOX2_IP, CLIENT_PORT, SERVICE_PORT);
    let unreachable = [&[3, 3, 0, 0, 0, 0, 0, 0][..], &quoted[..28]].concat();
    let error = from_bbox2(&ipv4(BBOX2_IP, BBOX1_IP, IPPROTO_ICMP, &[], &unreachable));
    assert_left_to_the_stack(&host2, &error, Counter::TxRoutedFlow)?;

    let mut fragment = tcp(BBOX2_IP, BBOX1_IP, SERVICE_PORT, CLIENT_PORT);
    // More fragments, offset 0; the header checksum is not the programs' concern.
    fragment[6] = 0x20;
    let fragment = from_bbox2(&fragment);
    assert_left_to_the_stack(&host2, &fragment, Counter::TxRoutedFlow)?;

    let inbound_error = from_host1(&ipv4(BBOX1_IP, BBOX2_IP, IPPROTO_ICMP, &[], &unreachable));
    let before = host2.counters()?;
    let outcome = run_uplink(UplinkHook::Tc, &host2, &inbound_error)?;
    assert_eq!(outcome.verdict, TC_ACT_REDIRECT);
    outcome.assert_only_since(&before, Counter::RxRoutedFlow);
    Ok(())
}
