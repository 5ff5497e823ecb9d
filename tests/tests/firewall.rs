//! flannel's forward and masquerade rules on hosts with a firewall of their own: the iptables
//! chains flannel makes by default, the nftables table of `EnableNFTables`, and a FORWARD
//! policy of DROP, as Docker sets it.
use std::time::Duration;

use anyhow::{Context, Result};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host, NFTABLES_NETWORK_CONFIG},
    process::iperf3_server,
    seed::{BBOX2, Container, Seed, check_seed_path},
    wait::wait_for,
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// nftables mode checks iptables' FORWARD policy at every resync: once a second here.
const RESYNC_FLAG: &str = "--iptables-resync=1";
const TWO_RESYNCS: Duration = Duration::from_secs(2);
/// One resync, and time for iptables on a busy machine.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// The seed's checks on a seed whose hosts drop what their FORWARD chain does not accept, with
/// a container that starts after the agents: the first packets to it take the stack's path.
fn seed_works_with_forward_policy_drop(cluster: Cluster, flags: &[&str]) -> Result<()> {
    let seed = Seed::start_on(cluster, flags)?;
    for host in [&seed.host1, &seed.host2] {
        host.iptables(&["-P", "FORWARD", "DROP"])?;
    }
    for (host, agent) in [(&seed.host1, &seed.agent1), (&seed.host2, &seed.agent2)] {
        wait_for_forward_jump(host, agent)?;
    }
    check_seed_path(&seed.bbox1, BBOX2)?;
    let late = Container::attach(&seed.host2, "late", "10.2.54.3")?;
    let first = seed.bbox1.ping(&late.address, 1)?;
    assert!(first.contains("ttl=62"), "{first}");
    let log = seed.cluster.scratch.path().join("iperf-late.log");
    let mut server = iperf3_server(&late.netns, &log, true)?;
    seed.bbox1
        .netns
        .exec(&["iperf3", "-c", &late.address, "-t", "1"])?;
    assert!(
        server.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        server.log()
    );
    Ok(())
}

/// Waits until `host`'s FORWARD chain jumps to flannel's forward chain: from the start with
/// iptables, within one resync of a DROP policy with nftables.
fn wait_for_forward_jump(host: &Host, agent: &Agent) -> Result<()> {
    host.wait_for_forward_jump(RESYNC_TIMEOUT)
        .with_context(|| format!("agent log:\n{}", agent.log()))
}

#[test]
fn kernel_mode_works_behind_a_forward_policy_of_drop() -> Result<()> {
    seed_works_with_forward_policy_drop(Cluster::new("drop-kernel")?, &["--dataplane=kernel"])
}

#[test]
fn ebpf_mode_works_behind_a_forward_policy_of_drop() -> Result<()> {
    seed_works_with_forward_policy_drop(Cluster::new("drop-ebpf")?, &["--dataplane=ebpf"])
}

#[test]
fn nftables_mode_works_behind_a_forward_policy_of_drop() -> Result<()> {
    let cluster = Cluster::with_etcd("drop-nft", false, Some(NFTABLES_NETWORK_CONFIG))?;
    seed_works_with_forward_policy_drop(cluster, &["--dataplane=kernel", RESYNC_FLAG])
}

/// With `EnableNFTables` flannel's forward chain is in iptables exactly while iptables' FORWARD
/// policy is DROP: added within a resync of the policy change, announced once, removed when the
/// policy is ACCEPT again, and by teardown.
#[test]
fn nftables_mode_keeps_iptables_forward_rules_only_behind_a_drop_policy() -> Result<()> {
    let cluster = Cluster::with_etcd("nft-policy", false, Some(NFTABLES_NETWORK_CONFIG))?;
    let mut seed = Seed::start_on(cluster, &["--dataplane=kernel", RESYNC_FLAG])?;
    let (host, agent) = (&seed.host1, &seed.agent1);
    let in_iptables = || -> Result<bool> { Ok(host.iptables(&["-S"])?.contains("FLANNEL-FWD")) };
    std::thread::sleep(TWO_RESYNCS);
    let ruleset = host.netns.exec(&["nft", "list", "ruleset"])?;
    assert!(
        !ruleset.contains("FLANNEL-"),
        "nothing in iptables behind a policy of ACCEPT:\n{ruleset}"
    );

    host.iptables(&["-P", "FORWARD", "DROP"])?;
    wait_for_forward_jump(host, agent)?;
    std::thread::sleep(TWO_RESYNCS);
    let announced = agent.count_in_log("iptables' FORWARD policy is DROP");
    assert_eq!(announced, 1, "{}", agent.log());
    assert_eq!(
        host.iptables(&["-S", "FLANNEL-FWD"])?.trim(),
        [
            "-N FLANNEL-FWD",
            "-A FLANNEL-FWD -s 10.2.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
            "-A FLANNEL-FWD -d 10.2.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT",
        ]
        .join("\n")
    );

    host.iptables(&["-P", "FORWARD", "ACCEPT"])?;
    wait_for("FLANNEL-FWD to go", RESYNC_TIMEOUT, || Ok(!in_iptables()?))?;

    host.iptables(&["-P", "FORWARD", "DROP"])?;
    wait_for_forward_jump(host, agent)?;
    seed.agent1.process.terminate(EVENT_TIMEOUT)?;
    let host = &seed.host1;
    let flags = [
        "teardown".to_string(),
        format!("--subnet-file={}", host.subnet_file().display()),
        format!("--bpf-pin-dir={}", host.pin_dir().display()),
    ];
    let mut teardown = Agent::start_with(host, &flags, &[])?;
    assert!(
        teardown.process.wait_exit(EVENT_TIMEOUT)?.success(),
        "{}",
        teardown.log()
    );
    let forward = host.iptables(&["-S"])?;
    assert!(
        !forward.contains("FLANNEL-FWD") && forward.contains("-P FORWARD DROP"),
        "teardown removes our chain and leaves the policy:\n{forward}"
    );
    Ok(())
}

