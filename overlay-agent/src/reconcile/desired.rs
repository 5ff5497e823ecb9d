//! The state the host should be in, as one value: [`compute`] turns what was [`Observed`]
//! (the remote leases, the devices, the local containers, which PublicIPs share our segment)
//! and what this node is set to do ([`NodeIntent`]) into a [`Desired`]. No netlink, no maps,
//! so every rule here is tested without root; [`super::plan`] applies the value in order.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_common::{
    CONFIG_ACCEPT_NAT_PEERS, CONFIG_CONTAINER_VLANS, CONFIG_DIRECT_ROUTING, CONFIG_FAST_PATH,
    CONFIG_IPV6, EndpointSlot, LocalEndpoint, OverlayConfig, REMOTE_ROUTE_DIRECTLY, RemoteVtep,
    RemoteVtep6, VtepSubnet, VtepSubnet6, endpoint_slot,
};

use crate::{
    mac::MacAddr,
    model::{
        Containers, DecapHook, Device, Devices, Endpoints, Endpoints6, EntrySet, FamilyDevices,
        FdbEntry, LeaseEntries, LeaseKernelEntries, LeaseSubnets, PeerEntries, Placement, Programs,
        Reach, Route, RoutingRules, XdpModeChoice, gateway, ipv6_gateway,
    },
    subnet::Lease,
};

/// How much of the host one round looks at, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// A container port or address changed: programs and endpoints, from what the
    /// notifications already told.
    Containers,
    /// Leases came, changed or went: the lease entries and the kernel's entries too, written
    /// where they differ from what the last round left, on the devices as it found them.
    Leases,
    /// A device or an owned entry changed: the devices, and every lease entry and kernel
    /// entry listed and compared.
    Node,
    /// Start, the safety net, lost notifications: the containers re-listed as well.
    Everything,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Containers => "containers",
            Scope::Leases => "leases",
            Scope::Node => "node",
            Scope::Everything => "everything",
        }
    }
}

/// What this node is set to do, fixed for the agent's life.
#[derive(Clone, Debug)]
pub struct NodeIntent {
    pub rules: RoutingRules,
    /// This host's lease, each family's it carries: container addresses lie inside it.
    pub own: LeaseSubnets,
    /// How the eBPF programs are placed; none in kernel mode.
    pub programs: Option<ProgramSettings>,
}

/// How the eBPF programs are placed, and what they are told besides the devices and the lease.
#[derive(Clone, Debug)]
pub struct ProgramSettings {
    pub vni: u32,
    pub vxlan_port: u16,
    /// The outer source of what this host encapsulates, as the kernel's vxlan device would
    /// send it (the uplink's address); none in an IPv6-only network.
    pub tunnel_source: Option<Ipv4Addr>,
    /// flannel-v6.<VNI>'s tunnel source, where VXLAN over IPv6 comes to; none without IPv6,
    /// and then all of it passes unchecked.
    pub tunnel_source6: Option<Ipv6Addr>,
    /// This host's VTEP MACs, each family's it carries.
    pub vtep_mac: Option<MacAddr>,
    pub vtep6_mac: Option<MacAddr>,
    /// Each family's VXLAN device's MTU, 0 for a family the host does not carry.
    pub vtep_mtu: u32,
    pub vtep6_mtu: u32,
    pub uplink_mac: MacAddr,
    /// The network config's `DirectRouting`.
    pub direct_routing: bool,
    /// Whether container traffic bypasses the stack (`--fast-path`).
    pub fast_path: bool,
    /// Whether VLAN-tagged frames from containers go on unchecked (`--container-vlans`).
    pub container_vlans: bool,
    /// Whether VXLAN from an unlisted outer source is accepted on its inner source MAC
    /// (`--accept-nat-peers`).
    pub accept_nat_peers: bool,
    pub decap_hook: DecapHook,
    pub xdp_mode: XdpModeChoice,
}

/// What one round found on the host and in etcd.
pub struct Observed<'a> {
    pub scope: Scope,
    pub leases: &'a HashMap<LeaseSubnets, Lease>,
    pub devices: &'a Devices,
    pub containers: &'a Containers,
    /// Which of the leases' PublicIPs and PublicIPv6s are reached without a gateway, and which
    /// no route leads to (DirectRouting only).
    pub reach: &'a Reach,
}

/// The state the host should be in after one round of `scope`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub scope: Scope,
    /// The programs, where they sit and what they deliver to; none in kernel mode.
    pub programs: Option<Programs>,
    /// Live container ports the node has taken down for want of their program. Kernel mode
    /// wants no program on them, so there every one comes back up.
    pub ports_down: BTreeSet<u32>,
    /// The remote leases' map and kernel entries; none in a round about containers alone.
    pub leases: Option<LeaseState>,
}

/// What the remote leases need: their map entries, and each family's kernel entries; and the
/// leases left out because no route leads to their public address, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub entries: LeaseEntries,
    pub peers: Vec<FamilyPeers>,
    pub unreachable: BTreeMap<LeaseSubnets, String>,
}

/// One family's kernel entries, lease by lease, on that family's devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyPeers {
    pub devices: FamilyDevices,
    pub leases: Vec<LeasePeer>,
}

/// The kernel entries of one lease, and whether they lead into a program that drops what its
/// maps do not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasePeer {
    pub lease: LeaseSubnets,
    pub entries: LeaseKernelEntries,
    pub needs_map_entries: bool,
}

