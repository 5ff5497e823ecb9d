//! The eBPF dataplane in namespaces: our programs carry the seed's traffic with flannel's
//! semantics, hold up under TCP load and agent restarts, and interoperate with kernel-mode
//! and stock flannel hosts.
use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters, RemoteVtep};
use overlay_tests::{
    agent::{Agent, HEALTH_PORT},
    attached::{ensure_links_adopted, link_exists, link_pin_name, pinned_links},
    cluster::{Cluster, Host},
    loss::{LossWindow, steady_ping},
    metrics::{scrape, value_of},
    process::iperf3_server,
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2, Seed},
    stock_flannel::{self, Peer},
    wait::{WITHIN_A_SECOND, wait_for},
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// host2's subnet's address, as the subnet map's key holds it.
const SUBNET2_ADDRESS: [u8; 4] = [10, 2, 54, 0];

fn counters(host: &Host) -> Result<Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

fn delta(before: &Counters, after: &Counters, counter: Counter) -> u64 {
    after.get(counter) - before.get(counter)
}

/// Pings until both hosts deliver straight into the containers: the first packet to a
/// container the host has not yet talked to goes through docker0, which learns its address.
fn warm_up_fast_path(seed: &Seed) -> Result<()> {
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    wait_for("the fast path on both hosts", EVENT_TIMEOUT, || {
        // A lost ping is retried: tests running beside this one may fill the shared backlogs.
        seed.bbox1
            .netns
            .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", BBOX2])?;
        let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
        Ok(delta(&before1, &after1, Counter::RxDelivered) > 0
            && delta(&before2, &after2, Counter::RxDelivered) > 0)
    })
}

#[test]
fn the_seed_runs_on_our_programs_with_flannels_semantics() -> Result<()> {
    let seed = Seed::start("seed-ebpf", &[])?;
    warm_up_fast_path(&seed)?;
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    let ping = seed.bbox1.ping(BBOX2, 5)?;
    assert_eq!(ping.matches("ttl=62").count(), 5, "{ping}");
    let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    for (host, before, after, what) in [
        (&seed.host1, &before1, &after1, "requests"),
        (&seed.host2, &before2, &after2, "replies"),
    ] {
        assert_eq!(
            delta(before, after, Counter::TxDirect),
            5,
            "{} encapsulated the {what} at the container's veth",
            host.name
        );
        for routed in [
            Counter::TxEncapsulated,
            Counter::TxSlowPath,
            Counter::RxDecapsulated,
        ] {
            assert_eq!(
                delta(before, after, routed),
                0,
                "{}: {}",
                host.name,
                routed.name()
            );
        }
    }
    for (host, before, after, what) in [
        (&seed.host2, &before2, &after2, "requests"),
        (&seed.host1, &before1, &after1, "replies"),
    ] {
        assert_eq!(
            delta(before, after, Counter::RxDelivered),
            5,
            "{} put the {what} straight into the container",
            host.name
        );
    }

    // TTL 1 and 2 run out on host1 and on host2: the stack answers, from docker0 and flannel.1.
    assert_eq!(
        seed.bbox1.traceroute(BBOX2)?,
        ["10.2.41.1", "10.2.54.0", "10.2.54.2"]
    );
    for host in [&seed.host1, &seed.host2] {
        let fdb = host
            .netns
            .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
        assert!(
            !fdb.contains(" dst "),
            "no FDB entry on {}'s flannel.1:\n{fdb}",
            host.name
        );
        let counters = counters(host)?;
        for dropped in [Counter::RxMalformed, Counter::RxError, Counter::TxError] {
            assert_eq!(counters.get(dropped), 0, "{}: {counters:?}", host.name);
        }
    }
    let routes = seed.host1.netns.ip(&["route"])?;
    assert!(
        routes.contains("10.2.54.0/24 via 10.2.54.0 dev flannel.1 onlink"),
        "{routes}"
    );
    Ok(())
}

