//! Mirroring remote leases into the subnet and VTEP maps, and local containers into the
//! endpoint map. Entries are written only when they differ: from what the maps hold, read
//! entry by entry, or, in a round about lease events, from what the last round wrote, looking
//! only at the entries of the leases changed since, so that one event costs the syscalls and
//! the lookups of its own entries, not a pass over every lease. The programs bind container
//! addresses and MACs themselves; the agent frees the bindings of ports that are gone.
use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher, Hash},
};

use anyhow::{Context, Result};
use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use overlay_common::{
    CLAIM_CACHE_SLOTS, CachedClaims, EndpointSlot, LocalEndpoint, PeerTraffic, RemoteVtep,
    RemoteVtep6, VtepSubnet, VtepSubnet6,
};

use super::{
    BOUND_ADDRESSES_MAP, BOUND_ADDRESSES6_MAP, BOUND_MACS_MAP, CLAIM_CACHE_MAP,
    CLAIMS_PER_PORT_MAP, Dataplane, ENDPOINTS_MAP, ENDPOINTS6_MAP, PEER_TRAFFIC_MAP, SUBNETS_MAP,
    SUBNETS6_MAP, VTEPS_MAP, VTEPS6_MAP, map_mut,
    peers::{self, Slot},
};
use crate::model::{
    Baseline, Endpoints, Endpoints6, FullMap, LeaseEntries, LeaseSubnets, Unwritten, WrittenLeases,
};

type SubnetMap<'a> = LpmTrie<&'a mut MapData, [u8; 4], RemoteVtep>;
type Subnet6Map<'a> = LpmTrie<&'a mut MapData, [u8; 16], RemoteVtep6>;
type VtepMap<'a> = BpfHashMap<&'a mut MapData, [u8; 4], VtepSubnet>;
type Vtep6Map<'a> = BpfHashMap<&'a mut MapData, [u8; 16], VtepSubnet6>;

/// Notes in `unwritten` that `map` refused the entry `leases` need.
fn note_refusal(
    unwritten: &mut Unwritten,
    map: &'static str,
    capacity: u32,
    leases: &[LeaseSubnets],
    error: &MapError,
) {
    unwritten.leases.extend(leases);
    if is_full(error) {
        let full = unwritten.full.entry(map).or_insert(FullMap {
            capacity,
            leases_left_out: 0,
        });
        full.leases_left_out += leases.len();
    } else {
        for lease in leases {
            unwritten
                .refused
                .insert(*lease, format!("the {map} map refused it: {error}"));
        }
    }
}

/// Whether the kernel refused an update because the map has no room: a hash map says E2BIG,
/// an LPM trie ENOSPC, either ENOMEM when it cannot allocate the element.
fn is_full(error: &MapError) -> bool {
    let MapError::SyscallError(error) = error else {
        return false;
    };
    matches!(
        error.io_error.raw_os_error(),
        Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
    )
}

impl Dataplane {
    /// Writes the lease entries that differ from `baseline` (or hold a fresh slot), as many
    /// as the maps hold; returns what was left out. Call it before the routes to these subnets
    /// are added, so no packet reaches the programs ahead of its entry.
    pub fn write_lease_entries(
        &mut self,
        desired: &LeaseEntries,
        baseline: Baseline<'_, WrittenLeases>,
    ) -> Result<Unwritten> {
        match baseline.written() {
            // A round from the last one's writes adopts nothing: the listed round before it
            // adopted what an earlier run pinned and removed the rest.
            None => {
                self.adopt_pinned_peer_slots(desired)?;
                self.write_differing(desired, None, desired)
            }
            Some(last) => {
                let (wanted, written) = last.touched(desired, self.peer_slots.unslotted());
                self.write_differing(&wanted, Some(&written), desired)
            }
        }
    }

