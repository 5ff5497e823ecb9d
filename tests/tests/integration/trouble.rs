//! The network under trouble, in namespaces with a real etcd: hosts joining and dying, etcd
//! going away, agents restarting under load, hostile input.
use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use overlay_common::{Counter, Trace};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host, PREFIX},
    frames::{HOST2_IP, IPPROTO_UDP, ipv4, ipv4_fragments, udp},
    inject::{send_ipv4, send_udp},
    loss::{LossWindow, steady_ping},
    process::{Process, iperf3_server},
    seed::{BBOX2, Container, HOST2, SUBNET2, Seed},
    stock_flannel::{Peer, add_peer, add_vtep},
    wait::wait_for,
};

const HOST3: &str = "172.20.62.106";
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether a monitor has `host`'s programs report their drops: the pinned `monitor` switch.
fn drop_reports_on(host: &Host) -> Result<bool> {
    let path = host.pin_dir().join("monitor");
    let data =
        MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let switch: Array<MapData, u32> = Array::try_from(Map::Array(data))?;
    Ok(switch.get(&0, 0)? != 0)
}

/// Whether `host`'s programs report anything: drops, or a trace.
fn reports_on(host: &Host) -> Result<bool> {
    let path = host.pin_dir().join("trace");
    let data =
        MapData::from_pin(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let trace: Array<MapData, Trace> = Array::try_from(Map::Array(data))?;
    Ok(drop_reports_on(host)? || trace.get(&0, 0)?.family != 0)
}

fn flannel_record(address: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{address}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

#[test]
fn three_hosts_form_one_network_without_name_resolution() -> Result<()> {
    let mut seed = Seed::start("mesh", &[])?;
    let host3 = seed.cluster.add_host("host3", HOST3)?;
    let mut agent3 = Agent::start(&seed.cluster, &host3, &[])?;
    let subnet3 = agent3.wait_ready()?;
    for host in [&seed.host1, &seed.host2] {
        wait_for("the new host's route", EVENT_TIMEOUT, || {
            host.netns.has_route(&subnet3)
        })?;
    }
    let bbox3 = Container::attach(&host3, "bbox3", &subnet3.replace(".0/24", ".2"))?;
    let containers = [&seed.bbox1, &seed.bbox2, &bbox3];
    for from in containers {
        for to in containers {
            if from.address != to.address {
                assert!(
                    from.ping(&to.address, 1)?.contains("ttl=62"),
                    "{} to {}",
                    from.address,
                    to.address
                );
            }
        }
    }
    // No DNS: another container's name resolves to nothing.
    let lookup = seed
        .bbox1
        .netns
        .exec_unchecked(&["getent", "hosts", "bbox2"])?;
    assert!(
        !lookup.status.success() && lookup.stdout.is_empty(),
        "bbox2 must not resolve"
    );
    Ok(())
}

#[test]
fn a_joining_host_is_reachable_within_two_seconds_of_its_lease() -> Result<()> {
    let mut seed = Seed::start("join", &[])?;
    let host3 = seed.cluster.add_host("host3", HOST3)?;
    seed.cluster.reserve("10.2.63.0/24", HOST3)?;
    let mut agent3 = Agent::start(&seed.cluster, &host3, &[])?;
    assert_eq!(agent3.wait_ready()?, "10.2.63.0/24");
    let leased = Instant::now();
    let bbox3 = Container::attach(&host3, "bbox3", "10.2.63.2")?;
    wait_for(
        "bbox1 and bbox2 to reach the new host",
        Duration::from_secs(2),
        || {
            Ok(seed.bbox1.ping(&bbox3.address, 1).is_ok()
                && seed.bbox2.ping(&bbox3.address, 1).is_ok())
        },
    )
    .with_context(|| format!("{:?} after the lease", leased.elapsed()))?;
    Ok(())
}

#[test]
fn a_dead_host_s_entries_vanish_within_its_ttl_and_two_seconds() -> Result<()> {
    let ttl = ["--subnet-lease-ttl=5s"];
    let mut seed = Seed::start("death", &ttl)?;
    let host3 = seed.cluster.add_host("host3", HOST3)?;
    let mut agent3 = Agent::start(&seed.cluster, &host3, &ttl)?;
    let subnet3 = agent3.wait_ready()?;
    for host in [&seed.host1, &seed.host2] {
        wait_for("the new host's entries", EVENT_TIMEOUT, || {
            Ok(host.overlay_peer(&subnet3)?.is_some())
        })?;
    }
    agent3.process.kill();
    let killed = Instant::now();
    for host in [&seed.host1, &seed.host2] {
        let left = Duration::from_secs(7).saturating_sub(killed.elapsed());
        wait_for(
            &format!("{} to forget the dead host", host.name),
            left,
            || host.holds_no_peer(&subnet3),
        )?;
    }
    Ok(())
}

#[test]
fn forwarding_outlives_an_etcd_outage_and_the_agents_catch_up() -> Result<()> {
    let mut seed = Seed::start("etcd-down", &[])?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 3600)?;
    sleep(Duration::from_secs(1));
    seed.cluster.etcd.stop();
    sleep(Duration::from_secs(30));
    seed.cluster.etcd.restart()?;
    seed.cluster.etcd.put(
        &seed.cluster.subnet_key("10.2.77.0/24"),
        &flannel_record("172.20.62.177", "1a:4b:d7:f7:16:77"),
    )?;
    let added = Instant::now();
    for host in [&seed.host1, &seed.host2] {
        let left = Duration::from_secs(2).saturating_sub(added.elapsed());
        wait_for(
            &format!("{} to learn the new lease", host.name),
            left,
            || Ok(host.overlay_peer("10.2.77.0/24")?.is_some()),
        )?;
    }
    window.assert_no_loss(ping, 3600, &[])
}

#[test]
fn restarting_every_agent_under_load_loses_no_ping() -> Result<()> {
    let mut seed = Seed::start("upgrade", &[])?;
    let log = seed.cluster.scratch.path().join("iperf3-server.log");
    let _server = iperf3_server(&seed.bbox2.netns, &log, false)?;
    let log = seed.cluster.scratch.path().join("iperf3-client.log");
    // Steady load below what saturates the veths here, so a lost ping means a restart lost it.
    let client_args = ["-c", BBOX2, "-t", "12", "-b", "200M"].map(String::from);
    let mut client = Process::spawn(
        seed.bbox1.netns.name(),
        "iperf3".as_ref(),
        &client_args,
        &[],
        &log,
    )?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 1000)?;
    sleep(Duration::from_secs(2));
    for host in 1..=2 {
        let (agent, node) = if host == 1 {
            (&mut seed.agent1, &seed.host1)
        } else {
            (&mut seed.agent2, &seed.host2)
        };
        assert!(agent.process.terminate(EVENT_TIMEOUT)?.success());
        *agent = Agent::start(&seed.cluster, node, &[])?;
        agent.wait_ready()?;
    }
    window.assert_no_loss(ping, 1000, &[])?;
    assert!(
        client.wait_exit(Duration::from_secs(30))?.success(),
        "{}",
        client.log()
    );
    Ok(())
}

