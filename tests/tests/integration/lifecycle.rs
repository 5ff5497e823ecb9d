//! What an earlier run or another agent left behind never breaks forwarding: a node switched
//! to kernel mode or to another pin directory keeps none of the old programs, the netlink tc
//! path of kernels before 6.6 carries the seed, survives a crash and leaves nothing on
//! teardown, and agents in two namespaces never share pins. The guard of flannel-v6.1's socket
//! follows its device as flannel.1's does.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::Agent,
    attached::{
        ensure_links_adopted, link_exists, link_pin_name, pinned_links, tc_filters, tcx_programs,
    },
    cluster::{Cluster, Host},
    ipv6::{BBOX1_V6, BBOX2_V6, SUBNET1_V6},
    loss::{LossWindow, steady_ping},
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2, Seed, check_seed_path},
    wait::wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(20);
const TC_NETLINK: &str = "--tc-attach=netlink";
const TC_TCX: &str = "--tc-attach=tcx";
const TC_AUTO: &str = "--tc-attach=auto";
const HOST3: &str = "172.20.62.106";
const SUBNET3: &str = "10.2.63.0/24";
const BBOX3: &str = "10.2.63.2";

/// `flags` with `--bpf-pin-dir` set to `dir`, or left out (the agent's default) for `None`.
fn with_pin_dir(flags: Vec<String>, dir: Option<&Path>) -> Vec<String> {
    let mut flags: Vec<String> = flags
        .into_iter()
        .filter(|flag| !flag.starts_with("--bpf-pin-dir="))
        .collect();
    flags.extend(dir.map(|dir| format!("--bpf-pin-dir={}", dir.display())));
    flags
}

fn ping_ttl_62(from: &Container, to: &str) -> Result<()> {
    let ping = from.ping(to, 3)?;
    ensure!(
        ping.matches("ttl=62").count() == 3,
        "{} to {to}:\n{ping}",
        from.address
    );
    Ok(())
}

/// A third host joins after the seed, with its own agent and a container; host1's bbox1
/// must reach it through the overlay.
fn third_host_answers_bbox1(seed: &mut Seed) -> Result<()> {
    seed.cluster.reserve(SUBNET3, HOST3)?;
    let host3 = seed.cluster.add_host("host3", HOST3)?;
    let mut agent3 = Agent::start(&seed.cluster, &host3, &[])?;
    ensure!(agent3.wait_ready()? == SUBNET3, "host3 got another subnet");
    let _bbox3 = Container::attach(&host3, "bbox3", BBOX3)?;
    wait_for("host1's route to host3's lease", TIMEOUT, || {
        seed.host1.netns.has_route(SUBNET3)
    })?;
    let ping = seed.bbox1.ping(BBOX3, 3)?;
    ensure!(
        ping.matches("ttl=62").count() == 3,
        "bbox1 to bbox3:\n{ping}"
    );
    Ok(())
}

#[test]
fn an_ebpf_node_restarted_in_kernel_mode_keeps_none_of_our_programs() -> Result<()> {
    let mut seed = Seed::start("to-kernel", &[])?;
    let links = pinned_links(&seed.host1.pin_dir())?;
    ensure!(!links.is_empty(), "the ebpf run pinned no link");
    seed.agent1.process.terminate(TIMEOUT)?;

    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &["--dataplane=kernel"])?;
    assert_eq!(seed.agent1.wait_ready()?, SUBNET1);
    assert!(
        links.iter().all(|(_, id)| !link_exists(*id)),
        "every link of the ebpf run is gone: {links:?}\n{}",
        seed.agent1.log()
    );
    assert_eq!(tcx_programs(&seed.host1.netns)?, Vec::<String>::new());
    assert!(!seed.host1.pin_dir().exists(), "the pins are gone");
    third_host_answers_bbox1(&mut seed)
}

/// The guard on flannel-v6.1's ingress, as tcx lists it.
const GUARD6: &str = "tc_vtep_ingress on flannel-v6.1 ingress";

fn guards_flannel_v6(host: &Host) -> Result<bool> {
    Ok(tcx_programs(&host.netns)?.iter().any(|line| line == GUARD6))
}

