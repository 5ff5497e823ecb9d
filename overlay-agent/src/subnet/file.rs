//! The subnet file (`/run/flannel/subnet.env`): flannel's variables (FLANNEL_NETWORK,
//! FLANNEL_SUBNET, with IPv6 FLANNEL_IPV6_NETWORK and FLANNEL_IPV6_SUBNET, FLANNEL_MTU,
//! FLANNEL_IPMASQ), which flannel's CNI plugin and
//! `dockerd --bip=${FLANNEL_SUBNET} --mtu=${FLANNEL_MTU}` read unchanged.
use std::{
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnetwork::{Ipv4Network, Ipv6Network};

use super::LeaseSubnets;
use crate::model::{gateway, ipv6_gateway};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The IPv4 network and subnet; `None` in an IPv6-only network.
    pub ipv4: Option<(Ipv4Network, Ipv4Network)>,
    /// The IPv6 network and subnet, with `EnableIPv6`.
    pub ipv6: Option<(Ipv6Network, Ipv6Network)>,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// In flannel's order. FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET name each subnet's first
    /// host address, the bridge's, e.g. 10.2.41.1/24 and fd00:2:0:41::1/64.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Some((network, subnet)) = self.ipv4 {
            let gateway = gateway(subnet);
            text += &format!(
                "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={gateway}/{}\n",
                subnet.prefix()
            );
        }
        if let Some((network, subnet)) = self.ipv6 {
            let gateway = ipv6_gateway(subnet);
            text += &format!(
                "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={gateway}/{}\n",
                subnet.prefix()
            );
        }
        text + &format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ip_masq
        )
    }

    /// Writes the file so that readers see the old contents or the new, never a torn file.
    pub fn write_atomically(&self, path: &Path) -> Result<()> {
        let directory = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
        let temporary = temporary_path(path);
        let mut file = fs::File::create(&temporary)
            .with_context(|| format!("cannot create {}", temporary.display()))?;
        file.write_all(self.render().as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        fs::rename(&temporary, path)
            .with_context(|| format!("cannot move {} into place", path.display()))
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The subnets a previous run wrote into the file, if the file exists and names one: its
/// IPv4 subnet (flannel's empty 0.0.0.0/0 when it names only an IPv6 one) and its IPv6 subnet.
pub fn previous_subnet(path: &Path) -> Option<LeaseSubnets> {
    let contents = fs::read_to_string(path).ok()?;
    let ipv4 = variable(&contents, "FLANNEL_SUBNET").and_then(|value| {
        let address: Ipv4Network = value.parse().ok()?;
        Ipv4Network::new(address.network(), address.prefix()).ok()
    });
    let ipv6 = variable(&contents, "FLANNEL_IPV6_SUBNET").and_then(|value| {
        let address: Ipv6Network = value.parse().ok()?;
        Ipv6Network::new(address.network(), address.prefix()).ok()
    });
    match (ipv4, ipv6) {
        (None, None) => None,
        (ipv4, ipv6) => Some(LeaseSubnets {
            ipv4: ipv4.unwrap_or(EMPTY_IPV4),
            ipv6,
        }),
    }
}

/// The networks a previous run wrote into the file: FLANNEL_NETWORK and FLANNEL_IPV6_NETWORK.
pub fn previous_networks(path: &Path) -> (Option<Ipv4Network>, Option<Ipv6Network>) {
    let contents = fs::read_to_string(path).unwrap_or_default();
    (
        variable(&contents, "FLANNEL_NETWORK").and_then(|value| value.parse().ok()),
        variable(&contents, "FLANNEL_IPV6_NETWORK").and_then(|value| value.parse().ok()),
    )
}

/// flannel's empty IPv4 network, the IPv4 half of an IPv6-only lease.
const EMPTY_IPV4: Ipv4Network = match Ipv4Network::new_checked(Ipv4Addr::UNSPECIFIED, 0) {
    Some(network) => network,
    None => unreachable!(),
};

fn variable<'a>(contents: &'a str, name: &str) -> Option<&'a str> {
    contents.lines().find_map(|line| {
        line.trim()
            .strip_prefix(name)?
            .strip_prefix('=')
            .map(str::trim)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_flannels_four_variables_and_reads_the_subnet_back() {
        let env = SubnetEnv {
            ipv4: Some((
                "10.2.0.0/16".parse().unwrap(),
                "10.2.41.0/24".parse().unwrap(),
            )),
            ipv6: None,
            mtu: 1450,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.41.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("overlay-subnet-file-{}", std::process::id()));
        let path = dir.join("run/flannel/subnet.env");
        env.write_atomically(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env.render());
        assert_eq!(
            previous_subnet(&path),
            Some(LeaseSubnets::ipv4("10.2.41.0/24".parse().unwrap()))
        );
        assert!(!temporary_path(&path).exists());
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(previous_subnet(&path), None);
    }

    #[test]
    fn ipv6_subnets_are_written_and_read_back_in_flannels_form() {
        let ipv6 = (
            "fd00:2::/48".parse().unwrap(),
            "fd00:2:0:41::/64".parse().unwrap(),
        );
        let dual = SubnetEnv {
            ipv4: Some((
                "10.2.0.0/16".parse().unwrap(),
                "10.2.41.0/24".parse().unwrap(),
            )),
            ipv6: Some(ipv6),
            mtu: 1450,
            ip_masq: true,
        };
        assert_eq!(
            dual.render(),
            "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.41.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00:2::/48\nFLANNEL_IPV6_SUBNET=fd00:2:0:41::1/64\n\
             FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let only = SubnetEnv {
            ipv4: None,
            ..dual.clone()
        };
        let dir =
            std::env::temp_dir().join(format!("overlay-subnet-file-v6-{}", std::process::id()));
        let path = dir.join("subnet.env");
        for (env, ipv4) in [(&dual, "10.2.41.0/24"), (&only, "0.0.0.0/0")] {
            env.write_atomically(&path).unwrap();
            let expected = LeaseSubnets {
                ipv4: ipv4.parse().unwrap(),
                ipv6: Some(ipv6.1),
            };
            assert_eq!(previous_subnet(&path), Some(expected));
        }
        assert_eq!(previous_networks(&path), (None, Some(ipv6.0)));
        fs::remove_dir_all(&dir).unwrap();
    }
}
