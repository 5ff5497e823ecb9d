//! The state the host should be in, computed from the remote leases, the devices and the local
//! containers alone: no netlink, no maps, so every rule here is tested without root.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_common::{
    CONFIG_FAST_PATH, CONFIG_IPV6, LocalEndpoint, OverlayConfig, REMOTE_ROUTE_DIRECTLY, RemoteVtep,
    RemoteVtep6, VtepSubnet, VtepSubnet6,
};

use crate::{
    mac::MacAddr,
    node::bridge::{gateway, ipv6_gateway},
    subnet::{Lease, LeaseSubnets},
};

/// Where this host's overlay devices are, as the node sink last made sure of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Devices {
    pub bridge: Device,
    pub bridge_mac: MacAddr,
    /// flannel.<VNI>, with IPv4.
    pub vtep: Option<Device>,
    /// flannel-v6.<VNI>, with IPv6.
    pub vtep6: Option<Device>,
    pub uplink: Device,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    pub name: String,
    pub index: u32,
}

/// What the host's routing needs from the agent besides the leases.
#[derive(Clone, Copy, Debug)]
pub struct RoutingRules {
    /// The whole overlay network: direct routes into it through the uplink are ours.
    pub network: Ipv4Network,
    /// The IPv6 overlay network, with `EnableIPv6`: routes into it through the uplink are ours.
    pub ipv6_network: Option<Ipv6Network>,
    /// Kernel mode: the vxlan device forwards by its FDB. Our dataplane needs none.
    pub install_fdb: bool,
    /// Route peers on our L2 segment directly via their PublicIP, without VXLAN.
    pub direct_routing: bool,
}

/// The containers on the bridge, as netlink last reported them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Containers {
    /// Container ports (the host-side veths on the bridge), by interface index.
    pub ports: BTreeMap<u32, Device>,
    /// Addresses the bridge has resolved (by ARP or NDP), with the MAC behind each.
    pub addresses: HashMap<IpAddr, MacAddr>,
    /// Which port each container MAC was learned behind.
    pub port_of_mac: HashMap<MacAddr, u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub destination: IpNetwork,
    pub gateway: IpAddr,
    pub interface: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub mac: MacAddr,
    pub destination: IpAddr,
}

/// What every remote lease needs in the kernel, in flannel's form: a permanent neighbour
/// entry for the remote gateway (`<subnet>.0` → VtepMAC), an FDB entry (VtepMAC → PublicIP),
/// and the route `<subnet> via <subnet>.0 dev flannel.1 onlink`; the same over IPv6 on
/// flannel-v6.<VNI> (`<v6 subnet>::` → the v6 VtepMAC → PublicIPv6).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerEntries {
    pub neighbours: HashMap<IpAddr, MacAddr>,
    pub fdb: HashSet<FdbEntry>,
    pub routes: HashSet<Route>,
}

/// The subnet and VTEP map entries of the remote leases, each with the lease (or leases)
/// it serves.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LeaseEntries {
    /// Remote subnet → where its host is (the encapsulators' lookup).
    pub subnets: HashMap<Ipv4Network, (RemoteVtep, LeaseSubnets)>,
    /// Remote PublicIP → the subnet it may send from (the decapsulators' check).
    pub vteps: HashMap<[u8; 4], VtepSubnet>,
    /// Remote PublicIPv6 → the IPv6 subnet it may send from (the uplink's check of VXLAN over
    /// IPv6).
    pub vteps6: HashMap<[u8; 16], (VtepSubnet6, Vec<LeaseSubnets>)>,
    /// Remote IPv6 subnet → where its host is over IPv6 (the IPv6 fast path's lookup).
    pub subnets6: HashMap<Ipv6Network, (RemoteVtep6, LeaseSubnets)>,
}

impl LeaseEntries {
    /// The leases each remote host (by PublicIP) holds.
    pub fn leases_by_host(&self) -> HashMap<[u8; 4], Vec<LeaseSubnets>> {
        let mut by_host: HashMap<[u8; 4], Vec<LeaseSubnets>> = HashMap::new();
        for (remote, lease) in self.subnets.values() {
            by_host.entry(remote.public_ip).or_default().push(*lease);
        }
        by_host
    }
}

