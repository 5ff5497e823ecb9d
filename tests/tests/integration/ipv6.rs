//! IPv6 in the overlay, as flannel carries it: in a dual-stack network each host has
//! flannel-v6.1 beside flannel.1 (VXLAN over the IPv6 underlay, with its own VtepMAC in the
//! lease's BackendV6Data), containers reach each other over both families; an IPv6-only
//! network has flannel-v6.1 alone. First stock flannel's hosts built by hand, on their own,
//! then the agent in each dataplane, and the agent next to stock flannel.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, READY_TIMEOUT, subnet_from_file, subnet6_from_file},
    capture::capture_one,
    cluster::{Cluster, Host, PREFIX, SEED_NETWORK_CONFIG, UNDERLAY_GATEWAY, UNDERLAY_GATEWAY6},
    frames::parse_mac,
    ipv6::{
        BBOX1_V6, BBOX2_V6, DUAL_STACK_NETWORK_CONFIG, HOST1_V6, HOST2_V6, IPV6_NETWORK,
        IPV6_ONLY_NETWORK_CONFIG, SUBNET1_V6, SUBNET2_V6, address_in, bridge_gateway6,
    },
    metrics::settled_rounds,
    process::iperf3_server,
    seed::{
        BBOX1, BBOX2, Container, HOST1, HOST2, SUBNET1, SUBNET2, Seed, check_ipv6_path,
        check_seed_path,
    },
    stock_flannel::{self, Lease6, Peer, Vtep, add_peer, lease_value},
    wait::wait_for,
};

const KERNEL: &[&str] = &["--dataplane=kernel"];
const EBPF: &[&str] = &["--dataplane=ebpf"];
/// The VTEP MACs of hand-built stock flannel hosts: flannel.1's, then flannel-v6.1's.
const STOCK_MACS: [(&str, &str); 2] = [
    ("1a:4b:d7:f7:16:88", "1a:4b:d7:f7:66:88"),
    ("1a:4b:d7:f7:16:89", "1a:4b:d7:f7:66:89"),
];
const VXLAN_PORT: u16 = 8472;

/// A host's IPv6 side as the others see it: its /64, its PublicIPv6 and flannel-v6.1's MAC.
struct Remote6<'a> {
    subnet6: &'a str,
    public_ipv6: &'a str,
    vtep6_mac: &'a str,
}

/// The seed's two hosts built by hand as stock flannel builds them in the dual-stack or the
/// IPv6-only network, each with its container. Field order is drop order.
struct StockPair {
    bbox1: Container,
    bbox2: Container,
    host1: Host,
    host2: Host,
    cluster: Cluster,
}

fn stock_pair(tag: &str, dual_stack: bool) -> Result<StockPair> {
    let mut cluster = Cluster::with_ipv6(tag, network_config(dual_stack))?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let seed = [
        (&host1, SUBNET1, SUBNET1_V6, STOCK_MACS[0]),
        (&host2, SUBNET2, SUBNET2_V6, STOCK_MACS[1]),
    ];
    for (index, (host, subnet, subnet6, (mac, mac6))) in seed.iter().enumerate() {
        let (remote, remote_subnet, remote_subnet6, (remote_mac, remote_mac6)) = seed[1 - index];
        let peer = Peer {
            subnet: remote_subnet,
            public_ip: &remote.address,
            vtep_mac: remote_mac,
        };
        let peer6 = Peer {
            subnet: remote_subnet6,
            public_ip: remote.ipv6()?,
            vtep_mac: remote_mac6,
        };
        let lease = Lease6 {
            ipv4: dual_stack.then_some((*subnet, *mac)),
            ipv6: (subnet6, mac6),
        };
        let peers: &[Peer] = if dual_stack { &[peer] } else { &[] };
        stock_flannel::configure_ipv6(&cluster, host, &lease, peers, &[peer6])?;
    }
    let bbox1 = attach_seed_container(&host1, "bbox1", BBOX1, BBOX1_V6, dual_stack)?;
    let bbox2 = attach_seed_container(&host2, "bbox2", BBOX2, BBOX2_V6, dual_stack)?;
    Ok(StockPair {
        bbox1,
        bbox2,
        host1,
        host2,
        cluster,
    })
}

fn network_config(dual_stack: bool) -> &'static str {
    if dual_stack {
        DUAL_STACK_NETWORK_CONFIG
    } else {
        IPV6_ONLY_NETWORK_CONFIG
    }
}

/// A container with `address` and `address6`, or with `address6` alone unless `dual_stack`.
fn attach_seed_container(
    host: &Host,
    name: &str,
    address: &str,
    address6: &str,
    dual_stack: bool,
) -> Result<Container> {
    if dual_stack {
        Container::attach_dual_stack(host, name, address, address6)
    } else {
        Container::attach_ipv6_only(host, name, address6)
    }
}

/// Fails unless `host` is as an IPv6-only network leaves it: no flannel.1, no IPv4 address
/// on docker0.
fn check_no_ipv4_overlay(host: &Host) -> Result<()> {
    ensure!(
        host.netns.ip(&["link", "show", "flannel.1"]).is_err(),
        "{} has a flannel.1 in an IPv6-only network",
        host.name
    );
    let ipv4 = host.netns.ip(&["-4", "addr", "show", "docker0"])?;
    ensure!(
        !ipv4.contains("inet "),
        "{}'s docker0 has IPv4:\n{ipv4}",
        host.name
    );
    Ok(())
}

/// What `ip -d link show flannel-v6.1` says of flannel's IPv6 device on a 1500-byte uplink
/// whose IPv6 address is `local6`: the kernel caps the 1450 flannel asks for at 1430 (VXLAN
/// over IPv6 takes 70 bytes), and computes the outer UDP checksum.
fn vtep6_attributes(local6: &str) -> Vec<String> {
    [
        "mtu 1430",
        &format!("vxlan id 1 local {local6} dev eth0"),
        "dstport 8472",
        "nolearning",
        "noudp6zerocsumtx noudp6zerocsumrx",
    ]
    .map(str::to_string)
    .to_vec()
}

