//! The neighbour, FDB and route entries of the remote leases (see
//! [`PeerEntries`]), written in flannel's order.
//!
//! [`reconcile`] compares the desired entries with what netlink reports and fixes the
//! difference, so entries deleted by hand come back and entries no lease justifies go.
use std::{
    borrow::Cow,
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use ipnetwork::IpNetwork;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{
            RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
        },
    },
};

use crate::{
    mac::MacAddr,
    model::{Baseline, FamilyDevices, FdbEntry, PeerEntries, Reach, Route, WrittenPeers},
};

impl FamilyDevices {
    fn family(&self) -> AddressFamily {
        match self.network {
            IpNetwork::V4(_) => AddressFamily::Inet,
            IpNetwork::V6(_) => AddressFamily::Inet6,
        }
    }
}

/// Brings the neighbour, FDB and route entries the agent owns on one family's `devices` in
/// line with `desired`, from what the kernel holds (listed) or what the last round wrote.
pub async fn reconcile(
    handle: &Handle,
    devices: FamilyDevices,
    desired: &PeerEntries,
    baseline: Baseline<'_, PeerEntries>,
) -> Result<()> {
    let vtep_index = devices.vtep_index;
    let Owned {
        present,
        neighbours,
        fdb,
        routes,
    } = match baseline {
        Baseline::Listed => Owned::listed(handle, devices).await?,
        Baseline::Written(written) => Owned::as_written(written, desired),
    };

    pipelined(
        "routes removed",
        routes
            .iter()
            .filter(|(route, _)| !desired.routes.contains(route))
            .map(|(route, message)| async move {
                log::debug!("removing route {} via {}", route.destination, route.gateway);
                let message = match message {
                    Some(listed) => listed.clone(),
                    None => route_message(route, vtep_index)?,
                };
                delete_route(handle, message).await
            }),
    )
    .await?;
    pipelined(
        "neighbours set",
        desired
            .neighbours
            .iter()
            .filter(|(address, mac)| present.neighbours.get(*address) != Some(*mac))
            .map(|(&address, &mac)| add_neighbour(handle, vtep_index, address, mac)),
    )
    .await?;
    pipelined(
        "FDB entries set",
        desired
            .fdb
            .difference(&present.fdb)
            .map(|entry| add_fdb(handle, vtep_index, *entry)),
    )
    .await?;
    pipelined(
        "routes added",
        desired
            .routes
            .difference(&present.routes)
            .map(|route| add_route(handle, route, vtep_index)),
    )
    .await?;
    pipelined(
        "FDB entries removed",
        fdb.into_iter()
            .filter(|(entry, _)| !desired.fdb.contains(entry))
            .map(|(entry, message)| {
                log::debug!("removing FDB entry {} dst {}", entry.mac, entry.destination);
                let message = message.unwrap_or_else(|| {
                    let bridge = AddressFamily::Bridge;
                    neighbour_message(bridge, vtep_index, entry.destination, Some(entry.mac))
                });
                delete_neighbour(handle, message)
            }),
    )
    .await?;
    pipelined(
        "neighbours removed",
        neighbours
            .into_iter()
            .filter(|(address, _)| !desired.neighbours.contains_key(address))
            .map(|(address, message)| {
                log::debug!("removing neighbour {address}");
                let message = message.unwrap_or_else(|| {
                    neighbour_message(devices.family(), vtep_index, address, None)
                });
                delete_neighbour(handle, message)
            }),
    )
    .await
}

/// The entries of the kinds the agent owns on one family's devices: all of them, to compare
/// the desired ones with, and those that may have to go, each with the message that deletes
/// it as the kernel listed it. An entry as the last round wrote it has no message: one is
/// built from the entry if it must go.
struct Owned<'a> {
    present: Cow<'a, PeerEntries>,
    neighbours: Vec<(IpAddr, Option<NeighbourMessage>)>,
    fdb: Vec<(FdbEntry, Option<NeighbourMessage>)>,
    routes: Vec<(Route, Option<RouteMessage>)>,
}