#[test]
fn the_xdp_hook_checks_in_front_of_tc_which_decapsulates_the_seed() -> Result<()> {
    let seed = Seed::start("seed-xdp", &["--decap-hook=xdp"])?;
    let before2 = counters(&seed.host2)?;
    let ping = seed.bbox1.ping(BBOX2, 5)?;
    assert_eq!(ping.matches("ttl=62").count(), 5, "{ping}");
    let after2 = counters(&seed.host2)?;
    assert_eq!(delta(&before2, &after2, Counter::RxChecked), 5);
    let decapsulated_by_tc = [
        Counter::RxDelivered,
        Counter::RxDecapsulated,
        Counter::RxRoutedFlow,
    ]
    .iter()
    .map(|&counter| delta(&before2, &after2, counter))
    .sum::<u64>();
    assert_eq!(decapsulated_by_tc, 5);

    assert_eq!(
        seed.bbox1.traceroute(BBOX2)?,
        ["10.2.41.1", "10.2.54.0", "10.2.54.2"]
    );
    assert!(
        seed.host2
            .netns
            .ip(&["link", "show", "eth0"])?
            .contains("xdp"),
        "XDP is attached"
    );
    Ok(())
}

#[test]
fn a_restart_with_another_xdp_mode_moves_the_check_into_that_mode() -> Result<()> {
    let mut seed = Seed::start("xdp-mode", &["--decap-hook=xdp", "--xdp-mode=generic"])?;
    assert_eq!(xdp_attachment(&seed.host2)?, "xdpgeneric");
    for (mode, shown, was) in [
        ("native", "xdp", "generic"),
        ("generic", "xdpgeneric", "native"),
        // Native where the driver allows it, as a veth does.
        ("auto", "xdp", "generic"),
    ] {
        seed.agent2.process.terminate(Duration::from_secs(20))?;
        let flags = ["--decap-hook=xdp", &format!("--xdp-mode={mode}")];
        seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &flags)?;
        seed.agent2.wait_ready()?;
        assert_eq!(
            xdp_attachment(&seed.host2)?,
            shown,
            "after a restart with --xdp-mode={mode}"
        );
        let log = seed.agent2.log();
        let why = format!("runs on eth0 in {was} mode, not as --xdp-mode={mode} asks");
        assert!(log.contains(&why), "{log}");
        let before = counters(&seed.host2)?;
        let ping = seed.bbox1.ping(BBOX2, 3)?;
        assert_eq!(ping.matches("ttl=62").count(), 3, "{ping}");
        let after = counters(&seed.host2)?;
        assert_eq!(delta(&before, &after, Counter::RxChecked), 3, "{mode}");
    }
    Ok(())
}

/// How XDP runs on `host`'s uplink, as `ip link` names it: `xdp` (native), `xdpgeneric`, or
/// `none`.
fn xdp_attachment(host: &Host) -> Result<String> {
    let link = host.netns.ip(&["link", "show", "eth0"])?;
    let mode = link.split_whitespace().find(|word| word.starts_with("xdp"));
    Ok(mode.unwrap_or("none").to_string())
}

#[test]
fn without_the_fast_path_every_packet_is_routed_through_the_stack() -> Result<()> {
    let seed = Seed::start("routed", &["--fast-path=false"])?;
    // Neighbours resolved before counting.
    seed.bbox1
        .netns
        .exec_unchecked(&["ping", "-n", "-c", "2", "-W", "1", BBOX2])?;
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    let ping = seed.bbox1.ping(BBOX2, 5)?;
    assert_eq!(ping.matches("ttl=62").count(), 5, "{ping}");
    let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    for (host, before, after) in [
        (&seed.host1, &before1, &after1),
        (&seed.host2, &before2, &after2),
    ] {
        assert_eq!(
            delta(before, after, Counter::TxEncapsulated),
            5,
            "{}",
            host.name
        );
        assert_eq!(
            delta(before, after, Counter::RxDecapsulated),
            5,
            "{}",
            host.name
        );
        assert_eq!(delta(before, after, Counter::TxDirect), 0, "{}", host.name);
        assert_eq!(
            delta(before, after, Counter::RxDelivered),
            0,
            "{}",
            host.name
        );
    }
    Ok(())
}

