//! The containers on the bridge, read from netlink: every container port (a veth enslaved to
//! the bridge), every address the bridge resolved (ARP and NDP), and the port each container MAC was learned
//! behind. [`list`] reads them whole; [`observe`] follows one notification, so a container's
//! address reaches the fast path as soon as the bridge resolves it. [`isolate`] takes down a
//! port that cannot carry its program, and brings it back once it does.
use std::collections::HashSet;

use anyhow::{Context, Result};
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{InfoKind, LinkAttribute, LinkMessage},
        neighbour::{NeighbourMessage, NeighbourState},
    },
};

use super::{
    links,
    peers::{neighbour_destination, neighbour_mac},
};
use crate::model::{Containers, Device, PortIsolation};

/// The alias a container port carries while it is down for want of its program: how a later
/// round, a restarted agent and `status` tell it from a port someone else took down.
pub const ISOLATED_ALIAS: &str = "overlay-agent: down, no program";

/// Reads the containers of the bridge `bridge_index` whole. MACs `previous` learned stay
/// while their port does: the bridge forgets a MAC after five minutes without a frame from it,
/// and the fast path takes most frames past the bridge.
pub async fn list(handle: &Handle, bridge_index: u32, previous: &Containers) -> Result<Containers> {
    let mut containers = Containers::default();
    for link in links::all(handle).await? {
        take_port(&mut containers, &link, bridge_index);
    }
    let live: HashSet<u32> = containers.ports.keys().copied().collect();
    containers.port_of_mac = previous
        .port_of_mac
        .iter()
        .filter(|(_, port)| live.contains(port))
        .map(|(mac, port)| (*mac, *port))
        .collect();
    for fdb_entry in links::neighbours(handle, AddressFamily::Bridge).await? {
        learn_mac(&mut containers, &fdb_entry);
    }
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for neighbour in links::neighbours(handle, family).await? {
            if neighbour.header.ifindex == bridge_index {
                resolve_address(&mut containers, &neighbour);
            }
        }
    }
    Ok(containers)
}

/// Follows one notification into `containers`; returns whether it was about them (a port of
/// the bridge `bridge_index`, a MAC learned behind one, an address on the bridge).
pub fn observe(
    containers: &mut Containers,
    message: &RouteNetlinkMessage,
    bridge_index: u32,
) -> bool {
    match message {
        // The bridge's own notice about a port's state (forwarding, say): it carries no link
        // kind, so it says nothing about whether the port is a container's.
        RouteNetlinkMessage::NewLink(link)
            if link.header.interface_family == AddressFamily::Bridge =>
        {
            false
        }
        // A link that is not a port of the bridge (any more) is forgotten.
        RouteNetlinkMessage::NewLink(link) => {
            take_port(containers, link, bridge_index) || forget_port(containers, link.header.index)
        }
        RouteNetlinkMessage::DelLink(link) => forget_port(containers, link.header.index),
        RouteNetlinkMessage::NewNeighbour(message) => match message.header.family {
            AddressFamily::Bridge => learn_mac(containers, message),
            AddressFamily::Inet | AddressFamily::Inet6
                if message.header.ifindex == bridge_index =>
            {
                resolve_address(containers, message);
                true
            }
            _ => false,
        },
        RouteNetlinkMessage::DelNeighbour(message)
            if matches!(
                message.header.family,
                AddressFamily::Inet | AddressFamily::Inet6
            ) && message.header.ifindex == bridge_index =>
        {
            if let Some(address) = neighbour_destination(message) {
                containers.addresses.remove(&address);
            }
            true
        }
        // A MAC the bridge aged out keeps its port (see `list`).
        _ => false,
    }
}

/// Takes `link` into `containers` if it is a container port; returns whether it is.
fn take_port(containers: &mut Containers, link: &LinkMessage, bridge_index: u32) -> bool {
    let Some(port) = container_port(link, bridge_index) else {
        return false;
    };
    if is_isolated(link) {
        containers.isolated.insert(port.index);
    } else {
        containers.isolated.remove(&port.index);
    }
    containers.ports.insert(port.index, port);
    true
}

fn is_isolated(link: &LinkMessage) -> bool {
    link.attributes.iter().any(
        |attribute| matches!(attribute, LinkAttribute::IfAlias(alias) if alias == ISOLATED_ALIAS),
    )
}

/// Takes down the ports `change` isolates, under [`ISOLATED_ALIAS`], and brings back up the
/// ones it restores, their alias cleared.
pub async fn isolate(handle: &Handle, change: &PortIsolation) -> Result<()> {
    for (&port, why) in &change.isolate {
        log::warn!("container port {why}: down until it takes its program");
        set_port_state(
            handle,
            port,
            LinkUnspec::new_with_index(port).down(),
            ISOLATED_ALIAS,
        )
        .await?;
    }
    for &port in &change.restore {
        set_port_state(handle, port, LinkUnspec::new_with_index(port).up(), "").await?;
        log::info!("container port {port} no longer waits for a program: up");
    }
    Ok(())
}

/// The names of the links down under [`ISOLATED_ALIAS`].
pub async fn isolated_ports(handle: &Handle) -> Result<Vec<String>> {
    Ok(links::all(handle)
        .await?
        .iter()
        .filter(|link| is_isolated(link))
        .filter_map(|link| links::name(link).map(str::to_string))
        .collect())
}

async fn set_port_state(
    handle: &Handle,
    port: u32,
    change: rtnetlink::LinkMessageBuilder<LinkUnspec>,
    alias: &str,
) -> Result<()> {
    handle
        .link()
        .set(change.alias(alias).build())
        .execute()
        .await
        .with_context(|| format!("cannot set the state of container port {port}"))
}

