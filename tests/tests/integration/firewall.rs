//! flannel's forward and masquerade rules on hosts with a firewall of their own: the iptables
//! chains flannel makes by default, the nftables table of `EnableNFTables`, and a FORWARD
//! policy of DROP, as Docker sets it.
use std::time::Duration;

use anyhow::{Context, Result};
use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_agent::masquerade::{Backend, Masquerade, Networks, Rules};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host, NFTABLES_NETWORK_CONFIG, SEED_NETWORK_CONFIG},
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

/// The seed's checks, on a cluster named `tag` with network config `config`, whose hosts drop
/// what their FORWARD chain does not accept, with a container that starts after the agents:
/// the first packets to it take the stack's path.
fn seed_works_with_forward_policy_drop(tag: &str, config: &str, flags: &[&str]) -> Result<()> {
    let seed = Seed::start_on(Cluster::with_etcd(tag, false, Some(config))?, flags)?;
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

// Each dataplane, and flannel's rules in nftables, behind a FORWARD policy of DROP.
test_matrix! { seed_works_with_forward_policy_drop {
    kernel_mode_works_behind_a_forward_policy_of_drop:
        ("drop-kernel", SEED_NETWORK_CONFIG, &["--dataplane=kernel"]),
    ebpf_mode_works_behind_a_forward_policy_of_drop:
        ("drop-ebpf", SEED_NETWORK_CONFIG, &["--dataplane=ebpf"]),
    nftables_mode_works_behind_a_forward_policy_of_drop:
        ("drop-nft", NFTABLES_NETWORK_CONFIG, &["--dataplane=kernel", RESYNC_FLAG]),
}}

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
    teardown(host)?;
    let forward = host.iptables(&["-S"])?;
    assert!(
        !forward.contains("FLANNEL-FWD") && forward.contains("-P FORWARD DROP"),
        "teardown removes our chain and leaves the policy:\n{forward}"
    );
    Ok(())
}