#[test]
fn a_packet_too_big_for_the_overlay_gets_fragmentation_needed_from_docker0() -> Result<()> {
    let seed = Seed::start("pmtu", &[])?;
    warm_up_fast_path(&seed)?;
    // A container left at Docker's default MTU, larger than the overlay's.
    seed.bbox1
        .netns
        .ip(&["link", "set", "eth0", "mtu", "1500"])?;
    seed.host1
        .netns
        .ip(&["link", "set", "veth-bbox1", "mtu", "1500"])?;
    let before1 = counters(&seed.host1)?;
    let output = seed.bbox1.netns.exec_unchecked(&[
        "ping", "-n", "-c", "1", "-W", "2", "-M", "do", "-s", "1472", BBOX2,
    ])?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("Frag needed") && text.contains("mtu = 1450"),
        "ping -M do -s 1472:\n{text}"
    );
    assert_eq!(
        delta(&before1, &counters(&seed.host1)?, Counter::TxSlowPath),
        1,
        "handed to the stack, which answered"
    );
    // What fits still takes the fast path.
    let before1 = counters(&seed.host1)?;
    seed.bbox1
        .netns
        .exec(&["ping", "-n", "-c", "1", "-M", "do", "-s", "1422", BBOX2])?;
    assert_eq!(
        delta(&before1, &counters(&seed.host1)?, Counter::TxDirect),
        1
    );
    Ok(())
}

#[test]
fn bpftool_and_status_show_the_maps_by_name() -> Result<()> {
    let seed = Seed::start("status", &[])?;
    warm_up_fast_path(&seed)?;
    let subnets = seed.host1.pin_dir().join("subnets");
    let dump = overlay_tests::netns::run(
        std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&subnets),
    )?;
    for field in [
        "\"prefix_len\": 24",
        "\"data\": [10,2,54,0",
        "\"public_ip\": [172,20,62,105",
        "\"mac\": [",
    ] {
        assert!(
            dump.replace('\n', "")
                .replace("            ", "")
                .contains(field),
            "{field} in\n{dump}"
        );
    }
    let report = Agent::status_report(&seed.cluster, &seed.host1)?;
    let mac2 = seed.host2.vtep_mac()?;
    for line in [
        format!("lease: {SUBNET1}"),
        format!("{SUBNET2} via {HOST2} (VTEP {mac2}): map {HOST2} {mac2}"),
        "tc_vtep_egress on flannel.1 (ifindex".to_string(),
        "tc_uplink_ingress on eth0 (ifindex".to_string(),
        "tc_container_ingress on veth-bbox1 (ifindex".to_string(),
        "rx_delivered".to_string(),
        "tx_direct".to_string(),
    ] {
        assert!(report.contains(&line), "status lacks {line:?}:\n{report}");
    }
    Ok(())
}

/// The agent's longest wait before it compares the maps with what it wants (its 30-s round),
/// with room for a loaded machine.
const FULL_ROUND_WITHIN: Duration = Duration::from_secs(40);