#[test]
fn flannels_iptables_chains_are_kept_and_restored() -> Result<()> {
    let seed = Seed::start(
        "iptables",
        &["--dataplane=kernel", "--ip-masq", "--iptables-resync=1"],
    )?;
    let host = &seed.host1;
    let masq = "-m comment --comment \"flanneld masq\"";
    let forward = "-m comment --comment \"flanneld forward\"";
    assert_eq!(
        host.iptables(&["-t", "nat", "-S", "FLANNEL-POSTRTG"])?.trim(),
        [
            "-N FLANNEL-POSTRTG".to_string(),
            format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s 10.2.41.0/24 -d 10.2.0.0/16 {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s 10.2.0.0/16 -d 10.2.41.0/24 {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG ! -s 10.2.0.0/16 -d 10.2.41.0/24 {masq} -j RETURN"),
            format!(
                "-A FLANNEL-POSTRTG -s 10.2.0.0/16 ! -d 224.0.0.0/4 {masq} -j MASQUERADE --random-fully"
            ),
            format!(
                "-A FLANNEL-POSTRTG ! -s 10.2.0.0/16 -d 10.2.0.0/16 {masq} -j MASQUERADE --random-fully"
            ),
        ]
        .join("\n")
    );
    assert_eq!(
        host.iptables(&["-S", "FLANNEL-FWD"])?.trim(),
        [
            "-N FLANNEL-FWD".to_string(),
            format!("-A FLANNEL-FWD -s 10.2.0.0/16 {forward} -j ACCEPT"),
            format!("-A FLANNEL-FWD -d 10.2.0.0/16 {forward} -j ACCEPT"),
        ]
        .join("\n")
    );
    assert!(
        host.iptables(&["-t", "nat", "-S", "POSTROUTING"])?
            .contains(&format!("-A POSTROUTING {masq} -j FLANNEL-POSTRTG"))
    );
    assert!(
        host.netns
            .exec_unchecked(&["nft", "list", "table", "ip", "flannel-ipv4"])?
            .status
            .code()
            != Some(0),
        "no nftables table in iptables mode"
    );

    // Someone flushes our chain and removes our jump: both come back within the resync period.
    host.iptables(&["-F", "FLANNEL-FWD"])?;
    host.iptables(&[
        "-t",
        "nat",
        "-D",
        "POSTROUTING",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "FLANNEL-POSTRTG",
    ])?;
    wait_for("the rules to come back", Duration::from_secs(5), || {
        Ok(host.iptables(&["-S", "FLANNEL-FWD"])?.lines().count() == 3
            && host
                .iptables(&["-t", "nat", "-S", "POSTROUTING"])?
                .contains("FLANNEL-POSTRTG"))
    })
    .with_context(|| {
        format!(
            "agent log:\n{}\nrules now:\n{}",
            seed.agent1.log(),
            host.netns.exec(&["iptables-save"]).unwrap_or_default()
        )
    })?;
    // Restored, and then left alone: rules in place are not rewritten on every check.
    let restorations = || {
        seed.agent1
            .count_in_log("rules were changed or removed; restoring them")
    };
    let restored = restorations();
    assert!((1..=2).contains(&restored), "{}", seed.agent1.log());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(restorations(), restored, "{}", seed.agent1.log());
    Ok(())
}

#[test]
fn fully_random_masquerade_can_be_turned_off() -> Result<()> {
    let seed = Seed::start(
        "no-random",
        &[
            "--dataplane=kernel",
            "--ip-masq",
            "--ip-masq-fully-random-disable",
        ],
    )?;
    let rules = seed
        .host1
        .iptables(&["-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    assert!(rules.contains("-j MASQUERADE"), "{rules}");
    assert!(!rules.contains("--random-fully"), "{rules}");
    Ok(())
}

#[test]
fn enable_nftables_makes_flannels_table_instead() -> Result<()> {
    let cluster = Cluster::with_etcd("nftables", false, Some(NFTABLES_NETWORK_CONFIG))?;
    let seed = Seed::start_on(cluster, &["--dataplane=kernel", "--ip-masq"])?;
    let table = seed
        .host1
        .netns
        .exec(&["nft", "list", "table", "ip", "flannel-ipv4"])?;
    for rule in [
        "type filter hook forward priority filter; policy accept;",
        "ip saddr 10.2.0.0/16 accept",
        "ip daddr 10.2.0.0/16 accept",
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark 0x00004000 return",
        "ip saddr 10.2.41.0/24 ip daddr 10.2.0.0/16 return",
        "ip saddr 10.2.0.0/16 ip daddr 10.2.41.0/24 return",
        "ip saddr != 10.2.41.0/24 ip daddr 10.2.0.0/16 return",
        "ip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.2.0.0/16 ip daddr 10.2.0.0/16 masquerade fully-random",
    ] {
        assert!(table.contains(rule), "no {rule:?} in\n{table}");
    }
    let iptables_rules = seed.host1.netns.exec(&["nft", "list", "ruleset"])?;
    assert!(
        !iptables_rules.contains("FLANNEL-"),
        "no iptables chains in nftables mode:\n{iptables_rules}"
    );
    let ping = seed.bbox1.ping(BBOX2, 2)?;
    assert_eq!(ping.matches("ttl=62").count(), 2, "{ping}");
    Ok(())
}
