//! The container bridge (docker0): carries the first address of our lease (of each family's
//! lease, dual-stack); containers hang off it by veth.
use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use ipnetwork::IpNetwork;
use rtnetlink::{
    Handle, LinkBridge, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        link::{InfoKind, LinkAttribute},
        route::{RouteAddress, RouteAttribute, RouteType},
    },
};

use super::links;
use crate::{
    mac::MacAddr,
    model::{gateway, ipv6_gateway},
};

pub struct Bridge {
    pub index: u32,
    pub mac: MacAddr,
}

/// Makes sure the bridge `name` exists, is up and carries the first address of each lease
/// subnet in `leases` (subnet, overlay network), and no other address inside that network.
pub async fn ensure(
    handle: &Handle,
    name: &str,
    leases: &[(IpNetwork, IpNetwork)],
) -> Result<Bridge> {
    let link = match links::find(handle, name).await? {
        Some(link) => link,
        None => {
            log::info!("creating bridge {name}");
            // A bridge whose MAC was never set takes the lowest of its ports' MACs, so it
            // would change as containers come and go; a set one stays, as docker0's does.
            let message = LinkBridge::new(name)
                .up()
                .append_extra_attribute(LinkAttribute::Address(MacAddr::random_local().0.to_vec()))
                .build();
            links::create(handle, name, message).await?
        }
    };
    if links::kind(&link) != Some(&InfoKind::Bridge) {
        bail!("{name} exists but is not a bridge: pick another name with --bridge");
    }
    links::set_up_with_mtu(handle, &link, None).await?;
    for &(subnet, network) in leases {
        let gateway = match subnet {
            IpNetwork::V4(subnet) => IpAddr::V4(gateway(subnet)),
            IpNetwork::V6(subnet) => IpAddr::V6(ipv6_gateway(subnet)),
        };
        links::ensure_lease_address(handle, link.header.index, gateway, subnet.prefix(), network)
            .await?;
    }
    let mac = links::mac(&link).with_context(|| format!("bridge {name} has no MAC"))?;
    Ok(Bridge {
        index: link.header.index,
        mac,
    })
}

/// `--ip-blackhole-route`: a blackhole route for our subnet (each family's), as flanneld adds
/// one, so that traffic to addresses no container holds ends here instead of following the
/// default route. While the bridge's own route for the subnet exists the kernel refuses a
/// second one (EEXIST) and there is nothing to do.
pub async fn ensure_blackhole_route(handle: &Handle, subnet: IpNetwork) -> Result<()> {
    let route = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(subnet.network(), subnet.prefix())
        .with_context(|| format!("blackhole route {subnet}"))?
        .kind(RouteType::BlackHole)
        .build();
    match handle.route().add(route).execute().await {
        Ok(()) => {
            log::info!("added blackhole route {subnet}");
            Ok(())
        }
        Err(rtnetlink::Error::NetlinkError(message)) if message.raw_code() == -libc::EEXIST => {
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("cannot add blackhole route {subnet}")),
    }
}

/// Deletes the blackhole routes into `network`: the one `--ip-blackhole-route` added.
pub async fn remove_blackhole_routes(handle: &Handle, network: IpNetwork) -> Result<()> {
    let family = if network.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    for route in links::routes(handle, family).await? {
        let destination = route
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(address)) => {
                    Some(IpAddr::V4(*address))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(address)) => {
                    Some(IpAddr::V6(*address))
                }
                _ => None,
            });
        let ours = route.header.kind == RouteType::BlackHole
            && destination.is_some_and(|address| network.contains(address));
        if ours {
            log::info!("removing a blackhole route into {network}");
            handle
                .route()
                .del(route)
                .execute()
                .await
                .context("cannot delete a blackhole route")?;
        }
    }
    Ok(())
}