/// A map entry changed or deleted by hand sends the agent no notification: `status` flags it
/// at once (`DIFFERS`, `MISSING`), and the next round that compares, the 30-s one at the
/// latest, puts it back.
#[test]
fn a_map_entry_changed_by_hand_is_flagged_and_put_back() -> Result<()> {
    let seed = Seed::start("hand-edit", &[])?;
    let path = seed.host1.pin_dir().join("subnets");
    let data =
        MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut subnets: LpmTrie<MapData, [u8; 4], RemoteVtep> = LpmTrie::try_from(Map::LpmTrie(data))?;
    let key = Key::new(24, SUBNET2_ADDRESS);
    let wanted = subnets.get(&key, 0)?;
    let mac2 = seed.host2.vtep_mac()?;
    let head = format!("{SUBNET2} via {HOST2} (VTEP {mac2}): ");

    // Each hand edit: what `status` says at once, then the entry as the agent wants it.
    let check = |edit: &str, state: &str, subnets: &LpmTrie<MapData, [u8; 4], RemoteVtep>| {
        let report = Agent::status_report(&seed.cluster, &seed.host1)?;
        let line = format!("{head}{state}\n");
        anyhow::ensure!(report.contains(&line), "status lacks {line:?}:\n{report}");
        wait_for(
            &format!("the {edit} entry put back"),
            FULL_ROUND_WITHIN,
            || Ok(subnets.get(&key, 0).ok() == Some(wanted)),
        )
    };
    let forged = RemoteVtep {
        mac: [0x02, 0, 0, 0, 0, 0x66],
        ..wanted
    };
    subnets.insert(&key, forged, 0)?;
    check(
        "changed",
        &format!("map {HOST2} 02:00:00:00:00:66 DIFFERS"),
        &subnets,
    )?;
    subnets.remove(&key)?;
    check("deleted", "MISSING from the map", &subnets)?;
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

#[test]
fn big_tcp_superpackets_are_refused_and_counted_never_truncated() -> Result<()> {
    let seed = Seed::start("big-tcp", &[])?;
    // BIG TCP on bbox1: its TCP may build superpackets of up to 128 KiB, whose length no
    // outer IPv4 header can state.
    seed.bbox1.netns.set_gso_max_size("eth0", 131_072)?;
    let log = seed.cluster.scratch.path().join("iperf3-server.log");
    let mut server = iperf3_server(&seed.bbox2.netns, &log, true)?;
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    let _ = seed
        .bbox1
        .netns
        .exec_unchecked(&["iperf3", "-c", BBOX2, "-t", "3"])?;
    let _ = server.wait_exit(EVENT_TIMEOUT);
    let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    assert!(
        delta(&before1, &after1, Counter::TxTooBig) > 0,
        "host1 refused superpackets above 64 KiB: {after1:?}"
    );
    // Nothing arrived cut short or with a length that disagrees with the packet.
    assert_eq!(
        delta(&before2, &after2, Counter::RxMalformed),
        0,
        "{after2:?}"
    );
    Ok(())
}

#[test]
fn a_ten_second_tcp_transfer_goes_through_without_a_retransmission_storm() -> Result<()> {
    let seed = Seed::start("iperf", &[])?;
    let log = seed.cluster.scratch.path().join("iperf3-server.log");
    let mut server = iperf3_server(&seed.bbox2.netns, &log, true)?;
    let report = seed
        .bbox1
        .netns
        .exec(&["iperf3", "-c", BBOX2, "-t", "10", "-J"])?;
    server.wait_exit(EVENT_TIMEOUT)?;
    let json: serde_json::Value =
        serde_json::from_str(&report).context("iperf3 -J printed no JSON")?;
    let sent = &json["end"]["sum_sent"];
    let bytes = sent["bytes"].as_u64().context("no bytes sent")?;
    let retransmits = sent["retransmits"]
        .as_u64()
        .context("no retransmit count")?;
    let segments = bytes / 1398;
    assert!(bytes > 100_000_000, "at least 100 MB in 10 s, got {bytes}");
    assert!(
        retransmits * 100 <= segments.max(10_000),
        "{retransmits} retransmits for {segments} segments"
    );
    let received = json["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("no bytes received")?;
    assert!(
        received * 100 >= bytes * 99,
        "received {received} of {bytes}"
    );
    Ok(())
}

#[test]
fn killing_and_restarting_an_agent_loses_no_packet() -> Result<()> {
    let mut seed = Seed::start("restart", &[])?;
    // 100 packets a second for 10 s, across a SIGKILL and a restart of host1's agent.
    let links = pinned_links(&seed.host1.pin_dir())?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 1000)?;
    std::thread::sleep(Duration::from_secs(2));
    seed.agent1.process.kill();
    std::thread::sleep(Duration::from_millis(500));
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &[])?;
    assert_eq!(seed.agent1.wait_ready()?, SUBNET1);
    window.assert_no_loss(ping, 1000, &[])?;
    ensure_links_adopted(&links, &seed.host1.pin_dir())
        .with_context(|| format!("agent log:\n{}", seed.agent1.log()))?;

    let entries = PinnedDataplane::open(&seed.host1.pin_dir())?.subnet_entries()?;
    let expected: HashMap<_, _> = [(
        SUBNET2.parse()?,
        (HOST2.parse::<Ipv4Addr>()?, seed.host2.vtep_mac()?),
    )]
    .into();
    let actual: HashMap<_, _> = entries
        .into_iter()
        .map(|(subnet, remote)| {
            let mac = remote.mac.map(|octet| format!("{octet:02x}")).join(":");
            (subnet, (Ipv4Addr::from(remote.public_ip), mac))
        })
        .collect();
    assert_eq!(actual, expected, "the maps hold exactly etcd's view");
    Ok(())
}

