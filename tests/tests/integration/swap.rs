//! Swapping flanneld for overlay-agent on a live node, and back: host1 starts as flanneld
//! leaves a node (flannel.1 with its MAC, its lease in etcd under a 24 h etcd lease, routes,
//! neighbours, FDB entries, flanneld's FLANNEL-POSTRTG and FLANNEL-FWD chains), as does host2.
//! While a container on host2 pings one on host1 100 times a second, host1 is taken over by
//! the agent and handed back to no agent at all, as an operator would before starting flanneld
//! again. No ping is lost, the lease and flannel.1 (same device, same MAC) stay, flanneld's
//! rules are never absent, and the node is left as flanneld left it. Under a flood ping from
//! host1 to its container, the takeover loses none of a million.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::Agent,
    attached::{tc_filters, tcx_programs},
    cluster::{Cluster, Host},
    loss::{LossWindow, flood_ping, steady_ping},
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2},
    stock_flannel::{self, Peer, add_flanneld_rules},
};

const NETWORK: &str = "10.2.0.0/16";
const MAC1: &str = "1a:06:15:fe:26:6e";
const MAC2: &str = "1a:4b:d7:f7:16:89";
/// 100 pings a second for 20 s: long enough for every swap of a test.
const PINGS: u32 = 2000;
const SETTLE: Duration = Duration::from_secs(1);
/// About five seconds of a flood ping on the host's own path to a container, here.
const FLOOD_PINGS: u32 = 1_000_000;
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const EBPF: &[&str] = &["--ip-masq"];
const KERNEL: &[&str] = &["--ip-masq", "--dataplane=kernel"];

/// Which iptables the hosts use, flanneld and the agent alike.
#[derive(Clone, Copy)]
enum Iptables {
    Nft,
    Legacy,
}

impl Iptables {
    fn command(self) -> &'static str {
        match self {
            Self::Nft => "iptables",
            Self::Legacy => "iptables-legacy",
        }
    }
}

/// Two hosts as flanneld leaves them, each with a container.
struct StockPair {
    cluster: Cluster,
    host1: Host,
    host2: Host,
    bbox1: Container,
    bbox2: Container,
    iptables: Iptables,
}

impl StockPair {
    fn start(tag: &str, iptables: Iptables) -> Result<Self> {
        let mut cluster = Cluster::new(tag)?;
        let host1 = cluster.add_host("host1", HOST1)?;
        let host2 = cluster.add_host("host2", HOST2)?;
        for (host, subnet, mac, peer) in [
            (&host1, SUBNET1, MAC1, (SUBNET2, HOST2, MAC2)),
            (&host2, SUBNET2, MAC2, (SUBNET1, HOST1, MAC1)),
        ] {
            let (peer_subnet, public_ip, vtep_mac) = peer;
            let peer = Peer {
                subnet: peer_subnet,
                public_ip,
                vtep_mac,
            };
            stock_flannel::configure(&cluster, host, subnet, mac, &[peer])?;
            add_flanneld_rules(host, iptables.command(), NETWORK, subnet)?;
        }
        // flanneld's subnet file, which the agent reads the previous subnet from.
        std::fs::write(
            host1.subnet_file(),
            format!(
                "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET=10.2.41.1/24\nFLANNEL_MTU=1450\n\
                 FLANNEL_IPMASQ=true\n"
            ),
        )?;
        let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
        let bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;
        bbox2.ping(BBOX1, 2)?;
        Ok(Self {
            cluster,
            host1,
            host2,
            bbox1,
            bbox2,
            iptables,
        })
    }

    fn lease1(&self) -> Result<String> {
        self.cluster
            .etcd
            .get(&self.cluster.subnet_key(SUBNET1))?
            .context("host1 has no lease record")
    }

    /// Runs `swap` on host1 while bbox2 pings bbox1 100 times a second and another thread
    /// lists host1's iptables rules in a tight loop; fails on a lost ping or a listing that
    /// lacked one of flanneld's rules.
    fn under_steady_ping(&self, swap: impl FnOnce() -> Result<()>) -> Result<()> {
        let expected = flanneld_rules(&self.host1, self.iptables)?;
        ensure!(expected.len() == 10, "flanneld's rules: {expected:#?}");
        let namespaces = [
            &self.cluster.underlay,
            &self.host1.netns,
            &self.host2.netns,
            &self.bbox1.netns,
            &self.bbox2.netns,
        ];
        // A device's drop on the path (flannel.1 without an FDB entry, say) is the swap's
        // doing, never an excuse.
        let window = LossWindow::open(&namespaces, &[])?.excused_by_backlog_only();
        let ping = steady_ping(&self.cluster, &self.bbox2, BBOX1, PINGS)?;
        let done = AtomicBool::new(false);
        let (swapped, polls) = thread::scope(|scope| {
            let poller = scope.spawn(|| poll_rules(&self.host1, self.iptables, &expected, &done));
            thread::sleep(SETTLE);
            let swapped = swap();
            thread::sleep(SETTLE);
            done.store(true, Ordering::Relaxed);
            let polls = poller.join().expect("the poller does not panic");
            (swapped, polls)
        });
        swapped?;
        let (polls, incomplete) = polls?;
        // Both judged, so that a failure names every way the swap fell short.
        let failures: Vec<String> = [
            window.assert_no_loss(ping, PINGS, &[]),
            rules_never_absent(polls, &incomplete),
        ]
        .into_iter()
        .filter_map(|outcome| outcome.err().map(|error| format!("{error:#}")))
        .collect();
        ensure!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    }
}