impl FamilyPeers {
    /// The entries of every lease but those `unmapped` (left out of the maps) that need them:
    /// a route to a lease whose map entries are missing would lead to a drop.
    pub fn entries(&self, unmapped: &BTreeSet<LeaseSubnets>) -> PeerEntries {
        let mut entries = PeerEntries::with_capacity(self.leases.len());
        for peer in &self.leases {
            if !(peer.needs_map_entries && unmapped.contains(&peer.lease)) {
                entries.insert(&peer.entries);
            }
        }
        entries
    }
}

/// The one desired state of what was `observed`, for a node set up as `intent` says.
pub fn compute(observed: &Observed, intent: &NodeIntent) -> Desired {
    let programs = intent
        .programs
        .as_ref()
        .map(|settings| programs(settings, observed.devices, observed.containers, &intent.own));
    let leases = (observed.scope != Scope::Containers).then(|| {
        let (reachable, unreachable) = split_unreachable(observed.leases, observed.reach);
        LeaseState {
            entries: lease_entries(reachable.iter().copied(), &observed.reach.on_link),
            peers: family_peers(observed, &reachable, &intent.rules),
            unreachable,
        }
    });
    Desired {
        scope: observed.scope,
        programs,
        ports_down: ports_down(observed.containers),
        leases,
    }
}

/// The live container ports the node has taken down.
fn ports_down(containers: &Containers) -> BTreeSet<u32> {
    containers
        .isolated
        .iter()
        .filter(|port| containers.ports.contains_key(port))
        .copied()
        .collect()
}

/// The public addresses of `lease` the node sends to: its PublicIP (not the 0.0.0.0 of an
/// IPv6-only record) and, `with_ipv6`, its PublicIPv6.
pub fn public_addresses(lease: &Lease, with_ipv6: bool) -> impl Iterator<Item = IpAddr> {
    let ipv4 = Some(lease.attrs.public_ip).filter(|address| !address.is_unspecified());
    let ipv6 = lease.attrs.public_ipv6.filter(|_| with_ipv6);
    ipv4.map(IpAddr::V4).into_iter().chain(ipv6.map(IpAddr::V6))
}

/// The leases none of whose public addresses `reach` finds unreachable, and why each of the
/// others is left out.
fn split_unreachable<'a>(
    leases: &'a HashMap<LeaseSubnets, Lease>,
    reach: &Reach,
) -> (Vec<&'a Lease>, BTreeMap<LeaseSubnets, String>) {
    let mut reachable = Vec::with_capacity(leases.len());
    let mut unreachable = BTreeMap::new();
    for lease in leases.values() {
        let why = public_addresses(lease, true).find_map(|address| {
            let why = reach.unreachable.get(&address)?;
            Some(format!(
                "no route leads to its public address {address}: {why}"
            ))
        });
        match why {
            Some(why) => {
                unreachable.insert(lease.subnets(), why);
            }
            None => reachable.push(lease),
        }
    }
    (reachable, unreachable)
}

/// Each family's kernel entries for the `leases`, for the families whose VXLAN device exists.
fn family_peers(observed: &Observed, leases: &[&Lease], rules: &RoutingRules) -> Vec<FamilyPeers> {
    let devices = observed.devices;
    let on_link = &observed.reach.on_link;
    let mut families = Vec::new();
    if let Some(vtep) = &devices.vtep {
        let leases = leases.iter().copied();
        families.push(ipv4_peers(leases, vtep, &devices.uplink, rules, on_link));
    }
    if let (Some(vtep6), Some(network)) = (&devices.vtep6, rules.ipv6_network) {
        let leases = leases.iter().copied();
        families.push(ipv6_peers(leases, vtep6, &devices.uplink, network, on_link));
    }
    families
}

/// The kernel's IPv4 entries for `leases` on `vtep` (flannel.<VNI>). A lease whose PublicIP
/// is `on_link` (reached without a gateway) gets a direct route when the rules ask for direct
/// routing: it needs no map entry. The others get flannel's entries into flannel.1, whose
/// program drops what its maps do not hold.
pub fn ipv4_peers<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    vtep: &Device,
    uplink: &Device,
    rules: &RoutingRules,
    on_link: &EntrySet<IpAddr>,
) -> FamilyPeers {
    let mut peers = Vec::new();
    for lease in leases {
        let Some(mac) = lease.attrs.vtep_mac() else {
            continue;
        };
        let public_ip = IpAddr::V4(lease.attrs.public_ip);
        let direct = rules.direct_routing && on_link.contains(&public_ip);
        let entries = if direct {
            direct_route(lease.subnet.into(), public_ip, uplink)
        } else {
            vxlan_peer(lease.subnet.into(), mac, public_ip, vtep, rules.install_fdb)
        };
        peers.push(LeasePeer {
            lease: lease.subnets(),
            entries,
            needs_map_entries: !direct,
        });
    }
    FamilyPeers {
        devices: FamilyDevices {
            vtep_index: vtep.index,
            uplink_index: uplink.index,
            network: rules.network.into(),
        },
        leases: peers,
    }
}

/// The kernel's IPv6 entries for `leases` on `vtep6` (flannel-v6.<VNI>), which carries IPv6
/// in both dataplanes: flannel's neighbour, FDB and onlink route for each lease with an IPv6
/// subnet and VTEP; a direct route via the uplink instead for a PublicIPv6 `on_link`
/// (DirectRouting only). A lease left out of the maps gets neither.
pub fn ipv6_peers<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    vtep6: &Device,
    uplink: &Device,
    network: Ipv6Network,
    on_link: &EntrySet<IpAddr>,
) -> FamilyPeers {
    let peers = leases
        .filter_map(|lease| {
            let (subnet, public_ipv6, mac) = lease.ipv6_peer()?;
            let public_ipv6 = IpAddr::V6(public_ipv6);
            let entries = if on_link.contains(&public_ipv6) {
                direct_route(subnet.into(), public_ipv6, uplink)
            } else {
                vxlan_peer(subnet.into(), mac, public_ipv6, vtep6, true)
            };
            Some(LeasePeer {
                lease: lease.subnets(),
                entries,
                needs_map_entries: true,
            })
        })
        .collect();
    FamilyPeers {
        devices: FamilyDevices {
            vtep_index: vtep6.index,
            uplink_index: uplink.index,
            network: network.into(),
        },
        leases: peers,
    }
}