/// `host`'s IPv6 node network, as flannel's vxlan backend leaves it for its lease `subnet6`
/// and the `remote` host: flannel-v6.1 as flannel builds it with the lease's network address
/// as /128, docker0 with the lease's first address, IPv6 forwarding, and the remote's
/// neighbour, FDB entry and onlink route on flannel-v6.1.
fn check_ipv6_node(host: &Host, subnet6: &str, remote: &Remote6) -> Result<()> {
    let ns = &host.netns;
    let device = ns.ip(&["-d", "link", "show", "flannel-v6.1"])?;
    for attribute in vtep6_attributes(host.ipv6()?) {
        ensure!(
            device.contains(&attribute),
            "{}'s flannel-v6.1 lacks {attribute:?}:\n{device}",
            host.name
        );
    }
    ensure!(
        ns.exec(&["sysctl", "-n", "net.ipv6.conf.flannel-v6/1.accept_ra"])?
            .trim()
            == "0",
        "flannel-v6.1 accepts router advertisements"
    );
    expect_in(
        host,
        &["-6", "addr", "show", "flannel-v6.1"],
        &format!("inet6 {}/128", address_in(subnet6, 0)?),
    )?;
    expect_in(
        host,
        &["-6", "addr", "show", "docker0"],
        &format!("inet6 {}/64", bridge_gateway6(subnet6)?),
    )?;
    ensure!(
        ns.exec(&["sysctl", "-n", "net.ipv6.conf.all.forwarding"])?
            .trim()
            == "1",
        "{} does not forward IPv6",
        host.name
    );
    let gateway = address_in(remote.subnet6, 0)?;
    expect_in(
        host,
        &["-6", "neigh", "show", "dev", "flannel-v6.1"],
        &format!("{gateway} lladdr {} PERMANENT", remote.vtep6_mac),
    )?;
    let fdb = ns.exec(&["bridge", "fdb", "show", "dev", "flannel-v6.1"])?;
    let entry = format!(
        "{} dst {} self permanent",
        remote.vtep6_mac, remote.public_ipv6
    );
    ensure!(fdb.contains(&entry), "no {entry:?} in:\n{fdb}");
    let route = ns.ip(&["-6", "route", "show", remote.subnet6])?;
    ensure!(
        route.contains(&format!(
            "{} via {gateway} dev flannel-v6.1",
            remote.subnet6
        )) && route.contains("onlink"),
        "{}'s route to {}: {route:?}",
        host.name,
        remote.subnet6
    );
    Ok(())
}

/// Fails unless `ip args...` on `host` prints `expected`.
fn expect_in(host: &Host, args: &[&str], expected: &str) -> Result<()> {
    let output = host.netns.ip(args)?;
    ensure!(
        output.contains(expected),
        "`ip {}` on {} lacks {expected:?}:\n{output}",
        args.join(" "),
        host.name
    );
    Ok(())
}

/// The outer headers of a VXLAN-over-IPv6 frame, as the underlay carries it.
#[derive(Debug)]
struct Ipv6Vxlan {
    source: std::net::Ipv6Addr,
    destination: std::net::Ipv6Addr,
    destination_port: u16,
    udp_checksum: u16,
    vxlan_flags: u8,
    vni: u32,
    inner_destination_mac: [u8; 6],
    inner_source_mac: [u8; 6],
}

/// Reads the outer Ethernet, IPv6 (no extension headers), UDP and VXLAN headers of `frame`.
fn parse_ipv6_vxlan(frame: &[u8]) -> Result<Ipv6Vxlan> {
    const IPV6: usize = 14;
    const UDP: usize = IPV6 + 40;
    const VXLAN: usize = UDP + 8;
    const INNER: usize = VXLAN + 8;
    ensure!(frame.len() >= INNER + 14, "a {}-byte frame", frame.len());
    ensure!(
        frame[12..14] == [0x86, 0xdd],
        "not IPv6: ethertype {:02x?}",
        &frame[12..14]
    );
    ensure!(
        frame[IPV6 + 6] == 17,
        "not UDP: next header {}",
        frame[IPV6 + 6]
    );
    let address = |at: usize| -> Result<std::net::Ipv6Addr> {
        let octets: [u8; 16] = frame[at..at + 16].try_into()?;
        Ok(octets.into())
    };
    let u16_at = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    let mac_at = |at: usize| -> Result<[u8; 6]> { Ok(frame[at..at + 6].try_into()?) };
    Ok(Ipv6Vxlan {
        source: address(IPV6 + 8)?,
        destination: address(IPV6 + 24)?,
        destination_port: u16_at(UDP + 2),
        udp_checksum: u16_at(UDP + 6),
        vxlan_flags: frame[VXLAN],
        vni: u32::from_be_bytes([0, frame[VXLAN + 4], frame[VXLAN + 5], frame[VXLAN + 6]]),
        inner_destination_mac: mac_at(INNER)?,
        inner_source_mac: mac_at(INNER + 6)?,
    })
}

