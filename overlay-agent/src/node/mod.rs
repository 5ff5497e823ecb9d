//! The host's overlay devices, owned through netlink: the container bridge, the VXLAN device,
//! and one set of neighbour, FDB and route entries per remote lease. This is the reconciler's
//! netlink sink ([`NodeSink`]): it is told what should be and repairs whatever differs, so it
//! is safe to call as often as wanted.
pub mod bridge;
pub mod endpoints;
pub mod headroom;
pub mod links;
pub mod notifications;
pub mod peers;
pub mod uplink;
pub mod vtep;

use std::net::IpAddr;

use anyhow::Result;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use rtnetlink::{
    Handle,
    packet_core::NetlinkPayload,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        route::{RouteAddress, RouteAttribute, RouteMessage},
    },
};

use crate::{
    model::{
        Baseline, Containers, Device, Devices, FamilyDevices, NodeChange, PeerEntries,
        PortIsolation, Reach, WrittenPeers,
    },
    sinks::NodeSink,
};
use notifications::Notification;
use uplink::Uplink;
use vtep::VtepSpec;

/// The node's devices and kernel entries, through netlink and nothing else.
pub struct NodeNetwork {
    handle: Handle,
    settings: NodeSettings,
}

/// What the node's devices are built from.
pub struct NodeSettings {
    pub bridge: String,
    /// flannel.<VNI> and the IPv4 lease; none in an IPv6-only network.
    pub ipv4: Option<FamilySettings<Ipv4Network>>,
    /// flannel-v6.<VNI> and the IPv6 lease, with `EnableIPv6`.
    pub ipv6: Option<FamilySettings<Ipv6Network>>,
    pub uplink: Uplink,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
    /// The ebpf mode's [`headroom`] port on the bridge; kernel mode has none, as flannel.
    pub headroom_port: bool,
}

/// One family's VXLAN device and lease.
pub struct FamilySettings<N> {
    pub vtep: VtepSpec,
    /// This host's lease.
    pub subnet: N,
    /// The overlay network the lease is part of: addresses inside it on our devices are ours.
    pub network: N,
}

impl<N: Into<IpNetwork> + Copy> FamilySettings<N> {
    fn lease(&self) -> (IpNetwork, IpNetwork) {
        (self.subnet.into(), self.network.into())
    }

    async fn ensure_vtep(&self, handle: &Handle) -> Result<Device> {
        let (subnet, network) = self.lease();
        let index = vtep::ensure(handle, &self.vtep, subnet, network).await?;
        Ok(Device {
            name: self.vtep.name.clone(),
            index,
        })
    }
}

impl NodeNetwork {
    pub fn new(handle: Handle, settings: NodeSettings) -> Self {
        Self { handle, settings }
    }

