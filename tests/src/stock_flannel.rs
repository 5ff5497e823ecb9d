//! A host configured by the test exactly as stock flannel's vxlan backend configures the
//! kernel (flannel.md), with no agent: the other side of every interop test.
use anyhow::Result;

use crate::cluster::{Cluster, Host};

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
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "address",
        mac,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &host.address,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
        "noudpcsum",
    ])?;
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"])?;
    ns.ip(&["addr", "add", &format!("{network}/32"), "dev", "flannel.1"])?;
    ns.ip(&["link", "add", "docker0", "type", "bridge"])?;
    ns.ip(&["addr", "add", &gateway, "dev", "docker0"])?;
    ns.ip(&["link", "set", "docker0", "up"])?;
    ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for peer in peers {
        let peer_gateway = peer.subnet.trim_end_matches("/24");
        ns.ip(&[
            "neigh",
            "add",
            peer_gateway,
            "lladdr",
            peer.vtep_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        ns.exec(&[
            "bridge",
            "fdb",
            "append",
            peer.vtep_mac,
            "dev",
            "flannel.1",
            "dst",
            peer.public_ip,
        ])?;
        ns.ip(&[
            "route",
            "add",
            peer.subnet,
            "via",
            peer_gateway,
            "dev",
            "flannel.1",
            "onlink",
        ])?;
    }
    let record = format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#,
        host.address
    );
    cluster.etcd.put(&cluster.subnet_key(subnet), &record)
}