/// The first VXLAN-over-IPv6 frame from host1 to host2 on the underlay while bbox1 pings
/// `destination` over IPv6; checks what every such frame must show: outer IPv6 between the
/// hosts' PublicIPv6, UDP to port 8472 with a checksum (IPv6 allows no zero), VXLAN flags
/// 0x08 with VNI 1, and the inner frame between the VTEPs' MACs.
fn check_ipv6_vxlan_frame(
    cluster: &Cluster,
    from: &Container,
    destination: &str,
    vtep6_macs: [&str; 2],
) -> Result<()> {
    let filter = format!("ip6 and udp dst port {VXLAN_PORT} and src host {HOST1_V6}");
    let frame = capture_one(&cluster.underlay, "br0", &filter, || {
        from.netns
            .exec_unchecked(&["ping", "-6", "-c", "1", "-W", "1", destination])?;
        Ok(())
    })?;
    let vxlan = parse_ipv6_vxlan(&frame)?;
    ensure!(
        vxlan.source.to_string() == HOST1_V6 && vxlan.destination.to_string() == HOST2_V6,
        "outer addresses: {vxlan:?}"
    );
    ensure!(vxlan.destination_port == VXLAN_PORT, "{vxlan:?}");
    ensure!(
        vxlan.udp_checksum != 0,
        "a zero UDP checksum over IPv6: {vxlan:?}"
    );
    ensure!(vxlan.vxlan_flags == 0x08 && vxlan.vni == 1, "{vxlan:?}");
    ensure!(
        vxlan.inner_source_mac == parse_mac(vtep6_macs[0])?
            && vxlan.inner_destination_mac == parse_mac(vtep6_macs[1])?,
        "inner MACs, expected {vtep6_macs:?}: {vxlan:?}"
    );
    Ok(())
}

/// Both ways over IPv6 between bbox1 on host1 and bbox2 on host2, whose IPv6 leases are
/// `subnet1` and `subnet2`.
fn check_ipv6_both_ways(bbox1: &Container, bbox2: &Container, subnets: [&str; 2]) -> Result<()> {
    let [subnet1, subnet2] = subnets;
    let (address1, address2) = (ipv6_of(bbox1)?, ipv6_of(bbox2)?);
    check_ipv6_path(
        bbox1,
        address2,
        [&bridge_gateway6(subnet1)?, &address_in(subnet2, 0)?],
    )?;
    check_ipv6_path(
        bbox2,
        address1,
        [&bridge_gateway6(subnet2)?, &address_in(subnet1, 0)?],
    )
}

fn ipv6_of(container: &Container) -> Result<&str> {
    container
        .address6
        .as_deref()
        .with_context(|| format!("container {} has no IPv6 address", container.address))
}

#[test]
fn stock_hosts_in_dual_stack_carry_both_families() -> Result<()> {
    let pair = stock_pair("v6-stock", true)?;
    check_ipv6_both_ways(&pair.bbox1, &pair.bbox2, [SUBNET1_V6, SUBNET2_V6])?;
    check_seed_path(&pair.bbox1, BBOX2)?;
    check_seed_path_back(&pair.bbox2)?;
    let host2_as_remote = Remote6 {
        subnet6: SUBNET2_V6,
        public_ipv6: HOST2_V6,
        vtep6_mac: STOCK_MACS[1].1,
    };
    check_ipv6_node(&pair.host1, SUBNET1_V6, &host2_as_remote)?;
    let host1_as_remote = Remote6 {
        subnet6: SUBNET1_V6,
        public_ipv6: HOST1_V6,
        vtep6_mac: STOCK_MACS[0].1,
    };
    check_ipv6_node(&pair.host2, SUBNET2_V6, &host1_as_remote)
}

#[test]
fn stock_hosts_send_vxlan_over_ipv6_with_a_udp_checksum() -> Result<()> {
    let pair = stock_pair("v6-stock-frame", true)?;
    let macs = [STOCK_MACS[0].1, STOCK_MACS[1].1];
    check_ipv6_vxlan_frame(&pair.cluster, &pair.bbox1, BBOX2_V6, macs)?;
    // flannel-v6.1 carries IPv6 alone: IPv4 still goes over flannel.1, in VXLAN over IPv4.
    let frame = capture_one(
        &pair.cluster.underlay,
        "br0",
        "ip and udp dst port 8472",
        || {
            pair.bbox1
                .netns
                .exec_unchecked(&["ping", "-c", "1", "-W", "1", BBOX2])?;
            Ok(())
        },
    )?;
    ensure!(
        frame[12..14] == [0x08, 0x00],
        "IPv4 ping in VXLAN over {:02x?}",
        &frame[12..14]
    );
    Ok(())
}

#[test]
fn stock_hosts_in_ipv6_only_carry_ipv6_alone() -> Result<()> {
    let pair = stock_pair("v6-stock-only", false)?;
    check_ipv6_both_ways(&pair.bbox1, &pair.bbox2, [SUBNET1_V6, SUBNET2_V6])?;
    for host in [&pair.host1, &pair.host2] {
        check_no_ipv4_overlay(host)?;
    }
    let host2_as_remote = Remote6 {
        subnet6: SUBNET2_V6,
        public_ipv6: HOST2_V6,
        vtep6_mac: STOCK_MACS[1].1,
    };
    check_ipv6_node(&pair.host1, SUBNET1_V6, &host2_as_remote)
}

/// bbox2 to bbox1 over IPv4: two replies with ttl=62.
fn check_seed_path_back(bbox2: &Container) -> Result<()> {
    let ping = bbox2.ping(BBOX1, 2)?;
    ensure!(
        ping.matches("ttl=62").count() == 2,
        "not two ttl=62 replies:\n{ping}"
    );
    Ok(())
}

/// Fails unless `key` holds `host`'s lease exactly as flannel writes it: the IPv6 half, and
/// the IPv4 half when `dual_stack`.
fn check_record(cluster: &Cluster, host: &Host, key: &str, dual_stack: bool) -> Result<()> {
    let record = cluster
        .etcd
        .get(key)?
        .with_context(|| format!("no record {key} for {}", host.name))?;
    let ipv4 = if dual_stack {
        Some(host.vtep_mac()?)
    } else {
        None
    };
    let expected = lease_value(
        ipv4.as_deref().map(|mac| Vtep {
            public_ip: &host.address,
            mac,
        }),
        Some(Vtep {
            public_ip: host.ipv6()?,
            mac: &host.vtep6_mac()?,
        }),
    );
    ensure!(
        record == expected,
        "{}'s record:\n{record}\nnot\n{expected}",
        host.name
    );
    Ok(())
}