/// A route to `subnet` via its host's `public` address on our segment, without VXLAN.
fn direct_route(subnet: IpNetwork, public: IpAddr, uplink: &Device) -> LeaseKernelEntries {
    LeaseKernelEntries {
        route: Route {
            destination: subnet,
            gateway: public,
            interface: uplink.index,
        },
        neighbour: None,
        fdb: None,
    }
}

/// flannel's entries for a remote `subnet` behind the VTEP `mac` at `public`: the gateway
/// (the subnet's network address) resolved to the VTEP, the VTEP forwarded to the host, the
/// subnet routed via the gateway on the device.
fn vxlan_peer(
    subnet: IpNetwork,
    mac: MacAddr,
    public: IpAddr,
    vtep: &Device,
    install_fdb: bool,
) -> LeaseKernelEntries {
    let gateway = subnet.network();
    LeaseKernelEntries {
        route: Route {
            destination: subnet,
            gateway,
            interface: vtep.index,
        },
        neighbour: Some((gateway, mac)),
        fdb: install_fdb.then_some(FdbEntry {
            mac,
            destination: public,
        }),
    }
}

/// The map entries for `leases`: IPv4 ones for a lease with a VTEP MAC (an IPv6-only
/// network's have none), IPv6 ones for a lease with an IPv6 subnet and VTEP. Hosts whose
/// PublicIP is `on_link` (DirectRouting only) are marked to be routed to without VXLAN.
pub fn lease_entries<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    on_link: &EntrySet<IpAddr>,
) -> LeaseEntries {
    let mut entries = LeaseEntries::default();
    for lease in leases {
        if let Some(mac) = lease.attrs.vtep_mac() {
            add_ipv4_entries(&mut entries, lease, mac, on_link);
        }
        if let Some((subnet6, public_ipv6, mac6)) = lease.ipv6_peer() {
            add_ipv6_vtep(&mut entries, lease.subnets(), subnet6, public_ipv6.octets());
            let remote6 = RemoteVtep6 {
                public_ipv6: public_ipv6.octets(),
                mac: mac6.0,
                reserved: 0,
                peer: 0,
            };
            entries.subnets6.insert(subnet6, (remote6, lease.subnets()));
        }
    }
    entries
}

/// The IPv4 subnet and VTEP entries of `lease`, whose VTEP has `mac`.
fn add_ipv4_entries(
    entries: &mut LeaseEntries,
    lease: &Lease,
    mac: MacAddr,
    on_link: &EntrySet<IpAddr>,
) {
    let public_ip = lease.attrs.public_ip.octets();
    let remote = RemoteVtep {
        public_ip,
        mac: mac.0,
        flags: if on_link.contains(&IpAddr::V4(lease.attrs.public_ip)) {
            REMOTE_ROUTE_DIRECTLY
        } else {
            0
        },
        // The dataplane gives each lease its slot as it writes the entry.
        peer: 0,
    };
    entries
        .subnets
        .insert(lease.subnet, (remote, lease.subnets()));
    let value = VtepSubnet {
        subnet: lease.subnet.network().octets(),
        prefix_len: u32::from(lease.subnet.prefix()),
    };
    // A host with several leases: the greatest subnet, the same one every round, whatever
    // order the leases come in.
    let entry = entries.vteps.entry(public_ip).or_insert(value);
    if value.subnet > entry.subnet {
        *entry = value;
    }
}

/// The IPv6 VTEP entry of `lease` with `subnet6` at `public_ipv6`: that the host holds a
/// lease, with every lease of that host behind it. The value names one of its subnets (the
/// greatest, the same one every round); the programs check inner sources against `subnets6`,
/// so every lease of the host counts.
fn add_ipv6_vtep(
    entries: &mut LeaseEntries,
    lease: LeaseSubnets,
    subnet6: Ipv6Network,
    public_ipv6: [u8; 16],
) {
    let value = VtepSubnet6 {
        subnet: subnet6.network().octets(),
        prefix_len: u32::from(subnet6.prefix()),
    };
    let (entry, leases) = entries
        .vteps6
        .entry(public_ipv6)
        .or_insert((value, Vec::new()));
    if value.subnet > entry.subnet {
        *entry = value;
    }
    leases.push(lease);
}

/// Every container address in our `subnet` whose MAC sits behind a known port.
pub fn endpoints(containers: &Containers, subnet: Ipv4Network) -> Endpoints {
    let netmask = subnet.mask().octets();
    endpoints_where(containers, |address| match address {
        IpAddr::V4(address) if subnet.contains(address) => Some(address.octets()),
        _ => None,
    })
    .into_iter()
    .map(|(address, endpoint)| {
        let slot = endpoint_slot(address, netmask);
        (slot, EndpointSlot { address, endpoint })
    })
    .collect()
}

/// Every container address in our IPv6 `subnet` whose MAC sits behind a known port.
pub fn endpoints6(containers: &Containers, subnet: Ipv6Network) -> Endpoints6 {
    endpoints_where(containers, |address| match address {
        IpAddr::V6(address) if subnet.contains(address) => Some(address.octets()),
        _ => None,
    })
}

