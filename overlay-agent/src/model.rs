//! The plain values the agent's layers hand each other: the devices and containers the node
//! observes, what the leases ask of the kernel and of the maps, where the programs go, and what
//! the maps could not hold. A leaf: it imports nothing of the agent but MAC addresses, so
//! `node`, `dataplane`, `subnet` and `reconcile` all build on it from below.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_common::{
    EndpointSlot, LocalEndpoint, OverlayConfig, RemoteVtep, RemoteVtep6, VtepSubnet, VtepSubnet6,
};

use crate::mac::MacAddr;

/// A network interface of this namespace, by name and index.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    pub name: String,
    pub index: u32,
}

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

/// One interface of this namespace, with the XDP program on it, if any: what the dataplane
/// needs to find programs an earlier run left.
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub xdp_program: Option<u32>,
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
    /// Ports the node took down for want of their program (see [`PortIsolation`]).
    pub isolated: BTreeSet<u32>,
}

/// What a netlink notification told the node about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeChange {
    /// A container port, a MAC behind one or an address on the bridge: already taken into the
    /// containers.
    Containers,
    /// One of the overlay devices, or an entry the agent owns on them.
    Devices,
    /// Notifications were lost: everything must be listed again.
    Lost,
}

/// The subnets of one lease, each family's: its identity in etcd and in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseSubnets {
    pub ipv4: Ipv4Network,
    pub ipv6: Option<Ipv6Network>,
}

impl LeaseSubnets {
    pub fn ipv4(ipv4: Ipv4Network) -> Self {
        Self { ipv4, ipv6: None }
    }

    /// The IPv4 subnet; none for flannel's empty 0.0.0.0/0 of an IPv6-only lease.
    pub fn ipv4_subnet(&self) -> Option<Ipv4Network> {
        (self.ipv4.prefix() != 0).then_some(self.ipv4)
    }
}

impl From<Ipv4Network> for LeaseSubnets {
    fn from(ipv4: Ipv4Network) -> Self {
        Self::ipv4(ipv4)
    }
}

impl fmt::Display for LeaseSubnets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv6 {
            Some(ipv6) if self.ipv4_subnet().is_none() => write!(f, "{ipv6}"),
            Some(ipv6) => write!(f, "{} & {ipv6}", self.ipv4),
            None => write!(f, "{}", self.ipv4),
        }
    }
}

/// The subnet's first host address: the containers' default gateway (the bridge's address),
/// FLANNEL_SUBNET's address.
pub fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// The IPv6 subnet's first host address, as [`gateway`]: FLANNEL_IPV6_SUBNET's address.
pub fn ipv6_gateway(subnet: Ipv6Network) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet.network()) + 1)
}

/// What the host's routing needs from the agent besides the leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// The hasher of the tables of lease and kernel entries, which a round at thousands of leases
/// looks up tens of thousands of times: foldhash is several times faster than the standard
/// library's SipHash on keys this small. Its seed is random and its own for every table, so
/// the keys, which etcd records choose, cannot be picked to collide in advance.
pub type EntryHasher = foldhash::fast::RandomState;
pub type EntryMap<K, V> = HashMap<K, V, EntryHasher>;
pub type EntrySet<T> = HashSet<T, EntryHasher>;

/// What every remote lease needs in the kernel, in flannel's form: a permanent neighbour
/// entry for the remote gateway (`<subnet>.0` → VtepMAC), an FDB entry (VtepMAC → PublicIP),
/// and the route `<subnet> via <subnet>.0 dev flannel.1 onlink`; the same over IPv6 on
/// flannel-v6.<VNI> (`<v6 subnet>::` → the v6 VtepMAC → PublicIPv6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerEntries {
    pub neighbours: EntryMap<IpAddr, MacAddr>,
    pub fdb: EntrySet<FdbEntry>,
    pub routes: EntrySet<Route>,
}

impl PeerEntries {
    /// Room for the entries of `leases` leases, so that gathering them never rehashes.
    pub fn with_capacity(leases: usize) -> Self {
        Self {
            neighbours: EntryMap::with_capacity_and_hasher(leases, EntryHasher::default()),
            fdb: EntrySet::with_capacity_and_hasher(leases, EntryHasher::default()),
            routes: EntrySet::with_capacity_and_hasher(leases, EntryHasher::default()),
        }
    }

    /// Adds one lease's `entries` to these.
    pub fn insert(&mut self, entries: &LeaseKernelEntries) {
        self.routes.insert(entries.route);
        self.neighbours.extend(entries.neighbour);
        self.fdb.extend(entries.fdb);
    }
}

/// One lease's share of [`PeerEntries`]: its route, and for a route into the VXLAN device the
/// neighbour entry of the gateway and (where the rules want them) the FDB entry of the VTEP.
/// Held without a set of its own, as there are thousands of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseKernelEntries {
    pub route: Route,
    pub neighbour: Option<(IpAddr, MacAddr)>,
    pub fdb: Option<FdbEntry>,
}