/// flannel's chains and the jumps into them in `command`'s (iptables' or ip6tables') tables
/// of `host`, for the overlay `network`, the host's `subnet` and the family's `multicast`,
/// masquerading fully random.
fn assert_flannels_chains(
    host: &Host,
    command: &str,
    network: &str,
    subnet: &str,
    multicast: &str,
) -> Result<()> {
    let list = |args: &[&str]| host.netns.exec(&[&[command], args].concat());
    let masq = "-m comment --comment \"flanneld masq\"";
    let forward = "-m comment --comment \"flanneld forward\"";
    let masquerade = "-j MASQUERADE --random-fully";
    assert_eq!(
        list(&["-t", "nat", "-S", "FLANNEL-POSTRTG"])?.trim(),
        [
            "-N FLANNEL-POSTRTG".to_string(),
            format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s {subnet} -d {network} {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s {network} -d {subnet} {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG ! -s {network} -d {subnet} {masq} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s {network} ! -d {multicast} {masq} {masquerade}"),
            format!("-A FLANNEL-POSTRTG ! -s {network} -d {network} {masq} {masquerade}"),
        ]
        .join("\n")
    );
    assert_eq!(
        list(&["-S", "FLANNEL-FWD"])?.trim(),
        [
            "-N FLANNEL-FWD".to_string(),
            format!("-A FLANNEL-FWD -s {network} {forward} -j ACCEPT"),
            format!("-A FLANNEL-FWD -d {network} {forward} -j ACCEPT"),
        ]
        .join("\n")
    );
    assert!(
        list(&["-t", "nat", "-S", "POSTROUTING"])?
            .contains(&format!("-A POSTROUTING {masq} -j FLANNEL-POSTRTG"))
    );
    assert!(list(&["-S", "FORWARD"])?.contains(&format!("-A FORWARD {forward} -j FLANNEL-FWD")));
    Ok(())
}

/// flannel's jump from nat `POSTROUTING` into its masquerade chain, as iptables arguments.
const MASQUERADE_JUMP: [&str; 6] = [
    "-m",
    "comment",
    "--comment",
    "flanneld masq",
    "-j",
    "FLANNEL-POSTRTG",
];

/// What someone else might do to our rules in `command`'s tables: flush the forward chain and
/// remove the jump into the masquerade chain.
fn damage_flannels_chains(host: &Host, command: &str) -> Result<()> {
    host.netns.exec(&[command, "-F", "FLANNEL-FWD"])?;
    host.netns.exec(
        &[
            &[command, "-t", "nat", "-D", "POSTROUTING"][..],
            &MASQUERADE_JUMP,
        ]
        .concat(),
    )?;
    Ok(())
}

/// `overlay-agent teardown` on `host`, which must succeed.
fn teardown(host: &Host) -> Result<()> {
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
    Ok(())
}

#[test]
fn flannels_iptables_chains_are_kept_and_restored() -> Result<()> {
    let seed = Seed::start(
        "iptables",
        &["--dataplane=kernel", "--ip-masq", "--iptables-resync=1"],
    )?;
    let host = &seed.host1;
    assert_flannels_chains(
        host,
        "iptables",
        "10.2.0.0/16",
        "10.2.41.0/24",
        "224.0.0.0/4",
    )?;
    assert!(
        host.netns
            .exec_unchecked(&["nft", "list", "table", "ip", "flannel-ipv4"])?
            .status
            .code()
            != Some(0),
        "no nftables table in iptables mode"
    );

    // Someone flushes our chain and removes our jump: both come back within the resync period.
    damage_flannels_chains(host, "iptables")?;
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

/// A second jump into our masquerade chain, left by hand or by another tool, is deleted: one
/// jump stays, and the rules are restored once, not at every check.
#[test]
fn a_duplicated_jump_into_our_chain_is_collapsed_to_one() -> Result<()> {
    let (_cluster, host, agent) = masquerading_host("dupjump")?;
    let jumps = || -> Result<usize> {
        Ok(host
            .iptables(&["-t", "nat", "-S", "POSTROUTING"])?
            .lines()
            .filter(|line| line.ends_with("-j FLANNEL-POSTRTG"))
            .count())
    };
    wait_for("the jump into FLANNEL-POSTRTG", RESYNC_TIMEOUT, || {
        Ok(jumps()? == 1)
    })?;
    host.iptables(&[&["-t", "nat", "-A", "POSTROUTING"][..], &MASQUERADE_JUMP].concat())?;
    assert_eq!(jumps()?, 2, "the copy is in place");

    wait_for(
        "one jump into FLANNEL-POSTRTG again",
        RESYNC_TIMEOUT,
        || Ok(jumps()? == 1),
    )
    .with_context(|| format!("agent log:\n{}", agent.log()))?;
    let restorations = || agent.count_in_log("rules were changed or removed; restoring them");
    let restored = restorations();
    std::thread::sleep(TWO_RESYNCS + TWO_RESYNCS);
    assert_eq!(restorations(), restored, "{}", agent.log());
    assert_eq!(jumps()?, 1);
    Ok(())
}

/// What others write next to our chains is theirs: a jump into our masquerade chain with a
/// match of its own, and a chain whose name begins with ours, jumped to from FORWARD. The
/// agent leaves both alone, and sees no change in them: it restores nothing at its checks,
/// until our own jump goes.
#[test]
fn jumps_and_chains_of_others_next_to_ours_are_left_alone() -> Result<()> {
    let (_cluster, host, agent) = masquerading_host("foreignjump")?;
    wait_for("the jump into FLANNEL-POSTRTG", RESYNC_TIMEOUT, || {
        Ok(host
            .iptables(&["-t", "nat", "-S", "POSTROUTING"])?
            .contains("-j FLANNEL-POSTRTG"))
    })?;
    let restorations = || agent.count_in_log("rules were changed or removed; restoring them");
    let restored = restorations();
    let our_jump = "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG";
    let foreign_jump = "-A POSTROUTING -o eth0 -j FLANNEL-POSTRTG";
    let foreign_chain = "-A FLANNEL-FWD-LOCAL -s 192.0.2.0/24 -j ACCEPT";
    host.iptables(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "eth0",
        "-j",
        "FLANNEL-POSTRTG",
    ])?;
    host.iptables(&["-N", "FLANNEL-FWD-LOCAL"])?;
    host.iptables(&[
        "-A",
        "FLANNEL-FWD-LOCAL",
        "-s",
        "192.0.2.0/24",
        "-j",
        "ACCEPT",
    ])?;
    host.iptables(&["-A", "FORWARD", "-j", "FLANNEL-FWD-LOCAL"])?;

    std::thread::sleep(TWO_RESYNCS + TWO_RESYNCS);
    assert_eq!(restorations(), restored, "{}", agent.log());
    let nat = host.iptables(&["-t", "nat", "-S"])?;
    assert!(nat.contains(foreign_jump), "{nat}");
    assert!(nat.contains(our_jump), "{nat}");
    let filter = host.iptables(&["-S"])?;
    assert!(filter.contains(foreign_chain), "{filter}");
    assert!(
        filter.contains("-A FORWARD -j FLANNEL-FWD-LOCAL"),
        "{filter}"
    );

    // The checks do run, and among the others' rules they still see one of ours go.
    host.iptables(&[&["-t", "nat", "-D", "POSTROUTING"][..], &MASQUERADE_JUMP].concat())?;
    wait_for("our jump restored", RESYNC_TIMEOUT, || {
        Ok(host.iptables(&["-t", "nat", "-S"])?.contains(our_jump))
    })
    .with_context(|| format!("agent log:\n{}", agent.log()))?;
    assert_eq!(restorations(), restored + 1, "{}", agent.log());
    let nat = host.iptables(&["-t", "nat", "-S"])?;
    assert!(nat.contains(foreign_jump), "{nat}");
    Ok(())
}

/// A node that masqueraded before and no longer does (`--ip-masq` off), where someone else's
/// rule jumps into the old masquerade chain: the agent starts, empties the chain it no longer
/// wants and leaves their rule; the kernel keeps the chain while that rule is there, and the
/// agent says so once, not at every check. Once their rule goes, so does the chain. With
/// iptables-nft and with iptables-legacy.
#[test]
fn a_chain_no_longer_wanted_stays_empty_while_others_jump_to_it() -> Result<()> {
    for (tag, command) in [
        ("unwanted", "iptables"),
        ("unwanted-legacy", "iptables-legacy"),
    ] {
        let (cluster, host) = lone_host(tag)?;
        let path = host.legacy_iptables_path()?;
        let envs = match command {
            "iptables-legacy" => vec![("PATH", path.as_str())],
            _ => Vec::new(),
        };
        let nat = |args: &[&str]| {
            host.netns
                .exec(&[&[command, "-t", "nat"][..], args].concat())
        };
        let foreign_jump = ["POSTROUTING", "-o", "eth0", "-j", "FLANNEL-POSTRTG"];
        // What a masquerading run left, and someone else's jump into it.
        nat(&["-N", "FLANNEL-POSTRTG"])?;
        nat(&["-A", "FLANNEL-POSTRTG", "-s", "10.2.0.0/16", "-j", "RETURN"])?;
        nat(&[&["-A", "POSTROUTING"][..], &MASQUERADE_JUMP].concat())?;
        nat(&[&["-A"][..], &foreign_jump].concat())?;

        let flags = Agent::flags(&cluster, &host, &["--dataplane=kernel", RESYNC_FLAG]);
        let mut agent = Agent::start_with(&host, &flags, &envs)?;
        agent
            .wait_ready()
            .with_context(|| format!("{command}: agent log:\n{}", agent.log()))?;
        std::thread::sleep(TWO_RESYNCS + TWO_RESYNCS);
        let listed = nat(&["-S"])?;
        let ours: Vec<&str> = listed
            .lines()
            .filter(|line| line.contains("FLANNEL-POSTRTG") && !line.contains("-o eth0"))
            .collect();
        assert_eq!(ours, ["-N FLANNEL-POSTRTG"], "{command}:\n{listed}");
        assert!(
            listed.contains("-A POSTROUTING -o eth0 -j FLANNEL-POSTRTG"),
            "{command}:\n{listed}"
        );
        assert_eq!(
            agent.count_in_log("rules we did not write jump to it"),
            1,
            "{command}: {}",
            agent.log()
        );
        assert_eq!(
            agent.count_in_log("cannot"),
            0,
            "{command}: {}",
            agent.log()
        );

        nat(&[&["-D"][..], &foreign_jump].concat())?;
        wait_for("the chain no longer wanted removed", RESYNC_TIMEOUT, || {
            Ok(!nat(&["-S"])?.contains("FLANNEL-POSTRTG"))
        })
        .with_context(|| format!("{command}: agent log:\n{}", agent.log()))?;
    }
    Ok(())
}

/// An xtables lock held by someone else while the agent starts (iptables-legacy waits 5 s
/// for it, then gives up) delays the rules, not the node: the agent becomes ready, says it
/// cannot write them yet, and writes them at the first check after the lock is free, as
/// flanneld does. The lock is one of the test's own (`XTABLES_LOCKFILE`), not the machine's.
#[test]
fn a_held_xtables_lock_at_start_delays_the_rules_not_the_node() -> Result<()> {
    let (cluster, host) = lone_host("xtables-lock")?;
    let lock_path = cluster.scratch.path().join("xtables.lock");
    let lock = std::fs::File::create(&lock_path)?;
    lock.lock()?;
    let (path, lock_file) = (
        host.legacy_iptables_path()?,
        lock_path.display().to_string(),
    );
    let envs = [
        ("PATH", path.as_str()),
        ("XTABLES_LOCKFILE", lock_file.as_str()),
    ];
    let flags = Agent::flags(
        &cluster,
        &host,
        &["--dataplane=kernel", "--ip-masq", RESYNC_FLAG],
    );
    let mut agent = Agent::start_with(&host, &flags, &envs)?;
    agent
        .wait_ready()
        .with_context(|| format!("agent log:\n{}", agent.log()))?;
    let log = agent.log();
    assert!(
        log.contains("cannot write the forward and masquerade rules yet")
            && log.contains("holding the xtables lock"),
        "{log}"
    );

    drop(lock);
    let nat = || host.netns.exec(&["iptables-legacy", "-t", "nat", "-S"]);
    wait_for(
        "the rules written once the lock is free",
        RESYNC_TIMEOUT,
        || {
            let listed = nat()?;
            Ok(listed.contains("-N FLANNEL-POSTRTG") && listed.contains("-j FLANNEL-POSTRTG"))
        },
    )
    .with_context(|| format!("agent log:\n{}", agent.log()))?;
    Ok(())
}

/// `--iptables-forward-rules=false` on a node where an earlier run wrote FLANNEL-FWD: the
/// chain goes, and the jump into it, as a chain no longer wanted does.
#[test]
fn forward_rules_turned_off_since_an_earlier_run_are_removed() -> Result<()> {
    let (cluster, host) = lone_host("no-forward")?;
    let forward_lines = || -> Result<Vec<String>> {
        Ok(flannel_lines(&host, "iptables-save")?
            .into_iter()
            .filter(|line| line.contains("FLANNEL-FWD"))
            .collect())
    };
    let mut agent = Agent::start(&cluster, &host, &["--dataplane=kernel"])?;
    agent.wait_ready()?;
    agent.process.terminate(EVENT_TIMEOUT)?;
    let left = forward_lines()?;
    assert!(
        left.iter().any(|line| line.starts_with(":FLANNEL-FWD"))
            && left.iter().any(|line| line.starts_with("-A FORWARD")),
        "the first run left no FLANNEL-FWD and jump: {left:?}"
    );

    let flags = ["--dataplane=kernel", "--iptables-forward-rules=false"];
    let mut agent = Agent::start(&cluster, &host, &flags)?;
    agent.wait_ready()?;
    let left = forward_lines()?;
    assert!(left.is_empty(), "{left:?}\n{}", agent.log());
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

// The IPv6 half of the rules, driven through the agent's masquerade module in a host namespace
// of the test's own: the agent takes no `EnableIPv6` yet. Teardown is the agent's own.

/// The seed's IPv4 networks for host1.
fn seed_ipv4() -> Result<Networks<Ipv4Network>> {
    Ok(Networks {
        network: "10.2.0.0/16".parse()?,
        subnet: "10.2.41.0/24".parse()?,
    })
}

/// An IPv6 overlay beside the seed's, host1 leasing one /64 of it.
fn seed_ipv6() -> Result<Networks<Ipv6Network>> {
    Ok(Networks {
        network: "fc00::/48".parse()?,
        subnet: "fc00:0:0:41::/64".parse()?,
    })
}

/// Every rule, in both families.
fn dual_stack_rules() -> Result<Rules> {
    Ok(Rules {
        ipv4: Some(seed_ipv4()?),
        ipv6: Some(seed_ipv6()?),
        masquerade: true,
        forward: true,
        fully_random: true,
    })
}

/// A host namespace of its own, without an agent.
fn lone_host(tag: &str) -> Result<(Cluster, Host)> {
    let mut cluster = Cluster::new(tag)?;
    let host = cluster.add_host("host1", "172.20.62.104")?;
    Ok((cluster, host))
}

/// A lone host whose kernel-mode agent masquerades and checks its rules every second, ready.
fn masquerading_host(tag: &str) -> Result<(Cluster, Host, Agent)> {
    let (cluster, host) = lone_host(tag)?;
    let mut agent = Agent::start(
        &cluster,
        &host,
        &["--dataplane=kernel", "--ip-masq", RESYNC_FLAG],
    )?;
    agent.wait_ready()?;
    Ok((cluster, host, agent))
}

/// The module's `Masquerade` for `rules`, made inside `host`: it asks the host's iptables
/// what they support.
fn masquerade_on(host: &Host, rules: Rules, backend: Backend) -> Result<Masquerade> {
    host.netns
        .run_inside(|| Ok(Masquerade::new(rules, backend)))
}

/// One resync's `ensure`, inside `host`.
fn ensure_on(host: &Host, masquerade: &mut Masquerade) -> Result<()> {
    host.netns.run_inside(|| masquerade.ensure())
}

/// Our chains and the jumps into them, as `ip6tables-save` or `iptables-save` lists them.
fn flannel_lines(host: &Host, save: &str) -> Result<Vec<String>> {
    Ok(host
        .netns
        .exec(&[save])?
        .lines()
        .filter(|line| line.contains("FLANNEL-"))
        .map(str::to_string)
        .collect())
}

#[test]
fn flannels_ip6tables_chains_are_written_restored_and_torn_down() -> Result<()> {
    let (_cluster, host) = lone_host("v6-iptables")?;
    let mut masquerade = masquerade_on(&host, dual_stack_rules()?, Backend::Iptables)?;
    ensure_on(&host, &mut masquerade)?;
    assert_flannels_chains(
        &host,
        "ip6tables",
        "fc00::/48",
        "fc00:0:0:41::/64",
        "ff00::/8",
    )?;
    assert_flannels_chains(
        &host,
        "iptables",
        "10.2.0.0/16",
        "10.2.41.0/24",
        "224.0.0.0/4",
    )?;

    // Someone flushes the IPv6 forward chain and removes the IPv6 masquerade jump: the next
    // check puts both back, and leaves IPv4 as it was.
    let (ipv6_before, ipv4_before) = (
        flannel_lines(&host, "ip6tables-save")?,
        flannel_lines(&host, "iptables-save")?,
    );
    damage_flannels_chains(&host, "ip6tables")?;
    ensure_on(&host, &mut masquerade)?;
    assert_eq!(flannel_lines(&host, "ip6tables-save")?, ipv6_before);
    assert_eq!(flannel_lines(&host, "iptables-save")?, ipv4_before);

    teardown(&host)?;
    for save in ["ip6tables-save", "iptables-save"] {
        let left = flannel_lines(&host, save)?;
        assert!(left.is_empty(), "teardown leaves in {save}: {left:?}");
    }
    Ok(())
}

fn nft_table(host: &Host, family: &str, name: &str) -> Result<Option<String>> {
    let output = host
        .netns
        .exec_unchecked(&["nft", "list", "table", family, name])?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// An IPv6-only network in nftables mode: only `ip6 flannel-ipv6`, flannel's rules in it, and
/// nothing of ours in IPv4, not even what an earlier dual-stack run in iptables mode left.
#[test]
fn ipv6_only_network_gets_only_flannels_ip6_nftables_table() -> Result<()> {
    let (_cluster, host) = lone_host("v6-nft")?;
    let mut earlier = masquerade_on(&host, dual_stack_rules()?, Backend::Iptables)?;
    ensure_on(&host, &mut earlier)?;
    let ipv6_only = Rules {
        ipv4: None,
        ..dual_stack_rules()?
    };
    let mut masquerade = masquerade_on(&host, ipv6_only, Backend::Nftables)?;
    ensure_on(&host, &mut masquerade)?;

    let table = nft_table(&host, "ip6", "flannel-ipv6")?.context("no ip6 flannel-ipv6")?;
    for rule in [
        "comment \"rules for flannel-ipv6\"",
        "type filter hook forward priority filter; policy accept;",
        "ip6 saddr fc00::/48 accept",
        "ip6 daddr fc00::/48 accept",
        "type nat hook postrouting priority srcnat; policy accept;",
        "meta mark 0x00004000 return",
        "ip6 saddr fc00:0:0:41::/64 ip6 daddr fc00::/48 return",
        "ip6 saddr fc00::/48 ip6 daddr fc00:0:0:41::/64 return",
        "ip6 saddr != fc00:0:0:41::/64 ip6 daddr fc00::/48 return",
        "ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random",
        "ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade fully-random",
    ] {
        assert!(table.contains(rule), "no {rule:?} in\n{table}");
    }
    let ruleset = host.netns.exec(&["nft", "list", "ruleset"])?;
    assert!(
        !ruleset.contains("FLANNEL-") && !ruleset.contains("flannel-ipv4"),
        "nothing of ours but the ip6 table:\n{ruleset}"
    );

    host.netns
        .exec(&["nft", "delete", "table", "ip6", "flannel-ipv6"])?;
    ensure_on(&host, &mut masquerade)?;
    assert_eq!(
        nft_table(&host, "ip6", "flannel-ipv6")?.as_deref(),
        Some(table.as_str()),
        "restored as it was"
    );

    teardown(&host)?;
    assert_eq!(nft_table(&host, "ip6", "flannel-ipv6")?, None);
    Ok(())
}

/// Docker sets ip6tables' FORWARD policy to DROP when its IPv6 support is on: in nftables
/// mode flannel's forward chain then goes into ip6tables too, and only there while IPv4's
/// policy stays ACCEPT.
#[test]
fn nftables_mode_follows_ip6tables_forward_policy() -> Result<()> {
    let (_cluster, host) = lone_host("v6-policy")?;
    let mut masquerade = masquerade_on(&host, dual_stack_rules()?, Backend::Nftables)?;
    ensure_on(&host, &mut masquerade)?;
    assert!(flannel_lines(&host, "ip6tables-save")?.is_empty());

    host.ip6tables(&["-P", "FORWARD", "DROP"])?;
    ensure_on(&host, &mut masquerade)?;
    assert_eq!(
        host.ip6tables(&["-S", "FLANNEL-FWD"])?.trim(),
        [
            "-N FLANNEL-FWD",
            "-A FLANNEL-FWD -s fc00::/48 -m comment --comment \"flanneld forward\" -j ACCEPT",
            "-A FLANNEL-FWD -d fc00::/48 -m comment --comment \"flanneld forward\" -j ACCEPT",
        ]
        .join("\n")
    );
    assert!(
        flannel_lines(&host, "iptables-save")?.is_empty(),
        "IPv4's policy is ACCEPT"
    );

    host.ip6tables(&["-P", "FORWARD", "ACCEPT"])?;
    ensure_on(&host, &mut masquerade)?;
    assert!(flannel_lines(&host, "ip6tables-save")?.is_empty());

    host.ip6tables(&["-P", "FORWARD", "DROP"])?;
    ensure_on(&host, &mut masquerade)?;
    teardown(&host)?;
    let forward = host.ip6tables(&["-S"])?;
    assert!(
        !forward.contains("FLANNEL-FWD") && forward.contains("-P FORWARD DROP"),
        "teardown removes our chain and leaves the policy:\n{forward}"
    );
    for (family, name) in [("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")] {
        assert_eq!(nft_table(&host, family, name)?, None, "{family} {name}");
    }
    Ok(())
}
