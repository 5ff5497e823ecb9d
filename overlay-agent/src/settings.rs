//! What the agent derives from its flags, the network config, the uplink and its lease, each
//! thing once and before anything is applied: the public addresses its record names, the
//! node's devices, what the programs are told, the routing rules, the subnet file and the
//! masquerade rules.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};

use crate::{
    config::{NetworkConfig, VXLAN_IPV6_OVERHEAD, VXLAN_OVERHEAD},
    mac::MacAddr,
    masquerade::{self, Networks, Rules},
    model::{LeaseSubnets, RoutingRules},
    node::{FamilySettings, NodeSettings, uplink::Uplink, vtep},
    options::{AgentOptions, Dataplane},
    reconcile::{NodeIntent, ProgramSettings},
    subnet::{Lease, PublicAddresses, file::SubnetEnv},
};

/// The address families a record or a network holds.
#[derive(Clone, Copy, Debug)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub fn of_config(config: &NetworkConfig) -> Self {
        Self {
            ipv4: config.enable_ipv4,
            ipv6: config.ipv6.is_some(),
        }
    }

    pub fn of_lease(subnets: LeaseSubnets) -> Self {
        Self {
            ipv4: subnets.ipv4_subnet().is_some(),
            ipv6: subnets.ipv6.is_some(),
        }
    }
}

/// The PublicIP and PublicIPv6 of our record in `families`: `--public-ip` and
/// `--public-ipv6`, else the uplink's addresses; flannel's 0.0.0.0 without IPv4.
pub fn public_addresses(
    options: &AgentOptions,
    uplink: &Uplink,
    families: Families,
) -> Result<PublicAddresses> {
    let ipv4 = if families.ipv4 {
        options.public_ip.or(uplink.address).with_context(|| {
            format!(
                "the uplink {} has no IPv4 address for the overlay: give the uplink one, or \
                 name another with --iface",
                uplink.name
            )
        })?
    } else {
        Ipv4Addr::UNSPECIFIED
    };
    let ipv6 = if families.ipv6 {
        let local = uplink.ipv6.with_context(|| {
            format!(
                "the network has IPv6, but the uplink {} has no usable IPv6 address for the \
                 overlay",
                uplink.name
            )
        })?;
        Some(options.public_ipv6.unwrap_or(local))
    } else {
        None
    };
    Ok(PublicAddresses { ipv4, ipv6 })
}

/// Everything derived from the flags, the config, the uplink and the lease.
pub struct Settings {
    pub node: NodeSettings,
    pub intent: NodeIntent,
    pub subnet_env: SubnetEnv,
    pub masquerade: (Rules, masquerade::Backend),
}

impl Settings {
    /// The settings of a node holding `lease`; `uplink_mac` is needed in ebpf mode alone.
    pub fn derive(
        options: &AgentOptions,
        config: &NetworkConfig,
        uplink: &Uplink,
        uplink_mac: Option<MacAddr>,
        lease: &Lease,
    ) -> Result<Self> {
        let node = node_settings(options, config, uplink, lease)?;
        // The IPv6 lease counts where this host carries IPv6.
        let own = LeaseSubnets {
            ipv4: lease.subnet,
            ipv6: node.ipv6.as_ref().map(|family| family.subnet),
        };
        let programs = match options.dataplane {
            Dataplane::Ebpf => Some(program_settings(
                options, config, uplink, uplink_mac, lease, &node,
            )?),
            Dataplane::Kernel => None,
        };
        let intent = NodeIntent {
            rules: RoutingRules {
                network: config.network,
                ipv6_network: config.ipv6.map(|range| range.network),
                install_fdb: programs.is_none(),
                direct_routing: config.backend.direct_routing,
            },
            own,
            programs,
        };
        Ok(Self {
            node,
            intent,
            subnet_env: subnet_env(options, config, uplink, lease)?,
            masquerade: masquerade_rules(options, config, lease),
        })
    }
}

