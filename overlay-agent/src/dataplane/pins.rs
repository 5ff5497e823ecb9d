//! The dataplane as it stands pinned in bpffs, read or removed without loading anything:
//! for `overlay-agent status`, `monitor`, `teardown` and the metrics.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::maps::{
    Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf, lpm_trie::LpmTrie,
};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_common::{
    Counters, EndpointSlot, FlowKey, OverlayConfig, PeerTraffic, RemoteVtep, RemoteVtep6,
    RoutedFlow, TRACE_IPV4, TRACE_IPV6, Trace, VtepSubnet, VtepSubnet6,
};

use super::{
    CONFIG_MAP, COUNTERS_MAP, DROP_EVENTS_MAP, ENDPOINTS_MAP, MAPS, MONITOR_MAP, PEER_TRAFFIC_MAP,
    PROGRAMS, ROUTED_FLOWS_MAP, SUBNETS_MAP, SUBNETS6_MAP, TRACE_MAP, VTEPS_MAP, VTEPS6_MAP, peers,
    sum_per_cpu,
};

/// The directory under the pins that a monitor holds an advisory lock on while it runs. The
/// lock goes with the process however it ends (SIGKILL, say, which leaves the reports on), so
/// reports found on with the lock free have no reader, and the agent turns them off.
const MONITOR_LOCK_DIR: &str = "monitor-lock";
/// Tries at taking the monitor lock: the agent holds it for a moment while it looks.
const MONITOR_LOCK_TRIES: usize = 5;
const MONITOR_LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// While alive, the programs report to the `drop_events` ring buffer every drop, or with a
/// trace every packet to or from the traced prefix.
pub struct MonitorSwitch {
    drops: Array<MapData, u32>,
    trace: Array<MapData, Trace>,
    /// Released after `drop` has turned the reports off.
    _lock: std::fs::File,
}

impl Drop for MonitorSwitch {
    fn drop(&mut self) {
        if let Err(error) = self.drops.set(0, 0, 0) {
            log::warn!("cannot turn the drop reports off: {error}");
        }
        if let Err(error) = self.trace.set(0, Trace::default(), 0) {
            log::warn!("cannot turn the trace off: {error}");
        }
    }
}

/// The `trace` entry that asks for `prefix`, set by this process.
fn trace_of(prefix: Option<IpNetwork>) -> Trace {
    let monitor_pid = std::process::id();
    let Some(prefix) = prefix else {
        return Trace {
            monitor_pid,
            ..Trace::default()
        };
    };
    let (family, address) = match prefix.network() {
        IpAddr::V4(network) => {
            let mut address = [0; 16];
            address[..4].copy_from_slice(&network.octets());
            (TRACE_IPV4, address)
        }
        IpAddr::V6(network) => (TRACE_IPV6, network.octets()),
    };
    Trace {
        monitor_pid,
        family,
        prefix_len: prefix.prefix(),
        reserved: 0,
        address,
    }
}

/// How many entries one map holds, of how many it can.
#[derive(Clone, Debug)]
pub struct MapOccupancy {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// What this host exchanged with one remote lease: its host's public address (PublicIP, or
/// PublicIPv6 for an IPv6 lease), the lease's subnet, and the traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    pub peer: IpAddr,
    pub subnet: IpNetwork,
    pub traffic: PeerTraffic,
}

pub struct PinnedDataplane {
    dir: PathBuf,
}

impl PinnedDataplane {
    /// Whether an agent in ebpf mode pinned its dataplane under `dir`.
    pub fn is_pinned(dir: &Path) -> bool {
        dir.join(COUNTERS_MAP).exists()
    }

