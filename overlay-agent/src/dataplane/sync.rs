//! Mirroring remote leases into the subnet and VTEP maps, and local containers into the
//! endpoint map. Entries are written only when they differ, so a steady state costs lookups,
//! not updates. The programs bind container addresses and MACs themselves; the agent frees
//! the bindings of ports that are gone.
use std::{collections::HashSet, hash::Hash};

use anyhow::{Context, Result};
use aya::maps::{
    HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnetwork::Ipv4Network;
use overlay_common::{LocalEndpoint, RemoteVtep, VtepSubnet};

use super::{
    BOUND_ADDRESSES_MAP, BOUND_MACS_MAP, Dataplane, ENDPOINTS_MAP, SUBNETS_MAP, VTEPS_MAP, map_mut,
};
use crate::reconcile::desired::{Endpoints, LeaseEntries};

type SubnetMap<'a> = LpmTrie<&'a mut MapData, [u8; 4], RemoteVtep>;
type VtepMap<'a> = BpfHashMap<&'a mut MapData, [u8; 4], VtepSubnet>;
type EndpointMap<'a> = BpfHashMap<&'a mut MapData, [u8; 4], LocalEndpoint>;

impl Dataplane {
    /// Writes the lease entries that are missing or differ. Call it before the routes to
    /// these subnets are added, so no packet reaches the programs ahead of its entry.
    pub fn write_lease_entries(&mut self, desired: &LeaseEntries) -> Result<()> {
        let mut subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        for (subnet, remote) in &desired.subnets {
            let key = subnet_key(subnet);
            if subnets.get(&key, 0).ok().as_ref() != Some(remote) {
                subnets
                    .insert(&key, remote, 0)
                    .context("cannot write the subnet map")?;
            }
        }
        let mut vteps: VtepMap = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS_MAP)?)?;
        for (public_ip, vtep_subnet) in &desired.vteps {
            if vteps.get(public_ip, 0).ok().as_ref() != Some(vtep_subnet) {
                vteps
                    .insert(public_ip, vtep_subnet, 0)
                    .context("cannot write the VTEP map")?;
            }
        }
        Ok(())
    }

    /// Deletes the lease entries `desired` does not hold. Call it after the routes of removed
    /// leases are gone.
    pub fn remove_stale_lease_entries(&mut self, desired: &LeaseEntries) -> Result<()> {
        let mut subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        let stale: Vec<Key<[u8; 4]>> = subnets
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| {
                Ipv4Network::new(key.data().into(), key.prefix_len() as u8)
                    .map_or(true, |subnet| !desired.subnets.contains_key(&subnet))
            })
            .collect();
        for key in &stale {
            subnets
                .remove(key)
                .context("cannot delete from the subnet map")?;
        }
        let mut vteps: VtepMap = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS_MAP)?)?;
        let stale: Vec<[u8; 4]> = vteps
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| !desired.vteps.contains_key(key))
            .collect();
        for key in &stale {
            vteps
                .remove(key)
                .context("cannot delete from the VTEP map")?;
        }
        Ok(())
    }

    /// Makes the endpoint map hold exactly `endpoints` (container address → where it is).
    pub fn sync_endpoints(&mut self, endpoints: &Endpoints) -> Result<()> {
        let mut map: EndpointMap = BpfHashMap::try_from(map_mut(&mut self.ebpf, ENDPOINTS_MAP)?)?;
        for (address, endpoint) in endpoints {
            if map.get(address, 0).ok().as_ref() != Some(endpoint) {
                map.insert(address, endpoint, 0)
                    .context("cannot write the endpoint map")?;
            }
        }
        let stale: Vec<[u8; 4]> = map
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| !endpoints.contains_key(key))
            .collect();
        for key in &stale {
            map.remove(key)
                .context("cannot delete from the endpoint map")?;
        }
        Ok(())
    }
}

impl Dataplane {
    /// Deletes every address and MAC binding of a port not in `live_ports`, so that a new
    /// container can take an address or MAC a removed one held.
    pub fn release_claims_of_gone_ports(&mut self, live_ports: &HashSet<u32>) -> Result<()> {
        release_gone::<[u8; 4]>(map_mut(&mut self.ebpf, BOUND_ADDRESSES_MAP)?, live_ports)?;
        release_gone::<[u8; 6]>(map_mut(&mut self.ebpf, BOUND_MACS_MAP)?, live_ports)
    }
}

fn release_gone<K: aya::Pod + Eq + Hash>(
    map: &mut aya::maps::Map,
    live_ports: &HashSet<u32>,
) -> Result<()> {
    let mut bindings: BpfHashMap<&mut MapData, K, u32> = BpfHashMap::try_from(map)?;
    let gone: Vec<K> = bindings
        .iter()
        .filter_map(|entry| entry.ok())
        .filter(|(_, port)| !live_ports.contains(port))
        .map(|(key, _)| key)
        .collect();
    for key in &gone {
        bindings
            .remove(key)
            .context("cannot release a gone port's binding")?;
    }
    Ok(())
}

fn subnet_key(subnet: &Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}
