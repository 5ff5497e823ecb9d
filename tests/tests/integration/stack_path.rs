//! What the kernel's stack sees in ebpf mode is what it sees with flannel:
//! - decapsulated packets the stack must route arrive on flannel.1, at either decap hook, so
//!   strict reverse-path filtering (`rp_filter=1`, RHEL's default) passes them and host rules
//!   on `-i flannel.1` match them: the host's own traffic, TTL running out, containers not yet
//!   learned;
//! - flows conntrack translates keep working with the fast path on: a service address DNATed
//!   on the client's host to a container on another host, and a port DNATed on the server's
//!   host to its container, reached from a container elsewhere. Both dataplanes must agree.
use anyhow::{Context, Result};
use overlay_common::Counter;
use overlay_tests::{
    cluster::Host,
    process::iperf3_server,
    seed::{BBOX2, Container, HOST2, Seed, iperf3_through},
};

/// host2's flannel.1 address: the host itself, seen from the overlay.
const HOST2_VTEP_ADDRESS: &str = "10.2.54.0";
/// A service address on host1, as kube-proxy would DNAT a ClusterIP.
const SERVICE_VIP: &str = "10.96.0.10";
const SERVICE_PORT: &str = "80";
const PUBLISHED_PORT: &str = "8080";
const IPERF3_PORT: &str = "5201";

fn sysctl(host: &Host, setting: &str) -> Result<()> {
    host.netns.exec(&["sysctl", "-qw", setting]).map(drop)
}

/// Has `host` DNAT TCP to `address`:`port` (any port without one) to `to`, in nat PREROUTING,
/// as kube-proxy translates a service address or Docker a published port.
fn dnat(host: &Host, address: &str, port: Option<&str>, to: &str) -> Result<()> {
    let mut rule = vec!["-t", "nat", "-A", "PREROUTING", "-d", address, "-p", "tcp"];
    if let Some(port) = port {
        rule.extend(["--dport", port]);
    }
    rule.extend(["-j", "DNAT", "--to-destination", to]);
    host.iptables(&rule).map(drop)
}

/// The packets the first rule of `chain` (filter table) whose text contains `needle` counted.
fn rule_packets(host: &Host, chain: &str, needle: &str) -> Result<u64> {
    let listing = host.iptables(&["-L", chain, "-v", "-x", "-n"])?;
    // Below the chain's title and the column heads.
    let line = listing
        .lines()
        .skip(2)
        .find(|line| line.contains(needle))
        .with_context(|| format!("no rule with {needle:?} in {chain}:\n{listing}"))?;
    line.split_whitespace()
        .next()
        .and_then(|packets| packets.parse().ok())
        .with_context(|| format!("no packet count in {line:?}"))
}

/// The seed with `rp_filter=1` everywhere on both hosts and host rules on `-i flannel.1`:
/// container to container, to a container started now, and to host2 itself.
fn the_stack_sees_flannel_1(hook: &str) -> Result<()> {
    let seed = Seed::start(&format!("rpf-{hook}"), &[&format!("--decap-hook={hook}")])?;
    for host in [&seed.host1, &seed.host2] {
        for scope in ["all", "default", "eth0", "flannel.1", "docker0"] {
            sysctl(host, &format!("net/ipv4/conf/{scope}/rp_filter=1"))?;
        }
    }
    seed.host2.iptables(&[
        "-A",
        "INPUT",
        "-i",
        "flannel.1",
        "-p",
        "icmp",
        "-j",
        "ACCEPT",
    ])?;
    seed.host2.iptables(&[
        "-A",
        "INPUT",
        "-i",
        "flannel.1",
        "-p",
        "tcp",
        "--dport",
        IPERF3_PORT,
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ])?;

    let ping = seed.bbox1.ping(BBOX2, 2)?;
    assert_eq!(ping.matches("ttl=62").count(), 2, "{ping}");
    assert_eq!(
        seed.bbox1.traceroute(BBOX2)?,
        ["10.2.41.1", "10.2.54.0", "10.2.54.2"]
    );
    let late = Container::attach(&seed.host2, &format!("late-{hook}"), "10.2.54.3")?;
    iperf3_through(&seed, &seed.bbox1, &late, &late.address, IPERF3_PORT)?;

    let icmp_before = rule_packets(&seed.host2, "INPUT", "ACCEPT")?;
    let ping = seed.bbox1.ping(HOST2_VTEP_ADDRESS, 3)?;
    assert_eq!(ping.matches("ttl=63").count(), 3, "{ping}");
    assert!(
        rule_packets(&seed.host2, "INPUT", "ACCEPT")? >= icmp_before + 3,
        "host2's INPUT rule on -i flannel.1 saw the pings to the host"
    );
    let log = seed.cluster.scratch.path().join("iperf-host2.log");
    let _server = iperf3_server(&seed.host2.netns, &log, true)?;
    let refused =
        seed.bbox1
            .netns
            .exec_unchecked(&["iperf3", "-c", HOST2_VTEP_ADDRESS, "-t", "1"])?;
    assert!(
        !refused.status.success(),
        "host2's REJECT on -i flannel.1 refused the connection"
    );
    assert!(rule_packets(&seed.host2, "INPUT", "reject-with")? > 0);
    Ok(())
}

