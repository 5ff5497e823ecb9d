//! Choosing the uplink: the interface other hosts reach this one through, found as flanneld
//! finds it. With none of `--iface`, `--iface-regex` and `--iface-can-reach`: the interface
//! holding `--public-ip`, else the default route's. Otherwise each `--iface` (name or address)
//! in turn, then each `--iface-regex` (addresses first, then names), then the interface of the
//! route to `--iface-can-reach`. An interface without an IPv4 address serves an IPv6-only
//! network; without any `--iface*` flag it is then the IPv6 default route's.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use regex::Regex;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressFlags},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
    },
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub index: u32,
    /// The interface's IPv4 address: the tunnel's source, and the public IP unless
    /// `--public-ip`. None on an interface without one (an IPv6-only host's).
    pub address: Option<Ipv4Addr>,
    /// The interface's IPv6 address as flannel picks it (see [`ipv6_address`]): the IPv6
    /// tunnel's source, and the PublicIPv6 unless `--public-ipv6`.
    pub ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// How the operator asked for the uplink: flanneld's flags of the same names.
#[derive(Clone, Copy, Debug)]
pub struct Choice<'a> {
    pub ifaces: &'a [String],
    pub regexes: &'a [String],
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

struct Link {
    index: u32,
    name: String,
    mtu: u32,
}

/// The interfaces and their IPv4 addresses, listed once per search.
struct Interfaces {
    links: Vec<Link>,
    /// (interface index, address), in the kernel's order.
    addresses: Vec<(u32, Ipv4Addr)>,
}

impl Interfaces {
    async fn list(handle: &Handle) -> Result<Self> {
        Ok(Self {
            links: links(handle).await?,
            addresses: ipv4_addresses(handle).await?,
        })
    }

    /// The uplink on the interface `index`, with `address` or else its first IPv4 address, if
    /// it has one.
    fn uplink(&self, index: u32, address: Option<Ipv4Addr>) -> Option<Uplink> {
        let link = self.links.iter().find(|link| link.index == index)?;
        let address = address.or_else(|| {
            self.addresses
                .iter()
                .find(|(owner, _)| *owner == index)
                .map(|(_, address)| *address)
        });
        Some(Uplink {
            name: link.name.clone(),
            index,
            address,
            ipv6: None,
            mtu: link.mtu,
        })
    }

    /// The interface holding `wanted`.
    fn holding(&self, wanted: Ipv4Addr) -> Option<Uplink> {
        let (index, _) = self
            .addresses
            .iter()
            .find(|(_, address)| *address == wanted)?;
        self.uplink(*index, Some(wanted))
    }

    /// The interface called `name`.
    fn named(&self, name: &str) -> Option<Uplink> {
        self.links
            .iter()
            .find(|link| link.name == name)
            .and_then(|link| self.uplink(link.index, None))
    }

    /// `--iface`: an interface by address or by name.
    fn by_spec(&self, spec: &str) -> Option<Uplink> {
        match spec.parse::<Ipv4Addr>() {
            Ok(wanted) => self.holding(wanted),
            Err(_) => self.named(spec),
        }
    }

    /// `--iface-regex`: the first address that matches, else the first name.
    fn by_regex(&self, regex: &Regex) -> Option<Uplink> {
        let by_address = self
            .addresses
            .iter()
            .find(|(_, address)| regex.is_match(&address.to_string()))
            .and_then(|(index, address)| self.uplink(*index, Some(*address)));
        by_address.or_else(|| {
            self.links
                .iter()
                .filter(|link| regex.is_match(&link.name))
                .find_map(|link| self.uplink(link.index, None))
        })
    }
}

/// The uplink as it is now: the interface of the same name holding the same address. Its
/// index changes when the interface is deleted and made again; anything else is not the
/// uplink the lease was taken with.
pub async fn current(handle: &Handle, started_with: &Uplink) -> Result<Uplink> {
    let interfaces = Interfaces::list(handle).await?;
    let now = match started_with.address {
        Some(address) => interfaces.holding(address),
        None => interfaces.named(&started_with.name),
    };
    now.filter(|uplink| uplink.name == started_with.name)
        .map(|uplink| Uplink {
            ipv6: started_with.ipv6,
            ..uplink
        })
        .with_context(|| {
            let address = started_with
                .address
                .map_or("no IPv4 address".to_string(), |address| address.to_string());
            format!(
                "the uplink {} with {address} is gone; the agent follows it when an interface \
                 of that name holds that address again",
                started_with.name
            )
        })
}

/// Finds the uplink as [`Choice`] asks, in flanneld's order, with its IPv6 address.
pub async fn find(handle: &Handle, choice: Choice<'_>) -> Result<Uplink> {
    let uplink = find_interface(handle, choice).await?;
    let ipv6 = ipv6_address(handle, uplink.index, choice.public_ipv6).await?;
    Ok(Uplink { ipv6, ..uplink })
}