/// Container address (network order) → its port and MAC: where the decapsulator delivers.
pub type Endpoints = HashMap<[u8; 4], LocalEndpoint>;
/// The same for IPv6 container addresses.
pub type Endpoints6 = HashMap<[u8; 16], LocalEndpoint>;

/// Which interface each program sits on, and the settings they read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub config: OverlayConfig,
    pub uplink: Device,
    /// flannel.<VNI>, with IPv4.
    pub vtep: Option<Device>,
    /// flannel-v6.<VNI>, with IPv6.
    pub vtep6: Option<Device>,
    /// Every container port.
    pub containers: Vec<Device>,
    /// The container bridge, whose egress notes the flows the stack carries, with the fast
    /// path; none without.
    pub bridge: Option<Device>,
}

/// The kernel's IPv4 entries for `leases` on `vtep` (flannel.<VNI>). A lease whose PublicIP
/// is in `on_link` (reached without a gateway) gets a direct route when the rules ask for
/// direct routing. A lease `unmapped` (its map entries did not fit) gets no route into
/// flannel.1, whose program would drop its traffic; a direct route needs no map entry and
/// stays.
pub fn peer_entries<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    vtep: &Device,
    uplink: &Device,
    rules: &RoutingRules,
    on_link: &HashSet<Ipv4Addr>,
    unmapped: &BTreeSet<LeaseSubnets>,
) -> PeerEntries {
    let mut entries = PeerEntries::default();
    for lease in leases {
        let Some(mac) = lease.attrs.vtep_mac() else {
            continue;
        };
        let public_ip = lease.attrs.public_ip;
        if rules.direct_routing && on_link.contains(&public_ip) {
            entries.routes.insert(Route {
                destination: lease.subnet.into(),
                gateway: public_ip.into(),
                interface: uplink.index,
            });
            continue;
        }
        if unmapped.contains(&lease.subnets()) {
            continue;
        }
        entries.add_vxlan_peer(
            lease.subnet.into(),
            mac,
            public_ip.into(),
            vtep,
            rules.install_fdb,
        );
    }
    entries
}

/// The kernel's IPv6 entries for `leases` on `vtep6` (flannel-v6.<VNI>), which carries IPv6
/// in both dataplanes: flannel's neighbour, FDB and onlink route for each lease with an IPv6
/// subnet and VTEP; a direct route via the uplink instead for a PublicIPv6 in `on_link`
/// (DirectRouting only).
pub fn ipv6_peer_entries<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    vtep6: &Device,
    uplink: &Device,
    on_link: &HashSet<Ipv6Addr>,
) -> PeerEntries {
    let mut entries = PeerEntries::default();
    for (subnet, public_ipv6, mac) in leases.filter_map(Lease::ipv6_peer) {
        if on_link.contains(&public_ipv6) {
            entries.routes.insert(Route {
                destination: subnet.into(),
                gateway: public_ipv6.into(),
                interface: uplink.index,
            });
            continue;
        }
        entries.add_vxlan_peer(subnet.into(), mac, public_ipv6.into(), vtep6, true);
    }
    entries
}

impl PeerEntries {
    /// flannel's entries for a remote `subnet` behind the VTEP `mac` at `public`: the gateway
    /// (the subnet's network address) resolved to the VTEP, the VTEP forwarded to the host,
    /// the subnet routed via the gateway on the device.
    fn add_vxlan_peer(
        &mut self,
        subnet: IpNetwork,
        mac: MacAddr,
        public: IpAddr,
        vtep: &Device,
        install_fdb: bool,
    ) {
        let gateway = subnet.network();
        self.neighbours.insert(gateway, mac);
        if install_fdb {
            self.fdb.insert(FdbEntry {
                mac,
                destination: public,
            });
        }
        self.routes.insert(Route {
            destination: subnet,
            gateway,
            interface: vtep.index,
        });
    }
}

