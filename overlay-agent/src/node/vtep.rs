//! The VXLAN device (`flannel.<VNI>`), configured exactly as flannel configures it.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle, LinkVxlan,
    packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkMessage},
};

use super::links;
use crate::mac::MacAddr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VtepSpec {
    pub name: String,
    pub vni: u32,
    pub local: Ipv4Addr,
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

/// The MAC of an existing device called `name`, so a restarted agent keeps its VTEP MAC and
/// peers never hold a stale ARP entry for it.
pub async fn existing_mac(handle: &Handle, name: &str) -> Result<Option<MacAddr>> {
    Ok(links::find(handle, name)
        .await?
        .as_ref()
        .and_then(links::mac))
}

/// Makes sure the device matches `spec` (recreating it when it does not), is up, and carries
/// the lease's network address as /32 and no other address inside `network`; returns its
/// index.
pub async fn ensure(
    handle: &Handle,
    spec: &VtepSpec,
    subnet: Ipv4Network,
    network: Ipv4Network,
) -> Result<u32> {
    let link = match links::find(handle, &spec.name).await? {
        Some(link) if matches_spec(&link, spec) => link,
        Some(stale) => {
            log::warn!(
                "{} does not match the network config; recreating it",
                spec.name
            );
            handle
                .link()
                .del(stale.header.index)
                .execute()
                .await
                .with_context(|| format!("cannot delete the incompatible {}", spec.name))?;
            create(handle, spec).await?
        }
        None => create(handle, spec).await?,
    };
    links::set_up_with_mtu(handle, &link, Some(spec.mtu)).await?;
    links::ensure_lease_address(handle, link.header.index, subnet.network(), 32, network).await?;
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
    let device = LinkVxlan::new(&spec.name, spec.vni)
        .dev(spec.uplink_index)
        .local(spec.local)
        .port(spec.port)
        .learning(spec.learning)
        // flannel's wire format carries a zero outer UDP checksum.
        .udp_csum(false)
        .mtu(spec.mtu)
        .append_extra_attribute(LinkAttribute::Address(spec.mac.0.to_vec()));
    let message = if spec.gbp { device.gbp() } else { device }.build();
    links::create(handle, &spec.name, message).await
}

/// Whether the device is the vxlan device `spec` describes; the MTU is fixed in place instead.
fn matches_spec(link: &LinkMessage, spec: &VtepSpec) -> bool {
    let Some(InfoData::Vxlan(attributes)) = links::info_data(link) else {
        return false;
    };
    let has = |wanted: &InfoVxlan| attributes.contains(wanted);
    links::kind(link) == Some(&InfoKind::Vxlan)
        && links::mac(link) == Some(spec.mac)
        && has(&InfoVxlan::Id(spec.vni))
        && has(&InfoVxlan::Local(spec.local))
        && has(&InfoVxlan::Link(spec.uplink_index))
        && has(&InfoVxlan::Port(spec.port))
        && has(&InfoVxlan::Learning(spec.learning))
        && has(&InfoVxlan::Gbp) == spec.gbp
        && has(&InfoVxlan::UDPCsum(false))
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