impl Owned<'_> {
    /// What the kernel holds, dumped.
    async fn listed(handle: &Handle, devices: FamilyDevices) -> Result<Self> {
        let neighbours = owned_neighbours(handle, devices.family(), devices.vtep_index).await?;
        let fdb = owned_fdb(handle, devices.vtep_index).await?;
        let routes = owned_routes(handle, devices).await?;
        let present = PeerEntries {
            neighbours: neighbours
                .iter()
                .map(|(&address, (mac, _))| (address, *mac))
                .collect(),
            fdb: fdb.iter().map(|(entry, _)| *entry).collect(),
            routes: routes.iter().map(|(route, _)| *route).collect(),
        };
        Ok(Self {
            present: Cow::Owned(present),
            neighbours: neighbours
                .into_iter()
                .map(|(address, (_, message))| (address, Some(message)))
                .collect(),
            fdb: with_listed_messages(fdb),
            routes: with_listed_messages(routes),
        })
    }
}

impl<'a> Owned<'a> {
    /// `written`, as the last round left it, of which only what `desired` lacks may have to
    /// go: at thousands of leases, copying the rest would cost more than the event's writes.
    fn as_written(written: &'a PeerEntries, desired: &PeerEntries) -> Self {
        Self {
            present: Cow::Borrowed(written),
            neighbours: written
                .neighbours
                .keys()
                .filter(|address| !desired.neighbours.contains_key(address))
                .map(|&address| (address, None))
                .collect(),
            fdb: written
                .fdb
                .difference(&desired.fdb)
                .map(|&entry| (entry, None))
                .collect(),
            routes: written
                .routes
                .difference(&desired.routes)
                .map(|&route| (route, None))
                .collect(),
        }
    }
}

/// `entries` with the messages the kernel listed them in.
fn with_listed_messages<T, M>(entries: Vec<(T, M)>) -> Vec<(T, Option<M>)> {
    entries
        .into_iter()
        .map(|(entry, message)| (entry, Some(message)))
        .collect()
}

/// How many netlink requests are in flight at once. The kernel answers each in turn; one round
/// trip at a time, thousands of entries take seconds.
const PIPELINE_DEPTH: usize = 64;

/// Runs `requests` with up to [`PIPELINE_DEPTH`] in flight; the first error wins. Each entry
/// is logged at debug level and the round's count of `what` at info, so that thousands of
/// leases do not mean thousands of lines.
async fn pipelined(
    what: &str,
    requests: impl Iterator<Item = impl Future<Output = Result<()>>>,
) -> Result<()> {
    let mut count = 0;
    let outcome = futures::stream::iter(requests.inspect(|_| count += 1))
        .buffer_unordered(PIPELINE_DEPTH)
        .try_collect()
        .await;
    if count > 0 {
        log::info!("{what}: {count}");
    }
    outcome
}

/// Which of `addresses` the kernel reaches without a gateway, and which not at all: one route
/// lookup each, [`PIPELINE_DEPTH`] in flight (at 10,000 peers, one after another took half a
/// second).
pub async fn reach(handle: &Handle, addresses: Vec<IpAddr>) -> Result<Reach> {
    let lookups = addresses.into_iter().map(|address| async move {
        route_to(handle, address)
            .await
            .map(|route| (address, route))
    });
    let answers: Vec<(IpAddr, PeerRoute)> = futures::stream::iter(lookups)
        .buffer_unordered(PIPELINE_DEPTH)
        .try_collect()
        .await?;
    let mut reach = Reach::default();
    for (address, route) in answers {
        match route {
            PeerRoute::OnLink => {
                reach.on_link.insert(address);
            }
            PeerRoute::ViaGateway => {}
            PeerRoute::Unreachable(why) => {
                reach.unreachable.insert(address, why);
            }
        }
    }
    Ok(reach)
}

/// How the kernel would send to a peer's public address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRoute {
    /// Without a gateway: the peer shares our L2 segment.
    OnLink,
    ViaGateway,
    /// No route leads there (none at all, an unreachable, prohibit or blackhole route, or an
    /// address no route can lead to, such as 0.1.2.3); the kernel's reason.
    Unreachable(String),
}

