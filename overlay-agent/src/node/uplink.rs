//! Choosing the uplink: the interface other hosts reach this one through, found as flanneld
//! finds it. With none of `--iface`, `--iface-regex` and `--iface-can-reach`: the interface
//! holding `--public-ip`, else the default route's. Otherwise each `--iface` (name or address)
//! in turn, then each `--iface-regex` (IPv4 addresses, IPv6 addresses, then names), then the
//! interface of the route to `--iface-can-reach`. An interface without an IPv4 address serves
//! an IPv6-only network; without any `--iface*` flag it is then the IPv6 default route's.
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
    pub can_reach: Option<IpAddr>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Option<Ipv6Addr>,
}

struct Link {
    index: u32,
    name: String,
    mtu: u32,
}

/// The interfaces and their addresses, listed once per search.
struct Interfaces {
    links: Vec<Link>,
    /// (interface index, IPv4 address), in the kernel's order.
    addresses: Vec<(u32, Ipv4Addr)>,
    /// (interface index, IPv6 address), in the kernel's order.
    addresses6: Vec<(u32, Ipv6Addr)>,
}

impl Interfaces {
    async fn list(handle: &Handle) -> Result<Self> {
        let mut addresses = Vec::new();
        let mut addresses6 = Vec::new();
        for (index, address) in interface_addresses(handle).await? {
            match address {
                IpAddr::V4(address) => addresses.push((index, address)),
                IpAddr::V6(address) => addresses6.push((index, address)),
            }
        }
        Ok(Self {
            links: links(handle).await?,
            addresses,
            addresses6,
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

    /// The interface holding the IPv6 address `wanted`, which becomes its IPv6 address.
    fn holding6(&self, wanted: Ipv6Addr) -> Option<Uplink> {
        let (index, _) = self
            .addresses6
            .iter()
            .find(|(_, address)| *address == wanted)?;
        let uplink = self.uplink(*index, None)?;
        Some(Uplink {
            ipv6: Some(wanted),
            ..uplink
        })
    }

    /// The interface `index`, with `source` (a route's) as its address of that family.
    fn with_source(&self, index: u32, source: Option<IpAddr>) -> Option<Uplink> {
        match source {
            Some(IpAddr::V4(source)) => self.uplink(index, Some(source)),
            Some(IpAddr::V6(source)) => self.uplink(index, None).map(|uplink| Uplink {
                ipv6: Some(source),
                ..uplink
            }),
            None => self.uplink(index, None),
        }
    }

    /// The interface called `name`.
    fn named(&self, name: &str) -> Option<Uplink> {
        self.links
            .iter()
            .find(|link| link.name == name)
            .and_then(|link| self.uplink(link.index, None))
    }

    /// `--iface`: an interface by IPv4 or IPv6 address, or by name.
    fn by_spec(&self, spec: &str) -> Option<Uplink> {
        match spec.parse::<IpAddr>() {
            Ok(IpAddr::V4(wanted)) => self.holding(wanted),
            Ok(IpAddr::V6(wanted)) => self.holding6(wanted),
            Err(_) => self.named(spec),
        }
    }

    /// `--iface-regex`: the first IPv4 address that matches, else the first IPv6 address
    /// (which becomes the interface's IPv6 address, as an IPv6 `--iface` does), else the first
    /// name.
    fn by_regex(&self, regex: &Regex) -> Option<Uplink> {
        let by_address = self
            .addresses
            .iter()
            .find(|(_, address)| regex.is_match(&address.to_string()))
            .and_then(|(index, address)| self.uplink(*index, Some(*address)));
        let by_address6 = || {
            self.addresses6
                .iter()
                .find(|(_, address)| regex.is_match(&address.to_string()))
                .and_then(|(_, address)| self.holding6(*address))
        };
        let by_name = || {
            self.links
                .iter()
                .filter(|link| regex.is_match(&link.name))
                .find_map(|link| self.uplink(link.index, None))
        };
        by_address.or_else(by_address6).or_else(by_name)
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

/// Finds the uplink as [`Choice`] asks, in flanneld's order, with its IPv6 address. Its
/// addresses, the tunnels' sources, are `--public-ip` and `--public-ipv6` when the uplink
/// holds them, as in flanneld since v0.27.4; a public address the host does not hold (a
/// NAT's) is no source it can send from, and the uplink's own address stays. An IPv6
/// address that chose the uplink (`--iface`, `--iface-can-reach`) comes next.
pub async fn find(handle: &Handle, choice: Choice<'_>) -> Result<Uplink> {
    let interfaces = Interfaces::list(handle).await?;
    let uplink = find_interface(handle, &interfaces, choice).await?;
    let uplink = choice
        .public_ip
        .and_then(|public_ip| interfaces.holding(public_ip))
        .filter(|holder| holder.index == uplink.index)
        .unwrap_or(uplink);
    let wanted6 = [choice.public_ipv6, uplink.ipv6];
    let ipv6 = ipv6_address(handle, uplink.index, &wanted6).await?;
    Ok(Uplink { ipv6, ..uplink })
}

async fn find_interface(
    handle: &Handle,
    interfaces: &Interfaces,
    choice: Choice<'_>,
) -> Result<Uplink> {
    if choice.ifaces.is_empty() && choice.regexes.is_empty() && choice.can_reach.is_none() {
        return match choice.public_ip {
            Some(public_ip) => interfaces.holding(public_ip).with_context(|| {
                format!(
                    "no interface holds --public-ip {public_ip}: name the uplink with --iface \
                     (the public IP may then be an address of another host, e.g. a NAT)"
                )
            }),
            None => default_uplink(handle, interfaces).await,
        };
    }
    for spec in choice.ifaces {
        match interfaces.by_spec(spec) {
            Some(uplink) => return Ok(uplink),
            None => log::warn!("--iface {spec}: no interface with that name or address"),
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
                if let Some(uplink) = interfaces.with_source(index, source) {
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
async fn route_to(handle: &Handle, destination: IpAddr) -> Result<Option<(u32, Option<IpAddr>)>> {
    let query = match destination {
        IpAddr::V4(destination) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination, 32)
            .build(),
        IpAddr::V6(destination) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(destination, 128)
            .build(),
    };
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
                RouteAttribute::PrefSource(RouteAddress::Inet(address)) => {
                    source = Some(IpAddr::V4(address));
                }
                RouteAttribute::PrefSource(RouteAddress::Inet6(address)) => {
                    source = Some(IpAddr::V6(address));
                }
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

/// (interface index, address) for every address, in the kernel's order.
async fn interface_addresses(handle: &Handle) -> Result<Vec<(u32, IpAddr)>> {
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
                    // IPv4's local address; IPv6 has no IFA_LOCAL unless point-to-point.
                    AddressAttribute::Local(address @ IpAddr::V4(_)) => Some((index, address)),
                    AddressAttribute::Address(address @ IpAddr::V6(_)) => Some((index, address)),
                    _ => None,
                })
        })
        .collect())
}

/// The IPv6 address of the interface `index` the tunnel uses, as flannel picks it: the first
/// of `wanted` (`--public-ipv6`, ...) the interface holds, else the first non-deprecated global or
/// link-local unicast address, global before link-local, permanent before configured by
/// the kernel, stable before temporary.
async fn ipv6_address(
    handle: &Handle,
    index: u32,
    wanted: &[Option<Ipv6Addr>],
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
    let held = |wanted: &Ipv6Addr| candidates.iter().any(|(address, _)| address == wanted);
    if let Some(wanted) = wanted.iter().flatten().find(|wanted| held(wanted)) {
        return Ok(Some(*wanted));
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