/// The map entries for `leases`: IPv4 ones for a lease with a VTEP MAC (an IPv6-only
/// network's have none), IPv6 ones for a lease with an IPv6 subnet and VTEP. Hosts whose
/// PublicIP is `on_link` (DirectRouting only) are marked to be routed to without VXLAN.
pub fn lease_entries<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    on_link: &HashSet<Ipv4Addr>,
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
    on_link: &HashSet<Ipv4Addr>,
) {
    let public_ip = lease.attrs.public_ip.octets();
    let remote = RemoteVtep {
        public_ip,
        mac: mac.0,
        flags: if on_link.contains(&lease.attrs.public_ip) {
            REMOTE_ROUTE_DIRECTLY
        } else {
            0
        },
    };
    entries
        .subnets
        .insert(lease.subnet, (remote, lease.subnets()));
    entries.vteps.insert(
        public_ip,
        VtepSubnet {
            subnet: lease.subnet.network().octets(),
            prefix_len: u32::from(lease.subnet.prefix()),
        },
    );
}

/// The IPv6 VTEP entry of `lease` with `subnet6` at `public_ipv6`. The map holds one IPv6
/// subnet a host: of two leases of one host, the greater subnet wins, the same one every
/// round.
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
    endpoints_where(containers, |address| match address {
        IpAddr::V4(address) if subnet.contains(address) => Some(address.octets()),
        _ => None,
    })
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

/// The programs' places: the uplink's decapsulator, the VXLAN devices' encapsulator and
/// socket guards, one checker (with the fast path, also encapsulator) per container port and,
/// with the fast path, the bridge's flow watcher. `base` is the config but for the lease and
/// device facts filled in here.
pub fn placement(
    base: &OverlayConfig,
    devices: &Devices,
    containers: &Containers,
    subnets: &LeaseSubnets,
    fast_path: bool,
) -> Placement {
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
    let config = OverlayConfig {
        vtep_ifindex: devices.vtep.as_ref().map_or(0, |vtep| vtep.index),
        vtep6_ifindex: devices.vtep6.as_ref().map_or(0, |vtep6| vtep6.index),
        bridge_mac: devices.bridge_mac.0,
        uplink_ifindex: devices.uplink.index,
        flags: with_flag(
            with_flag(base.flags, CONFIG_FAST_PATH, fast_path),
            CONFIG_IPV6,
            subnets.ipv6.is_some(),
        ),
        local_subnet: subnet.network().octets(),
        local_netmask: subnet.mask().octets(),
        bridge_ip: gateway(subnet).octets(),
        local_subnet6,
        local_netmask6,
        bridge_ipv6,
        ..*base
    };
    Placement {
        config,
        uplink: devices.uplink.clone(),
        vtep: devices.vtep.clone(),
        vtep6: devices.vtep6.clone(),
        containers: containers.ports.values().cloned().collect(),
        bridge: fast_path.then(|| devices.bridge.clone()),
    }
}