    pub fn open(dir: &Path) -> Result<Self> {
        if !Self::is_pinned(dir) {
            anyhow::bail!("no dataplane is pinned under {}", dir.display());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn map_data(&self, name: &str) -> Result<MapData> {
        let path = self.dir.join(name);
        MapData::from_pin(&path)
            .with_context(|| format!("cannot open the pinned map {}", path.display()))
    }

    fn map(&self, name: &str) -> Result<Map> {
        Ok(Map::from_map_data(self.map_data(name)?)?)
    }

    pub fn counters(&self) -> Result<Counters> {
        sum_per_cpu(&PerCpuArray::try_from(&self.map(COUNTERS_MAP)?)?)
    }

    pub fn subnet_entries(&self) -> Result<HashMap<Ipv4Network, RemoteVtep>> {
        self.subnet_map(SUBNETS_MAP, |address, prefix| {
            Ipv4Network::new(address.into(), prefix)
        })
    }

    /// Every remote IPv6 subnet in the IPv6 subnet map, with where its host is.
    pub fn ipv6_subnet_entries(&self) -> Result<HashMap<Ipv6Network, RemoteVtep6>> {
        self.subnet_map(SUBNETS6_MAP, |address, prefix| {
            Ipv6Network::new(address.into(), prefix)
        })
    }

    /// The entries of the LPM trie `name`, keyed by the subnets `network` makes of them.
    fn subnet_map<const N: usize, V: aya::Pod, Network: Eq + Hash>(
        &self,
        name: &str,
        network: impl Fn([u8; N], u8) -> Result<Network, ipnetwork::IpNetworkError>,
    ) -> Result<HashMap<Network, V>> {
        let map = self.map(name)?;
        let trie: LpmTrie<&MapData, [u8; N], V> = LpmTrie::try_from(&map)?;
        trie.iter()
            .map(|entry| {
                let (key, value) = entry.with_context(|| format!("cannot read the {name} map"))?;
                let subnet = network(key.data(), key.prefix_len() as u8)
                    .with_context(|| format!("the {name} map holds a bad prefix"))?;
                Ok((subnet, value))
            })
            .collect()
    }

    /// The traffic of every remote lease with a `peer_traffic` slot, IPv4 then IPv6, each
    /// by subnet.
    pub fn peer_traffic(&self) -> Result<Vec<PeerRecord>> {
        let map = self.map(PEER_TRAFFIC_MAP)?;
        let traffic: PerCpuArray<&MapData, PeerTraffic> = PerCpuArray::try_from(&map)?;
        let mut ipv4: Vec<_> = self.subnet_entries()?.into_iter().collect();
        ipv4.sort_by_key(|(subnet, _)| *subnet);
        let mut ipv6: Vec<_> = self.ipv6_subnet_entries()?.into_iter().collect();
        ipv6.sort_by_key(|(subnet, _)| *subnet);
        let ipv4 = ipv4.into_iter().map(|(subnet, remote)| {
            let peer = IpAddr::from(remote.public_ip);
            (peer, IpNetwork::V4(subnet), remote.peer)
        });
        let ipv6 = ipv6.into_iter().map(|(subnet, remote)| {
            let peer = IpAddr::from(remote.public_ipv6);
            (peer, IpNetwork::V6(subnet), remote.peer)
        });
        ipv4.chain(ipv6)
            .filter(|(_, _, slot)| *slot != 0)
            .map(|(peer, subnet, slot)| {
                Ok(PeerRecord {
                    peer,
                    subnet,
                    traffic: peers::summed(&traffic, slot)?,
                })
            })
            .collect()
    }

    /// The PublicIP of every host in the VTEP map.
    pub fn vtep_addresses(&self) -> Result<HashSet<Ipv4Addr>> {
        let map = self.map(VTEPS_MAP)?;
        let vteps: BpfHashMap<&MapData, [u8; 4], VtepSubnet> = BpfHashMap::try_from(&map)?;
        vteps
            .keys()
            .map(|key| Ok(Ipv4Addr::from(key.context("cannot read the VTEP map")?)))
            .collect()
    }

    /// Every host's PublicIPv6 in the IPv6 VTEP map, with the IPv6 subnet its entry names.
    pub fn ipv6_vtep_entries(&self) -> Result<HashMap<Ipv6Addr, Ipv6Network>> {
        let map = self.map(VTEPS6_MAP)?;
        let vteps: BpfHashMap<&MapData, [u8; 16], VtepSubnet6> = BpfHashMap::try_from(&map)?;
        vteps
            .iter()
            .map(|entry| {
                let (address, vtep) = entry.context("cannot read the IPv6 VTEP map")?;
                let subnet = Ipv6Network::new(vtep.subnet.into(), vtep.prefix_len as u8)
                    .context("the IPv6 VTEP map holds a bad prefix")?;
                Ok((address.into(), subnet))
            })
            .collect()
    }

    /// The settings the programs read.
    pub fn config(&self) -> Result<OverlayConfig> {
        let map = self.map(CONFIG_MAP)?;
        let config: Array<&MapData, OverlayConfig> = Array::try_from(&map)?;
        config.get(&0, 0).context("cannot read the config map")
    }

    /// Turns the programs' drop reports on, or with `trace` the reports of every packet to or
    /// from that prefix, and returns the ring buffer they arrive in; the reports stop when the
    /// returned switch is dropped. One monitor at a time: refused while another holds the
    /// monitor lock.
    pub fn monitor(&self, trace: Option<IpNetwork>) -> Result<(RingBuf<MapData>, MonitorSwitch)> {
        let events = RingBuf::try_from(self.map(DROP_EVENTS_MAP)?)?;
        let lock = self.monitor_lock()?;
        if !take_lock(&lock, MONITOR_LOCK_TRIES).context("cannot take the monitor lock")? {
            bail!(
                "another monitor{} is reading the reports of {}; one monitor at a time",
                lock_holder(&lock).map_or(String::new(), |pid| format!(" (pid {pid})")),
                self.dir.display()
            );
        }
        let mut traced: Array<MapData, Trace> = Array::try_from(self.map(TRACE_MAP)?)?;
        let drops: Array<MapData, u32> = Array::try_from(self.map(MONITOR_MAP)?)?;
        traced
            .set(0, trace_of(trace), 0)
            .context("cannot set the trace")?;
        let mut switch = MonitorSwitch {
            drops,
            trace: traced,
            _lock: lock,
        };
        if trace.is_none() {
            switch
                .drops
                .set(0, 1, 0)
                .context("cannot turn the drop reports on")?;
        }
        Ok((events, switch))
    }

    /// Turns the programs' reports off if they are on while no monitor holds the lock: its
    /// process ended without turning them off. Returns, if it did, the pid the `trace` entry
    /// names, if any. The lock is held meanwhile, so a monitor starting now waits for it.
    pub fn end_reports_without_monitor(&self) -> Result<Option<Option<u32>>> {
        let lock = self.monitor_lock()?;
        if !take_lock(&lock, 1).context("cannot take the monitor lock")? {
            return Ok(None);
        }
        let mut traced: Array<MapData, Trace> = Array::try_from(self.map(TRACE_MAP)?)?;
        let mut drops: Array<MapData, u32> = Array::try_from(self.map(MONITOR_MAP)?)?;
        let trace = traced.get(&0, 0).context("cannot read the trace map")?;
        let reporting = drops.get(&0, 0).context("cannot read the monitor switch")?;
        if trace == Trace::default() && reporting == 0 {
            return Ok(None);
        }
        drops
            .set(0, 0, 0)
            .context("cannot turn the drop reports off")?;
        traced
            .set(0, Trace::default(), 0)
            .context("cannot turn the trace off")?;
        Ok(Some((trace.monitor_pid != 0).then_some(trace.monitor_pid)))
    }

    /// The monitor lock's directory, opened (and made, the first time).
    fn monitor_lock(&self) -> Result<std::fs::File> {
        let dir = self.dir.join(MONITOR_LOCK_DIR);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::File::open(&dir))
            .with_context(|| format!("cannot open the monitor lock {}", dir.display()))
    }

    /// How full each lease, endpoint and flow map is.
    pub fn occupancy(&self) -> Result<Vec<MapOccupancy>> {
        let (subnets, subnets6, vteps, vteps6, endpoints, routed_flows) = (
            self.map(SUBNETS_MAP)?,
            self.map(SUBNETS6_MAP)?,
            self.map(VTEPS_MAP)?,
            self.map(VTEPS6_MAP)?,
            self.map(ENDPOINTS_MAP)?,
            self.map(ROUTED_FLOWS_MAP)?,
        );
        let counts = [
            (
                SUBNETS_MAP,
                LpmTrie::<_, [u8; 4], RemoteVtep>::try_from(&subnets)?
                    .keys()
                    .count(),
            ),
            (
                SUBNETS6_MAP,
                LpmTrie::<_, [u8; 16], RemoteVtep6>::try_from(&subnets6)?
                    .keys()
                    .count(),
            ),
            (
                VTEPS_MAP,
                BpfHashMap::<_, [u8; 4], VtepSubnet>::try_from(&vteps)?
                    .keys()
                    .count(),
            ),
            (
                VTEPS6_MAP,
                BpfHashMap::<_, [u8; 16], VtepSubnet6>::try_from(&vteps6)?
                    .keys()
                    .count(),
            ),
            (
                ENDPOINTS_MAP,
                Array::<_, EndpointSlot>::try_from(&endpoints)?
                    .iter()
                    .try_fold(0, |held, slot| {
                        slot.map(|slot| held + usize::from(slot.endpoint.ifindex != 0))
                    })
                    .with_context(|| format!("cannot read the {ENDPOINTS_MAP} map"))?,
            ),
            (
                ROUTED_FLOWS_MAP,
                BpfHashMap::<_, FlowKey, RoutedFlow>::try_from(&routed_flows)?
                    .keys()
                    .count(),
            ),
        ];
        counts
            .into_iter()
            .map(|(name, entries)| {
                let capacity = self
                    .map_data(name)?
                    .info()
                    .with_context(|| format!("cannot read the {name} map's info"))?
                    .max_entries();
                Ok(MapOccupancy {
                    name,
                    entries,
                    capacity,
                })
            })
            .collect()
    }

    /// (program, interface index) of every pinned link, sorted.
    pub fn links(&self) -> Result<Vec<(&'static str, u32)>> {
        let mut links = Vec::new();
        for entry in std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.dir.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            for program in PROGRAMS {
                let ifindex = name
                    .strip_prefix(&format!("link_{program}_"))
                    .and_then(|ifindex| ifindex.parse().ok());
                if let Some(ifindex) = ifindex {
                    links.push((program, ifindex));
                }
            }
        }
        links.sort();
        Ok(links)
    }
}