    /// Writes the entries of `desired` that differ from `written`, or without it from what
    /// the maps hold, and those of leases without a slot; returns what was left out. `all`:
    /// every lease's entries, of which those of a host whose VTEP entry is refused are left
    /// out.
    fn write_differing(
        &mut self,
        desired: &LeaseEntries,
        written: Option<&LeaseEntries>,
        all: &LeaseEntries,
    ) -> Result<Unwritten> {
        let capacity = self.lease_capacity.entries();
        let mut unwritten = Unwritten::default();
        let holds_slot = |lease: IpNetwork| self.peer_slots.holds(&lease);
        let subnets_due = due(
            &desired.subnets,
            written.map(|written| &written.subnets),
            |subnet| holds_slot(IpNetwork::V4(*subnet)),
        );
        let subnets6_due = due(
            &desired.subnets6,
            written.map(|written| &written.subnets6),
            |subnet6| holds_slot(IpNetwork::V6(*subnet6)),
        );
        let slots = self.peer_slots_of(
            subnets_due
                .iter()
                .map(|(subnet, _)| IpNetwork::V4(**subnet))
                .chain(
                    subnets6_due
                        .iter()
                        .map(|(subnet6, _)| IpNetwork::V6(**subnet6)),
                ),
        )?;
        // What is due from the last round's writes is written; otherwise what the map holds
        // decides.
        let as_written = written.map(|_| false);
        let mut subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        for (subnet, (remote, lease)) in subnets_due {
            let key = subnet_key(subnet);
            let remote = &RemoteVtep {
                peer: slot_index(&slots, IpNetwork::V4(*subnet)),
                ..*remote
            };
            if must_write(as_written, || subnets.get(&key, 0).ok(), remote)
                && let Err(error) = subnets.insert(&key, remote, 0)
            {
                // Kernels before 6.14 refuse even to replace an entry of a full trie: the old
                // entry must not carry the lease's traffic to where it was. Absent, it cannot
                // be removed, which is as well.
                let _ = subnets.remove(&key);
                note_refusal(&mut unwritten, SUBNETS_MAP, capacity, &[*lease], &error);
            }
        }
        let mut vteps: VtepMap = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS_MAP)?)?;
        let mut refused = Vec::new();
        for (public_ip, vtep_subnet) in &desired.vteps {
            let as_written =
                written.map(|written| written.vteps.get(public_ip) == Some(vtep_subnet));
            if must_write(as_written, || vteps.get(public_ip, 0).ok(), vtep_subnet)
                && let Err(error) = vteps.insert(public_ip, vtep_subnet, 0)
            {
                refused.push((*public_ip, error));
            }
        }
        if !refused.is_empty() {
            let leases_by_host = all.leases_by_host();
            for (public_ip, error) in &refused {
                let leases = leases_by_host.get(public_ip).map_or(&[][..], Vec::as_slice);
                note_refusal(&mut unwritten, VTEPS_MAP, capacity, leases, error);
            }
        }
        let mut vteps6: Vtep6Map = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS6_MAP)?)?;
        for (public_ipv6, entry) in &desired.vteps6 {
            let (vtep_subnet, leases) = entry;
            let as_written = written.map(|written| written.vteps6.get(public_ipv6) == Some(entry));
            if must_write(as_written, || vteps6.get(public_ipv6, 0).ok(), vtep_subnet)
                && let Err(error) = vteps6.insert(public_ipv6, vtep_subnet, 0)
            {
                note_refusal(&mut unwritten, VTEPS6_MAP, capacity, leases, &error);
            }
        }
        let mut subnets6: Subnet6Map = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS6_MAP)?)?;
        for (subnet6, (remote6, lease)) in subnets6_due {
            let key = subnet6_key(subnet6);
            let remote6 = &RemoteVtep6 {
                peer: slot_index(&slots, IpNetwork::V6(*subnet6)),
                ..*remote6
            };
            if must_write(as_written, || subnets6.get(&key, 0).ok(), remote6)
                && let Err(error) = subnets6.insert(&key, remote6, 0)
            {
                // As for `subnets`: the old entry must not carry the lease's traffic on.
                let _ = subnets6.remove(&key);
                note_refusal(&mut unwritten, SUBNETS6_MAP, capacity, &[*lease], &error);
            }
        }
        Ok(unwritten)
    }

    /// Deletes the lease entries `desired` does not hold, of those the maps hold (listed) or
    /// of those the last round left (written); returns how many. Call it after the routes of
    /// removed leases are gone.
    pub fn remove_stale_lease_entries(
        &mut self,
        desired: &LeaseEntries,
        baseline: Baseline<'_, WrittenLeases>,
    ) -> Result<usize> {
        match baseline.written() {
            None => self.remove_missing(desired, None),
            Some(last) => {
                let (wanted, written) = last.touched(desired, self.peer_slots.unslotted());
                self.remove_missing(&wanted, Some(&written))
            }
        }
    }

    /// Deletes the entries `desired` lacks, of those `written` holds, or without it of those
    /// the maps hold; returns how many.
    fn remove_missing(
        &mut self,
        desired: &LeaseEntries,
        written: Option<&LeaseEntries>,
    ) -> Result<usize> {
        // From the last round's writes: the leases written then and not wanted now, whose
        // entries and slots go.
        let gone_leases: Vec<IpNetwork> = written.map_or_else(Vec::new, |written| {
            gone(&written.subnets, &desired.subnets)
                .map(|subnet| IpNetwork::V4(*subnet))
                .chain(
                    gone(&written.subnets6, &desired.subnets6)
                        .map(|subnet6| IpNetwork::V6(*subnet6)),
                )
                .collect()
        });
        let mut subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        let stale = match written {
            None => listed_stale_subnets(&subnets, |key| {
                Ipv4Network::new(key.data().into(), key.prefix_len() as u8)
                    .is_ok_and(|subnet| desired.subnets.contains_key(&subnet))
            }),
            Some(_) => gone_leases
                .iter()
                .filter_map(|lease| match lease {
                    IpNetwork::V4(subnet) => Some(subnet_key(subnet)),
                    IpNetwork::V6(_) => None,
                })
                .collect(),
        };
        let mut removed = remove_each(&stale, |key| subnets.remove(key), SUBNETS_MAP)?;
        let mut vteps: VtepMap = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS_MAP)?)?;
        let stale = match written {
            None => listed_stale(&vteps, &desired.vteps),
            Some(written) => gone(&written.vteps, &desired.vteps).copied().collect(),
        };
        removed += remove_each(&stale, |key| vteps.remove(key), VTEPS_MAP)?;
        let mut vteps6: Vtep6Map = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS6_MAP)?)?;
        let stale = match written {
            None => listed_stale(&vteps6, &desired.vteps6),
            Some(written) => gone(&written.vteps6, &desired.vteps6).copied().collect(),
        };
        removed += remove_each(&stale, |key| vteps6.remove(key), VTEPS6_MAP)?;
        let mut subnets6: Subnet6Map = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS6_MAP)?)?;
        let stale = match written {
            None => listed_stale_subnets(&subnets6, |key| {
                Ipv6Network::new(key.data().into(), key.prefix_len() as u8)
                    .is_ok_and(|subnet6| desired.subnets6.contains_key(&subnet6))
            }),
            Some(_) => gone_leases
                .iter()
                .filter_map(|lease| match lease {
                    IpNetwork::V6(subnet6) => Some(subnet6_key(subnet6)),
                    IpNetwork::V4(_) => None,
                })
                .collect(),
        };
        removed += remove_each(&stale, |key| subnets6.remove(key), SUBNETS6_MAP)?;
        match written {
            None => self.peer_slots.release_unless(|lease| match lease {
                IpNetwork::V4(subnet) => desired.subnets.contains_key(subnet),
                IpNetwork::V6(subnet6) => desired.subnets6.contains_key(subnet6),
            }),
            // Only leases the last round wrote (or this one gave a slot to) hold one.
            Some(_) => self.peer_slots.release(gone_leases),
        }
        Ok(removed)
    }

    /// Lets each desired lease without a slot take the one its pinned entry names, left by
    /// an earlier run, before any slot is given fresh: its counts go on across restarts.
    fn adopt_pinned_peer_slots(&mut self, desired: &LeaseEntries) -> Result<()> {
        let subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        let leases = desired
            .subnets
            .keys()
            .map(|subnet| (IpNetwork::V4(*subnet), subnet_key(subnet)));
        adopt_pinned(&mut self.peer_slots, &subnets, leases, |remote| remote.peer);
        let subnets6: Subnet6Map = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS6_MAP)?)?;
        let leases6 = desired
            .subnets6
            .keys()
            .map(|subnet6| (IpNetwork::V6(*subnet6), subnet6_key(subnet6)));
        adopt_pinned(&mut self.peer_slots, &subnets6, leases6, |remote| {
            remote.peer
        });
        Ok(())
    }

    /// The `peer_traffic` slot of each of `leases`, a fresh one zeroed first; a lease left
    /// without one (every slot taken) is not counted.
    fn peer_slots_of(
        &mut self,
        leases: impl Iterator<Item = IpNetwork>,
    ) -> Result<HashMap<IpNetwork, Slot>> {
        let mut traffic: PerCpuArray<&mut MapData, PeerTraffic> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, PEER_TRAFFIC_MAP)?)?;
        let mut slots = HashMap::new();
        for lease in leases {
            let Some(slot) = self.peer_slots.slot_of(lease) else {
                continue;
            };
            if let Slot::Fresh(fresh) = slot {
                peers::zero(&mut traffic, fresh)?;
            }
            slots.insert(lease, slot);
        }
        Ok(slots)
    }

    /// Makes the endpoint maps hold exactly `endpoints` and `endpoints6` (container address →
    /// where it is).
    pub fn sync_endpoints(&mut self, endpoints: &Endpoints, endpoints6: &Endpoints6) -> Result<()> {
        sync_endpoint_slots(map_mut(&mut self.ebpf, ENDPOINTS_MAP)?, endpoints)?;
        sync_ipv6_endpoints(map_mut(&mut self.ebpf, ENDPOINTS6_MAP)?, endpoints6)
    }
}

