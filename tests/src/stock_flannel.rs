//! A host configured by the test exactly as stock flannel's vxlan backend configures the
//! kernel (flannel.md), with no agent: the other side of every interop test. With IPv6, the
//! second half of flannel's backend too: flannel-v6.1 and its per-lease entries.
use anyhow::{Context, Result};
use ipnetwork::IpNetwork;

use crate::{
    cluster::{Cluster, Host},
    ipv6::{address_in, bridge_gateway6},
    netns::Netns,
};

/// Another host as stock flannel learns it from its lease: its IPv4 subnet, PublicIP and
/// flannel.1's MAC, or its IPv6 subnet, PublicIPv6 and flannel-v6.1's MAC.
pub struct Peer<'a> {
    pub subnet: &'a str,
    pub public_ip: &'a str,
    pub vtep_mac: &'a str,
}

/// A stock flannel host's lease in a network with IPv6.
pub struct Lease6<'a> {
    /// The IPv4 subnet and flannel.1's MAC; none in an IPv6-only network.
    pub ipv4: Option<(&'a str, &'a str)>,
    /// The IPv6 subnet and flannel-v6.1's MAC.
    pub ipv6: (&'a str, &'a str),
}

/// One half of a lease's value: the public address its tunnel ends at and its VTEP's MAC.
pub struct Vtep<'a> {
    pub public_ip: &'a str,
    pub mac: &'a str,
}

/// The MTU flannel asks for its VXLAN devices: the uplink's (1500) less 50.
const VTEP_MTU: &str = "1450";

/// Builds flannel.1 (VTEP `mac`) and docker0 on `host` for the /24 `subnet`, adds every peer
/// in flannel's order, and writes the host's lease in flannel's format.
pub fn configure(
    cluster: &Cluster,
    host: &Host,
    subnet: &str,
    mac: &str,
    peers: &[Peer],
) -> Result<()> {
    let ns = &host.netns;
    let gateway = add_ipv4_overlay(ns, &host.address, subnet, mac, peers)?;
    add_bridge(ns, &[gateway])?;
    let record = lease_value(
        Some(Vtep {
            public_ip: &host.address,
            mac,
        }),
        None,
    );
    put_lease(cluster, &cluster.subnet_key(subnet), &record)
}

/// flanneld's lease TTL: its record is attached to an etcd lease of 24 h.
const LEASE_TTL_SECONDS: u64 = 24 * 60 * 60;

/// Writes a record as flanneld does: attached to a fresh etcd lease of 24 h.
fn put_lease(cluster: &Cluster, key: &str, record: &str) -> Result<()> {
    let lease = cluster.etcd.grant(LEASE_TTL_SECONDS)?;
    cluster.etcd.put_under_lease(key, record, &lease)
}

/// flanneld's iptables rules on `host` for `network` and its /24 `subnet`, as its first start
/// writes them (trafficmngr/iptables, with `--ip-masq` and the default
/// `--iptables-forward-rules`) through `iptables` (`iptables`, `iptables-legacy`): each chain
/// made with `-N`, then the jump and the chain's rules in one `iptables-restore --noflush`,
/// with flannel's comments and `--random-fully`.
pub fn add_flanneld_rules(host: &Host, iptables: &str, network: &str, subnet: &str) -> Result<()> {
    let masq = r#"-m comment --comment "flanneld masq""#;
    let forward = r#"-m comment --comment "flanneld forward""#;
    let masquerade = "MASQUERADE --random-fully";
    let nat = [
        format!("-A POSTROUTING {masq} -j FLANNEL-POSTRTG"),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {masq} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {subnet} -d {network} {masq} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {network} -d {subnet} {masq} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {network} -d {subnet} {masq} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 {masq} -j {masquerade}"),
        format!("-A FLANNEL-POSTRTG ! -s {network} -d {network} {masq} -j {masquerade}"),
    ];
    let filter = [
        format!("-A FORWARD {forward} -j FLANNEL-FWD"),
        format!("-A FLANNEL-FWD -s {network} {forward} -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {network} {forward} -j ACCEPT"),
    ];
    for (table, chain, rules) in [
        ("nat", "FLANNEL-POSTRTG", &nat[..]),
        ("filter", "FLANNEL-FWD", &filter[..]),
    ] {
        host.netns
            .exec(&[iptables, "-w", "-t", table, "-N", chain])?;
        let input = host.dir.join(format!("flanneld-{table}.rules"));
        std::fs::write(&input, format!("*{table}\n{}\nCOMMIT\n", rules.join("\n")))?;
        let input = input.to_string_lossy();
        let restore = format!("{iptables}-restore");
        host.netns
            .exec(&[&restore, "-w", "--noflush", input.as_ref()])?;
    }
    Ok(())
}

