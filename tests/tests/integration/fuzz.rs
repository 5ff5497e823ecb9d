//! 100,000 random and mutated frames through each program (BPF_PROG_TEST_RUN): only the
//! expected verdicts come out, every frame moves exactly one counter, and garbage never counts
//! as decapsulated or encapsulated. The generator is seeded, so a failure reproduces.
use anyhow::Result;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, UplinkHook, dataplane_of,
        host2_with_bbox2, run_container, run_uplink, run_vtep,
    },
    frames::*,
    random::Random,
};

const FRAMES_PER_KIND: usize = 50_000;

/// Runs `check` on FRAMES_PER_KIND mutations, spread evenly over `seeds`; returns how many.
fn mutate_each(
    random: &mut Random,
    seeds: &[Vec<u8>],
    min_len: usize,
    mut check: impl FnMut(Vec<u8>) -> Result<()>,
) -> Result<u64> {
    let per_seed = FRAMES_PER_KIND / seeds.len();
    for seed in seeds {
        for _ in 0..per_seed {
            check(random.mutate(seed, min_len))?;
        }
    }
    Ok((per_seed * seeds.len()) as u64)
}

/// 1 if `outcome` is a redirect, 0 if it passed or dropped the frame; nothing else may come
/// out of an encapsulating program.
fn redirections(outcome: &Outcome) -> u64 {
    assert!(
        [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&outcome.verdict),
        "verdict {}",
        outcome.verdict
    );
    u64::from(outcome.verdict == TC_ACT_REDIRECT)
}

fn total(counters: &Counters) -> u64 {
    Counter::ALL
        .iter()
        .map(|&counter| counters.get(counter))
        .sum()
}

/// The seed's VXLAN frame with byte `at` of its outer IPv4 header set to `value` (the
/// checksum is not the programs' concern: the stack checks it).
fn with_outer_ip_byte(at: usize, value: u8) -> Vec<u8> {
    let mut frame = seed_vxlan_frame(1, 8472);
    frame[ETH_HEADER_LEN + at] = value;
    frame
}

#[test]
fn the_uplink_programs_survive_garbage() -> Result<()> {
    for hook in UplinkHook::ALL {
        // bbox2 known by both its addresses: what survives a mutation may be delivered.
        let dataplane = host2_with_bbox2()?;
        let mut random = Random(0x6f76_6572_6c61_7921);
        // The kernel refuses to test-run tc frames claiming IPv4 shorter than its header.
        let min_len = match hook {
            UplinkHook::Tc => ETH_HEADER_LEN + IPV4_HEADER_LEN,
            UplinkHook::Xdp => ETH_HEADER_LEN,
        };
        let assert_verdict = |outcome: &Outcome| {
            assert!(
                [hook.pass(), hook.drop(), hook.to_vtep()].contains(&outcome.verdict),
                "{hook:?}: verdict {}",
                outcome.verdict
            )
        };
        for _ in 0..FRAMES_PER_KIND {
            let len = min_len + random.below(300);
            assert_verdict(&run_uplink(hook, &dataplane, &random.bytes(len))?);
        }
        let counters = dataplane.counters()?;
        assert_eq!(
            counters.get(hook.to_vtep_counter(Counter::RxDecapsulated)),
            0,
            "{hook:?}: random bytes never go to flannel.1"
        );
        assert_eq!(
            total(&counters),
            FRAMES_PER_KIND as u64,
            "{hook:?}: one counter per frame: {counters:?}"
        );

        // Mutations of a whole frame, of a first fragment (checked, left to the stack) and of
        // a frame that met congestion (CE, decapsulated onto the inner packet).
        let seeds = [
            seed_vxlan_frame(1, 8472),
            with_outer_ip_byte(6, 0x20),
            with_outer_ip_byte(1, 0x03),
        ];
        let mutated = mutate_each(&mut random, &seeds, min_len, |frame| {
            assert_verdict(&run_uplink(hook, &dataplane, &frame)?);
            Ok(())
        })?;
        assert_eq!(
            total(&dataplane.counters()?),
            FRAMES_PER_KIND as u64 + mutated
        );

        // VXLAN over IPv6 as flannel-v6.1 sends it, as a first fragment, and behind a
        // destination options header. The kernel refuses tc test frames claiming IPv6 that
        // are shorter than its header.
        let min_len = match hook {
            UplinkHook::Tc => ETH_HEADER_LEN + IPV6_HEADER_LEN,
            UplinkHook::Xdp => ETH_HEADER_LEN,
        };
        let seeds = [
            FLANNEL_V6_PING.to_vec(),
            with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_FRAGMENT, ipv6_fragment(0)),
            with_ipv6_extension(&FLANNEL_V6_PING, IPPROTO_DSTOPTS, [0, 1, 4, 0, 0, 0, 0]),
        ];
        mutate_each(&mut random, &seeds, min_len, |frame| {
            assert_verdict(&run_uplink(hook, &dataplane, &frame)?);
            Ok(())
        })?;
        assert_eq!(
            total(&dataplane.counters()?),
            FRAMES_PER_KIND as u64 + 2 * mutated
        );
    }
    Ok(())
}

