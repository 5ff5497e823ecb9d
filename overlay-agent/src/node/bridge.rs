//! The container bridge (docker0): carries the first address of our lease; containers hang
//! off it by veth.
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use ipnetwork::Ipv4Network;
use rtnetlink::{Handle, LinkBridge, packet_route::link::InfoKind};

use super::links;

/// Makes sure the bridge `name` exists, is up and carries the lease's first address; returns
/// its index.
pub async fn ensure(handle: &Handle, name: &str, subnet: Ipv4Network) -> Result<u32> {
    let link = match links::find(handle, name).await? {
        Some(link) => link,
        None => {
            log::info!("creating bridge {name}");
            handle
                .link()
                .add(LinkBridge::new(name).up().build())
                .execute()
                .await
                .with_context(|| format!("cannot create bridge {name}"))?;
            links::find(handle, name)
                .await?
                .with_context(|| format!("bridge {name} vanished right after creation"))?
        }
    };
    if links::kind(&link) != Some(&InfoKind::Bridge) {
        bail!("{name} exists but is not a bridge: pick another name with --bridge");
    }
    links::set_up_with_mtu(handle, &link, None).await?;
    links::ensure_ipv4_address(handle, link.header.index, gateway(subnet), subnet.prefix()).await?;
    Ok(link.header.index)
}

/// The subnet's first host address: the containers' default gateway, FLANNEL_SUBNET's address.
pub fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}