/// The bridge, each family's VXLAN device and lease, as flannel makes them.
fn node_settings(
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    lease: &Lease,
) -> Result<NodeSettings> {
    let vtep_spec = |name: String, local: IpAddr, overhead: u32, mac: MacAddr| {
        Ok::<_, anyhow::Error>(vtep::VtepSpec {
            name,
            vni: config.backend.vni,
            local,
            uplink_index: uplink.index,
            port: config.backend.port,
            mtu: overlay_mtu(config, uplink, overhead)?,
            mac,
            gbp: config.backend.gbp,
            learning: config.backend.learning,
        })
    };
    let ipv4_vtep = lease.attrs.vtep_mac().zip(uplink.address);
    let ipv4 = match ipv4_vtep.filter(|_| config.enable_ipv4) {
        Some((mac, local)) => Some(FamilySettings {
            // The tunnel's source: the uplink's address, --public-ip where the uplink holds it.
            vtep: vtep_spec(
                vtep::device_name(config.backend.vni),
                IpAddr::V4(local),
                VXLAN_OVERHEAD,
                mac,
            )?,
            subnet: lease.subnet,
            network: config.network,
        }),
        None => None,
    };
    let ipv6 = match (
        config.ipv6,
        lease.ipv6_subnet,
        lease.attrs.vtep_mac_v6(),
        uplink.ipv6,
    ) {
        (Some(range), Some(subnet), Some(mac), Some(local)) => Some(FamilySettings {
            vtep: vtep_spec(
                vtep::ipv6_device_name(config.backend.vni),
                IpAddr::V6(local),
                VXLAN_IPV6_OVERHEAD,
                mac,
            )?,
            subnet,
            network: range.network,
        }),
        _ => None,
    };
    Ok(NodeSettings {
        bridge: options.bridge.clone(),
        ipv4,
        ipv6,
        uplink: uplink.clone(),
        blackhole_route: options.ip_blackhole_route,
        headroom_port: options.dataplane == Dataplane::Ebpf,
    })
}

/// What the programs are told besides the devices and the lease's subnets.
fn program_settings(
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    uplink_mac: Option<MacAddr>,
    lease: &Lease,
    node: &NodeSettings,
) -> Result<ProgramSettings> {
    let tunnel_source = if config.enable_ipv4 {
        Some(
            uplink
                .address
                .with_context(|| format!("the uplink {} has no IPv4 address", uplink.name))?,
        )
    } else {
        None
    };
    Ok(ProgramSettings {
        vni: config.backend.vni,
        vxlan_port: config.backend.port,
        tunnel_source,
        tunnel_source6: config.ipv6.and(uplink.ipv6),
        vtep_mac: lease.attrs.vtep_mac(),
        vtep6_mac: lease.attrs.vtep_mac_v6(),
        vtep_mtu: node.ipv4.as_ref().map_or(0, |family| family.vtep.mtu),
        vtep6_mtu: node.ipv6.as_ref().map_or(0, |family| family.vtep.mtu),
        uplink_mac: uplink_mac.with_context(|| format!("{} has no MAC", uplink.name))?,
        direct_routing: config.backend.direct_routing,
        fast_path: options.fast_path,
        container_vlans: options.container_vlans,
        accept_nat_peers: options.accept_nat_peers,
        decap_hook: options.decap_hook.into(),
        xdp_mode: options.xdp_mode.into(),
    })
}

/// flannel's subnet file for our lease: the MTU of flannel.<VNI>, or of flannel-v6.<VNI> in
/// an IPv6-only network.
fn subnet_env(
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    lease: &Lease,
) -> Result<SubnetEnv> {
    let overhead = if config.enable_ipv4 {
        VXLAN_OVERHEAD
    } else {
        VXLAN_IPV6_OVERHEAD
    };
    Ok(SubnetEnv {
        ipv4: config.enable_ipv4.then_some((config.network, lease.subnet)),
        ipv6: config
            .ipv6
            .zip(lease.ipv6_subnet)
            .map(|(range, subnet)| (range.network, subnet)),
        mtu: overlay_mtu(config, uplink, overhead)?,
        ip_masq: options.ip_masq,
    })
}

/// flannel's forward and masquerade rules for our lease, where `EnableNFTables` says.
fn masquerade_rules(
    options: &AgentOptions,
    config: &NetworkConfig,
    lease: &Lease,
) -> (Rules, masquerade::Backend) {
    let backend = if config.enable_nftables {
        masquerade::Backend::Nftables
    } else {
        masquerade::Backend::Iptables
    };
    let rules = Rules {
        ipv4: config.enable_ipv4.then_some(Networks {
            network: config.network,
            subnet: lease.subnet,
        }),
        ipv6: config
            .ipv6
            .zip(lease.ipv6_subnet)
            .map(|(range, subnet)| Networks {
                network: range.network,
                subnet,
            }),
        masquerade: options.ip_masq,
        forward: options.iptables_forward_rules,
        fully_random: !options.ip_masq_fully_random_disable,
    };
    (rules, backend)
}

/// The MTU inside the tunnel: the underlay's (Backend MTU, else the uplink's) less the
/// `overhead` of VXLAN over its family.
fn overlay_mtu(config: &NetworkConfig, uplink: &Uplink, overhead: u32) -> Result<u32> {
    let underlay_mtu = config.backend.mtu.unwrap_or(uplink.mtu);
    underlay_mtu.checked_sub(overhead).with_context(|| {
        format!("the underlay MTU {underlay_mtu} leaves no room for VXLAN's {overhead} bytes")
    })
}