/// Unpins every map under `dir` whose shape (type, key size, value size, capacity) differs from
/// the one `object` defines, with the capacities in `sized` (map name, entries) in place of
/// the object's: a pin an older version left, or one made for another network config.
/// Adopted as it is, such a map makes the verifier reject the programs (a smaller value),
/// lets lookups overrun their buffer (a larger one) or holds another number of leases than
/// the network calls for. Programs still attached keep the old map until their links take the
/// new programs; the new map starts empty and is filled as at a first start (a replaced
/// `counters` map counts from zero). Returns a description of each map replaced.
pub fn unpin_incompatible_maps(
    dir: &Path,
    object: &[u8],
    sized: &[(&str, u32)],
) -> Result<Vec<String>> {
    let object = aya_obj::Object::parse(object).context("cannot parse the eBPF object")?;
    let mut replaced = Vec::new();
    for name in MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let wanted = object
            .maps
            .get(name)
            .with_context(|| format!("the eBPF object has no map {name}"))?;
        let pinned = MapData::from_pin(&path)
            .and_then(|map| map.info())
            .with_context(|| format!("cannot read the pinned map {}", path.display()))?;
        let pinned_shape = Shape {
            map_type: pinned.map_type().map_or(u32::MAX, |kind| kind as u32),
            key_size: pinned.key_size(),
            value_size: pinned.value_size(),
            max_entries: pinned.max_entries(),
        };
        let wanted_shape = Shape {
            map_type: wanted.map_type(),
            key_size: wanted.key_size(),
            value_size: wanted.value_size(),
            max_entries: sized
                .iter()
                .find(|(sized_name, _)| *sized_name == name)
                .map_or(wanted.max_entries(), |(_, entries)| *entries),
        };
        if pinned_shape == wanted_shape {
            continue;
        }
        remove_map_pin(&path)?;
        replaced.push(format!(
            "{}: pinned {pinned_shape}, this version's {wanted_shape}",
            path.display()
        ));
    }
    Ok(replaced)
}

