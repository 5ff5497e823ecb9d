//! Choosing the uplink: the interface other hosts reach this one through, found as flanneld
//! finds it (`--iface`, then `--iface-regex`, then the default route's interface).
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use regex::Regex;
use rtnetlink::{
    Handle,
    packet_route::{
        address::AddressAttribute,
        route::{RouteAttribute, RouteHeader},
    },
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    /// The interface's address that other hosts reach; the public IP unless overridden.
    pub address: Ipv4Addr,
    pub mtu: u32,
}

struct Link {
    index: u32,
    name: String,
    mtu: u32,
}

/// Finds the uplink: the first `--iface` (name or address) that exists, else the first
/// `--iface-regex` matching an address or a name, else the default route's interface.
pub async fn find(handle: &Handle, ifaces: &[String], regexes: &[String]) -> Result<Uplink> {
    let links = links(handle).await?;
    let addresses = ipv4_addresses(handle).await?;
    let uplink_of = |link: &Link, address: Option<Ipv4Addr>| -> Option<Uplink> {
        let address = address.or_else(|| {
            addresses
                .iter()
                .find(|(index, _)| *index == link.index)
                .map(|(_, address)| *address)
        })?;
        Some(Uplink {
            name: link.name.clone(),
            index: link.index,
            address,
            mtu: link.mtu,
        })
    };
    let link_with_index = |index: u32| links.iter().find(|link| link.index == index);

    if !ifaces.is_empty() {
        for spec in ifaces {
            let found = match spec.parse::<Ipv4Addr>() {
                Ok(wanted) => addresses
                    .iter()
                    .find(|(_, address)| *address == wanted)
                    .and_then(|(index, address)| {
                        uplink_of(link_with_index(*index)?, Some(*address))
                    }),
                Err(_) => links
                    .iter()
                    .find(|link| &link.name == spec)
                    .and_then(|link| uplink_of(link, None)),
            };
            match found {
                Some(uplink) => return Ok(uplink),
                None => log::warn!("--iface {spec}: no interface with that name or IPv4 address"),
            }
        }
        bail!(
            "none of --iface {} names an interface with an IPv4 address",
            ifaces.join(", ")
        );
    }

    if !regexes.is_empty() {
        for pattern in regexes {
            let regex = Regex::new(pattern)
                .with_context(|| format!("--iface-regex {pattern:?} is not a valid regex"))?;
            let by_address = addresses
                .iter()
                .find(|(_, address)| regex.is_match(&address.to_string()))
                .and_then(|(index, address)| uplink_of(link_with_index(*index)?, Some(*address)));
            let found = by_address.or_else(|| {
                links
                    .iter()
                    .filter(|link| regex.is_match(&link.name))
                    .find_map(|link| uplink_of(link, None))
            });
            if let Some(uplink) = found {
                return Ok(uplink);
            }
        }
        bail!(
            "no interface address or name matches --iface-regex {}",
            regexes.join(", ")
        );
    }

    let index = default_route_interface(handle)
        .await?
        .context("there is no IPv4 default route: name the uplink with --iface")?;
    let link = link_with_index(index).context("the default route's interface vanished")?;
    uplink_of(link, None).with_context(|| {
        format!(
            "{}, the default route's interface, has no IPv4 address: name the uplink with --iface",
            link.name
        )
    })
}

async fn links(handle: &Handle) -> Result<Vec<Link>> {
    Ok(super::links::all(handle)
        .await?
        .iter()
        .map(|message| Link {
            index: message.header.index,
            name: super::links::name(message).unwrap_or_default().to_string(),
            mtu: super::links::mtu(message).unwrap_or_default(),
        })
        .collect())
}

/// (interface index, address) for every IPv4 address, in the kernel's order.
async fn ipv4_addresses(handle: &Handle) -> Result<Vec<(u32, Ipv4Addr)>> {
    let messages: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .context("cannot list interface addresses")?;
    Ok(messages
        .into_iter()
        .filter_map(|message| {
            let index = message.header.index;
            message
                .attributes
                .into_iter()
                .find_map(|attribute| match attribute {
                    AddressAttribute::Local(IpAddr::V4(address)) => Some((index, address)),
                    _ => None,
                })
        })
        .collect())
}

async fn default_route_interface(handle: &Handle) -> Result<Option<u32>> {
    Ok(super::links::ipv4_routes(handle)
        .await?
        .into_iter()
        .filter(|route| {
            route.header.destination_prefix_length == 0
                && route.header.table == RouteHeader::RT_TABLE_MAIN
        })
        .find_map(|route| {
            route
                .attributes
                .into_iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Oif(index) => Some(index),
                    _ => None,
                })
        }))
}