/// Fails unless enough listings were taken and none lacked a rule.
fn rules_never_absent(polls: usize, incomplete: &[Vec<String>]) -> Result<()> {
    ensure!(polls >= 20, "only {polls} listings of the rules");
    ensure!(
        incomplete.is_empty(),
        "{} of {polls} listings during the swap lacked flanneld's rules, the first: {:#?}",
        incomplete.len(),
        incomplete[0]
    );
    Ok(())
}

/// The rules of `iptables -t nat -S` and `iptables -S` that name flanneld's chains.
fn flanneld_rules(host: &Host, iptables: Iptables) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    for table in ["nat", "filter"] {
        // Waiting for the xtables lock iptables-legacy takes, as the agent's commands do.
        let listing = host
            .netns
            .exec(&[iptables.command(), "-w", "-t", table, "-S"])?;
        lines.extend(
            listing
                .lines()
                .filter(|line| line.starts_with("-A ") && line.contains("FLANNEL-"))
                .map(str::to_string),
        );
    }
    Ok(lines)
}

/// Lists `host`'s rules until `done`; returns how many listings it made and the rules each
/// incomplete one lacked.
fn poll_rules(
    host: &Host,
    iptables: Iptables,
    expected: &[String],
    done: &AtomicBool,
) -> Result<(usize, Vec<Vec<String>>)> {
    let (mut polls, mut incomplete) = (0, Vec::new());
    while !done.load(Ordering::Relaxed) {
        let listed = flanneld_rules(host, iptables)?;
        let missing: Vec<String> = expected
            .iter()
            .filter(|rule| !listed.contains(rule))
            .cloned()
            .collect();
        if !missing.is_empty() {
            incomplete.push(missing);
        }
        polls += 1;
    }
    Ok((polls, incomplete))
}

/// What flanneld needs of host1's kernel to carry the overlay, and what shows flannel.1 was
/// never made anew (its index), as listed by ip, bridge and iptables.
fn kernel_state(host: &Host, iptables: Iptables) -> Result<Vec<(&'static str, String)>> {
    let ns = &host.netns;
    Ok(vec![
        (
            "flannel.1",
            ns.ip(&["-d", "-o", "link", "show", "flannel.1"])?,
        ),
        (
            "its addresses",
            ns.ip(&["-o", "addr", "show", "dev", "flannel.1"])?,
        ),
        ("routes", ns.ip(&["route", "show"])?),
        ("neighbours", ns.ip(&["neigh", "show", "dev", "flannel.1"])?),
        (
            "FDB",
            ns.exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?,
        ),
        (
            "flanneld's rules",
            flanneld_rules(host, iptables)?.join("\n"),
        ),
    ])
}

/// Fails unless host1 is as flanneld left it, carries no program of ours, and bbox2 still
/// reaches bbox1 with no agent running.
fn assert_left_as_flanneld_left_it(
    pair: &StockPair,
    stock: &[(&str, String)],
    lease: &str,
) -> Result<()> {
    let now = kernel_state(&pair.host1, pair.iptables)?;
    for ((what, before), (_, after)) in stock.iter().zip(now) {
        ensure!(
            *before == after,
            "host1's {what} changed:\nbefore:\n{before}\nafter:\n{after}"
        );
    }
    ensure!(pair.lease1()? == lease, "host1's lease changed");
    let ns = &pair.host1.netns;
    let (filters, programs) = (tc_filters(ns)?, tcx_programs(ns)?);
    ensure!(
        filters.is_empty() && programs.is_empty(),
        "programs of ours stay attached: {filters:#?} {programs:#?}"
    );
    let ping = pair.bbox2.ping(BBOX1, 3)?;
    ensure!(ping.contains("ttl=62"), "with no agent:\n{ping}");
    Ok(())
}

/// Starts the agent on host1 with `flags`, on the pair's iptables, and waits until it has
/// taken its old lease.
fn take_over(pair: &StockPair, flags: &[&str]) -> Result<Agent> {
    let flags = Agent::flags(&pair.cluster, &pair.host1, flags);
    let mut agent = match pair.iptables {
        Iptables::Nft => Agent::start_with(&pair.host1, &flags, &[])?,
        Iptables::Legacy => {
            let path = pair.host1.legacy_iptables_path()?;
            Agent::start_with(&pair.host1, &flags, &[("PATH", &path)])?
        }
    };
    ensure!(agent.wait_ready()? == SUBNET1, "{}", agent.log());
    Ok(agent)
}