/// What a sink compares the desired entries with before it writes the difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline<'a, T> {
    /// What the kernel holds, listed (netlink dumps, map walks): whatever another hand
    /// changed is put right.
    Listed,
    /// What the last round left, taken as still there without listing: a round about lease
    /// events touches only the entries they change. Another hand's change to a kernel entry
    /// comes as a notification, which calls for a listed round; one to a map entry is put
    /// right by the next listed round (the 30-s safety net at the latest).
    Written(&'a T),
}

impl<'a, T> Baseline<'a, T> {
    /// What the last round wrote, when that is what counts.
    pub fn written(self) -> Option<&'a T> {
        match self {
            Baseline::Listed => None,
            Baseline::Written(written) => Some(written),
        }
    }
}

/// The peer entries the last round that reached them wrote, each family's with its devices:
/// what the notifications of the agent's own writes echo.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenPeers(pub Vec<(FamilyDevices, PeerEntries)>);

impl WrittenPeers {
    /// What the agent owns on `devices`, as last written there.
    pub fn of(&self, devices: FamilyDevices) -> Option<&PeerEntries> {
        self.0
            .iter()
            .find(|(written, _)| *written == devices)
            .map(|(_, entries)| entries)
    }

    /// Records that `entries` are now what the agent owns on `devices`.
    pub fn record(&mut self, devices: FamilyDevices, entries: PeerEntries) {
        match self.0.iter_mut().find(|(written, _)| *written == devices) {
            Some((_, written)) => *written = entries,
            None => self.0.push((devices, entries)),
        }
    }
}

/// The devices one family's peer entries live on: that family's VXLAN device and the uplink,
/// and the overlay network of that family, direct routes into which are ours too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyDevices {
    pub vtep_index: u32,
    pub uplink_index: u32,
    pub network: IpNetwork,
}

/// The subnet and VTEP map entries of the remote leases, each with the lease (or leases)
/// it serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseEntries {
    /// Remote subnet → where its host is (the encapsulators' lookup).
    pub subnets: EntryMap<Ipv4Network, (RemoteVtep, LeaseSubnets)>,
    /// Remote PublicIP → the subnet it may send from (the decapsulators' check).
    pub vteps: EntryMap<[u8; 4], VtepSubnet>,
    /// Remote PublicIPv6 → one of its IPv6 subnets, with every lease of that host: who may
    /// send VXLAN over IPv6 (the uplink's check; inner sources are checked against
    /// `subnets6`).
    pub vteps6: EntryMap<[u8; 16], (VtepSubnet6, Vec<LeaseSubnets>)>,
    /// Remote IPv6 subnet → where its host is over IPv6 (the IPv6 fast path's lookup).
    pub subnets6: EntryMap<Ipv6Network, (RemoteVtep6, LeaseSubnets)>,
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

    /// The entries of these that are keyed by one of `subnets` or `subnets6`, or by a public
    /// address in `vteps` or `vteps6`.
    fn restricted_to(
        &self,
        subnets: &EntrySet<Ipv4Network>,
        subnets6: &EntrySet<Ipv6Network>,
        vteps: &EntrySet<[u8; 4]>,
        vteps6: &EntrySet<[u8; 16]>,
    ) -> LeaseEntries {
        fn picked<K: Copy + Eq + Hash, V: Clone>(
            map: &EntryMap<K, V>,
            keys: &EntrySet<K>,
        ) -> EntryMap<K, V> {
            keys.iter()
                .filter_map(|key| Some((*key, map.get(key)?.clone())))
                .collect()
        }
        LeaseEntries {
            subnets: picked(&self.subnets, subnets),
            vteps: picked(&self.vteps, vteps),
            vteps6: picked(&self.vteps6, vteps6),
            subnets6: picked(&self.subnets6, subnets6),
        }
    }
}

/// The map entries the last round about the leases wrote, every lease's, and the leases that
/// lease events have added, changed or removed since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenLeases {
    pub entries: LeaseEntries,
    pub changed: EntrySet<LeaseSubnets>,
}

