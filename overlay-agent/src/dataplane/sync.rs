//! Mirroring remote leases into the subnet and VTEP maps, and local containers into the
//! endpoint map. Entries are written only when they differ, so a steady state costs lookups,
//! not updates.
use anyhow::{Context, Result};
use aya::maps::{
    HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use ipnetwork::Ipv4Network;
use overlay_common::{LocalEndpoint, RemoteVtep, VtepSubnet};

use super::{Dataplane, ENDPOINTS_MAP, SUBNETS_MAP, VTEPS_MAP, map_mut};
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

fn subnet_key(subnet: &Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.network().octets())
}
