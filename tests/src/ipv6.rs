//! The seed with IPv6: flannel's dual-stack and IPv6-only network configs, the seed's IPv6
//! subnets and addresses, and the addresses flannel derives from an IPv6 lease.
//!
//! ```text
//!   host1 172.20.62.104 fd00:ff::104, lease 10.2.41.0/24 fd00:2:0:41::/64
//!     docker0 10.2.41.1 fd00:2:0:41::1, flannel-v6.1 fd00:2:0:41::/128
//!     bbox1 10.2.41.2 fd00:2:0:41::2
//!   host2 172.20.62.105 fd00:ff::105, lease 10.2.54.0/24 fd00:2:0:54::/64
//!     bbox2 10.2.54.2 fd00:2:0:54::2
//! ```
use std::net::Ipv6Addr;

use anyhow::{Context, Result, ensure};
use ipnetwork::Ipv6Network;

/// The seed's network with IPv6 beside it; IPv6SubnetLen defaults to /64.
pub const DUAL_STACK_NETWORK_CONFIG: &str = r#"{"Network":"10.2.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:2::/48","Backend":{"Type":"vxlan"}}"#;
/// An overlay that carries IPv6 alone.
pub const IPV6_ONLY_NETWORK_CONFIG: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:2::/48","Backend":{"Type":"vxlan"}}"#;
pub const IPV6_NETWORK: &str = "fd00:2::/48";
/// flannel's IPv6SubnetLen for an IPv6Network of /62 or shorter.
pub const IPV6_SUBNET_LEN: u8 = 64;

pub const HOST1_V6: &str = "fd00:ff::104";
pub const HOST2_V6: &str = "fd00:ff::105";
pub const SUBNET1_V6: &str = "fd00:2:0:41::/64";
pub const SUBNET2_V6: &str = "fd00:2:0:54::/64";
pub const BBOX1_V6: &str = "fd00:2:0:41::2";
pub const BBOX2_V6: &str = "fd00:2:0:54::2";

/// The `index`th address of the IPv6 `subnet`: 0 is flannel-v6.1's address and the gateway
/// other hosts route the subnet through (`fd00:2:0:41::`), 1 docker0's (`fd00:2:0:41::1`),
/// 2 the first container's.
pub fn address_in(subnet6: &str, index: u128) -> Result<String> {
    let network: Ipv6Network = subnet6
        .parse()
        .with_context(|| format!("{subnet6:?} is not an IPv6 subnet"))?;
    ensure!(
        index < network.size(),
        "{subnet6} has no address number {index}"
    );
    Ok(Ipv6Addr::from(u128::from(network.network()) + index).to_string())
}

/// docker0's IPv6 address in `subnet6`, the containers' gateway.
pub fn bridge_gateway6(subnet6: &str) -> Result<String> {
    address_in(subnet6, 1)
}

/// The /64 lease that holds `address6` ("fd00:2:0:41::2" gives "fd00:2:0:41::/64").
pub fn subnet6_of(address6: &str) -> Result<String> {
    let address: Ipv6Addr = address6
        .parse()
        .with_context(|| format!("{address6:?} is not an IPv6 address"))?;
    let network = Ipv6Network::new(address, IPV6_SUBNET_LEN)?;
    Ok(format!("{}/{IPV6_SUBNET_LEN}", network.network()))
}