impl WrittenLeases {
    /// What a round about lease events compares: the entries of `desired` and those written
    /// that belong to a changed lease or to one of `unslotted` (leases whose entries still
    /// wait for a `peer_traffic` slot), under the PublicIPs they name now and named before.
    /// Every other entry is as written: a lease's entries follow from that lease alone, and
    /// from its PublicIP's reach, which a round about lease events asks about new addresses
    /// only.
    pub fn touched(
        &self,
        desired: &LeaseEntries,
        unslotted: impl Iterator<Item = IpNetwork>,
    ) -> (LeaseEntries, LeaseEntries) {
        let mut subnets = EntrySet::default();
        let mut subnets6 = EntrySet::default();
        let leases = self.changed.iter().flat_map(|lease| {
            let ipv6 = lease.ipv6.map(IpNetwork::V6);
            std::iter::once(IpNetwork::V4(lease.ipv4)).chain(ipv6)
        });
        for lease in leases.chain(unslotted) {
            match lease {
                IpNetwork::V4(subnet) => subnets.insert(subnet),
                IpNetwork::V6(subnet6) => subnets6.insert(subnet6),
            };
        }
        let written = &self.entries;
        let vteps: EntrySet<[u8; 4]> = [desired, written]
            .iter()
            .flat_map(|entries| subnets.iter().filter_map(|key| entries.subnets.get(key)))
            .map(|(remote, _)| remote.public_ip)
            .collect();
        let vteps6: EntrySet<[u8; 16]> = [desired, written]
            .iter()
            .flat_map(|entries| subnets6.iter().filter_map(|key| entries.subnets6.get(key)))
            .map(|(remote6, _)| remote6.public_ipv6)
            .collect();
        let touched =
            |entries: &LeaseEntries| entries.restricted_to(&subnets, &subnets6, &vteps, &vteps6);
        (touched(desired), touched(written))
    }
}

/// How the node reaches other hosts' public addresses, as DirectRouting asks: those on its
/// segment, and those no route leads to, each with the kernel's reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    pub on_link: EntrySet<IpAddr>,
    pub unreachable: EntryMap<IpAddr, String>,
}

/// The lease entries a write left out. A lease missing from any lease map is dropped by the
/// programs (`subnets` carries its traffic out, `vteps` and `vteps6` let its host's traffic
/// in), so no route may lead to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use = "a lease left out of the maps must get no route"]
pub struct Unwritten {
    /// Every lease without its subnet or VTEP entry.
    pub leases: BTreeSet<LeaseSubnets>,
    /// Each full map with how many leases it left out.
    pub full: BTreeMap<&'static str, FullMap>,
    /// Leases whose entry the kernel refused for another reason, with that reason.
    pub refused: BTreeMap<LeaseSubnets, String>,
}

impl Unwritten {
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

/// A lease map with no room for some leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FullMap {
    pub capacity: u32,
    pub leases_left_out: usize,
}

/// `endpoints` slot (the container address's host part in our lease) → the address with its
/// port and MAC: where the decapsulator delivers.
pub type Endpoints = BTreeMap<u32, EndpointSlot>;
/// Container IPv6 address (network order) → its port and MAC.
pub type Endpoints6 = HashMap<[u8; 16], LocalEndpoint>;

/// Where the uplink decapsulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapHook {
    /// tc ingress: keeps GSO superpackets whole and delivers straight into containers.
    Tc,
    /// XDP in front of tc: drops what fails a check before the stack allocates anything.
    Xdp,
}

/// How the uplink's XDP program attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpModeChoice {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

impl XdpModeChoice {
    /// Whether an XDP program running in `mode` is attached as this choice asks. A generic
    /// attachment does not meet `Auto`: the driver may have gained native XDP since.
    pub fn is_met_by(self, mode: XdpAttachMode) -> bool {
        match self {
            XdpModeChoice::Auto | XdpModeChoice::Native => mode == XdpAttachMode::Native,
            XdpModeChoice::Generic => mode == XdpAttachMode::Generic,
        }
    }
}

/// How the XDP program on a device runs, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Native,
    Generic,
}

/// Which interface each program sits on, and the settings they read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub config: OverlayConfig,
    pub uplink: Device,
    pub decap_hook: DecapHook,
    pub xdp_mode: XdpModeChoice,
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

/// Everything the programs are given for the local containers: where they sit, where the
/// decapsulators deliver, and which ports are alive (claims of others are freed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Programs {
    pub placement: Placement,
    pub endpoints: Endpoints,
    pub endpoints6: Endpoints6,
    pub live_ports: BTreeSet<u32>,
}

/// Container ports the fast-path program could not be attached to, by interface index, with
/// why. Such a port would forward its container's frames unchecked.
pub type RefusedPorts = BTreeMap<u32, String>;

/// What the node changes so that no container port forwards unchecked: ports without their
/// program go down (marked as ours), ports that have it again, or need none (kernel mode),
/// come back up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortIsolation {
    pub isolate: RefusedPorts,
    pub restore: BTreeSet<u32>,
}

impl PortIsolation {
    /// The change from the ports already `isolated` to exactly the `refused` ones.
    pub fn between(isolated: &BTreeSet<u32>, refused: &RefusedPorts) -> Self {
        PortIsolation {
            isolate: refused
                .iter()
                .filter(|(port, _)| !isolated.contains(port))
                .map(|(port, why)| (*port, why.clone()))
                .collect(),
            restore: isolated
                .iter()
                .filter(|port| !refused.contains_key(port))
                .copied()
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.isolate.is_empty() && self.restore.is_empty()
    }
}
