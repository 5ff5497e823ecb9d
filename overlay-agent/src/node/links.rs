//! Small netlink helpers shared by the device modules: finding links, reading their
//! attributes, bringing them up, and giving them addresses.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
        link::{
            InfoData, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp,
            XdpAttached,
        },
        neighbour::NeighbourMessage,
        route::RouteMessage,
    },
};

use crate::{
    mac::MacAddr,
    model::{Interface, XdpAttachMode},
};

/// A netlink handle for this namespace, its connection running on the tokio runtime.
pub fn connect() -> Result<Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The link called `name`, if it exists.
pub async fn find(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        // The kernel answers ENODEV for a name it does not know.
        Err(rtnetlink::Error::NetlinkError(error)) if error.raw_code() == -libc::ENODEV => Ok(None),
        Err(error) => Err(error).with_context(|| format!("cannot look up interface {name}")),
    }
}

/// Creates the link `message` describes and returns it as the kernel reports it.
pub async fn create(handle: &Handle, name: &str, message: LinkMessage) -> Result<LinkMessage> {
    handle
        .link()
        .add(message)
        .execute()
        .await
        .with_context(|| format!("cannot create {name}"))?;
    find(handle, name)
        .await?
        .with_context(|| format!("{name} vanished right after creation"))
}

/// Deletes `link`, logging it by `name`.
pub async fn delete(handle: &Handle, link: &LinkMessage, name: &str) -> Result<()> {
    log::info!("deleting {name}");
    handle
        .link()
        .del(link.header.index)
        .execute()
        .await
        .with_context(|| format!("cannot delete {name}"))
}

/// Every link of the namespace.
pub async fn all(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("cannot list network interfaces")
}

/// Every neighbour entry of `family` in the namespace: `Inet` for ARP entries, `Bridge` for
/// forwarding database entries.
pub async fn neighbours(handle: &Handle, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
    handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("cannot list {family:?} neighbour entries"))
}

/// Interface index → name, for every link of the namespace.
pub async fn names(handle: &Handle) -> Result<HashMap<u32, String>> {
    Ok(all(handle)
        .await?
        .iter()
        .filter_map(|link| Some((link.header.index, name(link)?.to_string())))
        .collect())
}

/// Every interface of the namespace, with the XDP program on it, for the dataplane to look
/// for programs of ours.
pub async fn interfaces(handle: &Handle) -> Result<Vec<Interface>> {
    Ok(all(handle)
        .await?
        .iter()
        .filter_map(|link| {
            Some(Interface {
                name: name(link)?.to_string(),
                index: link.header.index,
                xdp_program: xdp_program(link),
            })
        })
        .collect())
}

/// How the XDP program on `link` runs; none without one, or for one offloaded to the hardware
/// or beside another in the other mode, which the agent leaves as it is.
pub fn xdp_attach_mode(link: &LinkMessage) -> Option<XdpAttachMode> {
    xdp_entries(link).find_map(|entry| match entry {
        LinkXdp::Attached(XdpAttached::Driver) => Some(XdpAttachMode::Native),
        LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(XdpAttachMode::Generic),
        _ => None,
    })
}

fn xdp_program(link: &LinkMessage) -> Option<u32> {
    xdp_entries(link).find_map(|entry| match entry {
        LinkXdp::ProgId(id) => Some(*id),
        _ => None,
    })
}

fn xdp_entries(link: &LinkMessage) -> impl Iterator<Item = &LinkXdp> {
    link.attributes
        .iter()
        .filter_map(|attribute| match attribute {
            LinkAttribute::Xdp(xdp) => Some(xdp.iter()),
            _ => None,
        })
        .flatten()
}

pub fn name(link: &LinkMessage) -> Option<&str> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        })
}

/// The MAC of the interface `name`, if it has one; an error if it is gone.
pub async fn mac_of(handle: &Handle, name: &str) -> Result<Option<MacAddr>> {
    let link = find(handle, name)
        .await?
        .with_context(|| format!("the interface {name} vanished"))?;
    Ok(mac(&link))
}

pub fn mac(link: &LinkMessage) -> Option<MacAddr> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Address(bytes) => Some(MacAddr(bytes.as_slice().try_into().ok()?)),
            _ => None,
        })
}