#[test]
fn the_vtep_program_survives_garbage() -> Result<()> {
    // A test run's device is both flannel.1 and flannel-v6.1 here: IPv4 and IPv6 both routed.
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    let mut random = Random(0x656e_6361_7073_2121);
    let mut redirected = 0;
    let mut check = |frame: Vec<u8>| {
        redirected += redirections(&run_vtep(&dataplane, &frame)?);
        Ok(())
    };
    // The kernel refuses to test-run IPv4 frames shorter than an IPv4 header, so every frame
    // here holds at least Ethernet plus 20 bytes.
    let min_len = ETH_HEADER_LEN + IPV4_HEADER_LEN;
    for _ in 0..FRAMES_PER_KIND {
        let len = min_len + random.below(300);
        check(random.bytes(len))?;
    }
    let counters = dataplane.counters()?;
    assert_eq!(
        counters.get(Counter::TxEncapsulated),
        0,
        "random bytes are never encapsulated"
    );
    assert_eq!(
        total(&counters),
        FRAMES_PER_KIND as u64,
        "one counter per frame: {counters:?}"
    );

    let ipv4 = ethernet(
        HOST2_VTEP_MAC,
        HOST1_VTEP_MAC,
        ETH_P_IPV4,
        &bbox1_ping(BBOX2_IP, 64),
    );
    let ipv6 = ethernet(
        HOST2_VTEP6_MAC,
        HOST1_VTEP6_MAC,
        ETH_P_IPV6,
        &FLANNEL_V6_PING[V6_INNER_IP..],
    );
    mutate_each(&mut random, &[ipv4], min_len, &mut check)?;
    mutate_each(
        &mut random,
        &[ipv6],
        ETH_HEADER_LEN + IPV6_HEADER_LEN,
        &mut check,
    )?;
    let counters = dataplane.counters()?;
    assert_eq!(
        counters.get(Counter::TxEncapsulated),
        redirected,
        "{counters:?}"
    );
    assert_eq!(total(&counters), 3 * FRAMES_PER_KIND as u64);
    Ok(())
}

#[test]
fn the_container_program_survives_garbage() -> Result<()> {
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    let mut random = Random(0x7665_7468_2121_2121);
    let min_len = ETH_HEADER_LEN + IPV4_HEADER_LEN;
    for _ in 0..FRAMES_PER_KIND {
        let len = min_len + random.below(300);
        let outcome = run_container(&dataplane, &random.bytes(len))?;
        assert!(
            [TC_ACT_OK, TC_ACT_SHOT].contains(&outcome.verdict),
            "random bytes go on to the bridge, or are refused: verdict {}",
            outcome.verdict
        );
    }
    let counters = dataplane.counters()?;
    assert_eq!(
        total(&counters),
        refused(&counters),
        "nothing random is addressed to the bridge's MAC: {counters:?}"
    );

    // A fresh dataplane: the random frames bound as many random MACs as the map holds.
    let dataplane = dataplane_of(&HOST1, &[&HOST2])?;
    let ping = bbox1_ping(BBOX2_IP, 64);
    let ipv4 = [ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ETH_P_IPV4, &ping)];
    // IPv6 from bbox1, to the VXLAN port too: checked, and encapsulated if whole.
    let echo = ipv6(
        BBOX1_IPV6,
        BBOX2_IPV6,
        IPPROTO_ICMPV6,
        &[128, 0, 0, 0, 0, 1, 0, 1],
    );
    let vxlan = ipv6(
        BBOX1_IPV6,
        HOST2_IPV6,
        IPPROTO_UDP,
        &udp(40000, 8472, &[8; 64]),
    );
    let ipv6 =
        [echo, vxlan].map(|packet| ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ETH_P_IPV6, &packet));
    let mut redirected = 0;
    let mut check = |frame: Vec<u8>| {
        redirected += redirections(&run_container(&dataplane, &frame)?);
        Ok(())
    };
    mutate_each(&mut random, &ipv4, min_len, &mut check)?;
    mutate_each(
        &mut random,
        &ipv6,
        ETH_HEADER_LEN + IPV6_HEADER_LEN,
        &mut check,
    )?;
    let counters = dataplane.counters()?;
    assert_eq!(counters.get(Counter::TxDirect), redirected, "{counters:?}");
    assert_eq!(
        total(&counters),
        counters.get(Counter::TxDirect)
            + counters.get(Counter::TxSlowPath)
            + counters.get(Counter::TxRoutedFlow)
            + refused(&counters),
        "{counters:?}"
    );
    Ok(())
}

/// Frames the container program refused: claims a container cannot make, and frames no
/// check knows.
fn refused(counters: &Counters) -> u64 {
    [
        Counter::TxSpoofedMac,
        Counter::TxSpoofedSource,
        Counter::TxVxlanFromContainer,
        Counter::TxIpv6SpoofedSource,
        Counter::TxVlan,
        Counter::TxUnexpectedFrame,
        Counter::TxIpv6Unchecked,
        Counter::TxRouterMessage,
    ]
    .iter()
    .map(|&counter| counters.get(counter))
    .sum()
}
