//! The headroom port (ebpf mode): a VXLAN device kept down on the container bridge so that
//! containers' packets leave room for the VXLAN header the programs push.
//!
//! A container's socket reserves only the headroom its veth asks for, 16 bytes for a plain
//! veth, so `bpf_skb_adjust_room` reallocates every small packet's head to fit the 50 (70 over
//! IPv6) bytes of outer headers: a quarter of the encapsulation's time in real traffic. Nothing
//! sets a veth's headroom from user space on this kernel, but a bridge raises every port's
//! headroom, and through the veth its container end's, to the largest any port needs; a VXLAN
//! device needs its own overhead. Down, the port forwards nothing and binds no UDP socket.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use rtnetlink::{
    Handle, LinkVxlan,
    packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkMessage},
};

use super::links;

/// The port's name: no `flannel.` prefix, so nothing takes it for flannel's.
pub const HEADROOM_PORT: &str = "ovl-headroom";

/// A VNI and port no overlay device uses: the kernel refuses two devices sharing both.
const UNUSED_VNI: u32 = 0;
const UNUSED_PORT: u16 = 1;

/// Makes sure the headroom port exists on the bridge `bridge_index`, down, with the MTU of the
/// containers (`mtu`), so it never lowers the bridge's. `ipv6`: the node encapsulates over
/// IPv6, whose outer headers are 20 bytes longer.
pub async fn ensure(handle: &Handle, bridge_index: u32, mtu: u32, ipv6: bool) -> Result<()> {
    let wanted_local: IpAddr = if ipv6 {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    if let Some(link) = links::find(handle, HEADROOM_PORT).await? {
        if is_in_place(&link, bridge_index, mtu, wanted_local) {
            return Ok(());
        }
        links::delete(handle, &link, HEADROOM_PORT).await?;
    }
    log::info!("adding {HEADROOM_PORT} to the bridge, down, for the containers' headroom");
    let device = LinkVxlan::new(HEADROOM_PORT, UNUSED_VNI).port(UNUSED_PORT);
    let device = match wanted_local {
        IpAddr::V4(local) => device.local(local),
        IpAddr::V6(local) => device.local6(local),
    };
    let message = device
        .mtu(mtu)
        .append_extra_attribute(LinkAttribute::Controller(bridge_index))
        .build();
    links::create(handle, HEADROOM_PORT, message).await?;
    Ok(())
}

/// Removes the headroom port if it exists: kernel mode leaves the bridge as flannel does.
pub async fn remove(handle: &Handle) -> Result<()> {
    match links::find(handle, HEADROOM_PORT).await? {
        Some(link) => links::delete(handle, &link, HEADROOM_PORT).await,
        None => Ok(()),
    }
}

/// Whether the device is our headroom port on the bridge with the MTU and family wanted.
fn is_in_place(link: &LinkMessage, bridge_index: u32, mtu: u32, local: IpAddr) -> bool {
    let has = |wanted: &LinkAttribute| link.attributes.contains(wanted);
    let wanted_local = match local {
        IpAddr::V4(local) => InfoVxlan::Local(local),
        IpAddr::V6(local) => InfoVxlan::Local6(local),
    };
    let local_matches = matches!(links::info_data(link),
        Some(InfoData::Vxlan(attributes)) if attributes.contains(&wanted_local));
    links::kind(link) == Some(&InfoKind::Vxlan)
        && has(&LinkAttribute::Controller(bridge_index))
        && has(&LinkAttribute::Mtu(mtu))
        && local_matches
}