/// A host with no lease that sends VXLAN for the seed's port and VNI to host2, through a kernel
/// vxlan device, from 10.2.41.9 (inside host1's subnet).
fn intruder(seed: &mut Seed) -> Result<Host> {
    let intruder = seed.cluster.add_host("intruder", "172.20.62.66")?;
    let ns = &intruder.netns;
    add_vtep(ns, "vx", 1, "172.20.62.66", "1a:4b:d7:f7:16:66")?;
    ns.ip(&["addr", "add", "10.2.41.9/32", "dev", "vx"])?;
    let host2_mac = seed.host2.vtep_mac()?;
    let host2 = Peer {
        subnet: SUBNET2,
        public_ip: HOST2,
        vtep_mac: &host2_mac,
    };
    add_peer(ns, "vx", &host2)?;
    Ok(intruder)
}

#[test]
fn bpf_log_names_each_packets_outcome_in_the_agent_log() -> Result<()> {
    let mut seed = Seed::start("bpf-log", &["--bpf-log"])?;
    // The first echo reaches bbox2 through host2's stack, which resolves bbox2's address.
    seed.bbox1.ping(BBOX2, 4)?;
    let intruder = intruder(&mut seed)?;
    let injected =
        intruder
            .netns
            .exec_unchecked(&["ping", "-n", "-c", "3", "-W", "1", "10.2.54.2"])?;
    assert!(
        String::from_utf8_lossy(&injected.stdout).contains("3 packets transmitted, 0 received"),
        "no injected ping was answered"
    );
    let veth = seed.host1.netns.ifindex("veth-bbox1")?;
    let uplink = seed.host2.netns.ifindex("eth0")?;
    // The container's veth on host1 encapsulates, host2's uplink delivers or drops.
    for (agent, outcome) in [
        (&seed.agent1, format!("tx_direct on ifindex {veth} (")),
        (&seed.agent2, format!("rx_delivered on ifindex {uplink} (")),
        (
            &seed.agent2,
            format!("rx_unknown_vtep on ifindex {uplink} ("),
        ),
    ] {
        agent.wait_for_log(&outcome, 3, EVENT_TIMEOUT)?;
    }
    Ok(())
}