#[test]
fn the_bridges_notice_about_a_port_keeps_the_containers_fast_path() -> Result<()> {
    let seed = Seed::start("port-notice", &[])?;
    warm_up_fast_path(&seed)?;
    // The bridge announces a port's state (an RTM_NEWLINK of family AF_BRIDGE, which names no
    // link kind) whenever one of its flags is set.
    seed.host1.netns.exec(&[
        "bridge",
        "link",
        "set",
        "dev",
        "veth-bbox1",
        "learning",
        "on",
    ])?;
    std::thread::sleep(Duration::from_secs(1));
    let before = counters(&seed.host1)?;
    let ping = seed.bbox1.ping(BBOX2, 5)?;
    assert_eq!(ping.matches("ttl=62").count(), 5, "{ping}");
    assert_eq!(
        delta(&before, &counters(&seed.host1)?, Counter::TxDirect),
        5,
        "bbox1's veth still encapsulates:\n{}",
        seed.agent1.log()
    );
    Ok(())
}

#[test]
fn ebpf_kernel_and_stock_flannel_hosts_all_reach_each_other() -> Result<()> {
    let mut cluster = Cluster::new("interop")?;
    let subnet3 = "10.2.63.0/24";
    cluster.reserve(SUBNET1, HOST1)?;
    cluster.reserve(SUBNET2, HOST2)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let host3 = cluster.add_host("host3", "172.20.62.106")?;
    let mut ebpf = Agent::start(&cluster, &host1, &["--dataplane=ebpf"])?;
    let mut kernel = Agent::start(&cluster, &host2, &["--dataplane=kernel"])?;
    assert_eq!(ebpf.wait_ready()?, SUBNET1);
    assert_eq!(kernel.wait_ready()?, SUBNET2);
    let flannel_mac = "1a:4b:d7:f7:16:89";
    let (mac1, mac2) = (host1.vtep_mac()?, host2.vtep_mac()?);
    let peers = [
        Peer {
            subnet: SUBNET1,
            public_ip: HOST1,
            vtep_mac: &mac1,
        },
        Peer {
            subnet: SUBNET2,
            public_ip: HOST2,
            vtep_mac: &mac2,
        },
    ];
    stock_flannel::configure(&cluster, &host3, subnet3, flannel_mac, &peers)?;
    for host in [&host1, &host2] {
        host.wait_for_peer(subnet3, "172.20.62.106", flannel_mac)?;
    }
    for host in [&host1, &host2] {
        wait_for(
            &format!("{}'s route to the flannel host", host.name),
            EVENT_TIMEOUT,
            || host.netns.has_route(subnet3),
        )?;
    }
    let containers = [
        Container::attach(&host1, "bbox1", BBOX1)?,
        Container::attach(&host2, "bbox2", BBOX2)?,
        Container::attach(&host3, "bbox3", "10.2.63.2")?,
    ];
    for from in &containers {
        for to in &containers {
            if from.address != to.address {
                let ping = from.ping(&to.address, 2)?;
                assert!(
                    ping.contains("ttl=62"),
                    "{} to {}:\n{ping}",
                    from.address,
                    to.address
                );
            }
        }
    }
    Ok(())
}