/// Fails unless `host`'s subnet file is what flannel's WriteSubnetFile writes for the lease
/// `subnet` (none in an IPv6-only network) and `subnet6`, with no masquerade; but for the MTU
/// of an IPv6-only network, which is flannel-v6.1's (the underlay's less 70) where flannel
/// writes flannel.1's (less 50), more than its IPv6 device carries.
fn check_subnet_file(host: &Host, subnet: Option<&str>, subnet6: &str) -> Result<()> {
    let mut expected = String::new();
    if let Some(subnet) = subnet {
        let gateway = format!("{}.1/24", subnet.trim_end_matches(".0/24"));
        expected += &format!("FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET={gateway}\n");
    }
    expected += &format!(
        "FLANNEL_IPV6_NETWORK={IPV6_NETWORK}\nFLANNEL_IPV6_SUBNET={}/64\n",
        bridge_gateway6(subnet6)?
    );
    let mtu = if subnet.is_some() { 1450 } else { 1430 };
    expected += &format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n");
    let file = std::fs::read_to_string(host.subnet_file())?;
    ensure!(
        file == expected,
        "{}'s subnet file:\n{file}\nnot\n{expected}",
        host.name
    );
    Ok(())
}

/// The dual-stack seed with host1's agent given `flags[0]` and host2's `flags[1]`: the seed's
/// IPv4 checks, the same walk over IPv6, the records and subnet files flannel writes, and
/// each host's IPv6 node network as flannel builds it.
fn check_dual_stack_seed(tag: &str, flags: [&[&str]; 2]) -> Result<()> {
    let seed = Seed::start_dual_stack(tag, flags)?;
    check_seed_path(&seed.bbox1, BBOX2)?;
    check_seed_path_back(&seed.bbox2)?;
    check_ipv6_both_ways(&seed.bbox1, &seed.bbox2, [SUBNET1_V6, SUBNET2_V6])?;
    let hosts = [
        (&seed.host1, SUBNET1, SUBNET1_V6),
        (&seed.host2, SUBNET2, SUBNET2_V6),
    ];
    for (index, (host, subnet, subnet6)) in hosts.iter().enumerate() {
        let key = seed.cluster.subnet_key6(Some(subnet), subnet6);
        check_record(&seed.cluster, host, &key, true)?;
        ensure!(
            seed.cluster.etcd.lease_of(&key)? == 0,
            "{}'s reservation got an etcd lease",
            host.name
        );
        check_subnet_file(host, Some(subnet), subnet6)?;
        let (remote, _, remote6) = hosts[1 - index];
        check_ipv6_node(
            host,
            subnet6,
            &Remote6 {
                subnet6: remote6,
                public_ipv6: remote.ipv6()?,
                vtep6_mac: &remote.vtep6_mac()?,
            },
        )?;
    }
    Ok(())
}

/// An ebpf agent whose PublicIPv6 comes from the flag (host2's), not from its uplink.
const EBPF_WITH_PUBLIC_IPV6: &[&str] = &["--dataplane=ebpf", "--public-ipv6=fd00:ff::105"];

// The agents' dataplanes, host1's and host2's.
test_matrix! { check_dual_stack_seed {
    dual_stack_seed_in_kernel_mode: ("v6-kernel", [KERNEL, KERNEL]),
    dual_stack_seed_in_ebpf_mode: ("v6-ebpf", [EBPF, EBPF]),
    dual_stack_seed_with_a_kernel_and_an_ebpf_agent: ("v6-mixed", [KERNEL, EBPF_WITH_PUBLIC_IPV6]),
}}

/// How soon the agent puts back a route deleted by hand: a netlink notification away, far
/// inside the 30-s safety net.
const REPAIR_DEADLINE: Duration = Duration::from_secs(2);

/// Runs `check` on a working dual-stack seed of each mode, named `prefix` and the mode.
fn in_each_mode(prefix: &str, check: impl Fn(&str, &Seed) -> Result<()>) -> Result<()> {
    for (name, mode) in [("kernel", KERNEL), ("ebpf", EBPF)] {
        let tag = format!("{prefix}-{name}");
        let seed = Seed::start_dual_stack(&tag, [mode, mode])?;
        check_ipv6_both_ways(&seed.bbox1, &seed.bbox2, [SUBNET1_V6, SUBNET2_V6])?;
        check(&tag, &seed)?;
    }
    Ok(())
}

#[test]
fn a_route_deleted_by_hand_on_flannel_v6_is_back_within_two_seconds() -> Result<()> {
    in_each_mode("v6-repair", |tag, seed| {
        seed.host1
            .netns
            .ip(&["-6", "route", "del", SUBNET2_V6, "dev", "flannel-v6.1"])?;
        wait_for(
            &format!("{tag}: host1's route to {SUBNET2_V6} back"),
            REPAIR_DEADLINE,
            || seed.host1.netns.has_route(SUBNET2_V6),
        )?;
        check_ipv6_both_ways(&seed.bbox1, &seed.bbox2, [SUBNET1_V6, SUBNET2_V6])
    })
}

/// Longer than a port's duplicate address detection takes, with the kernel's defaults.
const DAD_TIME: Duration = Duration::from_secs(3);