fn with_flag(flags: u16, flag: u16, on: bool) -> u16 {
    if on { flags | flag } else { flags & !flag }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::LeaseAttrs;

    const VTEP_MAC: MacAddr = MacAddr([0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x89]);

    fn devices() -> Devices {
        let device = |name: &str, index| Device {
            name: name.into(),
            index,
        };
        Devices {
            bridge: device("docker0", 3),
            bridge_mac: MacAddr([2, 0, 0, 0, 0, 3]),
            vtep: Some(device("flannel.1", 4)),
            vtep6: None,
            uplink: device("eth0", 2),
        }
    }

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
            &HashSet::new(),
            &BTreeSet::new(),
        );
        let gateway: IpAddr = "10.2.54.0".parse().expect("address");
        assert_eq!(entries.neighbours, HashMap::from([(gateway, VTEP_MAC)]));
        assert_eq!(
            entries.fdb,
            HashSet::from([FdbEntry {
                mac: VTEP_MAC,
                destination: "172.20.62.105".parse().expect("address"),
            }])
        );
        assert_eq!(
            entries.routes,
            HashSet::from([Route {
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
        let entries = ipv6_peer_entries(leases.iter(), &vtep6, &devices().uplink, &HashSet::new());
        let gateway: IpAddr = "fd00:2:0:54::".parse().expect("address");
        assert_eq!(entries.neighbours, HashMap::from([(gateway, v6_mac)]));
        assert_eq!(
            entries.fdb,
            HashSet::from([FdbEntry {
                mac: v6_mac,
                destination: "fd00:ff::105".parse().expect("address"),
            }])
        );
        assert_eq!(
            entries.routes,
            HashSet::from([Route {
                destination: "fd00:2:0:54::/64".parse().expect("subnet"),
                gateway,
                interface: 5,
            }])
        );
        let on_link = HashSet::from(["fd00:ff::105".parse().expect("address")]);
        let direct = ipv6_peer_entries(leases.iter(), &vtep6, &devices().uplink, &on_link);
        assert!(direct.neighbours.is_empty() && direct.fdb.is_empty());
        assert_eq!(
            direct.routes,
            HashSet::from([Route {
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
            &HashSet::new(),
            &BTreeSet::new(),
        );
        assert!(entries.fdb.is_empty());
        assert_eq!(entries.routes.len(), 1);
        assert_eq!(
            lease_entries(leases.iter(), &HashSet::new()).subnets.len(),
            1
        );
    }

    #[test]
    fn direct_routing_takes_the_uplink_only_for_peers_on_link() {
        let leases = [
            lease("10.2.54.0/24", "172.20.62.105", Some(VTEP_MAC)),
            lease("10.2.77.0/24", "192.0.2.77", Some(VTEP_MAC)),
        ];
        let on_link = HashSet::from(["172.20.62.105".parse().expect("address")]);
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
        let on_link = HashSet::from(["172.20.62.105".parse().expect("address")]);
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
        let entries = lease_entries(leases.iter(), &HashSet::new());
        let subnet: Ipv4Network = "10.2.54.0/24".parse().expect("subnet");
        assert_eq!(
            entries.subnets,
            HashMap::from([(
                subnet,
                (
                    RemoteVtep {
                        public_ip: [172, 20, 62, 105],
                        mac: VTEP_MAC.0,
                        flags: 0
                    },
                    LeaseSubnets::ipv4(subnet)
                )
            )])
        );
        let on_link = HashSet::from([Ipv4Addr::new(172, 20, 62, 105)]);
        let direct = lease_entries(leases.iter(), &on_link);
        assert!(
            direct
                .subnets
                .values()
                .all(|(remote, _)| remote.routes_directly())
        );
        assert_eq!(
            entries.vteps,
            HashMap::from([(
                [172, 20, 62, 105],
                VtepSubnet {
                    subnet: [10, 2, 54, 0],
                    prefix_len: 24
                }
            )])
        );
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
        };
        let bbox1 = LocalEndpoint {
            ifindex: 9,
            mac: mac.0,
            reserved: 0,
        };
        let subnet = "10.2.41.0/24".parse().expect("subnet");
        assert_eq!(
            endpoints(&containers, subnet),
            HashMap::from([([10, 2, 41, 2], bbox1)])
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
        let base = OverlayConfig {
            vni: 1,
            ..OverlayConfig::default()
        };
        let subnets = LeaseSubnets::ipv4("10.2.41.0/24".parse().expect("subnet"));
        let with = placement(&base, &devices(), &containers, &subnets, true);
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
            (
                with.config.local_subnet,
                with.config.local_netmask,
                with.config.bridge_ip
            ),
            ([10, 2, 41, 0], [255, 255, 255, 0], [10, 2, 41, 1])
        );
        // Without the fast path the ports are still checked, and nothing watches the bridge.
        let without = placement(&with.config, &devices(), &containers, &subnets, false);
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
        let base = OverlayConfig::default();
        let placed = placement(&base, &devices, &Containers::default(), &subnets, true);
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
        let placed = placement(
            &OverlayConfig::default(),
            &devices,
            &Containers::default(),
            &subnets,
            true,
        );
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
        let entries = lease_entries([only.clone()].iter(), &HashSet::new());
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
        let entries = lease_entries([first.clone()].iter(), &HashSet::new());
        assert_eq!(
            entries.vteps6,
            HashMap::from([(
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
            let entries = lease_entries(leases.iter(), &HashSet::new());
            assert_eq!(entries.vteps6[&public_ipv6].0, expected("fd00:2:0:55::"));
            assert_eq!(entries.vteps6[&public_ipv6].1.len(), 2);
        }
        let ipv4_only = lease("10.2.56.0/24", "172.20.62.106", Some(VTEP_MAC));
        assert!(
            lease_entries([ipv4_only].iter(), &HashSet::new())
                .vteps6
                .is_empty()
        );
    }
}