fn forget_port(containers: &mut Containers, index: u32) -> bool {
    containers.isolated.remove(&index);
    if containers.ports.remove(&index).is_none() {
        return false;
    }
    containers.port_of_mac.retain(|_, port| *port != index);
    true
}

/// Records the port an FDB entry learned a MAC behind, if that port is a container's; the
/// bridge's own permanent entries for its ports' addresses are left out.
fn learn_mac(containers: &mut Containers, fdb_entry: &NeighbourMessage) -> bool {
    let port = fdb_entry.header.ifindex;
    if !containers.ports.contains_key(&port) || fdb_entry.header.state == NeighbourState::Permanent
    {
        return false;
    }
    let Some(mac) = neighbour_mac(fdb_entry) else {
        return false;
    };
    containers.port_of_mac.insert(mac, port) != Some(port)
}

/// Records or forgets a bridge neighbour's MAC (ARP's or NDP's), by whether its state can be
/// trusted.
fn resolve_address(containers: &mut Containers, neighbour: &NeighbourMessage) {
    let Some(address) = neighbour_destination(neighbour) else {
        return;
    };
    match neighbour_mac(neighbour).filter(|_| is_usable(neighbour.header.state)) {
        Some(mac) => containers.addresses.insert(address, mac),
        None => containers.addresses.remove(&address),
    };
}

/// A veth enslaved to the bridge: the only kind of port `bpf_redirect_peer` can deliver
/// through.
fn container_port(link: &LinkMessage, bridge_index: u32) -> Option<Device> {
    let enslaved = link.attributes.iter().any(
        |attribute| matches!(attribute, LinkAttribute::Controller(index) if *index == bridge_index),
    );
    (enslaved && links::kind(link) == Some(&InfoKind::Veth)).then(|| Device {
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rtnetlink::packet_route::{
        link::LinkInfo,
        neighbour::{NeighbourAddress, NeighbourAttribute},
    };

    use super::*;
    use crate::mac::MacAddr;

    const BRIDGE: u32 = 3;
    const PORT: u32 = 9;
    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x22]);

    fn port_link(controller: Option<u32>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = PORT;
        link.attributes = vec![
            LinkAttribute::IfName("veth-bbox1".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        link.attributes
            .extend(controller.map(LinkAttribute::Controller));
        link
    }

    fn neighbour(family: AddressFamily, ifindex: u32, state: NeighbourState) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = family;
        message.header.ifindex = ifindex;
        message.header.state = state;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(MAC.0.to_vec()));
        if family == AddressFamily::Inet {
            message
                .attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                    Ipv4Addr::new(10, 2, 41, 2),
                )));
        }
        message
    }

    #[test]
    fn a_container_is_known_from_its_port_fdb_and_arp_notifications() {
        let mut containers = Containers::default();
        let events = [
            RouteNetlinkMessage::NewLink(port_link(Some(BRIDGE))),
            RouteNetlinkMessage::NewNeighbour(neighbour(
                AddressFamily::Bridge,
                PORT,
                NeighbourState::Reachable,
            )),
            RouteNetlinkMessage::NewNeighbour(neighbour(
                AddressFamily::Inet,
                BRIDGE,
                NeighbourState::Reachable,
            )),
        ];
        for event in &events {
            assert!(observe(&mut containers, event, BRIDGE), "{event:?}");
        }
        assert_eq!(containers.ports.keys().copied().collect::<Vec<_>>(), [PORT]);
        assert_eq!(containers.port_of_mac.get(&MAC), Some(&PORT));
        assert_eq!(
            containers
                .addresses
                .get(&Ipv4Addr::new(10, 2, 41, 2).into()),
            Some(&MAC)
        );

        let failed = neighbour(AddressFamily::Inet, BRIDGE, NeighbourState::Failed);
        observe(
            &mut containers,
            &RouteNetlinkMessage::NewNeighbour(failed),
            BRIDGE,
        );
        assert!(
            containers.addresses.is_empty(),
            "a failed entry is not trusted"
        );

        let mut port_state = port_link(Some(BRIDGE));
        port_state.header.interface_family = AddressFamily::Bridge;
        port_state
            .attributes
            .retain(|attribute| !matches!(attribute, LinkAttribute::LinkInfo(_)));
        assert!(!observe(
            &mut containers,
            &RouteNetlinkMessage::NewLink(port_state),
            BRIDGE
        ));
        assert_eq!(
            containers.ports.keys().copied().collect::<Vec<_>>(),
            [PORT],
            "the bridge's notice about its port's state keeps the port"
        );

        let unplugged = RouteNetlinkMessage::NewLink(port_link(None));
        assert!(observe(&mut containers, &unplugged, BRIDGE));
        assert!(containers.ports.is_empty() && containers.port_of_mac.is_empty());
    }

    #[test]
    fn notifications_about_other_devices_are_not_about_containers() {
        let mut containers = Containers::default();
        let elsewhere = [
            RouteNetlinkMessage::NewLink(port_link(Some(BRIDGE + 1))),
            RouteNetlinkMessage::NewNeighbour(neighbour(
                AddressFamily::Inet,
                BRIDGE + 1,
                NeighbourState::Reachable,
            )),
            // An FDB entry behind a port that is not a container's (the VXLAN device's, say).
            RouteNetlinkMessage::NewNeighbour(neighbour(
                AddressFamily::Bridge,
                PORT,
                NeighbourState::Reachable,
            )),
        ];
        for event in &elsewhere {
            assert!(!observe(&mut containers, event, BRIDGE), "{event:?}");
        }
        assert_eq!(containers, Containers::default());
    }
}
