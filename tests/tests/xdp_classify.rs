//! The uplink XDP program on hand-built frames through BPF_PROG_TEST_RUN: each frame must pass
//! and move exactly the counter that names its class.
use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions};
use overlay_agent::dataplane::Dataplane;
use overlay_common::{Counter, Counters, DEFAULT_VXLAN_PORT, OverlayConfig};
use overlay_tests::{frames::*, require_root};

const XDP_PASS: u32 = 2;
const SEED_CONFIG: OverlayConfig = OverlayConfig {
    vni: 1,
    vxlan_port: DEFAULT_VXLAN_PORT,
    reserved: 0,
};

/// Runs `frame` through a freshly loaded uplink program; returns the verdict and the counters.
fn classify(config: &OverlayConfig, frame: &[u8]) -> Result<(u32, Counters)> {
    require_root()?;
    let dataplane = Dataplane::load(config)?;
    let mut data_out = vec![0; frame.len() + 256];
    let result = dataplane.uplink_program()?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut data_out),
        ..TestRunOptions::new()
    })?;
    assert_eq!(
        &data_out[..result.data_size_out as usize],
        frame,
        "the program must pass the frame unchanged"
    );
    Ok((result.return_value, dataplane.counters()?))
}

/// Asserts the frame passed and that `expected` is the only counter that moved, by one.
fn assert_classified(config: &OverlayConfig, frame: &[u8], expected: Counter) -> Result<()> {
    let (verdict, counters) = classify(config, frame)?;
    assert_eq!(verdict, XDP_PASS, "every frame passes for now");
    for &counter in Counter::ALL {
        let want = u64::from(counter == expected);
        assert_eq!(
            counters.get(counter),
            want,
            "counter {} after a frame of class {}",
            counter.name(),
            expected.name()
        );
    }
    Ok(())
}

#[test]
fn vxlan_with_our_vni_is_counted_as_vxlan() -> Result<()> {
    assert_classified(&SEED_CONFIG, &seed_vxlan_frame(1, 8472), Counter::RxVxlan)
}

#[test]
fn vxlan_with_another_vni_is_counted_as_foreign() -> Result<()> {
    assert_classified(
        &SEED_CONFIG,
        &seed_vxlan_frame(7, 8472),
        Counter::RxVxlanForeignVni,
    )
}

#[test]
fn port_and_vni_come_from_the_config_map() -> Result<()> {
    let iana = OverlayConfig {
        vni: 7,
        vxlan_port: 4789,
        reserved: 0,
    };
    assert_classified(&iana, &seed_vxlan_frame(7, 4789), Counter::RxVxlan)?;
    assert_classified(
        &iana,
        &seed_vxlan_frame(1, 4789),
        Counter::RxVxlanForeignVni,
    )?;
    assert_classified(&iana, &seed_vxlan_frame(7, 8472), Counter::RxOtherPort)
}

#[test]
fn plain_udp_to_another_port_is_counted_as_other_port() -> Result<()> {
    assert_classified(
        &SEED_CONFIG,
        &outer_udp_frame(&[], 40000, 53, b"a dns query"),
        Counter::RxOtherPort,
    )
}

#[test]
fn tcp_is_counted_as_not_udp() -> Result<()> {
    let segment = [&[0xc3, 0x50, 0x00, 0x50][..], &[0; 16]].concat();
    let packet = ipv4(HOST1_IP, HOST2_IP, IPPROTO_TCP, &[], &segment);
    assert_classified(
        &SEED_CONFIG,
        &ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV4, &packet),
        Counter::RxNotUdp,
    )
}

#[test]
fn arp_is_counted_as_not_ipv4() -> Result<()> {
    let request = [
        &[0, 1, 8, 0, 6, 4, 0, 1][..],
        &HOST1_MAC,
        &HOST1_IP,
        &[0; 6],
        &HOST2_IP,
    ]
    .concat();
    assert_classified(
        &SEED_CONFIG,
        &ethernet([0xff; 6], HOST1_MAC, ETH_P_ARP, &request),
        Counter::RxNotIpv4,
    )
}

#[test]
fn ipv4_options_are_skipped_to_find_vxlan() -> Result<()> {
    let inner = ethernet(HOST2_VTEP_MAC, HOST1_VTEP_MAC, ETH_P_IPV4, &[0x45; 20]);
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
    assert_classified(&SEED_CONFIG, &frame, Counter::RxVxlan)
}

#[test]
fn ipv4_fragments_are_left_to_the_stack() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    // More-fragments set, offset 0: the first fragment of a larger datagram.
    frame[ETH_HEADER_LEN + 6] = 0x20;
    assert_classified(&SEED_CONFIG, &frame, Counter::RxIpv4Fragment)
}

#[test]
fn vxlan_without_the_vni_flag_is_malformed() -> Result<()> {
    let mut frame = seed_vxlan_frame(1, 8472);
    frame[ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN] = 0;
    assert_classified(&SEED_CONFIG, &frame, Counter::RxMalformed)
}

#[test]
fn inconsistent_lengths_are_malformed() -> Result<()> {
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
    for (what, corrupt) in cases {
        let mut frame = seed_vxlan_frame(1, 8472);
        corrupt(&mut frame);
        let (_, counters) = classify(&SEED_CONFIG, &frame)?;
        assert_eq!(
            counters.get(Counter::RxMalformed),
            1,
            "{what} must count as malformed"
        );
    }
    Ok(())
}

/// Cuts the seed frame at every header boundary (and inside each header): every prefix that
/// ends before the inner Ethernet header is complete is malformed. The kernel refuses test
/// frames shorter than an Ethernet header, so cuts start there.
#[test]
fn frames_cut_short_are_malformed() -> Result<()> {
    let frame = seed_vxlan_frame(1, 8472);
    let boundaries = [
        ETH_HEADER_LEN,
        ETH_HEADER_LEN + IPV4_HEADER_LEN - 1,
        ETH_HEADER_LEN + IPV4_HEADER_LEN,
        ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN - 1,
        ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN,
        ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN - 1,
        ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN,
        ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN + ETH_HEADER_LEN - 1,
    ];
    for cut in boundaries {
        assert_classified(&SEED_CONFIG, &frame[..cut], Counter::RxMalformed)?;
    }
    Ok(())
}

/// The same cuts, but with the IP and UDP lengths rewritten to match the shorter frame, so
/// only the header checks can catch them.
#[test]
fn consistent_but_short_datagrams_are_malformed() -> Result<()> {
    let inner_start = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN;
    for payload_len in [
        0,
        VXLAN_HEADER_LEN - 1,
        VXLAN_HEADER_LEN,
        VXLAN_HEADER_LEN + ETH_HEADER_LEN - 1,
    ] {
        let full = seed_vxlan_frame(1, 8472);
        let payload = &full[inner_start - VXLAN_HEADER_LEN..][..payload_len];
        assert_classified(
            &SEED_CONFIG,
            &outer_udp_frame(&[], 49152, 8472, payload),
            Counter::RxMalformed,
        )?;
    }
    Ok(())
}