// The hook that checks the uplink's VXLAN.
test_matrix! { the_stack_sees_flannel_1 {
    tc_decapsulation_hands_the_stack_its_packets_on_flannel_1: ("tc"),
    with_the_xdp_hook_the_stack_gets_its_packets_on_flannel_1: ("xdp"),
}}

/// bbox1 reaches a service address on host1 that DNATs to bbox2 on host2: the replies must
/// come back through host1's conntrack.
fn a_service_address_reaches_a_remote_container(tag: &str, dataplane: &str) -> Result<()> {
    let seed = Seed::start(tag, &[&format!("--dataplane={dataplane}")])?;
    dnat(
        &seed.host1,
        SERVICE_VIP,
        Some(SERVICE_PORT),
        &format!("{BBOX2}:{IPERF3_PORT}"),
    )?;
    iperf3_through(&seed, &seed.bbox1, &seed.bbox2, SERVICE_VIP, SERVICE_PORT)
}

/// bbox1 reaches a port on host2's own address that host2 DNATs to bbox2 (as `docker run -p`
/// publishes one): bbox2's replies must go back through host2's conntrack.
fn a_published_port_reaches_its_container(tag: &str, dataplane: &str) -> Result<()> {
    let seed = Seed::start(tag, &[&format!("--dataplane={dataplane}")])?;
    dnat(
        &seed.host2,
        HOST2,
        Some(PUBLISHED_PORT),
        &format!("{BBOX2}:{IPERF3_PORT}"),
    )?;
    iperf3_through(&seed, &seed.bbox1, &seed.bbox2, HOST2, PUBLISHED_PORT)
}

// Each DNAT in each dataplane.
test_matrix! { a_service_address_reaches_a_remote_container {
    a_service_address_dnated_to_another_host_works_on_the_fast_path: ("vip-ebpf", "ebpf"),
    a_service_address_dnated_to_another_host_works_in_kernel_mode: ("vip-kernel", "kernel"),
}}

test_matrix! { a_published_port_reaches_its_container {
    a_port_dnated_on_the_server_s_host_works_on_the_fast_path: ("published-ebpf", "ebpf"),
    a_port_dnated_on_the_server_s_host_works_in_kernel_mode: ("published-kernel", "kernel"),
}}

/// The fast path still carries everything that conntrack does not translate.
#[test]
fn untranslated_flows_keep_the_fast_path_beside_translated_ones() -> Result<()> {
    let seed = Seed::start("vip-beside", &[])?;
    dnat(&seed.host1, SERVICE_VIP, None, BBOX2)?;
    let counters = |host: &Host| -> Result<_> {
        overlay_agent::dataplane::pins::PinnedDataplane::open(&host.pin_dir())?.counters()
    };
    let before = counters(&seed.host1)?;
    iperf3_through(&seed, &seed.bbox1, &seed.bbox2, SERVICE_VIP, IPERF3_PORT)?;
    let translated = counters(&seed.host1)?;
    assert!(
        translated.get(Counter::RxRoutedFlow) > before.get(Counter::RxRoutedFlow),
        "host1 left the service's replies to its conntrack: {translated:?}"
    );
    // bpftool names the flow's fields: the replies' key, from bbox2's iperf3 port.
    let flows = overlay_tests::netns::run(
        std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(seed.host1.pin_dir().join("routed_flows")),
    )?
    .replace([' ', '\n'], "");
    for field in [
        "\"src\":[10,2,54,2]",
        "\"dst\":[10,2,41,2]",
        "\"src_port\":[20,81]",
        "\"protocol\":6",
        "\"ifindex\":",
    ] {
        assert!(flows.contains(field), "{field} in {flows}");
    }
    iperf3_through(&seed, &seed.bbox1, &seed.bbox2, BBOX2, IPERF3_PORT)?;
    let direct = counters(&seed.host1)?;
    assert!(
        direct.get(Counter::TxDirect) > translated.get(Counter::TxDirect)
            && direct.get(Counter::RxDelivered) > translated.get(Counter::RxDelivered),
        "bbox1's own connection to bbox2 took the fast path: {direct:?}"
    );
    Ok(())
}
