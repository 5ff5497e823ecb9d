//! The host's overlay devices, owned through netlink: the container bridge, the VXLAN device,
//! one set of neighbour, FDB and route entries per remote lease, and, in ebpf mode, the
//! programs attached to them and the lease maps they read.
//!
//! [`NodeNetwork::reconcile`] computes the desired state from the leases and repairs whatever
//! differs, so it is safe to call as often as wanted: after every lease event and on a timer.
pub mod bridge;
pub mod endpoints;
pub mod links;
pub mod peers;
pub mod uplink;
pub mod vtep;

use std::collections::HashMap;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;

use overlay_common::OverlayConfig;

use crate::{
    dataplane::{Dataplane, DecapHook, XdpModeChoice},
    subnet::{Lease, LeaseEvent},
};
use bridge::Bridge;
use endpoints::{Containers, EndpointLearner};
use peers::PeerLayout;
use uplink::Uplink;
use vtep::VtepSpec;

pub struct NodeNetwork {
    handle: Handle,
    settings: NodeSettings,
    forwarding: Option<EbpfForwarding>,
    remote: HashMap<Ipv4Network, Lease>,
}

/// What the node network is built from, besides the remote leases.
pub struct NodeSettings {
    pub bridge: String,
    pub vtep: VtepSpec,
    pub uplink: Uplink,
    /// This host's lease.
    pub subnet: Ipv4Network,
    /// The whole overlay network.
    pub network: Ipv4Network,
    pub direct_routing: bool,
}

/// How much a reconcile looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// After lease events: everything but the local containers, so a new lease reaches its
    /// route as fast as possible.
    Leases,
    /// On the timer: the local containers too.
    Everything,
}

/// The eBPF dataplane and how to attach it; without it the kernel's vxlan device forwards.
pub struct EbpfForwarding {
    pub dataplane: Dataplane,
    /// The dataplane's settings but for the device indexes and MACs reconcile fills in.
    pub config: OverlayConfig,
    /// Whether container traffic bypasses the stack (`--fast-path`).
    pub fast_path: bool,
    pub decap_hook: DecapHook,
    pub xdp_mode: XdpModeChoice,
    pub learner: EndpointLearner,
}

impl EbpfForwarding {
    /// Points the programs at the current devices and attaches them: the VXLAN device's and
    /// the uplink's.
    fn attach(&mut self, settings: &NodeSettings, bridge: &Bridge, vtep_index: u32) -> Result<()> {
        self.config.vtep_ifindex = vtep_index;
        self.config.bridge_mac = bridge.mac.0;
        let dataplane = &mut self.dataplane;
        dataplane.set_config(&self.config)?;
        dataplane.ensure_vtep_attached(&settings.vtep.name, vtep_index)?;
        dataplane.ensure_uplink_attached(
            &settings.uplink.name,
            settings.uplink.index,
            self.decap_hook,
            self.xdp_mode,
        )
    }

    /// With the fast path, attaches the program to every container port and puts the
    /// containers' addresses into the endpoint map; without, makes sure neither is there.
    async fn sync_containers(
        &mut self,
        handle: &Handle,
        settings: &NodeSettings,
        bridge: &Bridge,
    ) -> Result<()> {
        let containers = if self.fast_path {
            self.learner
                .scan(handle, bridge.index, settings.subnet)
                .await?
        } else {
            Containers::default()
        };
        self.dataplane.ensure_container_ports(&containers.ports)?;
        self.dataplane.sync_endpoints(&containers.endpoints)
    }
}

impl NodeNetwork {
    pub fn new(handle: Handle, settings: NodeSettings, forwarding: Option<EbpfForwarding>) -> Self {
        Self {
            handle,
            settings,
            forwarding,
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
    /// the eBPF programs, the local containers (with `Scope::Everything`), and every remote
    /// lease's map entries, neighbour, FDB entry (kernel mode only) and route. Map entries go
    /// in before their routes and out after them.
    pub async fn reconcile(&mut self, scope: Scope) -> Result<()> {
        let settings = &self.settings;
        links::write_sysctl("net/ipv4/ip_forward", "1")?;
        let bridge = bridge::ensure(&self.handle, &settings.bridge, settings.subnet).await?;
        let vtep_index = vtep::ensure(&self.handle, &settings.vtep, settings.subnet).await?;
        if let Some(forwarding) = &mut self.forwarding {
            forwarding.attach(settings, &bridge, vtep_index)?;
            if scope == Scope::Everything {
                forwarding
                    .sync_containers(&self.handle, settings, &bridge)
                    .await?;
            }
            forwarding.dataplane.upsert_leases(self.remote.values())?;
        }
        let layout = PeerLayout {
            vtep_index,
            uplink_index: settings.uplink.index,
            network: settings.network,
            install_fdb: self.forwarding.is_none(),
            direct_routing: settings.direct_routing,
        };
        peers::reconcile(&self.handle, &layout, self.remote.values()).await?;
        if let Some(forwarding) = &mut self.forwarding {
            forwarding.dataplane.remove_stale(self.remote.values())?;
        }
        Ok(())
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