/// Makes the `endpoints6` hash hold exactly `endpoints6`.
fn sync_ipv6_endpoints(map: &mut aya::maps::Map, endpoints6: &Endpoints6) -> Result<()> {
    let mut map: BpfHashMap<&mut MapData, [u8; 16], LocalEndpoint> = BpfHashMap::try_from(map)?;
    for (address, endpoint) in endpoints6 {
        if map.get(address, 0).ok().as_ref() != Some(endpoint) {
            map.insert(address, endpoint, 0)
                .with_context(|| format!("cannot write the {ENDPOINTS6_MAP} map"))?;
        }
    }
    remove_stale(map, endpoints6, ENDPOINTS6_MAP)
}

/// Makes each slot of the `endpoints` array hold what `endpoints` puts there, or nothing. A
/// slot that goes from one container to another (an address reused) is emptied first: the
/// kernel copies an array value in place, so a packet that read the slot while it was written
/// could otherwise take the old container's port with the new one's MAC.
fn sync_endpoint_slots(map: &mut aya::maps::Map, endpoints: &Endpoints) -> Result<()> {
    let mut map: Array<&mut MapData, EndpointSlot> = Array::try_from(map)?;
    let empty = EndpointSlot::default();
    for slot in 0..map.len() {
        let wanted = endpoints.get(&slot).copied().unwrap_or_default();
        let held = map
            .get(&slot, 0)
            .with_context(|| format!("cannot read slot {slot} of the {ENDPOINTS_MAP} map"))?;
        if held == wanted {
            continue;
        }
        if held != empty && wanted != empty {
            map.set(slot, empty, 0)
                .with_context(|| format!("cannot empty slot {slot} of the {ENDPOINTS_MAP} map"))?;
        }
        map.set(slot, wanted, 0)
            .with_context(|| format!("cannot write slot {slot} of the {ENDPOINTS_MAP} map"))?;
    }
    let beyond = endpoints.range(map.len()..).count();
    if beyond > 0 {
        log::debug!(
            "{beyond} containers lie beyond the {} slots of {ENDPOINTS_MAP}: the stack delivers to them",
            map.len()
        );
    }
    Ok(())
}