/// The programs report only while a monitor runs. A monitor killed outright (SIGKILL) cannot
/// turn its reports off: the agent does, within seconds. One whose terminal closed (SIGHUP)
/// turns them off itself. Either way the next monitor starts, and one at a time still holds.
#[test]
fn reports_end_with_their_monitor_however_it_ends() -> Result<()> {
    let mut cluster = Cluster::new("gone-monitor")?;
    let host = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host, &[])?;
    agent.wait_ready()?;
    let monitor = |extra: &[&str]| {
        let flags: Vec<String> = [
            "monitor".to_string(),
            format!("--bpf-pin-dir={}", host.pin_dir().display()),
        ]
        .into_iter()
        .chain(extra.iter().map(|flag| flag.to_string()))
        .collect();
        Agent::start_with(&host, &flags, &[])
    };
    for (signal, extra) in [
        (libc::SIGKILL, &["--trace", "10.2.54.0/24"][..]),
        (libc::SIGKILL, &[][..]),
        (libc::SIGHUP, &["--trace", "10.2.54.0/24"][..]),
    ] {
        let mut running = monitor(extra)?;
        wait_for("the monitor's reports on", EVENT_TIMEOUT, || {
            reports_on(&host)
        })
        .with_context(|| format!("monitor log:\n{}", running.log()))?;
        let mut second = monitor(&[])?;
        assert!(!second.process.wait_exit(EVENT_TIMEOUT)?.success());
        assert!(
            second.log().contains("one monitor at a time"),
            "{}",
            second.log()
        );

        running.process.signal(signal)?;
        let status = running.process.wait_exit(EVENT_TIMEOUT)?;
        if signal == libc::SIGHUP {
            assert!(status.success(), "{}", running.log());
        }
        wait_for("the reports off", EVENT_TIMEOUT, || Ok(!reports_on(&host)?))
            .with_context(|| format!("agent log:\n{}", agent.log()))?;
    }
    assert_eq!(
        agent.count_in_log("ended without turning the dataplane's reports off"),
        2,
        "{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn hostile_input_is_counted_and_changes_nothing() -> Result<()> {
    let mut seed = Seed::start("hostile", &[])?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 1000)?;
    seed.cluster.etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network": 5, "Backend": "udp"}"#,
    )?;
    seed.cluster
        .etcd
        .put(&seed.cluster.subnet_key("10.2.99.0/24"), "{not json")?;

    // A non-member floods host2 with VXLAN for our port and VNI.
    let intruder = intruder(&mut seed)?;
    let ns = &intruder.netns;
    let monitor_flags = [
        "monitor".to_string(),
        format!("--bpf-pin-dir={}", seed.host2.pin_dir().display()),
    ];
    let mut monitor = Agent::start_with(&seed.host2, &monitor_flags, &[])?;
    wait_for(
        "the monitor to turn the drop reports on",
        EVENT_TIMEOUT,
        || drop_reports_on(&seed.host2),
    )
    .with_context(|| format!("monitor log:\n{}", monitor.log()))?;
    // 5,000 frames in bursts of 100 at most every 10 ms: as fast as the shell sends them
    // would overflow the input backlog of the CPU the pings share.
    let flood = "for burst in $(seq 50); do \
                   for i in $(seq 100); do echo flood > /dev/udp/10.2.54.2/5201; done; \
                   sleep 0.01; \
                 done; \
                 ping -n -c 3 -W 1 10.2.54.2";
    let flood = ns.exec_unchecked(&["bash", "-c", flood])?;

    // The monitor names each injected frame's reason and both of its flows.
    let injected = "rx_unknown_vtep on eth0: 172.20.62.66:";
    let inner = "-> 172.20.62.105:8472 udp | 10.2.41.9:";
    monitor.wait_for_log(inner, 1, EVENT_TIMEOUT)?;
    assert!(monitor.process.terminate(EVENT_TIMEOUT)?.success());
    let reported = monitor.log();
    let lines = reported
        .lines()
        .filter(|line| line.contains(injected) && line.contains("-> 10.2.54.2:5201 udp"))
        .count();
    assert_eq!(lines, 5000, "every injected frame is reported");
    assert!(
        !reported
            .lines()
            .any(|line| line.starts_with("rx_") && !line.contains(injected)),
        "only the injected frames were dropped:\n{reported}"
    );
    let answered = String::from_utf8_lossy(&flood.stdout);
    assert!(
        answered.contains("3 packets transmitted, 0 received"),
        "no injected ping was answered: {answered}"
    );

    // The ways around the uplink's checks: VXLAN from a container, VXLAN to host2's own
    // socket from host2 itself, and fragments, whose first one the intruder sends.
    let forged = seed.forged_vxlan_ping()?;
    send_udp(&seed.bbox1.netns, &format!("{HOST2}:8472"), &forged, 100)?;
    send_udp(&seed.host2.netns, &format!("{HOST2}:8472"), &forged, 100)?;
    let datagram = udp(49152, 8472, &forged);
    let packet = ipv4([172, 20, 62, 66], HOST2_IP, IPPROTO_UDP, &[], &datagram);
    ns.run_inside(|| {
        for id in 0..100 {
            for fragment in ipv4_fragments(&packet, 56, id) {
                send_ipv4(&fragment, HOST2.parse()?)?;
            }
        }
        Ok(())
    })?;
    // Every injected frame, and nothing else, is dropped where it is counted.
    window.assert_no_loss(
        ping,
        1000,
        &[
            (Counter::RxUnknownVtep, 5003 + 100),
            (Counter::TxVxlanFromContainer, 100),
            (Counter::RxUncheckedVxlan, 100),
        ],
    )?;
    for agent in [&mut seed.agent1, &mut seed.agent2] {
        assert!(
            agent.process.try_exit_status()?.is_none(),
            "the agents keep running:\n{}",
            agent.log()
        );
    }
    assert!(
        seed.agent1
            .log()
            .contains(&format!("skipping record {PREFIX}/subnets/10.2.99.0-24"))
    );
    seed.bbox1.ping(BBOX2, 1)?;
    Ok(())
}

