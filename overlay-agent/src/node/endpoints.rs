//! The containers on the bridge, as the fast paths need them: every container port (the
//! host-side end of a container's veth, where the encapsulating program sits) and every
//! container address with the port and MAC behind it (where a decapsulated packet goes).
//!
//! Addresses come from the bridge's neighbour table, ports from its forwarding database. An
//! address the bridge has no neighbour entry for yet is routed through docker0, which ARPs
//! for it and so makes the entry.
use std::collections::{HashMap, HashSet};

use anyhow::Result;
use ipnetwork::Ipv4Network;
use overlay_common::LocalEndpoint;
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        link::{InfoKind, LinkAttribute, LinkMessage},
        neighbour::{NeighbourMessage, NeighbourState},
    },
};

use super::{
    links,
    peers::{neighbour_destination, neighbour_mac},
};
use crate::{dataplane::Port, mac::MacAddr};

/// What one look at the bridge found.
#[derive(Debug, Default)]
pub struct Containers {
    pub ports: Vec<Port>,
    /// Container address (network order) → its port and MAC.
    pub endpoints: HashMap<[u8; 4], LocalEndpoint>,
}

/// Which port each container MAC sits behind, remembered across looks: the bridge forgets a
/// MAC after five minutes without a frame from it, and the fast path takes most frames past
/// the bridge. An entry goes when its port goes.
#[derive(Debug, Default)]
pub struct EndpointLearner {
    port_of_mac: HashMap<MacAddr, u32>,
}

impl EndpointLearner {
    /// Looks at the bridge `bridge_index`, whose containers hold addresses in `subnet`.
    pub async fn scan(
        &mut self,
        handle: &Handle,
        bridge_index: u32,
        subnet: Ipv4Network,
    ) -> Result<Containers> {
        let ports: Vec<Port> = links::all(handle)
            .await?
            .iter()
            .filter_map(|link| container_port(link, bridge_index))
            .collect();
        let port_indexes: HashSet<u32> = ports.iter().map(|port| port.index).collect();
        self.port_of_mac
            .retain(|_, port| port_indexes.contains(port));
        self.port_of_mac
            .extend(learned_macs(handle, &port_indexes).await?);

        let endpoints = bridge_neighbours(handle, bridge_index)
            .await?
            .into_iter()
            .filter(|message| is_usable(message.header.state))
            .filter_map(|message| {
                let address = neighbour_destination(&message)?;
                let mac = neighbour_mac(&message)?;
                let port = self.port_of_mac.get(&mac)?;
                subnet.contains(address).then_some((
                    address.octets(),
                    LocalEndpoint {
                        ifindex: *port,
                        mac: mac.0,
                        reserved: 0,
                    },
                ))
            })
            .collect();
        Ok(Containers { ports, endpoints })
    }
}

/// A veth enslaved to the bridge: the only kind of port `bpf_redirect_peer` can deliver
/// through.
fn container_port(link: &LinkMessage, bridge_index: u32) -> Option<Port> {
    let enslaved = link.attributes.iter().any(
        |attribute| matches!(attribute, LinkAttribute::Controller(index) if *index == bridge_index),
    );
    (enslaved && links::kind(link) == Some(&InfoKind::Veth)).then(|| Port {
        name: links::name(link).unwrap_or_default().to_string(),
        index: link.header.index,
    })
}

/// A neighbour entry whose MAC can be trusted: resolved, or resolved once and not yet
/// proven wrong.
fn is_usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    )
}

/// MACs the bridge learned behind the ports in `ports` (its own permanent entries for the
/// ports' addresses left out).
async fn learned_macs(handle: &Handle, ports: &HashSet<u32>) -> Result<Vec<(MacAddr, u32)>> {
    Ok(links::neighbours(handle, AddressFamily::Bridge)
        .await?
        .into_iter()
        .filter(|message| {
            ports.contains(&message.header.ifindex)
                && message.header.state != NeighbourState::Permanent
        })
        .filter_map(|message| Some((neighbour_mac(&message)?, message.header.ifindex)))
        .collect())
}

async fn bridge_neighbours(handle: &Handle, bridge_index: u32) -> Result<Vec<NeighbourMessage>> {
    Ok(links::neighbours(handle, AddressFamily::Inet)
        .await?
        .into_iter()
        .filter(|message| message.header.ifindex == bridge_index)
        .collect())
}