/// Stops `agent` with SIGTERM, as systemd does; fails unless it exits cleanly.
fn stop(mut agent: Agent) -> Result<String> {
    let status = agent.process.terminate(STOP_TIMEOUT)?;
    ensure!(status.success(), "{status}:\n{}", agent.log());
    Ok(agent.log())
}

/// Swaps host1 of a pair on `iptables` to the agent with `flags` and back, through each
/// agent of `agents`, started and stopped in turn; fails unless it loses no ping, keeps
/// flanneld's rules throughout and leaves the node as flanneld left it.
fn swap_and_back(tag: &str, iptables: Iptables, agents: &[&[&str]]) -> Result<()> {
    let pair = StockPair::start(tag, iptables)?;
    let (stock, lease) = (kernel_state(&pair.host1, iptables)?, pair.lease1()?);
    let mut logs = Vec::new();
    pair.under_steady_ping(|| {
        for flags in agents {
            logs.push(stop(take_over(&pair, flags)?)?);
        }
        Ok(())
    })
    .with_context(|| format!("the agents' logs:\n{}", logs.join("\n----\n")))?;
    ensure!(
        !logs.iter().any(|log| log.contains("recreating")),
        "flannel.1 was made anew:\n{}",
        logs.join("\n----\n")
    );
    assert_left_as_flanneld_left_it(&pair, &stock, &lease)
}

/// Back through kernel mode, which puts the kernel's path in place before it removes our
/// programs; stopped, it leaves the node to flanneld.
#[test]
fn a_flanneld_node_swapped_to_the_ebpf_dataplane_and_back_loses_no_ping() -> Result<()> {
    swap_and_back("swap-ebpf", Iptables::Nft, &[EBPF, KERNEL])
}

#[test]
fn a_flanneld_node_swapped_to_the_kernel_dataplane_and_back_loses_no_ping() -> Result<()> {
    swap_and_back("swap-kernel", Iptables::Nft, &[KERNEL])
}

#[test]
fn a_flanneld_node_on_iptables_legacy_swapped_and_back_loses_no_ping() -> Result<()> {
    swap_and_back("swap-legacy", Iptables::Legacy, &[EBPF, KERNEL])
}

/// host1 pings bbox1 in a flood, a packet on bbox1's port every few microseconds, while the
/// agent takes the node over from flanneld: putting the checks on a live container port must
/// not drop what the port is sending at that instant.
#[test]
fn taking_over_a_busy_container_port_drops_none_of_its_packets() -> Result<()> {
    let pair = StockPair::start("swap-flood", Iptables::Nft)?;
    let namespaces = [&pair.host1.netns, &pair.bbox1.netns];
    let window = LossWindow::open(&namespaces, &[])?.excused_by_backlog_only();
    let mut flood = flood_ping(&pair.cluster, &pair.host1.netns, BBOX1, FLOOD_PINGS)?;
    thread::sleep(SETTLE);
    let log = stop(take_over(&pair, EBPF)?)?;
    ensure!(
        flood.try_exit_status()?.is_none(),
        "the flood ended before the agent was done taking over: raise FLOOD_PINGS\n{}",
        flood.log()
    );
    window
        .assert_no_loss(flood, FLOOD_PINGS, &[])
        .with_context(|| format!("the agent's log:\n{log}"))
}

/// flannel.1's index and whether it learns, from `ip -d link show`.
fn vtep_index_and_learning(host: &Host) -> Result<(String, bool)> {
    let device = host.netns.ip(&["-d", "-o", "link", "show", "flannel.1"])?;
    let index = device
        .split(':')
        .next()
        .context("ip printed no index")?
        .to_string();
    Ok((index, !device.contains("nolearning")))
}

/// A flannel.1 that learns where the network config says it must not (flanneld made it
/// under a config with `Learning`, since changed) is changed in place, not made anew.
#[test]
fn a_flanneld_vtep_that_learns_is_changed_in_place() -> Result<()> {
    let pair = StockPair::start("swap-learning", Iptables::Nft)?;
    let host1 = &pair.host1;
    host1
        .netns
        .ip(&["link", "set", "flannel.1", "type", "vxlan", "learning"])?;
    let (index, learning) = vtep_index_and_learning(host1)?;
    ensure!(learning, "the stock device learns before the agent starts");
    let log = stop(take_over(&pair, KERNEL)?)?;
    let (after, learning) = vtep_index_and_learning(host1)?;
    ensure!(
        after == index && !learning,
        "flannel.1 (index {index}) is index {after}, learning {learning}:\n{log}"
    );
    Ok(())
}