/// The endpoints of the container addresses `key` gives a map key for.
fn endpoints_where<const N: usize>(
    containers: &Containers,
    key: impl Fn(IpAddr) -> Option<[u8; N]>,
) -> HashMap<[u8; N], LocalEndpoint> {
    containers
        .addresses
        .iter()
        .filter_map(|(address, mac)| {
            let key = key(*address)?;
            let port = containers.port_of_mac.get(mac)?;
            containers.ports.contains_key(port).then_some((
                key,
                LocalEndpoint {
                    ifindex: *port,
                    mac: mac.0,
                    reserved: 0,
                },
            ))
        })
        .collect()
}

/// The programs for this node's containers: where each program sits, and with the fast path
/// every container address in our lease as an endpoint (without it, none).
fn programs(
    settings: &ProgramSettings,
    devices: &Devices,
    containers: &Containers,
    own: &LeaseSubnets,
) -> Programs {
    let (endpoints, endpoints6) = if settings.fast_path {
        (
            own.ipv4_subnet()
                .map(|subnet| endpoints(containers, subnet))
                .unwrap_or_default(),
            own.ipv6
                .map(|subnet6| endpoints6(containers, subnet6))
                .unwrap_or_default(),
        )
    } else {
        Default::default()
    };
    Programs {
        placement: placement(settings, devices, containers, own),
        endpoints,
        endpoints6,
        live_ports: containers.ports.keys().copied().collect(),
    }
}

/// The programs' places: the uplink's decapsulator, the VXLAN devices' encapsulator and
/// socket guards, one checker (with the fast path, also encapsulator) per container port and,
/// with the fast path, the bridge's flow watcher; and the one config they all read.
pub fn placement(
    settings: &ProgramSettings,
    devices: &Devices,
    containers: &Containers,
    subnets: &LeaseSubnets,
) -> Placement {
    Placement {
        config: program_config(settings, devices, subnets),
        uplink: devices.uplink.clone(),
        decap_hook: settings.decap_hook,
        xdp_mode: settings.xdp_mode,
        vtep: devices.vtep.clone(),
        vtep6: devices.vtep6.clone(),
        containers: containers.ports.values().cloned().collect(),
        bridge: settings.fast_path.then(|| devices.bridge.clone()),
    }
}

