//! The host's overlay devices, owned through netlink: the container bridge, the VXLAN device,
//! and one set of neighbour, FDB and route entries per remote lease. This is the reconciler's
//! netlink sink: it is told what should be and repairs whatever differs, so it is safe to call
//! as often as wanted.
pub mod bridge;
pub mod endpoints;
pub mod links;
pub mod peers;
pub mod uplink;
pub mod vtep;

use std::{collections::HashSet, net::Ipv4Addr};

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle,
    packet_route::{AddressFamily, RouteNetlinkMessage},
};

use crate::{
    reconcile::desired::{Containers, Device, Devices, PeerEntries, RoutingRules},
    subnet::Lease,
};
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
    pub vtep: VtepSpec,
    pub uplink: Uplink,
    /// This host's lease.
    pub subnet: Ipv4Network,
    /// The overlay network the lease is part of: addresses inside it on our devices are ours.
    pub network: Ipv4Network,
    /// `--ip-blackhole-route`.
    pub blackhole_route: bool,
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
        links::write_sysctl("net/ipv4/ip_forward", "1")?;
        let (subnet, network) = (settings.subnet, settings.network);
        let bridge = bridge::ensure(&self.handle, &settings.bridge, subnet, network).await?;
        let vtep_index = vtep::ensure(&self.handle, &settings.vtep, subnet, network).await?;
        if settings.blackhole_route {
            bridge::ensure_blackhole_route(&self.handle, settings.subnet).await?;
        }
        Ok(Devices {
            bridge: Device {
                name: settings.bridge.clone(),
                index: bridge.index,
            },
            bridge_mac: bridge.mac,
            vtep: Device {
                name: settings.vtep.name.clone(),
                index: vtep_index,
            },
            uplink: Device {
                name: settings.uplink.name.clone(),
                index: settings.uplink.index,
            },
        })
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
            self.settings.vtep.uplink_index = now.index;
            self.settings.uplink = now;
        }
        Ok(())
    }

    /// The PublicIPs of `leases` that the kernel reaches without a gateway, i.e. that share
    /// our L2 segment.
    pub async fn on_link<'a>(
        &self,
        leases: impl Iterator<Item = &'a Lease>,
    ) -> Result<HashSet<Ipv4Addr>> {
        let mut on_link = HashSet::new();
        for lease in leases {
            let public_ip = lease.attrs.public_ip;
            if peers::is_on_link(&self.handle, public_ip).await? {
                on_link.insert(public_ip);
            }
        }
        Ok(on_link)
    }

    /// Makes the neighbour, FDB and route entries the agent owns exactly `entries`.
    pub async fn converge_peers(
        &self,
        devices: &Devices,
        rules: &RoutingRules,
        entries: &PeerEntries,
    ) -> Result<()> {
        peers::reconcile(&self.handle, devices, rules.network, entries).await
    }

    /// The containers on the bridge, read whole; see [`endpoints::list`].
    pub async fn list_containers(
        &self,
        bridge_index: u32,
        previous: &Containers,
    ) -> Result<Containers> {
        endpoints::list(&self.handle, bridge_index, previous).await
    }
}

/// Whether a notification concerns the node's own devices or the entries the agent owns on
/// them: a link or address of the bridge, the VXLAN device or the uplink (by index, or by name
/// for one made again), any IPv4 route, or a neighbour or FDB entry of the VXLAN device.
pub fn touches_devices(message: &RouteNetlinkMessage, devices: &Devices) -> bool {
    let ours = [
        devices.bridge.index,
        devices.vtep.index,
        devices.uplink.index,
    ];
    match message {
        RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link) => {
            ours.contains(&link.header.index)
                || links::name(link).is_some_and(|name| {
                    [&devices.bridge, &devices.vtep, &devices.uplink]
                        .iter()
                        .any(|device| device.name == name)
                })
        }
        RouteNetlinkMessage::NewAddress(address) | RouteNetlinkMessage::DelAddress(address) => {
            ours.contains(&address.header.index)
        }
        RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route) => {
            route.header.address_family == AddressFamily::Inet
        }
        RouteNetlinkMessage::NewNeighbour(neighbour)
        | RouteNetlinkMessage::DelNeighbour(neighbour) => {
            neighbour.header.ifindex == devices.vtep.index
        }
        _ => false,
    }
}

/// Removes what the agent creates: the bridge `bridge`, every `flannel.<VNI>` VXLAN device
/// (their neighbour, FDB and route entries go with them), and direct routes into `network`.
pub async fn teardown(handle: &Handle, bridge: &str, network: Option<Ipv4Network>) -> Result<()> {
    use rtnetlink::packet_route::link::InfoKind;
    for link in links::all(handle).await? {
        let name = links::name(&link).unwrap_or_default();
        let ours = match links::kind(&link) {
            Some(InfoKind::Bridge) => name == bridge,
            Some(InfoKind::Vxlan) => name.starts_with("flannel."),
            _ => false,
        };
        if ours {
            log::info!("deleting {name}");
            handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .with_context(|| format!("cannot delete {name}"))?;
        }
    }
    if let Some(network) = network {
        peers::remove_routes_into(handle, network).await?;
        bridge::remove_blackhole_routes(handle, network).await?;
    }
    Ok(())
}
