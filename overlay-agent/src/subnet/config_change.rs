//! Noticing that the network config in etcd changed while the agent runs. The node was built
//! for the config it started with (network, subnet length, backend); it cannot move into
//! another while running. So a change stops the agent with an error naming it, and its
//! supervisor starts it again into the new network, as a restarted flanneld would be.
use std::time::Duration;

use anyhow::{Error, anyhow};
use tokio::time::sleep;

use super::registry::{ConfigReadError, Registry};
use crate::config::NetworkConfig;

/// How often the config is read again: one small read per node.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What one read of the config says about the running one.
#[derive(Debug, PartialEq, Eq)]
enum Reading {
    Unchanged,
    Changed(String),
    /// Missing, invalid or unreachable: nothing to restart into, so the agent keeps the
    /// config it runs with and says why once.
    Unusable(String),
}

/// Returns once the config in etcd differs from `running`, with the change as the error.
pub async fn stop_on_change(registry: &impl Registry, running: &NetworkConfig) -> Error {
    let mut last_complaint = None;
    loop {
        sleep(CHECK_INTERVAL).await;
        match read_against(running, registry.network_config().await) {
            Reading::Unchanged => last_complaint = None,
            Reading::Changed(change) => return anyhow!(change),
            Reading::Unusable(complaint) => {
                if last_complaint.as_ref() != Some(&complaint) {
                    log::warn!("{complaint}");
                    last_complaint = Some(complaint);
                }
            }
        }
    }
}

fn read_against(running: &NetworkConfig, read: Result<NetworkConfig, ConfigReadError>) -> Reading {
    match read {
        Ok(current) if current == *running => Reading::Unchanged,
        Ok(current) => Reading::Changed(format!(
            "the network config in etcd changed ({} → {}): exiting, so that the agent starts \
             again into the new network",
            summary(running),
            summary(&current)
        )),
        Err(error) => Reading::Unusable(format!(
            "{error}; keeping the network config the agent started with"
        )),
    }
}

/// The settings a node is built from, as flannel's config spells them.
fn summary(config: &NetworkConfig) -> String {
    let ipv6 = config.ipv6.map_or("off".to_string(), |range| {
        format!(
            "IPv6Network {}, IPv6SubnetLen {}, IPv6SubnetMin {}, IPv6SubnetMax {}",
            range.network, range.subnet_len, range.subnet_min, range.subnet_max
        )
    });
    format!(
        "EnableIPv4 {}, Network {}, SubnetLen {}, SubnetMin {}, SubnetMax {}, IPv6 {ipv6}, \
         VNI {}, Port {}, MTU {:?}, DirectRouting {}, EnableNFTables {}",
        config.enable_ipv4,
        config.network,
        config.subnet_len,
        config.subnet_min,
        config.subnet_max,
        config.backend.vni,
        config.backend.port,
        config.backend.mtu,
        config.backend.direct_routing,
        config.enable_nftables
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).expect("a valid config")
    }

    #[test]
    fn only_a_different_config_is_a_change() {
        let running = config(r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#);
        let same = config(r#"{ "Backend": {"Type": "vxlan"}, "Network": "10.2.0.0/16" }"#);
        assert_eq!(read_against(&running, Ok(same)), Reading::Unchanged);
        let moved = config(r#"{"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan"}}"#);
        assert!(matches!(
            read_against(&running, Ok(moved)),
            Reading::Changed(change) if change.contains("Network 10.2.0.0/16,")
                && change.contains("→ EnableIPv4 true, Network 10.3.0.0/16,")
        ));
        let missing = Err(ConfigReadError::Missing(
            "/coreos.com/network/config".into(),
        ));
        assert!(matches!(
            read_against(&running, missing),
            Reading::Unusable(complaint) if complaint.contains("keeping")
        ));
    }
}