/// Lets each of `leases` (with its key in `trie`) that holds no slot adopt the one its entry
/// in `trie` names (`slot_of` the entry).
fn adopt_pinned<const N: usize, V: aya::Pod>(
    slots: &mut peers::PeerSlots,
    trie: &LpmTrie<&mut MapData, [u8; N], V>,
    leases: impl Iterator<Item = (IpNetwork, Key<[u8; N]>)>,
    slot_of: impl Fn(&V) -> u32,
) {
    for (lease, key) in leases {
        if !slots.holds(&lease)
            && let Ok(pinned) = trie.get(&key, 0)
        {
            slots.adopt(lease, slot_of(&pinned));
        }
    }
}

/// Whether an entry must be written. `as_written`: whether the last round wrote it as wanted,
/// when that is what counts; otherwise, whether the map holds `wanted` (`listed` reads it).
fn must_write<V: PartialEq>(
    as_written: Option<bool>,
    listed: impl FnOnce() -> Option<V>,
    wanted: &V,
) -> bool {
    match as_written {
        Some(as_written) => !as_written,
        None => listed().as_ref() != Some(wanted),
    }
}

/// The entries of `desired` a round may have to write: with the maps listed, every one; from
/// the last round's writes, those it did not write as wanted and those of leases without a
/// slot (`holds_slot`), which get one now that their entries must name.
fn due<'a, K: Eq + Hash, V: PartialEq, S: BuildHasher>(
    desired: &'a HashMap<K, V, S>,
    written: Option<&HashMap<K, V, S>>,
    holds_slot: impl Fn(&K) -> bool,
) -> Vec<(&'a K, &'a V)> {
    desired
        .iter()
        .filter(|(key, value)| {
            written.is_none_or(|written| written.get(key) != Some(value) || !holds_slot(key))
        })
        .collect()
}