/// Builds what flannel builds on `host` in a network with IPv6: flannel.1 with `peers` when
/// the lease has an IPv4 subnet, flannel-v6.1 with `peers6`, docker0 with the gateway of each
/// subnet (as Docker makes it from the subnet file), forwarding on; then writes the lease
/// under flannel's dual-stack (or IPv6-only) key, as flannel writes it.
pub fn configure_ipv6(
    cluster: &Cluster,
    host: &Host,
    lease: &Lease6,
    peers: &[Peer],
    peers6: &[Peer],
) -> Result<()> {
    let ns = &host.netns;
    let public_ipv6 = host.ipv6()?;
    let mut gateways = Vec::new();
    if let Some((subnet, mac)) = lease.ipv4 {
        gateways.push(add_ipv4_overlay(ns, &host.address, subnet, mac, peers)?);
    }
    let (subnet6, mac6) = lease.ipv6;
    gateways.push(add_ipv6_overlay(ns, public_ipv6, subnet6, mac6, peers6)?);
    add_bridge(ns, &gateways)?;
    let ipv4 = lease.ipv4.map(|(_, mac)| Vtep {
        public_ip: &host.address,
        mac,
    });
    let ipv6 = Vtep {
        public_ip: public_ipv6,
        mac: mac6,
    };
    let key = cluster.subnet_key6(lease.ipv4.map(|(subnet, _)| subnet), subnet6);
    put_lease(cluster, &key, &lease_value(ipv4, Some(ipv6)))
}