#[test]
fn teardown_removes_programs_and_pins() -> Result<()> {
    let mut cluster = Cluster::new("teardown-ebpf")?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let links_before = host1.netns.ip(&["-d", "link", "show"])?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    let links = pinned_links(&host1.pin_dir())?;
    for program in ["tc_uplink_ingress", "tc_vtep_egress"] {
        assert!(
            links.iter().any(|(name, _)| name.contains(program)),
            "{program} is attached: {links:?}"
        );
    }
    agent.process.terminate(EVENT_TIMEOUT)?;
    assert!(
        links.iter().all(|(_, id)| link_exists(*id)),
        "the pinned links outlive the agent"
    );

    let flags = [
        "teardown".to_string(),
        format!("--subnet-file={}", host1.subnet_file().display()),
        format!("--bpf-pin-dir={}", host1.pin_dir().display()),
    ];
    let mut teardown = Agent::start_with(&host1, &flags, &[])?;
    assert!(
        teardown.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        teardown.log()
    );
    assert!(!host1.pin_dir().exists(), "the pins are gone");
    assert!(
        links.iter().all(|(_, id)| !link_exists(*id)),
        "every link is gone with its program"
    );
    assert_eq!(
        host1.netns.ip(&["-d", "link", "show"])?,
        links_before,
        "no device left"
    );
    Ok(())
}