/// The guard of flannel-v6.1 is placed with the others, adopted by a restarted agent, placed
/// again on a flannel-v6.1 made anew, and gone in kernel mode.
#[test]
fn the_guard_of_flannel_v6_follows_its_device_and_the_dataplane() -> Result<()> {
    let mut seed = Seed::start_dual_stack("v6-guard", [&[], &[]])?;
    ensure!(
        guards_flannel_v6(&seed.host2)?,
        "{:?}",
        tcx_programs(&seed.host2.netns)?
    );
    let pin = link_pin_name(&seed.host2.netns, "tc_vtep_ingress", "flannel-v6.1")?;
    let links = pinned_links(&seed.host2.pin_dir())?;
    let (_, link) = links
        .iter()
        .find(|(name, _)| *name == pin)
        .with_context(|| format!("no {pin} in {links:?}"))?;

    seed.agent2.process.terminate(TIMEOUT)?;
    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &[])?;
    assert_eq!(seed.agent2.wait_ready()?, SUBNET2);
    ensure_links_adopted(&[(pin, *link)], &seed.host2.pin_dir())
        .with_context(|| format!("agent log:\n{}", seed.agent2.log()))?;

    seed.host2.netns.ip(&["link", "del", "flannel-v6.1"])?;
    wait_for("the guard on the new flannel-v6.1", TIMEOUT, || {
        guards_flannel_v6(&seed.host2)
    })?;
    seed.host2.wait_for_route(SUBNET1_V6)?;
    seed.bbox1.ping6(BBOX2_V6, 2)?;
    seed.bbox2.ping6(BBOX1_V6, 2)?;

    seed.agent2.process.terminate(TIMEOUT)?;
    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &["--dataplane=kernel"])?;
    assert_eq!(seed.agent2.wait_ready()?, SUBNET2);
    assert_eq!(tcx_programs(&seed.host2.netns)?, Vec::<String>::new());
    seed.bbox1.ping6(BBOX2_V6, 2)?;
    Ok(())
}

#[test]
fn an_agent_moved_to_another_pin_directory_detaches_what_the_old_one_attached() -> Result<()> {
    let mut seed = Seed::start("move-pins", &[])?;
    let attached = tcx_programs(&seed.host1.netns)?;
    ensure!(
        attached
            .iter()
            .any(|line| line.starts_with("tc_uplink_ingre")),
        "the uplink program is attached: {attached:?}"
    );
    seed.agent1.process.terminate(TIMEOUT)?;

    let moved = PathBuf::from(format!("{}-moved", seed.host1.pin_dir().display()));
    let _remove_moved = RemoveOnDrop(vec![moved.clone()]);
    let flags = with_pin_dir(Agent::flags(&seed.cluster, &seed.host1, &[]), Some(&moved));
    seed.agent1 = Agent::start_with(&seed.host1, &flags, &[])?;
    assert_eq!(seed.agent1.wait_ready()?, SUBNET1);
    assert_eq!(
        tcx_programs(&seed.host1.netns)?,
        attached,
        "each program once, where it was:\n{}",
        seed.agent1.log()
    );
    assert!(
        seed.agent1
            .log()
            .contains("detached tc_uplink_ingress (tcx) on eth0"),
        "{}",
        seed.agent1.log()
    );
    check_seed_path(&seed.bbox1, BBOX2)?;
    third_host_answers_bbox1(&mut seed)
}

#[test]
fn the_netlink_tc_path_carries_the_seed_through_a_crash_and_leaves_no_filter() -> Result<()> {
    let mut seed = Seed::start("netlink-tc", &[TC_NETLINK])?;
    check_seed_path(&seed.bbox1, BBOX2)?;
    let filters = tc_filters(&seed.host1.netns)?;
    for (device, program) in [
        ("eth0 ingress", "tc_uplink_ingress"),
        ("flannel.1 egress", "tc_vtep_egress"),
        ("flannel.1 ingress", "tc_vtep_ingress"),
        ("docker0 egress", "tc_bridge_egress"),
        ("veth", "tc_container_ingress"),
    ] {
        assert!(
            filters
                .iter()
                .any(|filter| filter.starts_with(device) && filter.contains(program)),
            "{program} is a filter on {device}: {filters:#?}"
        );
    }
    assert_eq!(tcx_programs(&seed.host1.netns)?, Vec::<String>::new());

    // 100 packets a second for 10 s, across a SIGKILL and a restart of host1's agent.
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 1000)?;
    std::thread::sleep(Duration::from_secs(2));
    seed.agent1.process.kill();
    std::thread::sleep(Duration::from_millis(500));
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &[TC_NETLINK])?;
    assert_eq!(seed.agent1.wait_ready()?, SUBNET1);
    let log = seed.agent1.log();
    assert_eq!(
        tc_filters(&seed.host1.netns)?,
        filters,
        "the restart swapped programs into the same filters:\n{log}"
    );
    window.assert_no_loss(ping, 1000, &[])?;
    assert_eq!(
        tc_filters(&seed.host1.netns)?,
        filters,
        "and keeps them:\n{}",
        seed.agent1.log()
    );

    seed.agent1.process.terminate(TIMEOUT)?;
    let flags = [
        "teardown".to_string(),
        format!("--subnet-file={}", seed.host1.subnet_file().display()),
        format!("--bpf-pin-dir={}", seed.host1.pin_dir().display()),
    ];
    let mut teardown = Agent::start_with(&seed.host1, &flags, &[])?;
    assert!(
        teardown.process.wait_exit(TIMEOUT)?.success(),
        "{}",
        teardown.log()
    );
    assert_eq!(tc_filters(&seed.host1.netns)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn switching_the_tc_path_either_way_leaves_only_the_new_one() -> Result<()> {
    let mut seed = Seed::start("tc-switch", &[TC_TCX])?;
    let tcx = tcx_programs(&seed.host1.netns)?;
    ensure!(tcx.len() == 5, "the tcx run attached {tcx:#?}");
    for flag in [TC_NETLINK, TC_AUTO, TC_TCX] {
        seed.agent1.process.terminate(TIMEOUT)?;
        seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &[flag])?;
        assert_eq!(seed.agent1.wait_ready()?, SUBNET1);
        let (filters, programs) = (
            tc_filters(&seed.host1.netns)?,
            tcx_programs(&seed.host1.netns)?,
        );
        let log = seed.agent1.log();
        match flag {
            TC_NETLINK => {
                assert_eq!(programs, Vec::<String>::new(), "{log}");
                assert_eq!(filters.len(), tcx.len(), "{filters:#?}");
                let links = pinned_links(&seed.host1.pin_dir())?;
                assert_eq!(links, Vec::new(), "no tcx link stays pinned");
            }
            // `auto` takes tcx links everywhere on a kernel that has them, as this one does.
            _ => {
                assert_eq!(filters, Vec::<String>::new(), "{log}");
                assert_eq!(programs, tcx);
            }
        }
        ping_ttl_62(&seed.bbox1, BBOX2)?;
    }
    Ok(())
}