/// How the kernel reaches `address`. Only a failure to ask is an error.
pub async fn route_to(handle: &Handle, address: IpAddr) -> Result<PeerRoute> {
    let host_len = if address.is_ipv4() { 32 } else { 128 };
    let query = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(address, host_len)
        .with_context(|| format!("a route query for {address}"))?
        .build();
    let answers: Vec<RouteMessage> = match handle.route().get(query).execute().try_collect().await {
        Ok(answers) => answers,
        Err(rtnetlink::Error::NetlinkError(message)) if is_no_route(message.raw_code()) => {
            return Ok(PeerRoute::Unreachable(message.to_io().to_string()));
        }
        Err(error) => {
            return Err(error).with_context(|| format!("cannot look up the route to {address}"));
        }
    };
    let via_gateway = answers.iter().any(|route| {
        route
            .attributes
            .iter()
            .any(|attribute| matches!(attribute, RouteAttribute::Gateway(_)))
    });
    Ok(if via_gateway {
        PeerRoute::ViaGateway
    } else {
        PeerRoute::OnLink
    })
}

/// Whether a route lookup's error code says that no route leads to the address.
fn is_no_route(raw_code: i32) -> bool {
    [
        libc::ENETUNREACH,
        libc::EHOSTUNREACH,
        libc::EACCES,
        libc::EINVAL,
    ]
    .iter()
    .any(|errno| raw_code == -errno)
}

/// What the kernel holds for the remote leases of `family`, whichever dataplane wrote it:
/// the permanent neighbours and the FDB entries of the VXLAN device `vtep_index`, if there is
/// one, and every main-table route via a gateway, on any device (DirectRouting's go through
/// the uplink).
pub async fn kernel_entries(
    handle: &Handle,
    family: AddressFamily,
    vtep_index: Option<u32>,
) -> Result<PeerEntries> {
    let mut entries = PeerEntries {
        routes: main_routes(handle, family)
            .await?
            .into_iter()
            .map(|(route, _)| route)
            .collect(),
        ..PeerEntries::default()
    };
    if let Some(vtep_index) = vtep_index {
        entries.neighbours = owned_neighbours(handle, family, vtep_index)
            .await?
            .into_iter()
            .map(|(address, (mac, _))| (address, mac))
            .collect();
        entries.fdb = owned_fdb(handle, vtep_index)
            .await?
            .into_iter()
            .map(|(entry, _)| entry)
            .collect();
    }
    Ok(entries)
}

/// Permanent neighbours of `family` on the VXLAN device: only the agent puts those there.
async fn owned_neighbours(
    handle: &Handle,
    family: AddressFamily,
    vtep_index: u32,
) -> Result<HashMap<IpAddr, (MacAddr, NeighbourMessage)>> {
    Ok(super::links::neighbours(handle, family)
        .await?
        .into_iter()
        .filter(|message| {
            message.header.ifindex == vtep_index
                && message.header.state == NeighbourState::Permanent
        })
        .filter_map(|message| {
            let address = neighbour_destination(&message)?;
            let mac = neighbour_mac(&message)?;
            Some((address, (mac, message)))
        })
        .collect())
}

/// FDB entries of the VXLAN device that send a MAC to a remote VTEP.
async fn owned_fdb(handle: &Handle, vtep_index: u32) -> Result<Vec<(FdbEntry, NeighbourMessage)>> {
    Ok(super::links::neighbours(handle, AddressFamily::Bridge)
        .await?
        .into_iter()
        .filter(|message| message.header.ifindex == vtep_index)
        .filter_map(|message| Some((fdb_entry(&message)?, message)))
        .collect())
}

fn fdb_entry(message: &NeighbourMessage) -> Option<FdbEntry> {
    Some(FdbEntry {
        mac: neighbour_mac(message)?,
        destination: neighbour_destination(message)?,
    })
}