/// The settings every program reads on every packet: the only place they are made.
fn program_config(
    settings: &ProgramSettings,
    devices: &Devices,
    subnets: &LeaseSubnets,
) -> OverlayConfig {
    // An IPv6-only lease has no IPv4 address for a container, which 0.0.0.0/32 says to the
    // programs: its one address is its network's, never a container's.
    let subnet = subnets
        .ipv4_subnet()
        .unwrap_or(Ipv4Network::from(Ipv4Addr::UNSPECIFIED));
    let (local_subnet6, local_netmask6, bridge_ipv6) = match subnets.ipv6 {
        Some(subnet6) => (
            subnet6.network().octets(),
            subnet6.mask().octets(),
            ipv6_gateway(subnet6).octets(),
        ),
        None => Default::default(),
    };
    let flag = |flag: u16, on: bool| if on { flag } else { 0 };
    // Without a family, no packet reads its fields: they stay zero.
    let mac_or_zero = |mac: Option<MacAddr>| mac.map_or([0; 6], |mac| mac.0);
    OverlayConfig {
        vni: settings.vni,
        vxlan_port: settings.vxlan_port,
        flags: flag(CONFIG_DIRECT_ROUTING, settings.direct_routing)
            | flag(CONFIG_FAST_PATH, settings.fast_path)
            | flag(CONFIG_CONTAINER_VLANS, settings.container_vlans)
            | flag(CONFIG_ACCEPT_NAT_PEERS, settings.accept_nat_peers)
            | flag(CONFIG_IPV6, subnets.ipv6.is_some()),
        public_ip: settings
            .tunnel_source
            .map_or([0; 4], |address| address.octets()),
        public_ipv6: settings
            .tunnel_source6
            .map_or([0; 16], |address| address.octets()),
        vtep_mac: mac_or_zero(settings.vtep_mac),
        vtep6_mac: mac_or_zero(settings.vtep6_mac),
        uplink_mac: settings.uplink_mac.0,
        uplink_ifindex: devices.uplink.index,
        vtep_ifindex: devices.vtep.as_ref().map_or(0, |vtep| vtep.index),
        vtep6_ifindex: devices.vtep6.as_ref().map_or(0, |vtep6| vtep6.index),
        vtep_mtu: settings.vtep_mtu,
        vtep6_mtu: settings.vtep6_mtu,
        bridge_mac: devices.bridge_mac.0,
        local_subnet: subnet.network().octets(),
        local_netmask: subnet.mask().octets(),
        bridge_ip: gateway(subnet).octets(),
        local_subnet6,
        local_netmask6,
        bridge_ipv6,
        ..OverlayConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{EntryMap, WrittenLeases};
    use crate::reconcile::fixtures::{VTEP_MAC, devices};
    use crate::subnet::LeaseAttrs;

    fn lease(subnet: &str, public_ip: &str, mac: Option<MacAddr>) -> Lease {
        let public_ip = public_ip.parse().expect("test address");
        let attrs = LeaseAttrs {
            backend_data: None,
            ..LeaseAttrs::ipv4_only(public_ip, 1, VTEP_MAC)
        };
        Lease {
            subnet: subnet.parse().expect("test subnet"),
            ipv6_subnet: None,
            attrs: match mac {
                Some(mac) => LeaseAttrs::ipv4_only(public_ip, 1, mac),
                None => attrs,
            },
            etcd_lease: 7,
        }
    }

    fn vtep() -> Device {
        devices().vtep.expect("flannel.1")
    }

    /// The IPv4 entries of `leases`, but those of the leases `unmapped` that need map entries.
    fn peer_entries<'a>(
        leases: impl Iterator<Item = &'a Lease>,
        vtep: &Device,
        uplink: &Device,
        rules: &RoutingRules,
        on_link: &EntrySet<IpAddr>,
        unmapped: &BTreeSet<LeaseSubnets>,
    ) -> PeerEntries {
        ipv4_peers(leases, vtep, uplink, rules, on_link).entries(unmapped)
    }

    fn ipv6_peer_entries<'a>(
        leases: impl Iterator<Item = &'a Lease>,
        vtep6: &Device,
        uplink: &Device,
        on_link: &EntrySet<IpAddr>,
    ) -> PeerEntries {
        let network = "fd00:2::/48".parse().expect("test network");
        ipv6_peers(leases, vtep6, uplink, network, on_link).entries(&BTreeSet::new())
    }

    /// The program settings of host1 in the seed, with or without the fast path.
    fn settings(fast_path: bool) -> ProgramSettings {
        ProgramSettings {
            vni: 1,
            vxlan_port: 8472,
            tunnel_source: Some(Ipv4Addr::new(172, 20, 62, 104)),
            tunnel_source6: None,
            vtep_mac: Some(VTEP_MAC),
            vtep6_mac: None,
            vtep_mtu: 1450,
            vtep6_mtu: 0,
            uplink_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            direct_routing: false,
            fast_path,
            container_vlans: false,
            accept_nat_peers: false,
            decap_hook: DecapHook::Tc,
            xdp_mode: XdpModeChoice::Auto,
        }
    }

    fn rules(install_fdb: bool, direct_routing: bool) -> RoutingRules {
        RoutingRules {
            network: "10.2.0.0/16".parse().expect("test network"),
            ipv6_network: None,
            install_fdb,
            direct_routing,
        }
    }

    #[test]
    fn a_lease_gets_flannels_neighbour_fdb_and_onlink_route() {
        let leases = [lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC))];
        let entries = peer_entries(
            leases.iter(),
            &vtep(),
            &devices().uplink,
            &rules(true, false),
            &EntrySet::default(),
            &BTreeSet::new(),
        );
        let gateway: IpAddr = "10.2.54.0".parse().expect("address");
        assert_eq!(
            entries.neighbours,
            EntryMap::from_iter([(gateway, VTEP_MAC)])
        );
        assert_eq!(
            entries.fdb,
            EntrySet::from_iter([FdbEntry {
                mac: VTEP_MAC,
                destination: "172.20.62.105".parse().expect("address"),
            }])
        );
        assert_eq!(
            entries.routes,
            EntrySet::from_iter([Route {
                destination: "10.2.54.0/24".parse().expect("subnet"),
                gateway,
                interface: 4,
            }])
        );
    }

    #[test]
    fn an_ipv6_lease_gets_flannels_entries_on_flannel_v6() {
        let mut dual = lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC));
        let v6_mac = MacAddr([0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x8a]);
        dual.ipv6_subnet = Some("fd00:2:0:54::/64".parse().expect("subnet"));
        dual.attrs.public_ipv6 = Some("fd00:ff::105".parse().expect("address"));
        dual.attrs.backend_v6_data = Some(crate::subnet::VxlanLeaseData {
            vni: Some(1),
            vtep_mac: v6_mac,
        });
        let ipv4_only = lease("10.2.55.0/24", "172.20.62.106", Some(VTEP_MAC));
        let vtep6 = Device {
            name: "flannel-v6.1".into(),
            index: 5,
        };
        let leases = [dual, ipv4_only];
        let entries = ipv6_peer_entries(
            leases.iter(),
            &vtep6,
            &devices().uplink,
            &EntrySet::default(),
        );
        let gateway: IpAddr = "fd00:2:0:54::".parse().expect("address");
        assert_eq!(entries.neighbours, EntryMap::from_iter([(gateway, v6_mac)]));
        assert_eq!(
            entries.fdb,
            EntrySet::from_iter([FdbEntry {
                mac: v6_mac,
                destination: "fd00:ff::105".parse().expect("address"),
            }])
        );
        assert_eq!(
            entries.routes,
            EntrySet::from_iter([Route {
                destination: "fd00:2:0:54::/64".parse().expect("subnet"),
                gateway,
                interface: 5,
            }])
        );
        let on_link = EntrySet::from_iter(["fd00:ff::105".parse().expect("address")]);
        let direct = ipv6_peer_entries(leases.iter(), &vtep6, &devices().uplink, &on_link);
        assert!(direct.neighbours.is_empty() && direct.fdb.is_empty());
        assert_eq!(
            direct.routes,
            EntrySet::from_iter([Route {
                destination: "fd00:2:0:54::/64".parse().expect("subnet"),
                gateway: "fd00:ff::105".parse().expect("address"),
                interface: 2,
            }])
        );
    }

    #[test]
    fn our_dataplane_needs_no_fdb_and_a_lease_without_mac_needs_nothing() {
        let leases = [
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.77.0/24", "172.20.62.177", None),
        ];
        let entries = peer_entries(
            leases.iter(),
            &vtep(),
            &devices().uplink,
            &rules(false, false),
            &EntrySet::default(),
            &BTreeSet::new(),
        );
        assert!(entries.fdb.is_empty());
        assert_eq!(entries.routes.len(), 1);
        assert_eq!(
            lease_entries(leases.iter(), &EntrySet::default())
                .subnets
                .len(),
            1
        );
    }

    #[test]
    fn direct_routing_takes_the_uplink_only_for_peers_on_link() {
        let leases = [
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.77.0/24", "192.0.2.77", Some(VTEP_MAC)),
        ];
        let on_link = EntrySet::from_iter(["172.20.62.105".parse().expect("address")]);
        let entries = peer_entries(
            leases.iter(),
            &vtep(),
            &devices().uplink,
            &rules(true, true),
            &on_link,
            &BTreeSet::new(),
        );
        let direct = Route {
            destination: "10.2.54.0/24".parse().expect("subnet"),
            gateway: "172.20.62.105".parse().expect("address"),
            interface: 2,
        };
        assert!(entries.routes.contains(&direct));
        assert_eq!(
            entries.neighbours.len(),
            1,
            "only the far peer goes by VXLAN"
        );
        assert_eq!(entries.routes.len(), 2);
    }

    #[test]
    fn a_lease_without_map_entries_gets_no_route_into_flannel_1_but_keeps_a_direct_one() {
        let leases = [
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.77.0/24", "192.0.2.77", Some(VTEP_MAC)),
            lease("10.2.78.0/24", "192.0.2.78", Some(VTEP_MAC)),
        ];
        let on_link = EntrySet::from_iter(["172.20.62.105".parse().expect("address")]);
        let unmapped = BTreeSet::from([leases[0].subnets(), leases[1].subnets()]);
        let entries = peer_entries(
            leases.iter(),
            &vtep(),
            &devices().uplink,
            &rules(false, true),
            &on_link,
            &unmapped,
        );
        let destinations: BTreeSet<String> = entries
            .routes
            .iter()
            .map(|route| route.destination.to_string())
            .collect();
        assert_eq!(
            destinations,
            BTreeSet::from(["10.2.54.0/24".to_string(), "10.2.78.0/24".to_string()])
        );
        assert_eq!(entries.neighbours.len(), 1, "only 10.2.78.0/24's gateway");
    }

    #[test]
    fn lease_entries_map_subnet_to_vtep_and_vtep_to_subnet() {
        let leases = [lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC))];
        let entries = lease_entries(leases.iter(), &EntrySet::default());
        let subnet: Ipv4Network = "10.2.54.0/24".parse().expect("subnet");
        assert_eq!(
            entries.subnets,
            EntryMap::from_iter([(
                subnet,
                (
                    RemoteVtep {
                        public_ip: [172, 20, 62, 105],
                        mac: VTEP_MAC.0,
                        flags: 0,
                        peer: 0,
                    },
                    LeaseSubnets::ipv4(subnet)
                )
            )])
        );
        let on_link = EntrySet::from_iter([IpAddr::V4(Ipv4Addr::new(172, 20, 62, 105))]);
        let direct = lease_entries(leases.iter(), &on_link);
        assert!(
            direct
                .subnets
                .values()
                .all(|(remote, _)| remote.routes_directly())
        );
        assert_eq!(
            entries.vteps,
            EntryMap::from_iter([(
                [172, 20, 62, 105],
                VtepSubnet {
                    subnet: [10, 2, 54, 0],
                    prefix_len: 24
                }
            )])
        );
    }

    #[test]
    fn a_host_with_two_leases_gets_its_greatest_subnet_as_vtep_entry_in_any_order() {
        let leases = [
            lease("10.2.55.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
        ];
        let forward = lease_entries(leases.iter(), &EntrySet::default());
        let backward = lease_entries(leases.iter().rev(), &EntrySet::default());
        assert_eq!(forward, backward);
        let vtep = forward
            .vteps
            .get(&[172, 20, 62, 105])
            .expect("the host's entry");
        assert_eq!(vtep.subnet, [10, 2, 55, 0]);
    }

    /// The keys of a map's entries, sorted.
    fn keys<K: Copy + Ord, V>(map: &EntryMap<K, V>) -> Vec<K> {
        let mut keys: Vec<K> = map.keys().copied().collect();
        keys.sort();
        keys
    }

    fn subnets(texts: &[&str]) -> Vec<Ipv4Network> {
        texts
            .iter()
            .map(|text| text.parse().expect("test subnet"))
            .collect()
    }

    #[test]
    fn a_round_about_lease_events_compares_the_changed_leases_under_old_and_new_addresses() {
        let written = [
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.55.0/24", "172.20.62.106", Some(VTEP_MAC)),
            lease("10.2.56.0/24", "172.20.62.107", Some(VTEP_MAC)),
            lease("10.2.60.0/24", "172.20.62.120", Some(VTEP_MAC)),
            lease("10.2.61.0/24", "172.20.62.120", Some(VTEP_MAC)),
        ];
        // Since: 54 moved to .108, 55 and 61 went, 57 came; 56 and 60 stayed as they were.
        let desired = [
            lease("10.2.54.0/24", "172.20.62.108", Some(VTEP_MAC)),
            lease("10.2.56.0/24", "172.20.62.107", Some(VTEP_MAC)),
            lease("10.2.57.0/24", "172.20.62.109", Some(VTEP_MAC)),
            lease("10.2.60.0/24", "172.20.62.120", Some(VTEP_MAC)),
        ];
        let none = EntrySet::default();
        let last = WrittenLeases {
            entries: lease_entries(written.iter(), &none),
            changed: [
                "10.2.54.0/24",
                "10.2.55.0/24",
                "10.2.57.0/24",
                "10.2.61.0/24",
            ]
            .iter()
            .map(|subnet| LeaseSubnets::ipv4(subnet.parse().expect("test subnet")))
            .collect(),
        };
        let desired = lease_entries(desired.iter(), &none);

        let (wanted, was) = last.touched(&desired, std::iter::empty());
        assert_eq!(
            keys(&wanted.subnets),
            subnets(&["10.2.54.0/24", "10.2.57.0/24"])
        );
        assert_eq!(
            keys(&was.subnets),
            subnets(&["10.2.54.0/24", "10.2.55.0/24", "10.2.61.0/24"])
        );
        let address = |last: u8| [172, 20, 62, last];
        // 54's old address and 55's are compared, to be removed; 120 is still 60's, whose
        // entry must stop naming 61.
        assert_eq!(
            keys(&wanted.vteps),
            [address(108), address(109), address(120)]
        );
        assert_eq!(keys(&was.vteps), [address(105), address(106), address(120)]);
        let subnet_of = |entries: &LeaseEntries| entries.vteps[&address(120)].subnet;
        assert_eq!(subnet_of(&wanted), [10, 2, 60, 0]);
        assert_eq!(subnet_of(&was), [10, 2, 61, 0]);

        // A lease still waiting for a slot is compared too, unchanged as it is.
        let waiting: IpNetwork = "10.2.56.0/24".parse().expect("test subnet");
        let (wanted, was) = last.touched(&desired, std::iter::once(waiting));
        for entries in [&wanted, &was] {
            assert!(entries.subnets.contains_key(&subnets(&["10.2.56.0/24"])[0]));
            assert!(entries.vteps.contains_key(&address(107)));
        }
    }

    #[test]
    fn an_endpoint_needs_an_address_in_our_subnet_a_learned_mac_and_a_live_port() {
        let mac = MacAddr([2, 0, 0, 0, 0, 0x22]);
        let stranger = MacAddr([2, 0, 0, 0, 0, 0x33]);
        let containers = Containers {
            ports: BTreeMap::from([(
                9,
                Device {
                    name: "veth-bbox1".into(),
                    index: 9,
                },
            )]),
            addresses: HashMap::from([
                ("10.2.41.2".parse().expect("address"), mac),
                ("10.2.41.3".parse().expect("address"), stranger),
                ("192.0.2.2".parse().expect("address"), mac),
                ("fd00:2:0:41::2".parse().expect("address"), mac),
                ("fe80::2".parse().expect("address"), mac),
            ]),
            port_of_mac: HashMap::from([(mac, 9), (stranger, 12)]),
            isolated: BTreeSet::new(),
        };
        let bbox1 = LocalEndpoint {
            ifindex: 9,
            mac: mac.0,
            reserved: 0,
        };
        let subnet = "10.2.41.0/24".parse().expect("subnet");
        let slot = EndpointSlot {
            address: [10, 2, 41, 2],
            endpoint: bbox1,
        };
        assert_eq!(
            endpoints(&containers, subnet),
            BTreeMap::from([(2, slot)]),
            "the slot of 10.2.41.2 in 10.2.41.0/24 is its host part"
        );
        let subnet6: Ipv6Network = "fd00:2:0:41::/64".parse().expect("subnet");
        let address6: Ipv6Addr = "fd00:2:0:41::2".parse().expect("address");
        assert_eq!(
            endpoints6(&containers, subnet6),
            HashMap::from([(address6.octets(), bbox1)])
        );
    }

    #[test]
    fn placement_fills_in_the_devices_and_follows_the_fast_path_switch() {
        let port = Device {
            name: "veth-bbox1".into(),
            index: 9,
        };
        let containers = Containers {
            ports: BTreeMap::from([(9, port.clone())]),
            ..Containers::default()
        };
        let subnets = LeaseSubnets::ipv4("10.2.41.0/24".parse().expect("subnet"));
        let with = placement(&settings(true), &devices(), &containers, &subnets);
        assert_eq!(with.containers, vec![port.clone()]);
        assert_eq!(with.bridge, Some(devices().bridge));
        assert_eq!(
            (
                with.config.vni,
                with.config.vtep_ifindex,
                with.config.uplink_ifindex
            ),
            (1, 4, 2)
        );
        assert_eq!(with.config.bridge_mac, [2, 0, 0, 0, 0, 3]);
        assert!(with.config.fast_path());
        assert_eq!(
            (with.config.public_ip, with.config.vtep_mac),
            ([172, 20, 62, 104], VTEP_MAC.0)
        );
        assert_eq!(
            (
                with.config.local_subnet,
                with.config.local_netmask,
                with.config.bridge_ip
            ),
            ([10, 2, 41, 0], [255, 255, 255, 0], [10, 2, 41, 1])
        );
        // Without the fast path the ports are still checked, and nothing watches the bridge.
        let without = placement(&settings(false), &devices(), &containers, &subnets);
        assert_eq!(without.containers, vec![port]);
        assert!(without.bridge.is_none() && !without.config.fast_path());
        assert!(!without.config.ipv6() && without.config.local_subnet6 == [0; 16]);
    }

    #[test]
    fn placement_with_an_ipv6_lease_checks_ipv6_and_guards_flannel_v6() {
        let vtep6 = Device {
            name: "flannel-v6.1".into(),
            index: 5,
        };
        let devices = Devices {
            vtep6: Some(vtep6.clone()),
            ..devices()
        };
        let subnets = LeaseSubnets {
            ipv4: "10.2.41.0/24".parse().expect("subnet"),
            ipv6: Some("fd00:2:0:41::/64".parse().expect("subnet")),
        };
        let placed = placement(&settings(true), &devices, &Containers::default(), &subnets);
        assert_eq!(placed.vtep6, Some(vtep6));
        assert!(placed.config.ipv6() && placed.config.fast_path());
        let address = |text: &str| text.parse::<Ipv6Addr>().expect("address").octets();
        assert_eq!(
            (
                placed.config.local_subnet6,
                placed.config.local_netmask6,
                placed.config.bridge_ipv6
            ),
            (
                address("fd00:2:0:41::"),
                address("ffff:ffff:ffff:ffff::"),
                address("fd00:2:0:41::1")
            )
        );
    }

    #[test]
    fn placement_in_an_ipv6_only_network_leaves_containers_no_ipv4_address() {
        let vtep6 = Device {
            name: "flannel-v6.1".into(),
            index: 5,
        };
        let devices = Devices {
            vtep: None,
            vtep6: Some(vtep6.clone()),
            ..devices()
        };
        let subnets = LeaseSubnets {
            ipv4: "0.0.0.0/0".parse().expect("subnet"),
            ipv6: Some("fd00:2:0:41::/64".parse().expect("subnet")),
        };
        let placed = placement(&settings(true), &devices, &Containers::default(), &subnets);
        assert_eq!((placed.vtep, placed.vtep6), (None, Some(vtep6)));
        assert_eq!(
            (placed.config.vtep_ifindex, placed.config.vtep6_ifindex),
            (0, 5)
        );
        // A /32 at 0.0.0.0: its only address is its network's, which no container may claim.
        assert_eq!(
            (placed.config.local_subnet, placed.config.local_netmask),
            ([0; 4], [255; 4])
        );
        assert!(placed.config.ipv6());
    }

    /// A lease at 172.20.62.105 and fd00:ff::105 of `subnet` (none: IPv6-only) and `subnet6`.
    fn ipv6_lease(subnet: Option<&str>, subnet6: &str) -> Lease {
        let mut lease = match subnet {
            Some(subnet) => lease(subnet, "172.20.62.105", Some(VTEP_MAC)),
            None => lease("0.0.0.0/0", "0.0.0.0", None),
        };
        lease.ipv6_subnet = Some(subnet6.parse().expect("subnet"));
        lease.attrs.public_ipv6 = Some("fd00:ff::105".parse().expect("address"));
        lease.attrs.backend_v6_data = Some(crate::subnet::VxlanLeaseData {
            vni: Some(1),
            vtep_mac: VTEP_MAC,
        });
        lease
    }

    #[test]
    fn an_ipv6_only_lease_gets_ipv6_entries_alone() {
        let only = ipv6_lease(None, "fd00:2:0:54::/64");
        let entries = lease_entries([only.clone()].iter(), &EntrySet::default());
        assert!(entries.subnets.is_empty() && entries.vteps.is_empty());
        let subnet6: Ipv6Network = "fd00:2:0:54::/64".parse().expect("subnet");
        assert_eq!(entries.subnets6[&subnet6].1, only.subnets());
        assert_eq!(entries.vteps6.len(), 1);
    }

    #[test]
    fn a_dual_stack_lease_gets_an_ipv6_vtep_entry_the_same_every_round() {
        let dual = |subnet: &str, subnet6: &str| ipv6_lease(Some(subnet), subnet6);
        let public_ipv6 = "fd00:ff::105"
            .parse::<Ipv6Addr>()
            .expect("address")
            .octets();
        let expected = |subnet6: &str| VtepSubnet6 {
            subnet: subnet6.parse::<Ipv6Addr>().expect("address").octets(),
            prefix_len: 64,
        };
        let first = dual("10.2.54.0/24", "fd00:2:0:54::/64");
        let entries = lease_entries([first.clone()].iter(), &EntrySet::default());
        assert_eq!(
            entries.vteps6,
            EntryMap::from_iter([(
                public_ipv6,
                (expected("fd00:2:0:54::"), vec![first.subnets()])
            )])
        );
        // A host holding two leases: one entry, the greater subnet, whatever the order.
        let second = dual("10.2.55.0/24", "fd00:2:0:55::/64");
        for leases in [
            [first.clone(), second.clone()],
            [second.clone(), first.clone()],
        ] {
            let entries = lease_entries(leases.iter(), &EntrySet::default());
            assert_eq!(entries.vteps6[&public_ipv6].0, expected("fd00:2:0:55::"));
            assert_eq!(entries.vteps6[&public_ipv6].1.len(), 2);
        }
        let ipv4_only = lease("10.2.56.0/24", "172.20.62.106", Some(VTEP_MAC));
        assert!(
            lease_entries([ipv4_only].iter(), &EntrySet::default())
                .vteps6
                .is_empty()
        );
    }

    #[test]
    fn a_lease_whose_public_ip_has_no_route_is_left_out_and_the_others_stay() {
        let (near, nowhere) = (Ipv4Addr::new(172, 20, 62, 105), Ipv4Addr::new(0, 1, 2, 3));
        let leases: HashMap<LeaseSubnets, Lease> = [
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.90.0/24", "0.1.2.3", Some(VTEP_MAC)),
        ]
        .into_iter()
        .map(|lease| (lease.subnets(), lease))
        .collect();
        let reach = Reach {
            on_link: EntrySet::from_iter([IpAddr::V4(near)]),
            unreachable: EntryMap::from_iter([(
                IpAddr::V4(nowhere),
                "Network is unreachable (os error 101)".to_string(),
            )]),
        };
        let (reachable, unreachable) = split_unreachable(&leases, &reach);
        let kept: Vec<_> = reachable.iter().map(|lease| lease.subnet).collect();
        assert_eq!(kept, ["10.2.54.0/24".parse().expect("subnet")]);
        let left_out: Vec<_> = unreachable.iter().collect();
        assert_eq!(left_out.len(), 1);
        assert_eq!(left_out[0].0.to_string(), "10.2.90.0/24");
        assert_eq!(
            left_out[0].1,
            "no route leads to its public address 0.1.2.3: Network is unreachable (os error 101)"
        );
        let (everyone, none_left_out) = split_unreachable(&leases, &Reach::default());
        assert!(everyone.len() == 2 && none_left_out.is_empty());
    }
}