/// A lease's value exactly as flannel writes it (lease.LeaseAttrs, field for field): the
/// IPv4 half's PublicIP and BackendData, the IPv6 half's PublicIPv6 and BackendV6Data. With
/// no IPv4 half, PublicIP is 0.0.0.0 and BackendData absent.
pub fn lease_value(ipv4: Option<Vtep>, ipv6: Option<Vtep>) -> String {
    let backend_data = |vtep: &Vtep| format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, vtep.mac);
    let public_ip = ipv4.as_ref().map_or("0.0.0.0", |vtep| vtep.public_ip);
    let mut fields = vec![format!(r#""PublicIP":"{public_ip}""#)];
    if let Some(vtep) = &ipv6 {
        fields.push(format!(r#""PublicIPv6":"{}""#, vtep.public_ip));
    }
    fields.push(r#""BackendType":"vxlan""#.to_string());
    if let Some(vtep) = &ipv4 {
        fields.push(format!(r#""BackendData":{}"#, backend_data(vtep)));
    }
    if let Some(vtep) = &ipv6 {
        fields.push(format!(r#""BackendV6Data":{}"#, backend_data(vtep)));
    }
    format!("{{{}}}", fields.join(","))
}

/// flannel.1 for the /24 `subnet` with its address and `peers`, IPv4 forwarding on; returns
/// docker0's address in `subnet` (CIDR).
fn add_ipv4_overlay(
    ns: &Netns,
    public_ip: &str,
    subnet: &str,
    mac: &str,
    peers: &[Peer],
) -> Result<String> {
    let network = subnet.trim_end_matches("/24");
    add_vtep(ns, "flannel.1", 1, public_ip, mac)?;
    ns.ip(&["addr", "add", &format!("{network}/32"), "dev", "flannel.1"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for peer in peers {
        add_peer(ns, "flannel.1", peer)?;
    }
    Ok(format!("{}.1/24", network.trim_end_matches(".0")))
}

/// flannel-v6.1 for the IPv6 `subnet6` with its /128 address and `peers6`, IPv6 forwarding
/// on; returns docker0's address in `subnet6` (CIDR).
fn add_ipv6_overlay(
    ns: &Netns,
    public_ipv6: &str,
    subnet6: &str,
    mac6: &str,
    peers6: &[Peer],
) -> Result<String> {
    add_vtep6(ns, "flannel-v6.1", 1, public_ipv6, mac6)?;
    let address = format!("{}/128", address_in(subnet6, 0)?);
    ns.ip(&["addr", "add", &address, "dev", "flannel-v6.1"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    for peer in peers6 {
        add_peer(ns, "flannel-v6.1", peer)?;
    }
    let prefix = subnet6
        .rsplit('/')
        .next()
        .context("a subnet with a length")?;
    Ok(format!("{}/{prefix}", bridge_gateway6(subnet6)?))
}

/// docker0, up, with `addresses` (CIDR).
fn add_bridge(ns: &Netns, addresses: &[String]) -> Result<()> {
    ns.ip(&["link", "add", "docker0", "type", "bridge"])?;
    for address in addresses {
        ns.ip(&["addr", "add", address, "dev", "docker0"])?;
    }
    ns.ip(&["link", "set", "docker0", "up"])?;
    Ok(())
}

/// A VXLAN device as flanneld's netlink request makes it, up: VNI `vni`, MAC `mac`, local
/// `local` on eth0, port 8472, no learning, MTU the uplink's less 50. flanneld's netlink
/// library sends no IFLA_VXLAN_UDP_CSUM, so the outer UDP checksum is the kernel's default:
/// computed (`udpcsum`, on 6.18).
pub fn add_vtep(ns: &Netns, name: &str, vni: u32, local: &str, mac: &str) -> Result<()> {
    add_vxlan(ns, name, vni, local, mac, &["mtu", VTEP_MTU], &[])
}

/// [`add_vtep`] with a zero outer UDP checksum (`noudpcsum`), as our programs send it: the
/// kernel's frames then match ours byte for byte.
pub fn add_vtep_zero_checksum(
    ns: &Netns,
    name: &str,
    vni: u32,
    local: &str,
    mac: &str,
) -> Result<()> {
    add_vxlan(
        ns,
        name,
        vni,
        local,
        mac,
        &["mtu", VTEP_MTU],
        &["noudpcsum"],
    )
}

/// flannel's IPv6 VXLAN device (flannel-v6.1), up, as its netlink request makes it: VNI
/// `vni`, MAC `mac`, local `local6` on eth0, port 8472, no learning, MTU asked as the
/// uplink's less 50 (the kernel caps it at the uplink's less 70, VXLAN's overhead over
/// IPv6), udp6zerocsumtx and udp6zerocsumrx off (flannel's netlink library sends both as 0),
/// so the outer UDP checksum is computed on send and required on receive; accept_ra 0.
pub fn add_vtep6(ns: &Netns, name: &str, vni: u32, local6: &str, mac: &str) -> Result<()> {
    let checksums = ["noudp6zerocsumtx", "noudp6zerocsumrx"];
    add_vxlan(ns, name, vni, local6, mac, &["mtu", VTEP_MTU], &checksums)?;
    // sysctl names an interface's dots as slashes.
    let accept_ra = format!("net.ipv6.conf.{}.accept_ra=0", name.replace('.', "/"));
    ns.exec(&["sysctl", "-qw", &accept_ra]).map(drop)
}

/// `ip link add name address mac link_options... type vxlan id vni local local dev eth0
/// dstport 8472 nolearning vxlan_options...`, then up.
fn add_vxlan(
    ns: &Netns,
    name: &str,
    vni: u32,
    local: &str,
    mac: &str,
    link_options: &[&str],
    vxlan_options: &[&str],
) -> Result<()> {
    let vni = vni.to_string();
    let device = ["link", "add", name, "address", mac];
    let vxlan = [
        "type",
        "vxlan",
        "id",
        &vni,
        "local",
        local,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ];
    ns.ip(&[&device[..], link_options, &vxlan, vxlan_options].concat())?;
    ns.ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// A peer's entries on `device`, in flannel's order: the permanent neighbour for its gateway
/// (the subnet's network address: `10.2.54.0`, `fd00:2:0:54::`), the FDB entry to its public
/// address, then the onlink route.
pub fn add_peer(ns: &Netns, device: &str, peer: &Peer) -> Result<()> {
    let subnet: IpNetwork = peer
        .subnet
        .parse()
        .with_context(|| format!("peer subnet {:?}", peer.subnet))?;
    let gateway = subnet.network().to_string();
    ns.ip(&[
        "neigh",
        "add",
        &gateway,
        "lladdr",
        peer.vtep_mac,
        "dev",
        device,
        "nud",
        "permanent",
    ])?;
    ns.exec(&[
        "bridge",
        "fdb",
        "append",
        peer.vtep_mac,
        "dev",
        device,
        "dst",
        peer.public_ip,
    ])?;
    ns.ip(&[
        "route",
        "add",
        peer.subnet,
        "via",
        &gateway,
        "dev",
        device,
        "onlink",
    ])?;
    Ok(())
}