/// Main-table routes of the family the agent owns: every non-kernel route via a gateway
/// through the VXLAN device, and direct routes to overlay subnets through the uplink.
async fn owned_routes(
    handle: &Handle,
    devices: FamilyDevices,
) -> Result<Vec<(Route, RouteMessage)>> {
    Ok(main_routes(handle, devices.family())
        .await?
        .into_iter()
        .filter(|(route, _)| devices.owns(route))
        .collect())
}

impl FamilyDevices {
    /// Whether `route` is of a kind the agent owns on these devices.
    fn owns(&self, route: &Route) -> bool {
        route.interface == self.vtep_index
            || (route.interface == self.uplink_index
                && self.network.contains(route.destination.network()))
    }
}

/// Main-table routes of `family` via a gateway that the kernel did not add itself.
async fn main_routes(handle: &Handle, family: AddressFamily) -> Result<Vec<(Route, RouteMessage)>> {
    Ok(super::links::routes(handle, family)
        .await?
        .into_iter()
        .filter_map(|message| Some((main_route(&message)?, message)))
        .collect())
}

/// The route `message` describes, if it is a main-table route via a gateway that the kernel
/// did not add itself.
fn main_route(message: &RouteMessage) -> Option<Route> {
    let header = &message.header;
    if header.table != RouteHeader::RT_TABLE_MAIN || header.protocol == RouteProtocol::Kernel {
        return None;
    }
    route_of(message)
}

/// Whether `message` only tells that an entry of a kind the agent owns is as the last round
/// left it: an entry it wrote, there; one it does not want, gone. That is the echo of the
/// agent's own write, and the round it would start would find nothing to do. Anything else
/// about those entries (one of ours deleted or changed by hand, a stranger added) is not.
pub fn echoes(message: &RouteNetlinkMessage, written: &WrittenPeers) -> bool {
    written.0.iter().any(|(devices, entries)| match message {
        RouteNetlinkMessage::NewRoute(route) => {
            owned_route(route, devices).is_some_and(|route| entries.routes.contains(&route))
        }
        RouteNetlinkMessage::DelRoute(route) => {
            owned_route(route, devices).is_some_and(|route| !entries.routes.contains(&route))
        }
        RouteNetlinkMessage::NewNeighbour(neighbour)
            if neighbour.header.ifindex == devices.vtep_index =>
        {
            is_as_written(entries, neighbour)
        }
        RouteNetlinkMessage::DelNeighbour(neighbour)
            if neighbour.header.ifindex == devices.vtep_index =>
        {
            is_unwanted(entries, neighbour)
        }
        _ => false,
    })
}

fn owned_route(message: &RouteMessage, devices: &FamilyDevices) -> Option<Route> {
    main_route(message).filter(|route| devices.owns(route))
}

/// Whether the neighbour or FDB entry `neighbour` reports is as [`reconcile`] would leave it
/// by `entries`.
fn is_as_written(entries: &PeerEntries, neighbour: &NeighbourMessage) -> bool {
    if neighbour.header.family == AddressFamily::Bridge {
        return fdb_entry(neighbour).is_some_and(|entry| entries.fdb.contains(&entry));
    }
    // The agent keeps only permanent ones. A permanent entry deleted while still referenced
    // comes back as a new one that has failed.
    if neighbour.header.state != NeighbourState::Permanent {
        return is_unwanted(entries, neighbour);
    }
    let wanted =
        neighbour_destination(neighbour).and_then(|address| entries.neighbours.get(&address));
    wanted.is_some() && wanted == neighbour_mac(neighbour).as_ref()
}

/// Whether `entries` want nothing where the neighbour or FDB entry `neighbour` reports gone
/// was.
fn is_unwanted(entries: &PeerEntries, neighbour: &NeighbourMessage) -> bool {
    if neighbour.header.family == AddressFamily::Bridge {
        return fdb_entry(neighbour).is_some_and(|entry| !entries.fdb.contains(&entry));
    }
    neighbour_destination(neighbour)
        .is_some_and(|address| !entries.neighbours.contains_key(&address))
}