/// `lease`'s slot index in `slots`, 0 (uncounted) for a lease without one.
fn slot_index(slots: &HashMap<IpNetwork, Slot>, lease: IpNetwork) -> u32 {
    slots.get(&lease).map_or(0, |slot| slot.index())
}

/// The keys of `written` that `desired` no longer holds.
fn gone<'a, K: Eq + Hash, V, W, S: BuildHasher>(
    written: &'a HashMap<K, V, S>,
    desired: &'a HashMap<K, W, S>,
) -> impl Iterator<Item = &'a K> {
    written.keys().filter(|key| !desired.contains_key(key))
}

/// The subnets of `trie` that are not `desired`, read key by key.
fn listed_stale_subnets<const N: usize, V: aya::Pod>(
    trie: &LpmTrie<&mut MapData, [u8; N], V>,
    desired: impl Fn(&Key<[u8; N]>) -> bool,
) -> Vec<Key<[u8; N]>> {
    trie.keys()
        .filter_map(|key| key.ok())
        .filter(|key| !desired(key))
        .collect()
}

/// The keys of `map` that `desired` lacks, read key by key.
fn listed_stale<K: aya::Pod + Eq + Hash, V: aya::Pod, W, S: BuildHasher>(
    map: &BpfHashMap<&mut MapData, K, V>,
    desired: &HashMap<K, W, S>,
) -> Vec<K> {
    map.keys()
        .filter_map(|key| key.ok())
        .filter(|key| !desired.contains_key(key))
        .collect()
}

/// Deletes each of `keys` from the map `name` through `remove`; returns how many were there.
fn remove_each<K>(
    keys: &[K],
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
    name: &str,
) -> Result<usize> {
    let mut removed = 0;
    for key in keys {
        match remove(key) {
            Ok(()) => removed += 1,
            Err(error) if is_absent(&error) => {}
            Err(error) => {
                return Err(error).with_context(|| format!("cannot delete from the {name} map"));
            }
        }
    }
    Ok(removed)
}