#[test]
fn metrics_show_counters_maps_leases_and_rounds_to_a_prometheus_parser() -> Result<()> {
    let seed = Seed::start("metrics", &[])?;
    seed.cluster
        .etcd
        .put(&seed.cluster.subnet_key("10.2.99.0/24"), "{not json")?;
    warm_up_fast_path(&seed)?;
    let mut samples = Vec::new();
    // The occupancy is read every few seconds, not at each scrape: wait for a read since
    // bbox1 was learned.
    wait_for(
        "the malformed record to count as skipped, bbox1's endpoint to be counted",
        EVENT_TIMEOUT,
        || {
            samples = scrape(&seed.host1.netns, HEALTH_PORT)?;
            Ok(
                value_of(&samples, "overlay_leases_skipped", &[]) == Some(1.0)
                    && value_of(&samples, "overlay_map_entries", &[("map", "endpoints")])
                        == Some(1.0),
            )
        },
    )?;
    let pinned = counters(&seed.host1)?;

    for &counter in Counter::ALL {
        let labels = [
            ("reason", counter.name()),
            ("verdict", counter.verdict().name()),
        ];
        let exported = value_of(&samples, "overlay_dataplane_packets_total", &labels)
            .with_context(|| format!("{} is exported", counter.name()))?;
        assert!(
            exported <= pinned.get(counter) as f64,
            "{}: {exported} exported, {} in the map since",
            counter.name(),
            pinned.get(counter)
        );
    }
    let direct = [("reason", "tx_direct"), ("verdict", "redirect")];
    assert!(value_of(&samples, "overlay_dataplane_packets_total", &direct) > Some(0.0));
    let dropped = [("reason", "rx_unknown_vtep"), ("verdict", "drop")];
    assert!(value_of(&samples, "overlay_dataplane_packets_total", &dropped).is_some());

    for (map, entries) in [("subnets", 1.0), ("vteps", 1.0), ("endpoints", 1.0)] {
        let labels = [("map", map)];
        assert_eq!(
            value_of(&samples, "overlay_map_entries", &labels),
            Some(entries),
            "{map}"
        );
        assert!(value_of(&samples, "overlay_map_capacity", &labels) > Some(entries));
    }
    assert_eq!(value_of(&samples, "overlay_leases_known", &[]), Some(1.0));
    assert_eq!(
        value_of(&samples, "overlay_lease_expiry_timestamp_seconds", &[]),
        Some(f64::INFINITY),
        "the seed's subnets are reservations"
    );
    let start = [("scope", "everything")];
    assert!(value_of(&samples, "overlay_reconcile_duration_seconds_count", &start) >= Some(1.0));
    assert_eq!(
        value_of(&samples, "overlay_reconcile_errors_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        value_of(&samples, "overlay_etcd_watch_reconnects_total", &[]),
        Some(0.0)
    );
    Ok(())
}

#[test]
fn an_uplink_deleted_and_made_again_is_followed_within_a_second() -> Result<()> {
    let mut seed = Seed::start("uplink-again", &[])?;
    seed.bbox1.ping(BBOX2, 1)?;
    let before = counters(&seed.host2)?;
    seed.cluster.recreate_uplink(&seed.host2)?;
    // The uplink's program is linked to the new eth0, by its index, and flannel.1 (deleted
    // with the old one) routes again.
    let pin = link_pin_name(&seed.host2.netns, "tc_uplink_ingress", "eth0")?;
    let followed = wait_for("the new eth0 to be followed", WITHIN_A_SECOND, || {
        let links = pinned_links(&seed.host2.pin_dir())?;
        Ok(links.iter().any(|(name, _)| *name == pin) && seed.host2.netns.has_route(SUBNET1)?)
    });
    followed.with_context(|| seed.agent2.log())?;
    wait_for("bbox1 to reach bbox2 again", Duration::from_secs(5), || {
        Ok(seed
            .bbox1
            .netns
            .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", BBOX2])?
            .status
            .success())
    })?;
    // The programs sit on the new eth0 and flannel.1: host2 decapsulates again.
    let after = counters(&seed.host2)?;
    assert!(
        delta(&before, &after, Counter::RxDelivered)
            + delta(&before, &after, Counter::RxDecapsulated)
            > 0,
        "{after:?}"
    );
    seed.bbox2.ping(BBOX1, 3)?;
    Ok(())
}

/// The VXLAN header's length over IPv4: outer Ethernet is already the veth's own header.
const VXLAN_OVERHEAD: u16 = 50;

/// In ebpf mode a container's end of its veth asks its sockets for room for the VXLAN header,
/// so the encapsulation pushes it without reallocating each small packet's head; this holds
/// for containers started before and after the agent. Kernel mode leaves docker0 as flannel
/// does, with only the containers' ports.
#[test]
fn containers_leave_room_for_the_vxlan_header_in_ebpf_mode_only() -> Result<()> {
    let mut seed = Seed::start("headroom", &[])?;
    let bbox3 = Container::attach(&seed.host1, "bbox3", "10.2.41.3")?;
    for container in [&seed.bbox1, &bbox3] {
        let headroom = container.netns.headroom("eth0")?;
        assert!(
            headroom >= VXLAN_OVERHEAD,
            "{}'s eth0 asks for {headroom} bytes of headroom\n{}",
            container.address,
            seed.agent1.log()
        );
    }
    let ping = seed.bbox1.ping(BBOX2, 3)?;
    assert_eq!(ping.matches("ttl=62").count(), 3, "{ping}");

    seed.agent1.process.terminate(EVENT_TIMEOUT)?;
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &["--dataplane=kernel"])?;
    seed.agent1.wait_ready()?;
    let ports = seed
        .host1
        .netns
        .ip(&["-o", "link", "show", "master", "docker0"])?;
    assert_eq!(
        ports.lines().count(),
        2,
        "docker0 holds the two containers' ports alone:\n{ports}"
    );
    Ok(())
}
