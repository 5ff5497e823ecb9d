//! The host's overlay devices, owned through netlink: the container bridge, the VXLAN device
//! and one set of neighbour, FDB and route entries per remote lease.
//!
//! [`NodeNetwork::reconcile`] computes the desired state from the leases and repairs whatever
//! differs, so it is safe to call as often as wanted: after every lease event and on a timer.
pub mod bridge;
pub mod links;
pub mod peers;
pub mod uplink;
pub mod vtep;

use std::collections::HashMap;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;

use crate::subnet::{Lease, LeaseEvent};
use peers::PeerLayout;
use vtep::VtepSpec;

pub struct NodeNetwork {
    handle: Handle,
    bridge: String,
    vtep: VtepSpec,
    subnet: Ipv4Network,
    network: Ipv4Network,
    install_fdb: bool,
    direct_routing: bool,
    remote: HashMap<Ipv4Network, Lease>,
}

/// What the node network is built from, besides the remote leases.
pub struct NodeSettings {
    pub bridge: String,
    pub vtep: VtepSpec,
    /// This host's lease.
    pub subnet: Ipv4Network,
    /// The whole overlay network.
    pub network: Ipv4Network,
    pub install_fdb: bool,
    pub direct_routing: bool,
}

impl NodeNetwork {
    pub fn new(handle: Handle, settings: NodeSettings) -> Self {
        Self {
            handle,
            bridge: settings.bridge,
            vtep: settings.vtep,
            subnet: settings.subnet,
            network: settings.network,
            install_fdb: settings.install_fdb,
            direct_routing: settings.direct_routing,
            remote: HashMap::new(),
        }
    }

    pub fn apply(&mut self, event: LeaseEvent) {
        match event {
            LeaseEvent::Added(lease) | LeaseEvent::Changed(lease) => {
                self.remote.insert(lease.subnet, lease);
            }
            LeaseEvent::Removed(lease) => {
                self.remote.remove(&lease.subnet);
            }
        }
    }

    /// Makes the host match the desired state: forwarding on, the bridge, the VXLAN device,
    /// and every remote lease's entries.
    pub async fn reconcile(&self) -> Result<()> {
        links::write_sysctl("net/ipv4/ip_forward", "1")?;
        bridge::ensure(&self.handle, &self.bridge, self.subnet).await?;
        let vtep_index = vtep::ensure(&self.handle, &self.vtep, self.subnet).await?;
        let layout = PeerLayout {
            vtep_index,
            uplink_index: self.vtep.uplink_index,
            network: self.network,
            install_fdb: self.install_fdb,
            direct_routing: self.direct_routing,
        };
        peers::reconcile(&self.handle, &layout, self.remote.values()).await
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
    }
    Ok(())
}