/// Whether a delete found no entry: gone already, by another hand.
fn is_absent(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(error) => error.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Deletes every entry of `map` whose key `desired` lacks.
fn remove_stale<K: aya::Pod + Eq + Hash, V: aya::Pod, W>(
    mut map: BpfHashMap<&mut MapData, K, V>,
    desired: &HashMap<K, W>,
    name: &str,
) -> Result<()> {
    let stale = listed_stale(&map, desired);
    remove_each(&stale, |key| map.remove(key), name).map(drop)
}

impl Dataplane {
    /// Deletes every address (IPv4 and IPv6) and MAC binding of a port not in `live_ports`,
    /// and its count of claims, so that a new container can take an address or MAC a removed
    /// one held.
    pub fn release_claims_of_gone_ports(&mut self, live_ports: &BTreeSet<u32>) -> Result<()> {
        let addresses = map_mut(&mut self.ebpf, BOUND_ADDRESSES_MAP)?;
        release_gone(addresses, live_ports, |_: &[u8; 4], port: &u32| *port)?;
        let addresses6 = map_mut(&mut self.ebpf, BOUND_ADDRESSES6_MAP)?;
        release_gone(addresses6, live_ports, |_: &[u8; 16], port: &u32| *port)?;
        let macs = map_mut(&mut self.ebpf, BOUND_MACS_MAP)?;
        release_gone(macs, live_ports, |_: &[u8; 6], port: &u32| *port)?;
        let counts = map_mut(&mut self.ebpf, CLAIMS_PER_PORT_MAP)?;
        let gone = release_gone(counts, live_ports, |port: &u32, _: &u64| *port)?;
        let cache = map_mut(&mut self.ebpf, CLAIM_CACHE_MAP)?;
        clear_cached_claims(cache, &gone)
    }
}

/// Empties the claim cache's slots of the `gone` ports, on every CPU: a port that reused one's
/// index could otherwise pass on its claims.
fn clear_cached_claims(map: &mut aya::maps::Map, gone: &[u32]) -> Result<()> {
    let mut cache: PerCpuArray<&mut MapData, CachedClaims> = PerCpuArray::try_from(map)?;
    for &port in gone {
        let slot = port % CLAIM_CACHE_SLOTS;
        let copies = cache.get(&slot, 0).context("cannot read the claim cache")?;
        if copies.iter().all(|cached| cached.port != port) {
            continue;
        }
        let cleared: Vec<CachedClaims> = copies
            .iter()
            .map(|cached| {
                if cached.port == port {
                    CachedClaims::default()
                } else {
                    *cached
                }
            })
            .collect();
        let values = PerCpuValues::try_from(cleared).context("cannot size the claim cache")?;
        cache
            .set(slot, values, 0)
            .context("cannot clear a gone port's cached claims")?;
    }
    Ok(())
}

/// Deletes every entry of `map` whose port (as `port_of` its key and value says) is not in
/// `live_ports`; returns those ports.
fn release_gone<K: aya::Pod + Eq + Hash, V: aya::Pod>(
    map: &mut aya::maps::Map,
    live_ports: &BTreeSet<u32>,
    port_of: impl Fn(&K, &V) -> u32,
) -> Result<Vec<u32>> {
    let mut bindings: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
    let gone: Vec<(K, u32)> = bindings
        .iter()
        .filter_map(|entry| entry.ok())
        .map(|(key, value)| {
            let port = port_of(&key, &value);
            (key, port)
        })
        .filter(|(_, port)| !live_ports.contains(port))
        .collect();
    for (key, _) in &gone {
        bindings
            .remove(key)
            .context("cannot release a gone port's binding")?;
    }
    Ok(gone.into_iter().map(|(_, port)| port).collect())
}

fn subnet6_key(subnet: &Ipv6Network) -> Key<[u8; 16]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}

fn subnet_key(subnet: &Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}