    /// Makes sure forwarding is on and the bridge and the VXLAN device exist as configured;
    /// returns where they are. An uplink deleted and made again is followed to its new index,
    /// and the VXLAN device, which the kernel deletes with it, is made again over it.
    pub async fn ensure_devices(&mut self) -> Result<Devices> {
        self.follow_the_uplink().await?;
        let settings = &self.settings;
        if settings.ipv4.is_some() {
            links::write_sysctl("net/ipv4/ip_forward", "1")?;
        }
        if settings.ipv6.is_some() {
            links::write_sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        let leases: Vec<(IpNetwork, IpNetwork)> = settings
            .ipv4
            .iter()
            .map(FamilySettings::lease)
            .chain(settings.ipv6.iter().map(FamilySettings::lease))
            .collect();
        let bridge = bridge::ensure(&self.handle, &settings.bridge, &leases).await?;
        let vtep = match &settings.ipv4 {
            Some(ipv4) => Some(ipv4.ensure_vtep(&self.handle).await?),
            None => None,
        };
        let vtep6 = match &settings.ipv6 {
            Some(ipv6) => Some(ipv6.ensure_vtep(&self.handle).await?),
            None => None,
        };
        self.ensure_headroom_port(bridge.index).await?;
        if settings.blackhole_route {
            for (subnet, _) in &leases {
                bridge::ensure_blackhole_route(&self.handle, *subnet).await?;
            }
        }
        Ok(Devices {
            bridge: Device {
                name: settings.bridge.clone(),
                index: bridge.index,
            },
            bridge_mac: bridge.mac,
            vtep,
            vtep6,
            uplink: Device {
                name: settings.uplink.name.clone(),
                index: settings.uplink.index,
            },
        })
    }

    async fn ensure_headroom_port(&self, bridge_index: u32) -> Result<()> {
        let settings = &self.settings;
        let vtep_mtus = [
            settings.ipv4.as_ref().map(|family| family.vtep.mtu),
            settings.ipv6.as_ref().map(|family| family.vtep.mtu),
        ];
        // The containers' MTU: the smaller device's when both families are leased.
        match vtep_mtus.into_iter().flatten().min() {
            Some(mtu) if settings.headroom_port => {
                let ipv6 = settings.ipv6.is_some();
                headroom::ensure(&self.handle, bridge_index, mtu, ipv6).await
            }
            _ => headroom::remove(&self.handle).await,
        }
    }

    async fn follow_the_uplink(&mut self) -> Result<()> {
        let now = uplink::current(&self.handle, &self.settings.uplink).await?;
        if now.index != self.settings.uplink.index {
            log::warn!(
                "the uplink {} was made again (ifindex {} → {}); following it",
                now.name,
                self.settings.uplink.index,
                now.index
            );
            if let Some(ipv4) = &mut self.settings.ipv4 {
                ipv4.vtep.uplink_index = now.index;
            }
            if let Some(ipv6) = &mut self.settings.ipv6 {
                ipv6.vtep.uplink_index = now.index;
            }
            self.settings.uplink = now;
        }
        Ok(())
    }
}

impl NodeSink for NodeNetwork {
    type Notification = Notification;

    async fn ensure_devices(&mut self) -> Result<Devices> {
        NodeNetwork::ensure_devices(self).await
    }

    /// See [`endpoints::list`].
    async fn list_containers(
        &self,
        bridge_index: u32,
        previous: &Containers,
    ) -> Result<Containers> {
        endpoints::list(&self.handle, bridge_index, previous).await
    }

    /// See [`peers::reach`].
    async fn reach(&self, addresses: Vec<IpAddr>) -> Result<Reach> {
        peers::reach(&self.handle, addresses).await
    }

    async fn converge_peers(
        &self,
        devices: FamilyDevices,
        entries: &PeerEntries,
        baseline: Baseline<'_, PeerEntries>,
    ) -> Result<()> {
        peers::reconcile(&self.handle, devices, entries, baseline).await
    }

    /// See [`endpoints::isolate`].
    async fn isolate_ports(&self, change: &PortIsolation) -> Result<()> {
        endpoints::isolate(&self.handle, change).await
    }

    fn classify(
        &self,
        notification: &Notification,
        devices: &Devices,
        written: &WrittenPeers,
        containers: &mut Containers,
    ) -> Option<NodeChange> {
        let message = match &notification.payload {
            NetlinkPayload::InnerMessage(message) => message,
            NetlinkPayload::Overrun(_) => return Some(NodeChange::Lost),
            _ => return None,
        };
        if endpoints::observe(containers, message, devices.bridge.index) {
            Some(NodeChange::Containers)
        } else if touches_devices(message, devices) && !peers::echoes(message, written) {
            Some(NodeChange::Devices)
        } else {
            None
        }
    }
}

/// Whether a notification concerns the node's own devices or the entries the agent owns on
/// them: a link or address of the bridge, a VXLAN device or the uplink (by index, or by name
/// for one made again), any route of a family the node carries but IPv6's link-scoped ones,
/// or a neighbour or FDB entry of a VXLAN device.
fn touches_devices(message: &RouteNetlinkMessage, devices: &Devices) -> bool {
    let ours: Vec<&Device> = [&devices.bridge, &devices.uplink]
        .into_iter()
        .chain(devices.vtep.as_ref())
        .chain(devices.vtep6.as_ref())
        .collect();
    let vteps = [&devices.vtep, &devices.vtep6];
    let is_vtep = |index: u32| {
        vteps
            .iter()
            .any(|vtep| vtep.as_ref().is_some_and(|vtep| vtep.index == index))
    };
    match message {
        RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link) => {
            let name = links::name(link);
            ours.iter().any(|device| {
                device.index == link.header.index || name == Some(device.name.as_str())
            })
        }
        RouteNetlinkMessage::NewAddress(address) | RouteNetlinkMessage::DelAddress(address) => ours
            .iter()
            .any(|device| device.index == address.header.index),
        RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route) => {
            match route.header.address_family {
                AddressFamily::Inet => devices.vtep.is_some(),
                AddressFamily::Inet6 => devices.vtep6.is_some() && !is_link_scoped6(route),
                _ => false,
            }
        }
        RouteNetlinkMessage::NewNeighbour(neighbour)
        | RouteNetlinkMessage::DelNeighbour(neighbour) => is_vtep(neighbour.header.ifindex),
        _ => false,
    }
}