#[test]
fn killing_the_etcd_member_an_agent_talks_to_loses_nothing() -> Result<()> {
    let mut seed = Seed::start_on(Cluster::with_etcd_cluster("etcd-cluster")?, &[])?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 1500)?;
    let connections =
        seed.host1
            .netns
            .exec(&["ss", "-Htn", "state", "established", "( dport = :2379 )"])?;
    let talked_to = connections
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .filter_map(|peer| {
            peer.rsplit_once(':')
                .map(|(address, _)| address.to_string())
        })
        .next()
        .context("host1's agent holds no connection to etcd")?;
    let cluster = &mut seed.cluster;
    let victim = std::iter::once(&mut cluster.etcd)
        .chain(&mut cluster.members)
        .find(|member| member.address() == talked_to)
        .with_context(|| format!("no member at {talked_to}"))?;
    victim.stop();

    let survivor = std::iter::once(&cluster.etcd)
        .chain(&cluster.members)
        .find(|member| member.address() != talked_to)
        .context("no surviving member")?;
    // If the victim led the cluster, writes wait for a new leader to be elected.
    let (key, record) = (
        cluster.subnet_key("10.2.77.0/24"),
        flannel_record("172.20.62.177", "1a:4b:d7:f7:16:77"),
    );
    wait_for(
        "the surviving members to accept a write",
        EVENT_TIMEOUT,
        || Ok(survivor.put(&key, &record).is_ok()),
    )?;
    for host in [&seed.host1, &seed.host2] {
        host.wait_for_peer("10.2.77.0/24", "172.20.62.177", "1a:4b:d7:f7:16:77")?;
    }
    window.assert_no_loss(ping, 1500, &[])
}