/// A new container's port brings the kernel's own IPv6 routes for it: its link-local prefix,
/// its addresses and multicast in the local table. None of them is the node's, nor can lead to
/// a peer's PublicIPv6, so they cost no round about the node: the port takes its program in a
/// round about containers alone. A dual-stack lease added or removed costs one round: the
/// notifications of its two families' entries echo what that round wrote.
#[test]
fn a_new_dual_stack_container_costs_no_round_about_the_node_and_a_lease_one() -> Result<()> {
    in_each_mode("v6-rounds", |tag, seed| {
        let before = settled_rounds(&seed.host1.netns)?;
        let bbox3 = Container::attach_dual_stack(
            &seed.host1,
            "bbox3",
            "10.2.41.3",
            &address_in(SUBNET1_V6, 3)?,
        )?;
        wait_for("bbox3 to reach bbox2 over IPv6", READY_TIMEOUT, || {
            Ok(bbox3.ping6(BBOX2_V6, 1).is_ok())
        })?;
        bbox3.ping(BBOX2, 1)?;
        // The port's duplicate address detection, one probe and a second's wait, ends meanwhile:
        // its address and routes change once more.
        std::thread::sleep(DAD_TIME);
        let after = settled_rounds(&seed.host1.netns)?;
        eprintln!(
            "{tag}: a new dual-stack container: {} rounds about the leases or the node",
            after - before
        );
        assert_eq!(after, before, "{}", seed.agent1.log());

        let (subnet, subnet6) = ("10.2.60.0/24", "fd00:2:0:60::/64");
        let key = seed.cluster.subnet_key6(Some(subnet), subnet6);
        let vteps = (
            Vtep {
                public_ip: "172.20.62.160",
                mac: "1a:4b:d7:f7:16:60",
            },
            Vtep {
                public_ip: "fd00:ff::160",
                mac: "1a:4b:d7:f7:66:60",
            },
        );
        seed.cluster
            .etcd
            .put(&key, &lease_value(Some(vteps.0), Some(vteps.1)))?;
        wait_for("host1's routes to the new lease", READY_TIMEOUT, || {
            Ok(seed.host1.netns.has_route(subnet)? && seed.host1.netns.has_route(subnet6)?)
        })?;
        let added = settled_rounds(&seed.host1.netns)?;
        seed.cluster.etcd.etcdctl(&["del", &key])?;
        wait_for("host1's routes to the lease to go", READY_TIMEOUT, || {
            Ok(!seed.host1.netns.has_route(subnet)? && !seed.host1.netns.has_route(subnet6)?)
        })?;
        let removed = settled_rounds(&seed.host1.netns)?;
        eprintln!(
            "{tag}: a dual-stack lease: {} rounds about the leases or the node added, {} removed",
            added - after,
            removed - added
        );
        assert_eq!(
            (added - after, removed - added),
            (1.0, 1.0),
            "{}",
            seed.agent1.log()
        );
        Ok(())
    })
}

#[test]
fn agent_frames_over_ipv6_look_like_stock_flannel_frames() -> Result<()> {
    let seed = Seed::start_dual_stack("v6-agent-frame", [KERNEL, KERNEL])?;
    let macs = [seed.host1.vtep6_mac()?, seed.host2.vtep6_mac()?];
    check_ipv6_vxlan_frame(&seed.cluster, &seed.bbox1, BBOX2_V6, [&macs[0], &macs[1]])
}

#[test]
fn ip_masq_takes_containers_out_over_ipv6_as_their_host() -> Result<()> {
    let flags: &[&str] = &["--dataplane=kernel", "--ip-masq"];
    let mut seed = Seed::start_dual_stack("v6-masq", [flags, flags])?;
    // A host outside the overlay, on the underlay's IPv6 segment, with no route to it.
    let outside = seed.cluster.add_host("outside", "172.20.62.200")?;
    let ip6tables = |args: &[&str]| seed.host1.netns.exec(&[&["ip6tables"], args].concat());
    let nat = ip6tables(&["-t", "nat", "-S", "FLANNEL-POSTRTG"])?;
    ensure!(
        nat.contains("-s fd00:2::/48 ! -d ff00::/8") && nat.contains("-j MASQUERADE"),
        "flannel's IPv6 masquerade is missing:\n{nat}"
    );
    let forward = ip6tables(&["-S", "FLANNEL-FWD"])?;
    ensure!(
        forward.contains("-s fd00:2::/48") && forward.contains("-d fd00:2::/48"),
        "flannel's IPv6 forward rules are missing:\n{forward}"
    );
    let log = seed.cluster.scratch.path().join("iperf-outside6.log");
    let mut server = iperf3_server(&outside.netns, &log, true)?;
    let outside_ipv6 = outside.ipv6()?;
    seed.bbox1
        .netns
        .exec(&["iperf3", "-c", outside_ipv6, "-t", "1"])?;
    server.wait_exit(READY_TIMEOUT)?;
    ensure!(
        server
            .log()
            .contains(&format!("Accepted connection from {HOST1_V6}")),
        "the outside host did not see host1's address:\n{}",
        server.log()
    );
    Ok(())
}

/// The IPv6-only seed with `flags`: containers reach each other over IPv6 with flannel's
/// hops, each host holds flannel's IPv6-only record, subnet file and entries, and no IPv4.
fn check_ipv6_only_seed(tag: &str, flags: &[&str]) -> Result<()> {
    let seed = Seed::start_ipv6_only(tag, flags)?;
    let subnet1 = subnet6_from_file(&seed.host1.subnet_file()).context("host1's lease")?;
    let subnet2 = subnet6_from_file(&seed.host2.subnet_file()).context("host2's lease")?;
    check_ipv6_both_ways(&seed.bbox1, &seed.bbox2, [&subnet1, &subnet2])?;
    for (host, subnet6) in [(&seed.host1, &subnet1), (&seed.host2, &subnet2)] {
        check_record(
            &seed.cluster,
            host,
            &seed.cluster.subnet_key6(None, subnet6),
            false,
        )?;
        check_subnet_file(host, None, subnet6)?;
        check_no_ipv4_overlay(host)?;
    }
    let remote = Remote6 {
        subnet6: &subnet2,
        public_ipv6: HOST2_V6,
        vtep6_mac: &seed.host2.vtep6_mac()?,
    };
    check_ipv6_node(&seed.host1, &subnet1, &remote)
}