async fn find_interface(handle: &Handle, choice: Choice<'_>) -> Result<Uplink> {
    let interfaces = Interfaces::list(handle).await?;
    if choice.ifaces.is_empty() && choice.regexes.is_empty() && choice.can_reach.is_none() {
        return match choice.public_ip {
            Some(public_ip) => interfaces.holding(public_ip).with_context(|| {
                format!(
                    "no interface holds --public-ip {public_ip}: name the uplink with --iface \
                     (the public IP may then be an address of another host, e.g. a NAT)"
                )
            }),
            None => default_uplink(handle, &interfaces).await,
        };
    }
    for spec in choice.ifaces {
        match interfaces.by_spec(spec) {
            Some(uplink) => return Ok(uplink),
            None => log::warn!("--iface {spec}: no interface with that name or IPv4 address"),
        }
    }
    for pattern in choice.regexes {
        let regex = Regex::new(pattern)
            .with_context(|| format!("--iface-regex {pattern:?} is not a valid regex"))?;
        match interfaces.by_regex(&regex) {
            Some(uplink) => return Ok(uplink),
            None => log::warn!("--iface-regex {pattern}: no interface address or name matches"),
        }
    }
    if let Some(destination) = choice.can_reach {
        match route_to(handle, destination).await? {
            Some((index, source)) => {
                if let Some(uplink) = interfaces.uplink(index, source) {
                    return Ok(uplink);
                }
                log::warn!("--iface-can-reach {destination}: the route's interface is gone");
            }
            None => log::warn!("--iface-can-reach {destination}: no route to it"),
        }
    }
    bail!("no interface matches the --iface, --iface-regex and --iface-can-reach given")
}

/// The IPv4 default route's interface, else the IPv6 default route's.
async fn default_uplink(handle: &Handle, interfaces: &Interfaces) -> Result<Uplink> {
    let index = match default_route_interface(handle, AddressFamily::Inet).await? {
        Some(index) => index,
        None => default_route_interface(handle, AddressFamily::Inet6)
            .await?
            .context("there is no default route: name the uplink with --iface")?,
    };
    interfaces.uplink(index, None).with_context(|| {
        format!(
            "the default route's interface (index {index}) is gone: name the uplink with --iface"
        )
    })
}

/// The interface and source address `ip route get <destination>` reports.
async fn route_to(
    handle: &Handle,
    destination: Ipv4Addr,
) -> Result<Option<(u32, Option<Ipv4Addr>)>> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(destination, 32)
        .build();
    let answers: Vec<RouteMessage> = match handle.route().get(query).execute().try_collect().await {
        Ok(answers) => answers,
        Err(rtnetlink::Error::NetlinkError(message))
            if message.raw_code() == -libc::ENETUNREACH =>
        {
            return Ok(None);
        }
        Err(error) => {
            return Err(error)
                .with_context(|| format!("cannot look up the route to {destination}"));
        }
    };
    Ok(answers.into_iter().find_map(|route| {
        let mut index = None;
        let mut source = None;
        for attribute in route.attributes {
            match attribute {
                RouteAttribute::Oif(oif) => index = Some(oif),
                RouteAttribute::PrefSource(RouteAddress::Inet(address)) => source = Some(address),
                _ => {}
            }
        }
        Some((index?, source))
    }))
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

/// The IPv6 address of the interface `index` the tunnel uses, as flannel picks it: `wanted`
/// (`--public-ipv6`) when the interface holds it, else the first non-deprecated global or
/// link-local unicast address, global before link-local, permanent before configured by
/// the kernel, stable before temporary.
async fn ipv6_address(
    handle: &Handle,
    index: u32,
    wanted: Option<Ipv6Addr>,
) -> Result<Option<Ipv6Addr>> {
    let messages = super::links::addresses_of(handle, index).await?;
    let mut candidates: Vec<(Ipv6Addr, AddressFlags)> = messages
        .into_iter()
        .filter_map(|message| {
            let mut address = None;
            let mut flags = AddressFlags::from_bits_retain(u32::from(message.header.flags.bits()));
            for attribute in message.attributes {
                match attribute {
                    AddressAttribute::Address(IpAddr::V6(found)) => address = Some(found),
                    AddressAttribute::Flags(all) => flags = all,
                    _ => {}
                }
            }
            Some((address?, flags))
        })
        .filter(|(address, flags)| {
            !flags.contains(AddressFlags::Deprecated)
                && !address.is_multicast()
                && !address.is_loopback()
                && !address.is_unspecified()
        })
        .collect();
    if let Some(wanted) = wanted.filter(|wanted| candidates.iter().any(|(a, _)| a == wanted)) {
        return Ok(Some(wanted));
    }
    // A stable sort keeps the kernel's order among equals, as flannel's does.
    candidates.sort_by_key(|(address, flags)| {
        (
            address.is_unicast_link_local(),
            !flags.contains(AddressFlags::Permanent),
            // IFA_F_TEMPORARY shares its bit with IFA_F_SECONDARY.
            flags.contains(AddressFlags::Secondary),
        )
    });
    Ok(candidates.first().map(|(address, _)| *address))
}

async fn default_route_interface(handle: &Handle, family: AddressFamily) -> Result<Option<u32>> {
    Ok(super::links::routes(handle, family)
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