/// Unpins the map pinned at `path`, if any; the map lives on while a program holds it.
pub fn remove_map_pin(path: &Path) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("cannot unpin {}", path.display()))?;
    }
    Ok(())
}

/// What must agree between a pinned map and the object's definition of it.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The pin directory in the host's network namespace when `--bpf-pin-dir` is not given.
const HOST_DEFAULT_DIR: &str = "/sys/fs/bpf/overlay";

/// Where the dataplane is pinned when `--bpf-pin-dir` is not given. bpffs is one for the
/// whole machine, and link pins are named by interface index, which each namespace numbers
/// on its own: so an agent in any namespace but the host's pins under its namespace's inode.
pub fn default_dir() -> Result<PathBuf> {
    if in_initial_netns() {
        return Ok(PathBuf::from(HOST_DEFAULT_DIR));
    }
    use std::os::unix::fs::MetadataExt;
    let namespace = Path::new("/proc/self/ns/net");
    let inode = std::fs::metadata(namespace)
        .with_context(|| format!("cannot read {}", namespace.display()))?
        .ino();
    Ok(PathBuf::from(format!("{HOST_DEFAULT_DIR}-netns-{inode}")))
}

/// Whether this process runs in the machine's initial network namespace. The kernel registers
/// the global net.core sysctls, netdev_max_backlog among them, in that namespace only; pid 1's
/// namespace is not always ours to read.
fn in_initial_netns() -> bool {
    Path::new("/proc/sys/net/core/netdev_max_backlog").exists()
}

