//! The eBPF dataplane in namespaces: our programs carry the seed's traffic with flannel's
//! semantics, hold up under TCP load and agent restarts, and interoperate with kernel-mode
//! and stock flannel hosts.
use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host, PREFIX},
    process::{Process, iperf3_server},
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2, Seed},
    stock_flannel::{self, Peer},
    wait::wait_for,
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

fn counters(host: &Host) -> Result<Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

fn delta(before: &Counters, after: &Counters, counter: Counter) -> u64 {
    after.get(counter) - before.get(counter)
}

#[test]
fn the_seed_runs_on_our_programs_with_flannels_semantics() -> Result<()> {
    let seed = Seed::start("seed-ebpf", &[])?;
    let (before1, before2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    let ping = seed.bbox1.ping(BBOX2, 5)?;
    assert_eq!(ping.matches("ttl=62").count(), 5, "{ping}");
    let (after1, after2) = (counters(&seed.host1)?, counters(&seed.host2)?);
    assert_eq!(
        delta(&before1, &after1, Counter::TxEncapsulated),
        5,
        "host1 encapsulated the requests"
    );
    assert_eq!(
        delta(&before2, &after2, Counter::RxDecapsulated),
        5,
        "host2 decapsulated them"
    );
    assert_eq!(
        delta(&before2, &after2, Counter::TxEncapsulated),
        5,
        "host2 encapsulated the replies"
    );
    assert_eq!(
        delta(&before1, &after1, Counter::RxDecapsulated),
        5,
        "host1 decapsulated them"
    );

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
    }
    let routes = seed.host1.netns.ip(&["route"])?;
    assert!(
        routes.contains("10.2.54.0/24 via 10.2.54.0 dev flannel.1 onlink"),
        "{routes}"
    );
    Ok(())
}

#[test]
fn bpftool_and_status_show_the_maps_by_name() -> Result<()> {
    let seed = Seed::start("status", &[])?;
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
    let flags = [
        format!("--etcd-endpoints={}", seed.cluster.etcd.endpoint()),
        format!("--etcd-prefix={PREFIX}"),
        format!("--subnet-file={}", seed.host1.subnet_file().display()),
        format!("--bpf-pin-dir={}", seed.host1.pin_dir().display()),
    ];
    let mut status = Agent::start_with(
        &seed.host1,
        &[&["status".to_string()][..], &flags].concat(),
        &[],
    )?;
    assert!(
        status.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        status.log()
    );
    let report = status.log();
    let mac2 = seed.host2.vtep_mac()?;
    for line in [
        format!("lease: {SUBNET1}"),
        format!("{SUBNET2} via {HOST2} (VTEP {mac2}): map {HOST2} {mac2}"),
        "tc_vtep_egress on ifindex".to_string(),
        "xdp_uplink on ifindex".to_string(),
        "rx_decapsulated".to_string(),
    ] {
        assert!(report.contains(&line), "status lacks {line:?}:\n{report}");
    }
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
    let log = seed.cluster.scratch.path().join("ping.log");
    // 100 packets a second for 8 s, across a SIGKILL and a restart of host1's agent.
    let ping_args = ["-n", "-q", "-i", "0.01", "-c", "800", BBOX2].map(String::from);
    let mut ping = Process::spawn(
        seed.bbox1.netns.name(),
        "ping".as_ref(),
        &ping_args,
        &[],
        &log,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    seed.agent1.process.kill();
    std::thread::sleep(Duration::from_millis(500));
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &[])?;
    assert_eq!(seed.agent1.wait_ready()?, SUBNET1);
    ping.wait_exit(Duration::from_secs(30))?;
    assert!(
        ping.log()
            .contains("800 packets transmitted, 800 received, 0% packet loss"),
        "{}",
        ping.log()
    );
    assert!(
        seed.agent1.log().contains("adopted the pinned link"),
        "{}",
        seed.agent1.log()
    );

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
    for agent in [&ebpf, &kernel] {
        agent.wait_for_log(
            &format!("lease added: {subnet3} via 172.20.62.106 (VTEP {flannel_mac})"),
            1,
            EVENT_TIMEOUT,
        )?;
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
    assert!(
        host1.netns.ip(&["link", "show", "eth0"])?.contains("xdp"),
        "XDP is attached"
    );
    agent.process.terminate(EVENT_TIMEOUT)?;
    assert!(
        host1.netns.ip(&["link", "show", "eth0"])?.contains("xdp"),
        "the pinned link outlives the agent"
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
    assert_eq!(
        host1.netns.ip(&["-d", "link", "show"])?,
        links_before,
        "no device, no XDP left"
    );
    Ok(())
}