/// Deletes every non-kernel main-table route into `network` that goes via a gateway: the
/// direct routes the agent adds (routes through the VXLAN device vanish with the device).
pub async fn remove_routes_into(handle: &Handle, network: IpNetwork) -> Result<()> {
    let family = if network.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    for (route, message) in main_routes(handle, family).await? {
        if network.contains(route.destination.network()) {
            log::info!("removing route {} via {}", route.destination, route.gateway);
            delete_route(handle, message).await?;
        }
    }
    Ok(())
}

fn route_of(message: &RouteMessage) -> Option<Route> {
    let mut destination = None;
    let mut gateway = None;
    let mut interface = None;
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(address)) => {
                destination = Some(IpAddr::V4(*address))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(address)) => {
                destination = Some(IpAddr::V6(*address))
            }
            RouteAttribute::Gateway(RouteAddress::Inet(address)) => {
                gateway = Some(IpAddr::V4(*address))
            }
            RouteAttribute::Gateway(RouteAddress::Inet6(address)) => {
                gateway = Some(IpAddr::V6(*address))
            }
            RouteAttribute::Oif(index) => interface = Some(*index),
            _ => {}
        }
    }
    Some(Route {
        destination: IpNetwork::new(destination?, message.header.destination_prefix_length).ok()?,
        gateway: gateway?,
        interface: interface?,
    })
}

pub fn neighbour_destination(message: &NeighbourMessage) -> Option<IpAddr> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(address)) => {
                Some(IpAddr::V4(*address))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(address)) => {
                Some(IpAddr::V6(*address))
            }
            // FDB entries are AF_BRIDGE messages, whose NDA_DST the parser leaves as raw bytes.
            NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => match bytes.len() {
                4 => <[u8; 4]>::try_from(bytes.as_slice())
                    .ok()
                    .map(|octets| IpAddr::V4(Ipv4Addr::from(octets))),
                16 => <[u8; 16]>::try_from(bytes.as_slice())
                    .ok()
                    .map(|octets| IpAddr::V6(Ipv6Addr::from(octets))),
                _ => None,
            },
            _ => None,
        })
}

/// The neighbour's IPv4 address, if it has one.
pub fn neighbour_ipv4(message: &NeighbourMessage) -> Option<Ipv4Addr> {
    match neighbour_destination(message)? {
        IpAddr::V4(address) => Some(address),
        IpAddr::V6(_) => None,
    }
}

pub fn neighbour_mac(message: &NeighbourMessage) -> Option<MacAddr> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                Some(MacAddr(bytes.as_slice().try_into().ok()?))
            }
            _ => None,
        })
}

async fn add_neighbour(
    handle: &Handle,
    vtep_index: u32,
    address: IpAddr,
    mac: MacAddr,
) -> Result<()> {
    log::debug!("setting neighbour {address} lladdr {mac}");
    handle
        .neighbours()
        .add(vtep_index, address)
        .link_layer_address(&mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .with_context(|| format!("cannot set neighbour {address} lladdr {mac}"))
}

async fn add_fdb(handle: &Handle, vtep_index: u32, entry: FdbEntry) -> Result<()> {
    log::debug!("setting FDB entry {} dst {}", entry.mac, entry.destination);
    handle
        .neighbours()
        .add_bridge(vtep_index, &entry.mac.0)
        .destination(entry.destination)
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .with_context(|| {
            format!(
                "cannot set FDB entry {} dst {}",
                entry.mac, entry.destination
            )
        })
}

async fn add_route(handle: &Handle, route: &Route, vtep_index: u32) -> Result<()> {
    log::debug!("adding route {} via {}", route.destination, route.gateway);
    handle
        .route()
        .add(route_message(route, vtep_index)?)
        .replace()
        .execute()
        .await
        .with_context(|| {
            format!(
                "cannot add route {} via {}",
                route.destination, route.gateway
            )
        })
}

/// The message of `route` as the agent adds it. flannel's VXLAN routes (through the VXLAN
/// device `vtep_index`) go via a gateway no interface is on; direct routes need not.
fn route_message(route: &Route, vtep_index: u32) -> Result<RouteMessage> {
    let mut message = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.destination.network(), route.destination.prefix())
        .and_then(|builder| builder.gateway(route.gateway))
        .with_context(|| format!("route {} via {}", route.destination, route.gateway))?
        .output_interface(route.interface)
        .protocol(RouteProtocol::Boot)
        .build();
    if route.interface == vtep_index {
        message.header.flags |= RouteFlags::Onlink;
    }
    Ok(message)
}