/// The pin directory, held by this process alone while the lock lives: two agents on one
/// set of pins would detach each other's programs and overwrite each other's maps.
#[derive(Debug)]
pub struct PinDirLock {
    /// The lock goes with the descriptor.
    _directory: std::fs::File,
}

impl PinDirLock {
    /// Creates `dir` if need be and locks it (an advisory lock on the directory itself:
    /// bpffs holds no regular files), or names the process that holds it.
    pub fn take(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the pin directory {}: is bpffs mounted?",
                dir.display()
            )
        })?;
        let file = std::fs::File::open(dir)
            .with_context(|| format!("cannot open the pin directory {}", dir.display()))?;
        if !take_lock(&file, 1).with_context(|| format!("cannot lock {}", dir.display()))? {
            bail!(
                "the pin directory {} is in use by another overlay-agent{}: run one agent per \
                 pin directory (in another network namespace, leave --bpf-pin-dir unset or \
                 give it a directory of its own)",
                dir.display(),
                lock_holder(&file).map_or(String::new(), |pid| format!(" (pid {pid})"))
            );
        }
        Ok(Self { _directory: file })
    }
}

/// Locks `file` (for as long as it stays open); false if another holds its lock through
/// `tries` tries.
fn take_lock(file: &std::fs::File, tries: usize) -> std::io::Result<bool> {
    for attempt in 1..=tries {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(std::fs::TryLockError::WouldBlock) if attempt < tries => {
                std::thread::sleep(MONITOR_LOCK_RETRY);
            }
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
    }
    Ok(false)
}

/// The pid holding a lock on `file`'s inode, as /proc/locks lists it ("1: FLOCK  ADVISORY
/// WRITE <pid> <major>:<minor>:<inode> 0 EOF").
fn lock_holder(file: &std::fs::File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let inode = file.metadata().ok()?.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let held = fields.get(5)?.rsplit(':').next()? == inode;
        held.then(|| fields.get(4)?.parse().ok()).flatten()
    })
}

/// Unpins every link (detaching its program) and map under `dir`, then removes `dir`.
pub fn remove(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for program in PROGRAMS {
        super::attach::remove_link_pins(dir, program, &Default::default())?;
    }
    for map in MAPS {
        remove_map_pin(&dir.join(map))?;
    }
    let monitor_lock = dir.join(MONITOR_LOCK_DIR);
    if monitor_lock.exists() {
        std::fs::remove_dir(&monitor_lock)
            .with_context(|| format!("cannot remove {}", monitor_lock.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("cannot remove {}", dir.display()))
}
