//! A host configured by the test exactly as stock flannel's vxlan backend configures the
//! kernel (flannel.md), with no agent: the other side of every interop test.
use anyhow::Result;

use crate::{
    cluster::{Cluster, Host},
    netns::Netns,
};

/// Another host as stock flannel learns it from its lease.
pub struct Peer<'a> {
    pub subnet: &'a str,
    pub public_ip: &'a str,
    pub vtep_mac: &'a str,
}

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
    let network = subnet.trim_end_matches("/24");
    let gateway = format!("{}.1/24", network.trim_end_matches(".0"));
    add_vtep(ns, "flannel.1", 1, &host.address, mac)?;
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450"])?;
    ns.ip(&["addr", "add", &format!("{network}/32"), "dev", "flannel.1"])?;
    ns.ip(&["link", "add", "docker0", "type", "bridge"])?;
    ns.ip(&["addr", "add", &gateway, "dev", "docker0"])?;
    ns.ip(&["link", "set", "docker0", "up"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for peer in peers {
        add_peer(ns, "flannel.1", peer)?;
    }
    let record = format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#,
        host.address
    );
    cluster.etcd.put(&cluster.subnet_key(subnet), &record)
}

/// A VXLAN device as flannel makes it, up: VNI `vni`, MAC `mac`, local `local` on eth0, port
/// 8472, no learning, a zero outer UDP checksum.
pub fn add_vtep(ns: &Netns, name: &str, vni: u32, local: &str, mac: &str) -> Result<()> {
    let vni = vni.to_string();
    ns.ip(&[
        "link",
        "add",
        name,
        "address",
        mac,
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
        "noudpcsum",
    ])?;
    ns.ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// A peer's entries on `device`, in flannel's order: the permanent neighbour for its gateway
/// (`<subnet>.0`), the FDB entry to its PublicIP, then the onlink route.
pub fn add_peer(ns: &Netns, device: &str, peer: &Peer) -> Result<()> {
    let gateway = peer.subnet.trim_end_matches("/24");
    ns.ip(&[
        "neigh",
        "add",
        gateway,
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
        gateway,
        "dev",
        device,
        "onlink",
    ])?;
    Ok(())
}