/// A permanent neighbour (`mac` none) or FDB entry (family bridge, `mac` its key) of the
/// device `ifindex` for `destination`, as the agent writes it.
fn neighbour_message(
    family: AddressFamily,
    ifindex: u32,
    destination: IpAddr,
    mac: Option<MacAddr>,
) -> NeighbourMessage {
    let mut message = NeighbourMessage::default();
    message.header.family = family;
    message.header.ifindex = ifindex;
    message.header.state = NeighbourState::Permanent;
    let destination = match destination {
        IpAddr::V4(address) => NeighbourAddress::Inet(address),
        IpAddr::V6(address) => NeighbourAddress::Inet6(address),
    };
    message
        .attributes
        .push(NeighbourAttribute::Destination(destination));
    if let Some(mac) = mac {
        message.header.flags = NeighbourFlags::Own;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    message
}

async fn delete_route(handle: &Handle, message: RouteMessage) -> Result<()> {
    let outcome = handle.route().del(message).execute().await;
    already_gone_is_done(outcome).context("cannot delete route")
}

async fn delete_neighbour(handle: &Handle, message: NeighbourMessage) -> Result<()> {
    let outcome = handle.neighbours().del(message).execute().await;
    already_gone_is_done(outcome).context("cannot delete neighbour entry")
}

/// A delete that finds nothing (another hand was first) has done its work.
fn already_gone_is_done(outcome: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match outcome {
        Err(rtnetlink::Error::NetlinkError(message))
            if [libc::ENOENT, libc::ESRCH].contains(&-message.raw_code()) =>
        {
            Ok(())
        }
        outcome => outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EntryMap, EntrySet};

    const VTEP: u32 = 4;
    const UPLINK: u32 = 2;
    const MAC: MacAddr = MacAddr([0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x89]);
    const OTHER_MAC: MacAddr = MacAddr([0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x8a]);

    fn address(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    fn devices() -> FamilyDevices {
        FamilyDevices {
            vtep_index: VTEP,
            uplink_index: UPLINK,
            network: "10.2.0.0/16".parse().expect("a test network"),
        }
    }

    /// What a round wrote for the seed's lease 10.2.54.0/24 of 172.20.62.105.
    fn written() -> WrittenPeers {
        let entries = PeerEntries {
            neighbours: EntryMap::from_iter([(address("10.2.54.0"), MAC)]),
            fdb: EntrySet::from_iter([FdbEntry {
                mac: MAC,
                destination: address("172.20.62.105"),
            }]),
            routes: EntrySet::from_iter([route("10.2.54.0/24", "10.2.54.0", VTEP)]),
        };
        WrittenPeers(vec![(devices(), entries)])
    }

    fn route(destination: &str, gateway: &str, interface: u32) -> Route {
        Route {
            destination: destination.parse().expect("a test subnet"),
            gateway: address(gateway),
            interface,
        }
    }

    fn route_message(route: Route, protocol: RouteProtocol) -> RouteMessage {
        RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.destination.network(), route.destination.prefix())
            .and_then(|builder| builder.gateway(route.gateway))
            .expect("a test route")
            .output_interface(route.interface)
            .protocol(protocol)
            .build()
    }

    fn neighbour(address: &str, mac: MacAddr, state: NeighbourState) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.ifindex = VTEP;
        message.header.state = state;
        message.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet(
                address.parse().expect("a test address"),
            )),
            NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
        ];
        message
    }

    fn permanent(address: &str, mac: MacAddr) -> NeighbourMessage {
        neighbour(address, mac, NeighbourState::Permanent)
    }

    /// An FDB entry as the kernel reports it: AF_BRIDGE, its destination as raw bytes.
    fn fdb(mac: MacAddr, destination: [u8; 4]) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = VTEP;
        message.header.state = NeighbourState::Permanent;
        message.attributes = vec![
            NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()),
            NeighbourAttribute::Destination(NeighbourAddress::Other(destination.to_vec())),
        ];
        message
    }

    #[test]
    fn the_entries_a_round_wrote_or_removed_echo_back_as_nothing_to_do() {
        let ours = route("10.2.54.0/24", "10.2.54.0", VTEP);
        let gone = route("10.2.60.0/24", "10.2.60.0", VTEP);
        let echoes_of_a_round = [
            RouteNetlinkMessage::NewRoute(route_message(ours, RouteProtocol::Boot)),
            RouteNetlinkMessage::DelRoute(route_message(gone, RouteProtocol::Boot)),
            RouteNetlinkMessage::NewNeighbour(permanent("10.2.54.0", MAC)),
            RouteNetlinkMessage::DelNeighbour(permanent("10.2.60.0", MAC)),
            // A removed neighbour the kernel still holds a reference to.
            RouteNetlinkMessage::NewNeighbour(neighbour("10.2.60.0", MAC, NeighbourState::Failed)),
            RouteNetlinkMessage::NewNeighbour(fdb(MAC, [172, 20, 62, 105])),
            RouteNetlinkMessage::DelNeighbour(fdb(OTHER_MAC, [172, 20, 62, 160])),
        ];
        for message in echoes_of_a_round {
            assert!(echoes(&message, &written()), "{message:?}");
        }
    }

    #[test]
    fn an_entry_of_ours_changed_or_deleted_by_another_hand_calls_for_a_round() {
        let ours = route("10.2.54.0/24", "10.2.54.0", VTEP);
        let stranger = route("10.2.99.0/24", "10.2.99.0", VTEP);
        let direct = route("10.2.54.0/24", "172.20.62.105", UPLINK);
        let changes = [
            RouteNetlinkMessage::DelRoute(route_message(ours, RouteProtocol::Boot)),
            RouteNetlinkMessage::NewRoute(route_message(stranger, RouteProtocol::Static)),
            RouteNetlinkMessage::NewRoute(route_message(direct, RouteProtocol::Boot)),
            RouteNetlinkMessage::NewNeighbour(permanent("10.2.54.0", OTHER_MAC)),
            RouteNetlinkMessage::NewNeighbour(neighbour("10.2.54.0", MAC, NeighbourState::Stale)),
            RouteNetlinkMessage::NewNeighbour(permanent("10.2.99.0", MAC)),
            RouteNetlinkMessage::DelNeighbour(permanent("10.2.54.0", MAC)),
            RouteNetlinkMessage::NewNeighbour(fdb(OTHER_MAC, [172, 20, 62, 105])),
            RouteNetlinkMessage::DelNeighbour(fdb(MAC, [172, 20, 62, 105])),
        ];
        for message in changes {
            assert!(!echoes(&message, &written()), "{message:?}");
        }
    }

    #[test]
    fn what_no_round_wrote_about_is_never_an_echo() {
        // The uplink's routes decide which peers share our segment; the kernel's own routes
        // and the entries of other devices are not the agent's.
        let uplink = route("172.20.63.0/24", "172.20.62.1", UPLINK);
        let kernel = route("10.2.54.0/24", "10.2.54.0", VTEP);
        let mut elsewhere = permanent("10.2.60.0", MAC);
        elsewhere.header.ifindex = UPLINK;
        let others = [
            RouteNetlinkMessage::DelRoute(route_message(uplink, RouteProtocol::Boot)),
            RouteNetlinkMessage::NewRoute(route_message(kernel, RouteProtocol::Kernel)),
            RouteNetlinkMessage::DelNeighbour(elsewhere),
        ];
        for message in &others {
            assert!(!echoes(message, &written()), "{message:?}");
            assert!(!echoes(message, &WrittenPeers::default()), "{message:?}");
        }
    }
}