/// Whether `route` leads only into IPv6 link-local or multicast addresses, as the routes the
/// kernel makes for every port that comes up do (its link-local prefix, and its addresses and
/// multicast in the local table). No entry of ours and no peer's PublicIPv6 lies there.
fn is_link_scoped6(route: &RouteMessage) -> bool {
    let prefix_len = route.header.destination_prefix_length;
    route.attributes.iter().any(|attribute| match attribute {
        RouteAttribute::Destination(RouteAddress::Inet6(address)) => {
            (address.is_unicast_link_local() && prefix_len >= 10)
                || (address.is_multicast() && prefix_len >= 8)
        }
        _ => false,
    })
}

/// Removes what the agent creates: the bridge `bridge`, every `flannel.<VNI>` and
/// `flannel-v6.<VNI>` VXLAN device, the headroom port (their neighbour, FDB and route entries go with them), and
/// direct routes into the networks of the subnet file.
pub async fn teardown(
    handle: &Handle,
    bridge: &str,
    networks: (Option<Ipv4Network>, Option<Ipv6Network>),
) -> Result<()> {
    use rtnetlink::packet_route::link::InfoKind;
    for link in links::all(handle).await? {
        let name = links::name(&link).unwrap_or_default();
        let ours = match links::kind(&link) {
            Some(InfoKind::Bridge) => name == bridge,
            Some(InfoKind::Vxlan) => {
                name.starts_with("flannel.")
                    || name.starts_with("flannel-v6.")
                    || name == headroom::HEADROOM_PORT
            }
            _ => false,
        };
        if ours {
            links::delete(handle, &link, name).await?;
        }
    }
    let networks = [networks.0.map(IpNetwork::V4), networks.1.map(IpNetwork::V6)];
    for network in networks.into_iter().flatten() {
        peers::remove_routes_into(handle, network).await?;
        bridge::remove_blackhole_routes(handle, network).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rtnetlink::RouteMessageBuilder;

    use super::*;

    #[test]
    fn only_ipv6_link_local_and_multicast_routes_are_link_scoped() {
        let message = |destination: &str, prefix_len: u8| {
            RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(destination.parse().expect("a test address"), prefix_len)
                .expect("a test route")
                .build()
        };
        for (destination, prefix_len) in [
            ("fe80::", 64),
            ("fe80::1c2a:3bff:fe4d:5e6f", 128),
            ("ff00::", 8),
        ] {
            assert!(
                is_link_scoped6(&message(destination, prefix_len)),
                "{destination}/{prefix_len}"
            );
        }
        let beyond = [
            ("fe80::", 9),
            ("fd00:ff::", 64),
            ("fd00:2:0:54::", 64),
            ("::", 0),
            ("10.2.54.0", 24),
        ];
        for (destination, prefix_len) in beyond {
            assert!(
                !is_link_scoped6(&message(destination, prefix_len)),
                "{destination}/{prefix_len}"
            );
        }
    }
}