test_matrix! { check_ipv6_only_seed {
    ipv6_only_seed_in_kernel_mode: ("v6-only", KERNEL),
    ipv6_only_seed_in_ebpf_mode: ("v6-only-ebpf", EBPF),
}}

test_matrix! { check_hosts_without_ipv4 {
    an_ipv6_only_host_needs_no_ipv4_address_on_its_uplink: ("v6-bare", KERNEL),
    an_ipv6_only_host_needs_no_ipv4_address_on_its_uplink_in_ebpf_mode: ("v6-bare-ebpf", EBPF),
}}

/// Two hosts whose uplinks have IPv6 alone, reaching etcd over IPv6, run the IPv6-only seed
/// with agents given `mode`.
fn check_hosts_without_ipv4(tag: &str, mode: &[&str]) -> Result<()> {
    let mut cluster = Cluster::with_ipv6(tag, IPV6_ONLY_NETWORK_CONFIG)?;
    let both = format!("http://{UNDERLAY_GATEWAY}:2379,http://[{UNDERLAY_GATEWAY6}]:2379");
    cluster
        .etcd
        .restart_with_flags(&[&format!("--listen-client-urls={both}")])?;
    let etcd6 = format!("--etcd-endpoints=http://[{UNDERLAY_GATEWAY6}]:2379");
    let mut hosts = Vec::new();
    for (name, address) in [("host1", HOST1), ("host2", HOST2)] {
        let host = cluster.add_host(name, address)?;
        host.netns
            .ip(&["addr", "del", &format!("{address}/24"), "dev", "eth0"])?;
        let mut flags = Agent::flags(&cluster, &host, mode);
        flags[0] = etcd6.clone();
        let mut agent = Agent::start_with(&host, &flags, &[])?;
        let subnet6 = agent.wait_ready_ipv6()?;
        // Tuple fields drop in order: the agent stops before its namespace goes.
        hosts.push((agent, host, subnet6));
    }
    let [(_agent1, host1, subnet1), (_agent2, host2, subnet2)] = &hosts[..] else {
        unreachable!("two hosts were added");
    };
    host1.wait_for_route(subnet2)?;
    host2.wait_for_route(subnet1)?;
    let bbox1 = Container::attach_ipv6_only(host1, "bbox1", &address_in(subnet1, 2)?)?;
    let bbox2 = Container::attach_ipv6_only(host2, "bbox2", &address_in(subnet2, 2)?)?;
    check_ipv6_both_ways(&bbox1, &bbox2, [subnet1, subnet2])?;
    check_record(&cluster, host1, &cluster.subnet_key6(None, subnet1), false)
}

/// What teardown must leave as it was, in both families.
fn snapshot(host: &Host) -> Result<Vec<String>> {
    Ok(vec![
        host.netns.ip(&["-d", "link", "show"])?,
        host.netns.ip(&["addr", "show"])?,
        host.netns.ip(&["-4", "route", "show", "table", "all"])?,
        host.netns.ip(&["-6", "route", "show", "table", "all"])?,
        host.netns.ip(&["neigh", "show", "nud", "permanent"])?,
        host.netns.exec(&["bridge", "fdb", "show"])?,
        host.netns.exec(&["nft", "list", "ruleset"])?,
    ])
}

