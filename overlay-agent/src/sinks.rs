//! The two sinks the reconciler applies its desired state through, as traits: the node's
//! netlink ([`NodeSink`], implemented by `node::NodeNetwork`) and the eBPF maps and links
//! ([`DataplaneSink`], implemented by `dataplane::Dataplane`). The reconciler knows neither
//! implementation, and its unit tests drive it through recording fakes.
use std::{future::Future, net::IpAddr};

use anyhow::Result;

use crate::model::{
    Baseline, Containers, Devices, FamilyDevices, LeaseEntries, NodeChange, PeerEntries,
    PortIsolation, Programs, Reach, RefusedPorts, Unwritten, WrittenLeases, WrittenPeers,
};

/// The host's devices and kernel entries: observed, and made to match.
pub trait NodeSink {
    /// One notification of a change on the host, as [`NotificationSource`] yields it.
    type Notification;

    /// Makes sure the bridge and the VXLAN devices exist as configured; returns where they are.
    fn ensure_devices(&mut self) -> impl Future<Output = Result<Devices>>;

    /// The containers on the bridge at `bridge_index`, read whole; what `previous` learned
    /// that the kernel forgets early is kept.
    fn list_containers(
        &self,
        bridge_index: u32,
        previous: &Containers,
    ) -> impl Future<Output = Result<Containers>>;

    /// Which of `addresses` the kernel reaches without a gateway, and which not at all.
    fn reach(&self, addresses: Vec<IpAddr>) -> impl Future<Output = Result<Reach>>;

    /// Makes the neighbour, FDB and route entries the agent owns on one family's devices
    /// exactly `entries`, writing what differs from `baseline`.
    fn converge_peers(
        &self,
        devices: FamilyDevices,
        entries: &PeerEntries,
        baseline: Baseline<'_, PeerEntries>,
    ) -> impl Future<Output = Result<()>>;

    /// Takes down the container ports `change` isolates, marked so that any later run knows
    /// them, and brings back up those it restores.
    fn isolate_ports(&self, change: &PortIsolation) -> impl Future<Output = Result<()>>;

    /// What `notification` says about the node: containers it tells about are taken into
    /// `containers` at once; one that only echoes what the agent `written` says nothing.
    fn classify(
        &self,
        notification: &Self::Notification,
        devices: &Devices,
        written: &WrittenPeers,
        containers: &mut Containers,
    ) -> Option<NodeChange>;
}

/// The eBPF programs and maps.
pub trait DataplaneSink {
    /// Writes the lease entries that differ from `baseline`, as far as the maps hold them;
    /// returns what was left out. From what the last round wrote, only the entries of the
    /// leases changed since are compared.
    fn write_lease_entries(
        &mut self,
        entries: &LeaseEntries,
        baseline: Baseline<'_, WrittenLeases>,
    ) -> Result<Unwritten>;

    /// Places the programs and writes the endpoints; frees the claims of ports that are gone.
    /// Returns the container ports that refused their program: the rest of the placement goes
    /// on without them.
    fn place_programs(&mut self, programs: &Programs) -> Result<RefusedPorts>;

    /// Deletes the lease entries of `baseline` that `entries` does not hold; returns how many.
    fn remove_stale_lease_entries(
        &mut self,
        entries: &LeaseEntries,
        baseline: Baseline<'_, WrittenLeases>,
    ) -> Result<usize>;
}

/// Where node notifications come from.
pub trait NotificationSource {
    type Notification;

    /// The next notification; waits for it.
    fn recv(&mut self) -> impl Future<Output = Self::Notification>;

    /// A notification already queued, if any.
    fn try_recv(&mut self) -> Option<Self::Notification>;
}
