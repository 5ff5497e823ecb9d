//! No container port forwards unchecked while the node's own steps fail: with host1's VXLAN
//! device unmakeable (another VXLAN device, with other receive flags, holds UDP 8472), every
//! round about the node fails, and a container started then must still get its checks. A port
//! that cannot take its program is down while it lacks it, and up again once the node runs in
//! kernel mode, which wants none.
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::Agent,
    frames::{BBOX1_IP, ETH_P_ARP, ethernet, mac_text},
    inject::send_frame,
    seed::{BBOX1, BBOX2, Container, Seed},
    wait::wait_for,
};

const EBPF: &[&str] = &["--dataplane=ebpf"];
const BBOX3: &str = "10.2.41.3";
const BRIDGE_IP: [u8; 4] = [10, 2, 41, 1];
/// How long the agent gets to place a new port's program before the attack.
const PLACEMENT_WAIT: Duration = Duration::from_secs(5);
const AGENT_STOP: Duration = Duration::from_secs(20);
const RECONNECT_WAIT: Duration = Duration::from_secs(10);

#[test]
fn a_container_started_while_the_node_steps_fail_still_gets_its_checks() -> Result<()> {
    let seed = Seed::start("fc-node", EBPF)?;
    seed.bbox1.ping(BBOX2, 1)?;
    let bbox1_mac = seed.bbox1.netns.mac("eth0")?;
    break_the_vxlan_device(&seed)?;
    seed.agent1
        .wait_for_log("cannot bring the node in line", 2, Duration::from_secs(10))?;

    let bbox3 = Container::attach(&seed.host1, "bbox3", BBOX3)?;
    wait_for_placement(&seed, "veth-bbox3");
    // bbox3 claims bbox1's address for its own MAC; the neighbour entry is old enough (a
    // second) for the kernel to take the claim, were it let through.
    std::thread::sleep(Duration::from_millis(1100));
    let bbox3_mac = bbox3.netns.mac("eth0")?;
    let bridge_mac = seed.host1.netns.mac("docker0")?;
    let claim = [
        &[0, 1, 8, 0, 6, 4, 0, 2][..],
        &bbox3_mac,
        &BBOX1_IP,
        &bridge_mac,
        &BRIDGE_IP,
    ]
    .concat();
    let frame = ethernet(bridge_mac, bbox3_mac, ETH_P_ARP, &claim);
    bbox3
        .netns
        .run_inside(|| (0..5).try_for_each(|_| send_frame("eth0", &frame)))?;

    let neighbour = seed.host1.container_neighbour(BBOX1)?;
    ensure!(
        neighbour.contains(&mac_text(bbox1_mac)),
        "host1's neighbour entry for {BBOX1} moved to bbox3 ({}): {neighbour}",
        mac_text(bbox3_mac)
    );
    // Checked, not cut off: bbox3 reaches its neighbour from its own address.
    bbox3.ping(BBOX1, 1)?;
    Ok(())
}

#[test]
fn a_port_down_for_want_of_its_program_is_up_again_in_kernel_mode() -> Result<()> {
    let mut seed = Seed::start("fc-back", EBPF)?;
    seed.agent1.process.terminate(AGENT_STOP)?;
    let bbox3 = Container::attach(&seed.host1, "bbox3", BBOX3)?;
    // A directory where the agent pins bbox3's link: the pin fails, and so does the attach.
    let port = seed.host1.netns.ifindex("veth-bbox3")?;
    let blocker = seed
        .host1
        .pin_dir()
        .join(format!("link_tc_container_ingress_{port}"));
    std::fs::create_dir_all(&blocker)?;
    let short_grace = ["--dataplane=ebpf", "--healthz-grace=1s"];
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &short_grace)?;
    seed.agent1.wait_ready()?;
    let (up, alias) = link_state(&seed, "veth-bbox3")?;
    ensure!(
        !up && alias == "overlay-agent: down, no program",
        "veth-bbox3 refused its program but is up {up}, alias {alias:?}\n{}",
        seed.agent1.log()
    );
    ensure!(
        bbox3.ping(BBOX1, 1).is_err(),
        "bbox3 reached its neighbour through a port without its program"
    );
    // Shown where an operator looks: in `status`, and in /healthz once the grace is over.
    let report = Agent::status_report(&seed.cluster, &seed.host1)?;
    let line = "  none on veth-bbox3: refused its program, kept down\n";
    ensure!(report.contains(line), "status lacks {line:?}:\n{report}");
    let phrases = ["container ports down for", "veth-bbox3"];
    seed.agent1
        .wait_for_health("/healthz", 503, &phrases, RECONNECT_WAIT)?;

    seed.agent1.process.terminate(AGENT_STOP)?;
    std::fs::remove_dir(&blocker)?;
    seed.agent1 = Agent::start(&seed.cluster, &seed.host1, &["--dataplane=kernel"])?;
    seed.agent1.wait_ready()?;
    let (up, alias) = link_state(&seed, "veth-bbox3")?;
    ensure!(
        up && alias.is_empty(),
        "in kernel mode veth-bbox3 is up {up}, alias {alias:?}\n{}",
        seed.agent1.log()
    );
    // A port set up sends once the kernel's link watch has seen its carrier: up to a second.
    wait_for("bbox3 to reach its neighbour", RECONNECT_WAIT, || {
        Ok(bbox3.ping(BBOX1, 1).is_ok())
    })?;
    bbox3.ping(BBOX2, 1)?;
    seed.agent1
        .wait_for_health("/healthz", 200, &["ok"], RECONNECT_WAIT)?;
    Ok(())
}

/// Whether host1's link `name` is set up, and its alias ("" without one).
fn link_state(seed: &Seed, name: &str) -> Result<(bool, String)> {
    let listing: serde_json::Value =
        serde_json::from_str(&seed.host1.netns.ip(&["-j", "link", "show", "dev", name])?)?;
    let link = &listing[0];
    let flags = link["flags"]
        .as_array()
        .with_context(|| format!("ip printed no flags for {name}: {listing}"))?;
    let up = flags.iter().any(|flag| flag == "UP");
    let alias = link["ifalias"].as_str().unwrap_or_default().to_string();
    Ok((up, alias))
}

/// Replaces host1's flannel.1 with a VXLAN device that holds its UDP port with GBP on, so the
/// agent cannot make flannel.1 again. The agent is stopped meanwhile, so that it cannot win
/// the port back first.
fn break_the_vxlan_device(seed: &Seed) -> Result<()> {
    let agent = &seed.agent1.process;
    agent.signal(libc::SIGSTOP)?;
    let host1 = &seed.host1.netns;
    let broken = host1.ip(&["link", "del", "flannel.1"]).and_then(|_| {
        host1.ip(&[
            "link",
            "add",
            "blocker",
            "type",
            "vxlan",
            "id",
            "99",
            "dstport",
            "8472",
            "gbp",
            "local",
            "172.20.62.104",
            "dev",
            "eth0",
        ])?;
        host1.ip(&["link", "set", "blocker", "up"])
    });
    agent.signal(libc::SIGCONT)?;
    broken.map(drop)
}

/// Gives the agent up to [`PLACEMENT_WAIT`] to say it attached the container program to
/// `port`; the attack that follows is the test, whatever the agent said.
fn wait_for_placement(seed: &Seed, port: &str) {
    let needle = format!("tc_container_ingress attached to {port}");
    let deadline = Instant::now() + PLACEMENT_WAIT;
    while Instant::now() < deadline && seed.agent1.count_in_log(&needle) == 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
}