#[test]
fn teardown_removes_both_families_and_release_lease_deletes_the_dual_stack_record() -> Result<()> {
    let mut cluster = Cluster::with_ipv6("v6-teardown", DUAL_STACK_NETWORK_CONFIG)?;
    let remote = lease_value(
        Some(Vtep {
            public_ip: HOST2,
            mac: STOCK_MACS[1].0,
        }),
        Some(Vtep {
            public_ip: HOST2_V6,
            mac: STOCK_MACS[1].1,
        }),
    );
    cluster
        .etcd
        .put(&cluster.subnet_key6(Some(SUBNET2), SUBNET2_V6), &remote)?;
    // host1's earlier lease, which the agent takes again: a lease, not a reservation (which
    // --release-lease keeps).
    let earlier = cluster.etcd.grant(3600)?;
    cluster.etcd.put_under_lease(
        &cluster.subnet_key6(Some(SUBNET1), SUBNET1_V6),
        &format!(r#"{{"PublicIP":"{HOST1}"}}"#),
        &earlier,
    )?;
    let host1 = cluster.add_host("host1", HOST1)?;
    // Forwarding, which the agent turns on and teardown leaves on (as ip_forward), adds
    // the router's anycast addresses and multicast groups: on before the snapshot.
    host1
        .netns
        .exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let before = snapshot(&host1)?;
    let flags = ["--dataplane=kernel", "--ip-masq", "--ip-blackhole-route"];
    let mut agent = Agent::start(&cluster, &host1, &flags)?;
    agent.wait_ready_ipv6()?;
    host1.wait_for_route(SUBNET2_V6)?;
    ensure!(
        host1
            .netns
            .ip(&["-6", "route", "show", "type", "blackhole"])?
            .contains(SUBNET1_V6),
        "no IPv6 blackhole route"
    );
    agent.process.terminate(READY_TIMEOUT)?;

    let etcd = [
        format!("--etcd-endpoints={}", cluster.etcd.endpoint()),
        format!("--etcd-prefix={PREFIX}"),
        format!("--subnet-file={}", host1.subnet_file().display()),
    ];
    let teardown = |extra: &[&str]| -> Result<()> {
        let args: Vec<String> = ["teardown"]
            .iter()
            .chain(extra)
            .map(|arg| arg.to_string())
            .chain(etcd.iter().cloned())
            .collect();
        let mut run = Agent::start_with(&host1, &args, &[])?;
        ensure!(
            run.process.wait_exit(READY_TIMEOUT)?.success(),
            "{}",
            run.log()
        );
        Ok(())
    };
    teardown(&[])?;
    let after = snapshot(&host1)?;
    ensure!(after == before, "before:\n{before:#?}\nafter:\n{after:#?}");
    let own_key = cluster.subnet_key6(Some(SUBNET1), SUBNET1_V6);
    ensure!(
        cluster.etcd.get(&own_key)?.is_some(),
        "the lease is kept by default"
    );
    teardown(&["--release-lease"])?;
    ensure!(
        cluster.etcd.get(&own_key)?.is_none(),
        "--release-lease deletes the dual-stack record"
    );
    Ok(())
}

#[test]
fn turning_ipv6_on_keeps_every_hosts_ipv4_subnet() -> Result<()> {
    let mut cluster = Cluster::with_ipv6("v6-turn-on", SEED_NETWORK_CONFIG)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let mut agents = Vec::new();
    let mut subnets = Vec::new();
    for host in [&host1, &host2] {
        let mut agent = Agent::start(&cluster, host, EBPF)?;
        subnets.push(agent.wait_ready()?);
        agents.push(agent);
    }
    // The agents of an IPv4 network see the config change and exit; their supervisor (here
    // the test) starts them again into the dual-stack network.
    cluster
        .etcd
        .put(&format!("{PREFIX}/config"), DUAL_STACK_NETWORK_CONFIG)?;
    for agent in &mut agents {
        let status = agent.process.wait_exit(Duration::from_secs(30))?;
        ensure!(!status.success(), "the agent ignored the new config");
    }
    let mut subnets6 = Vec::new();
    for (index, host) in [&host1, &host2].into_iter().enumerate() {
        agents[index] = Agent::start(&cluster, host, EBPF)?;
        subnets6.push(agents[index].wait_ready_ipv6()?);
        let subnet =
            subnet_from_file(&host.subnet_file()).context("no FLANNEL_SUBNET after the restart")?;
        ensure!(
            subnet == subnets[index],
            "{} moved from {} to {subnet}",
            host.name,
            subnets[index]
        );
    }
    host1.wait_for_route(&subnets6[1])?;
    host2.wait_for_route(&subnets6[0])?;
    host1.wait_for_route(&subnets[1])?;
    let bbox = |host: &Host, subnet: &str, subnet6: &str| -> Result<Container> {
        let address = format!("{}.2", subnet.trim_end_matches(".0/24"));
        Container::attach_dual_stack(host, "bbox", &address, &address_in(subnet6, 2)?)
    };
    let bbox1 = bbox(&host1, &subnets[0], &subnets6[0])?;
    let bbox2 = bbox(&host2, &subnets[1], &subnets6[1])?;
    check_ipv6_both_ways(&bbox1, &bbox2, [&subnets6[0], &subnets6[1]])?;
    let reply = bbox1.ping(&bbox2.address, 2)?;
    ensure!(reply.matches("ttl=62").count() == 2, "{reply}");
    Ok(())
}

/// Records naming IPv6 subnets no host may route to: our IPv6 subnet under another IPv4 one,
/// an IPv6 subnet outside the network, half of ours, one with no IPv6 VTEP, and an
/// IPv6-only key in a dual-stack network.
const HOSTILE_IPV6_KEYS: [&str; 5] = [
    "10.2.70.0-24&fd00:2:0:41::-64",
    "10.2.71.0-24&fd00:3::-64",
    "10.2.72.0-24&fd00:2:0:41:8000::-65",
    "10.2.73.0-24&fd00:2:0:73::-64",
    "0.0.0.0-0&fd00:2:0:74::-64",
];

#[test]
fn hostile_ipv6_records_leave_the_agent_up_and_routing() -> Result<()> {
    let mut cluster = Cluster::with_ipv6("v6-hostile", DUAL_STACK_NETWORK_CONFIG)?;
    cluster.reserve_dual_stack(SUBNET1, SUBNET1_V6, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    let hostile = lease_value(
        Some(Vtep {
            public_ip: "172.20.62.66",
            mac: "1a:4b:d7:f7:16:66",
        }),
        Some(Vtep {
            public_ip: "fd00:ff::66",
            mac: "1a:4b:d7:f7:66:66",
        }),
    );
    let no_ipv6_vtep = lease_value(
        Some(Vtep {
            public_ip: "172.20.62.67",
            mac: "1a:4b:d7:f7:16:67",
        }),
        None,
    );
    let write_hostile = || -> Result<()> {
        for name in HOSTILE_IPV6_KEYS {
            let value = if name.starts_with("10.2.73.") {
                &no_ipv6_vtep
            } else {
                &hostile
            };
            cluster
                .etcd
                .put(&format!("{PREFIX}/subnets/{name}"), value)?;
        }
        Ok(())
    };
    write_hostile()?;
    let mut agent = Agent::start(&cluster, &host1, KERNEL)?;
    ensure!(
        agent.wait_ready_ipv6()? == SUBNET1_V6,
        "host1 kept its reservation"
    );
    write_hostile()?;
    // A lease written after them is routed as usual.
    cluster.etcd.put(
        &cluster.subnet_key6(Some(SUBNET2), SUBNET2_V6),
        &lease_value(
            Some(Vtep {
                public_ip: HOST2,
                mac: STOCK_MACS[1].0,
            }),
            Some(Vtep {
                public_ip: HOST2_V6,
                mac: STOCK_MACS[1].1,
            }),
        ),
    )?;
    host1.wait_for_route(SUBNET2_V6)?;
    agent.ensure_running_and_skipping(&HOSTILE_IPV6_KEYS)?;
    let routes = host1.netns.ip(&["-6", "route"])?;
    for stolen in [
        "fd00:2:0:41::/64 via",
        "fd00:3::",
        "fd00:2:0:41:8000::",
        "fd00:2:0:73::",
        "fd00:2:0:74::",
    ] {
        ensure!(
            !routes.contains(stolen),
            "a hostile record was routed:\n{routes}"
        );
    }
    Ok(())
}

/// A hand-built stock flannel host2 next to an agent on host1 (given `flags`), in the
/// dual-stack network or, unless `dual_stack`, the IPv6-only one; the stock host takes SUBNET2 (and SUBNET2_V6) first, the agent reserves or
/// picks its own, and the stock host then learns the agent's lease as flannel would.
/// Containers on both reach each other both ways over IPv6 (and over IPv4 when the network
/// has it); host1 holds the stock host's lease as flannel does.
fn check_interop(tag: &str, dual_stack: bool, flags: &[&str]) -> Result<()> {
    let mut cluster = Cluster::with_ipv6(tag, network_config(dual_stack))?;
    if dual_stack {
        cluster.reserve_dual_stack(SUBNET1, SUBNET1_V6, HOST1)?;
    }
    let host1 = cluster.add_host("host1", HOST1)?;
    let host2 = cluster.add_host("host2", HOST2)?;
    let (stock_mac, stock_mac6) = STOCK_MACS[1];
    let lease = Lease6 {
        ipv4: dual_stack.then_some((SUBNET2, stock_mac)),
        ipv6: (SUBNET2_V6, stock_mac6),
    };
    stock_flannel::configure_ipv6(&cluster, &host2, &lease, &[], &[])?;
    let mut agent = Agent::start(&cluster, &host1, flags)?;
    let subnet1 = agent.wait_ready_ipv6()?;
    add_peer(
        &host2.netns,
        "flannel-v6.1",
        &Peer {
            subnet: &subnet1,
            public_ip: HOST1_V6,
            vtep_mac: &host1.vtep6_mac()?,
        },
    )?;
    if dual_stack {
        ensure!(subnet1 == SUBNET1_V6, "host1 did not get its reservation");
        add_peer(
            &host2.netns,
            "flannel.1",
            &Peer {
                subnet: SUBNET1,
                public_ip: HOST1,
                vtep_mac: &host1.vtep_mac()?,
            },
        )?;
        host1.wait_for_route(SUBNET2)?;
    }
    host1.wait_for_route(SUBNET2_V6)?;
    let bbox1_v6 = address_in(&subnet1, 2)?;
    let bbox1 = attach_seed_container(&host1, "bbox1", BBOX1, &bbox1_v6, dual_stack)?;
    let bbox2 = attach_seed_container(&host2, "bbox2", BBOX2, BBOX2_V6, dual_stack)?;
    check_ipv6_both_ways(&bbox1, &bbox2, [&subnet1, SUBNET2_V6])?;
    if dual_stack {
        check_seed_path(&bbox1, BBOX2)?;
        check_seed_path_back(&bbox2)?;
    }
    let stock = Remote6 {
        subnet6: SUBNET2_V6,
        public_ipv6: HOST2_V6,
        vtep6_mac: stock_mac6,
    };
    check_ipv6_node(&host1, &subnet1, &stock)
        .with_context(|| format!("agent log:\n{}", agent.log()))
}

// The agent's dataplane, with IPv4 next to IPv6 (dual stack) or not.
test_matrix! { check_interop {
    a_kernel_mode_agent_and_stock_flannel_interoperate_in_dual_stack:
        ("v6-interop-kernel", true, KERNEL),
    an_ebpf_mode_agent_and_stock_flannel_interoperate_in_dual_stack:
        ("v6-interop-ebpf", true, EBPF),
    a_kernel_mode_agent_and_stock_flannel_interoperate_in_ipv6_only:
        ("v6-interop-only", false, KERNEL),
    an_ebpf_mode_agent_and_stock_flannel_interoperate_in_ipv6_only:
        ("v6-interop-only-ebpf", false, EBPF),
}}

/// The containers' MTU is FLANNEL_MTU, 1450, the IPv4 device's; flannel-v6.1's is 1430. A
/// full-size IPv6 segment from a container is 20 bytes too big for the tunnel: docker0's
/// router answers "packet too big" and TCP sends smaller ones (PMTUD), in either dataplane.
#[test]
fn a_full_size_ipv6_tcp_transfer_between_containers_finds_the_tunnel_s_mtu() -> Result<()> {
    for (tag, flags) in [("pmtud-ebpf", EBPF), ("pmtud-kernel", KERNEL)] {
        let seed = Seed::start_dual_stack(tag, [flags, flags])?;
        let log = seed.cluster.scratch.path().join("iperf3-server.log");
        let mut server = iperf3_server(&seed.bbox2.netns, &log, true)?;
        // 4 MiB in full-size segments (iperf3's default MSS follows the container's MTU).
        let client = seed
            .bbox1
            .netns
            .exec_unchecked(&["timeout", "30", "iperf3", "-6", "-c", BBOX2_V6, "-n", "4M"])?;
        ensure!(
            client.status.success(),
            "{tag}: the transfer did not complete:\n{}\n{}",
            String::from_utf8_lossy(&client.stdout),
            String::from_utf8_lossy(&client.stderr)
        );
        ensure!(
            server.wait_exit(READY_TIMEOUT)?.success(),
            "{}",
            server.log()
        );
        let nstat = seed
            .bbox1
            .netns
            .exec(&["nstat", "-az", "Icmp6InPktTooBigs"])?;
        let too_big: u64 = nstat
            .lines()
            .find_map(|line| line.strip_prefix("Icmp6InPktTooBigs"))
            .and_then(|rest| rest.split_whitespace().next())
            .context("nstat names Icmp6InPktTooBigs")?
            .parse()?;
        ensure!(
            too_big > 0,
            "{tag}: bbox1 was never told its segments are too big:\n{nstat}"
        );
    }
    Ok(())
}
