//! The container bridge (docker0): carries the first address of our lease; containers hang
//! off it by veth.
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use ipnetwork::Ipv4Network;
use rtnetlink::{
    Handle, LinkBridge,
    packet_route::link::{InfoKind, LinkAttribute},
};

use super::links;
use crate::mac::MacAddr;

pub struct Bridge {
    pub index: u32,
    pub mac: MacAddr,
}

/// Makes sure the bridge `name` exists, is up and carries the lease's first address.
pub async fn ensure(handle: &Handle, name: &str, subnet: Ipv4Network) -> Result<Bridge> {
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
    links::ensure_ipv4_address(handle, link.header.index, gateway(subnet), subnet.prefix()).await?;
    let mac = links::mac(&link).with_context(|| format!("bridge {name} has no MAC"))?;
    Ok(Bridge {
        index: link.header.index,
        mac,
    })
}

/// The subnet's first host address: the containers' default gateway, FLANNEL_SUBNET's address.
pub fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}
