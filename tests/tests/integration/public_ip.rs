//! `--public-ip` as flanneld uses it since v0.27.4 (flannel.1's local address where the host
//! holds it), and peers whose VXLAN arrives from an address other than their PublicIP: a
//! host behind a SNAT, accepted in ebpf mode only with `--accept-nat-peers`.
use std::time::Duration;

use anyhow::{Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::{Counter, Counters};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host},
    seed::{BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2},
    wait::wait_for,
};

const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// host2's second address on eth0, its `--public-ip` in the secondary-address case.
const HOST2_SECONDARY: &str = "172.20.62.205";
/// The SNAT box's address on the underlay: host2's VXLAN to host1 leaves from it.
const NAT_ADDRESS: &str = "172.20.62.50";

fn counters(host: &Host) -> Result<Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

/// The seed's hosts, no agent yet, host2's subnet reserved for `host2_public_ip`.
fn seed_hosts(tag: &str, host2_public_ip: &str) -> Result<(Cluster, Host, Host)> {
    let mut cluster = Cluster::new(tag)?;
    cluster.reserve(SUBNET1, HOST1)?;
    cluster.reserve(SUBNET2, host2_public_ip)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    Ok((cluster, host1, host2))
}

/// bbox1 (on host1) pings bbox2 until it answers, then three times more, each answered across
/// the overlay, and host1 drops no VXLAN as from an unknown sender meanwhile.
fn assert_bbox2_answers_with_no_sender_dropped(bbox1: &Container, host1: &Host) -> Result<()> {
    let before = counters(host1)?;
    wait_for("a reply from bbox2", EVENT_TIMEOUT, || {
        let ping = bbox1
            .netns
            .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", BBOX2])?;
        Ok(ping.status.success())
    })?;
    let ping = bbox1.ping(BBOX2, 3)?;
    ensure!(ping.matches("ttl=62").count() == 3, "{ping}");
    let after = counters(host1)?;
    ensure!(
        after.get(Counter::RxUnknownVtep) == before.get(Counter::RxUnknownVtep),
        "host1 dropped bbox2's answers as VXLAN from an unknown sender"
    );
    Ok(())
}

#[test]
fn a_secondary_public_ip_is_the_tunnel_source_and_its_vxlan_is_accepted() -> Result<()> {
    let (cluster, host1, host2) = seed_hosts("secondary-ip", HOST2_SECONDARY)?;
    host2.netns.ip(&[
        "addr",
        "add",
        &format!("{HOST2_SECONDARY}/24"),
        "dev",
        "eth0",
    ])?;
    let mut agent1 = Agent::start(&cluster, &host1, &[])?;
    let public_ip = format!("--public-ip={HOST2_SECONDARY}");
    let mut agent2 = Agent::start(&cluster, &host2, &["--iface=eth0", &public_ip])?;
    ensure!(
        agent1.wait_ready()? == SUBNET1,
        "host1 lost its reservation"
    );
    ensure!(
        agent2.wait_ready()? == SUBNET2,
        "host2 lost its reservation"
    );
    let device = host2.netns.ip(&["-d", "link", "show", "flannel.1"])?;
    ensure!(
        device.contains(&format!("local {HOST2_SECONDARY} dev eth0")),
        "flannel.1's local address is not --public-ip, as flanneld makes it:\n{device}"
    );
    host1.wait_for_route(SUBNET2)?;
    host2.wait_for_route(SUBNET1)?;
    let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
    let _bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;

    assert_bbox2_answers_with_no_sender_dropped(&bbox1, &host1)
}

/// A namespace on the underlay that masquerades what host2 sends host1: host2 routes host1
/// through it, so host2's VXLAN reaches host1 from [`NAT_ADDRESS`], not from its PublicIP;
/// host1's VXLAN still goes to host2 directly.
fn snat_host2_towards_host1(cluster: &mut Cluster, host2: &Host) -> Result<Host> {
    let nat = cluster.add_host("nat", NAT_ADDRESS)?;
    nat.netns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.eth0.rp_filter=0",
    ])?;
    nat.iptables(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        HOST2,
        "-j",
        "MASQUERADE",
    ])?;
    host2.netns.ip(&[
        "route",
        "add",
        &format!("{HOST1}/32"),
        "via",
        NAT_ADDRESS,
        "dev",
        "eth0",
    ])?;
    Ok(nat)
}

#[test]
fn a_peer_behind_snat_reaches_a_container_with_accept_nat_peers_only() -> Result<()> {
    let (mut cluster, host1, host2) = seed_hosts("nat-peer", HOST2)?;
    // host2 sends as flanneld's kernel device does: wherever its routes lead.
    let mut agent2 = Agent::start(&cluster, &host2, &["--dataplane=kernel"])?;
    ensure!(
        agent2.wait_ready()? == SUBNET2,
        "host2 lost its reservation"
    );
    let _nat = snat_host2_towards_host1(&mut cluster, &host2)?;
    let mut strict = Agent::start(&cluster, &host1, &[])?;
    ensure!(
        strict.wait_ready()? == SUBNET1,
        "host1 lost its reservation"
    );
    host1.wait_for_route(SUBNET2)?;
    host2.wait_for_route(SUBNET1)?;
    let bbox1 = Container::attach(&host1, "bbox1", BBOX1)?;
    let _bbox2 = Container::attach(&host2, "bbox2", BBOX2)?;

    // Strict (the default): the replies come from an address no lease names.
    let before = counters(&host1)?;
    let ping = bbox1
        .netns
        .exec_unchecked(&["ping", "-n", "-c", "3", "-W", "1", BBOX2])?;
    let after = counters(&host1)?;
    ensure!(
        !ping.status.success(),
        "a reply came through without --accept-nat-peers"
    );
    ensure!(
        after.get(Counter::RxUnknownVtep) >= before.get(Counter::RxUnknownVtep) + 3,
        "host1 did not count the NATed replies as rx_unknown_vtep"
    );
    strict.process.terminate(EVENT_TIMEOUT)?;

    let mut accepting = Agent::start(&cluster, &host1, &["--accept-nat-peers"])?;
    accepting.wait_ready()?;
    assert_bbox2_answers_with_no_sender_dropped(&bbox1, &host1)
}
