//! The VXLAN devices (`flannel.<VNI>` over IPv4, `flannel-v6.<VNI>` over IPv6), configured
//! as flannel configures them.
use std::net::IpAddr;

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan,
    packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
};

use super::links;
use crate::mac::MacAddr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VtepSpec {
    pub name: String,
    pub vni: u32,
    /// The tunnel's source, whose family is the underlay's.
    pub local: IpAddr,
    pub uplink_index: u32,
    pub port: u16,
    pub mtu: u32,
    pub mac: MacAddr,
    /// The network config's `GBP`: VXLAN Group Based Policy extension.
    pub gbp: bool,
    /// The network config's `Learning`: the device learns remote MACs from received frames.
    pub learning: bool,
}

/// flannel's name for the device of `vni`.
pub fn device_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// flannel's name for the IPv6 device of `vni`.
pub fn ipv6_device_name(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}

/// The MAC of an existing device called `name`, so a restarted agent keeps its VTEP MAC and
/// peers never hold a stale ARP entry for it.
pub async fn existing_mac(handle: &Handle, name: &str) -> Result<Option<MacAddr>> {
    Ok(links::find(handle, name)
        .await?
        .as_ref()
        .and_then(links::mac))
}

/// Makes sure the device matches `spec` (changing it in place where the kernel allows,
/// recreating it where the peers' view of it differs), is up, and carries
/// the lease's network address as a host address (/32, /128) and no other address inside
/// `network`; returns its index.
pub async fn ensure(
    handle: &Handle,
    spec: &VtepSpec,
    subnet: IpNetwork,
    network: IpNetwork,
) -> Result<u32> {
    let link = match links::find(handle, &spec.name).await? {
        Some(link) if matches_spec(&link, spec) => {
            set_learning(handle, &link, spec).await?;
            link
        }
        Some(stale) => {
            log::warn!(
                "{} does not match the network config; recreating it",
                spec.name
            );
            links::delete(handle, &stale, &spec.name).await?;
            create(handle, spec).await?
        }
        None => create(handle, spec).await?,
    };
    links::set_up_with_mtu(handle, &link, Some(spec.mtu)).await?;
    let host_len = if subnet.is_ipv4() { 32 } else { 128 };
    links::ensure_lease_address(
        handle,
        link.header.index,
        subnet.network(),
        host_len,
        network,
    )
    .await?;
    disable_router_advertisements(&spec.name);
    Ok(link.header.index)
}

async fn create(handle: &Handle, spec: &VtepSpec) -> Result<LinkMessage> {
    log::info!(
        "creating {} (VNI {}, VTEP MAC {})",
        spec.name,
        spec.vni,
        spec.mac
    );
    let device = LinkVxlan::new(&spec.name, spec.vni).dev(spec.uplink_index);
    let device = match spec.local {
        // A zero outer UDP checksum over IPv4, as our programs send it (receivers accept a
        // zero checksum and a computed one alike; flanneld's device computes it).
        IpAddr::V4(local) => device.local(local).udp_csum(false),
        // Over IPv6 flannel sets no checksum flags: the kernel computes the outer UDP
        // checksum and refuses a zero one (udp6zerocsumtx and udp6zerocsumrx off).
        IpAddr::V6(local) => device.local6(local),
    };
    let device = device
        .port(spec.port)
        .learning(spec.learning)
        .mtu(spec.mtu)
        .append_extra_attribute(LinkAttribute::Address(spec.mac.0.to_vec()));
    let message = if spec.gbp { device.gbp() } else { device }.build();
    links::create(handle, &spec.name, message).await
}

/// Turns the device's learning (`learning`, the network config's `Learning`) to `spec`'s in
/// place, where it differs: the kernel allows it on a live device.
async fn set_learning(handle: &Handle, link: &LinkMessage, spec: &VtepSpec) -> Result<()> {
    let Some(InfoData::Vxlan(attributes)) = links::info_data(link) else {
        return Ok(());
    };
    if attributes.contains(&InfoVxlan::Learning(spec.learning)) {
        return Ok(());
    }
    log::info!(
        "{}: turning learning {} in place",
        spec.name,
        if spec.learning { "on" } else { "off" }
    );
    let mut change = LinkUnspec::new_with_index(link.header.index).build();
    change.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![InfoVxlan::Learning(spec.learning)])),
    ]));
    // RTM_NEWLINK on the existing device, as `ip link set ... type vxlan` sends it: RTM_SETLINK
    // would leave the vxlan attributes alone.
    handle
        .link()
        .change(change)
        .execute()
        .await
        .with_context(|| format!("cannot set learning on {}", spec.name))
}

/// Whether the device can carry `spec`'s traffic, adopted as it is but for what is changed
/// in place: the attributes that make the wire contract with the peers (their FDB and
/// neighbour entries name our MAC, their VXLAN goes to our local address, port and VNI) must
/// match; the rest is adopted as found, so a device flanneld made is taken over in place,
/// never recreated:
/// - the MTU and `learning` (whether the device learns remote MACs from what it receives)
///   are changed in place;
/// - over IPv4 the outer UDP checksum (`udpcsum`) is not compared: a receiver takes a zero
///   checksum and a computed one alike, flanneld leaves it to the kernel's default (on, on
///   6.18, so its flannel.1 computes it), and the kernel refuses to change it in place;
/// - over IPv6 a zero checksum on transmit is compared: peers refuse it (udp6zerocsumrx off);
/// - the uplink (`dev`) and `gbp` are compared: they decide where frames leave and what they
///   carry, and flanneld sets them from the same flags and config, so they differ only where
///   the node's configuration did;
/// - TTL, TOS, ageing and the source port range keep the kernel's defaults under flanneld as
///   under us, and change no frame a peer would refuse.
fn matches_spec(link: &LinkMessage, spec: &VtepSpec) -> bool {
    let Some(InfoData::Vxlan(attributes)) = links::info_data(link) else {
        return false;
    };
    let has = |wanted: &InfoVxlan| attributes.contains(wanted);
    let local_matches = match spec.local {
        IpAddr::V4(local) => has(&InfoVxlan::Local(local)),
        IpAddr::V6(local) => {
            has(&InfoVxlan::Local6(local)) && !has(&InfoVxlan::UDPZeroCsumTX(true))
        }
    };
    links::kind(link) == Some(&InfoKind::Vxlan)
        && links::mac(link) == Some(spec.mac)
        && has(&InfoVxlan::Id(spec.vni))
        && local_matches
        && has(&InfoVxlan::Link(spec.uplink_index))
        && has(&InfoVxlan::Port(spec.port))
        && has(&InfoVxlan::Gbp) == spec.gbp
}

/// flannel sets accept_ra to 0 on the device; without IPv6 in the namespace there is nothing
/// to set.
fn disable_router_advertisements(device: &str) {
    let key = format!("net/ipv6/conf/{device}/accept_ra");
    if std::path::Path::new("/proc/sys").join(&key).exists()
        && let Err(error) = links::write_sysctl(&key, "0")
    {
        log::warn!("{error:#}");
    }
}