/// Removes bpffs directories the harness does not name after its namespaces.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn two_agents_in_two_namespaces_on_the_default_pin_directory_both_keep_forwarding() -> Result<()> {
    let mut cluster = Cluster::new("default-pins")?;
    cluster.reserve(SUBNET1, HOST1)?;
    cluster.reserve(SUBNET2, HOST2)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let dirs = [host1.default_pin_dir()?, host2.default_pin_dir()?];
    let _remove_dirs = RemoveOnDrop(dirs.to_vec());
    let start = |host: &Host| {
        let flags = with_pin_dir(Agent::flags(&cluster, host, &[]), None);
        Agent::start_with(host, &flags, &[])
    };
    let mut agent1 = start(&host1)?;
    let mut agent2 = start(&host2)?;
    assert_eq!(agent1.wait_ready()?, SUBNET1);
    assert_eq!(agent2.wait_ready()?, SUBNET2);
    let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
    let _bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;
    // The replies need host2's route back as much as the requests need host1's.
    host1.wait_for_route(SUBNET2)?;
    host2.wait_for_route(SUBNET1)?;
    ping_ttl_62(&bbox1, BBOX2)?;
    for dir in &dirs {
        ensure!(
            !pinned_links(dir)?.is_empty(),
            "no links pinned in {}",
            dir.display()
        );
    }

    // host1's agent restarts; host2's programs stay where they are, and both forward.
    let host2_links = pinned_links(&dirs[1])?;
    agent1.process.terminate(TIMEOUT)?;
    agent1 = start(&host1)?;
    assert_eq!(agent1.wait_ready()?, SUBNET1);
    assert_eq!(pinned_links(&dirs[1])?, host2_links);
    assert!(host2_links.iter().all(|(_, id)| link_exists(*id)));
    ping_ttl_62(&bbox1, BBOX2)
}

#[test]
fn a_second_agent_on_a_pin_directory_in_use_exits_naming_it_and_takes_no_lease() -> Result<()> {
    let mut cluster = Cluster::new("pin-lock")?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let mut agent1 = Agent::start(&cluster, &host1, &[])?;
    agent1.wait_ready()?;
    let links = pinned_links(&host1.pin_dir())?;

    let flags = with_pin_dir(Agent::flags(&cluster, &host2, &[]), Some(&host1.pin_dir()));
    let mut agent2 = Agent::start_with(&host2, &flags, &[])?;
    agent2.expect_failure(&format!(
        "the pin directory {} is in use by another overlay-agent (pid {})",
        host1.pin_dir().display(),
        agent1.process.id()
    ))?;
    let records = cluster.subnet_keys()?;
    assert_eq!(records.len(), 1, "only host1 holds a lease: {records:?}");
    assert_eq!(
        pinned_links(&host1.pin_dir())?,
        links,
        "host1's pins untouched"
    );
    Ok(())
}