pub fn mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
}

pub fn kind(link: &LinkMessage) -> Option<&InfoKind> {
    link_info(link).find_map(|info| match info {
        LinkInfo::Kind(kind) => Some(kind),
        _ => None,
    })
}

pub fn info_data(link: &LinkMessage) -> Option<&InfoData> {
    link_info(link).find_map(|info| match info {
        LinkInfo::Data(data) => Some(data),
        _ => None,
    })
}

fn link_info(link: &LinkMessage) -> impl Iterator<Item = &LinkInfo> {
    link.attributes
        .iter()
        .filter_map(|attribute| match attribute {
            LinkAttribute::LinkInfo(infos) => Some(infos.iter()),
            _ => None,
        })
        .flatten()
}

/// Sets the link up and its MTU, unless both already are as wanted.
pub async fn set_up_with_mtu(
    handle: &Handle,
    link: &LinkMessage,
    wanted_mtu: Option<u32>,
) -> Result<()> {
    let up = link.header.flags.contains(LinkFlags::Up);
    let mtu_right = wanted_mtu.is_none() || mtu(link) == wanted_mtu;
    if up && mtu_right {
        return Ok(());
    }
    let mut change = LinkUnspec::new_with_index(link.header.index).up();
    if let Some(wanted) = wanted_mtu {
        change = change.mtu(wanted);
    }
    handle
        .link()
        .set(change.build())
        .execute()
        .await
        .with_context(|| format!("cannot bring up {}", name(link).unwrap_or("?")))
}

/// Makes `address/prefix_len` the link's only address of its family inside the overlay
/// `network`: adds it unless the link carries it, and removes any other address inside
/// `network` (a former lease's, after the subnet changed). Addresses outside the network
/// stay: the agent never removes what it did not put there.
pub async fn ensure_lease_address(
    handle: &Handle,
    index: u32,
    address: IpAddr,
    prefix_len: u8,
    network: IpNetwork,
) -> Result<()> {
    let present = addresses_of(handle, index).await?;
    let mut has_it = false;
    for message in present {
        let Some(local) = local_address(&message) else {
            continue;
        };
        if local == address && message.header.prefix_len == prefix_len {
            has_it = true;
        } else if network.contains(local) {
            log::info!(
                "removing {local}/{} from ifindex {index}: no longer this host's lease",
                message.header.prefix_len
            );
            handle
                .address()
                .del(message)
                .execute()
                .await
                .with_context(|| format!("cannot remove the former lease's address {local}"))?;
        }
    }
    if has_it {
        return Ok(());
    }
    handle
        .address()
        .add(index, address, prefix_len)
        .execute()
        .await
        .with_context(|| format!("cannot add {address}/{prefix_len}"))
}

/// Every address of the link `index`, of both families.
pub async fn addresses_of(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("cannot list the addresses of ifindex {index}"))
}

/// The address an address message gives its link: IFA_LOCAL for IPv4, IFA_ADDRESS for IPv6,
/// which has no IFA_LOCAL on a link without a peer.
fn local_address(message: &AddressMessage) -> Option<IpAddr> {
    message
        .attributes
        .iter()
        .find_map(|attribute| match (message.header.family, attribute) {
            (AddressFamily::Inet, AddressAttribute::Local(local @ IpAddr::V4(_))) => Some(*local),
            (AddressFamily::Inet6, AddressAttribute::Address(local @ IpAddr::V6(_))) => {
                Some(*local)
            }
            _ => None,
        })
}

/// Every IPv4 route of the namespace, all tables.
pub async fn ipv4_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    routes(handle, AddressFamily::Inet).await
}

/// Every route of `family` in the namespace, all tables.
pub async fn routes(handle: &Handle, family: AddressFamily) -> Result<Vec<RouteMessage>> {
    let query = match family {
        AddressFamily::Inet6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        _ => RouteMessageBuilder::<Ipv4Addr>::new().build(),
    };
    handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .context("cannot list routes")
}

/// Sets a sysctl of this namespace unless it already has `value`; `key` is its path below
/// /proc/sys.
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    if std::fs::read_to_string(&path).is_ok_and(|current| current.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).with_context(|| format!("cannot set {key} to {value}"))
}
