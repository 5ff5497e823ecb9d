//! Mirroring remote leases into the subnet and VTEP maps, and local containers into the
//! endpoint map. Entries are written only when they differ, so a steady state costs lookups,
//! not updates.
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use aya::maps::{
    HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use overlay_common::{LocalEndpoint, RemoteVtep, VtepSubnet};

use super::{Dataplane, ENDPOINTS_MAP, SUBNETS_MAP, VTEPS_MAP, map_mut};
use crate::subnet::Lease;

type SubnetMap<'a> = LpmTrie<&'a mut MapData, [u8; 4], RemoteVtep>;
type VtepMap<'a> = BpfHashMap<&'a mut MapData, [u8; 4], VtepSubnet>;
type EndpointMap<'a> = BpfHashMap<&'a mut MapData, [u8; 4], LocalEndpoint>;

/// The map entries one remote lease calls for.
struct Entries {
    subnet: Key<[u8; 4]>,
    remote: RemoteVtep,
    public_ip: [u8; 4],
    vtep_subnet: VtepSubnet,
}

fn entries(lease: &Lease) -> Option<Entries> {
    let mac = lease.attrs.vtep_mac()?;
    let subnet = lease.subnet.network().octets();
    let public_ip = lease.attrs.public_ip.octets();
    Some(Entries {
        subnet: Key::new(u32::from(lease.subnet.prefix()), subnet),
        remote: RemoteVtep {
            public_ip,
            mac: mac.0,
            reserved: 0,
        },
        public_ip,
        vtep_subnet: VtepSubnet {
            subnet,
            prefix_len: u32::from(lease.subnet.prefix()),
        },
    })
}

impl Dataplane {
    /// Writes the entries of `leases` that are missing or differ. Call it before the routes to
    /// these subnets are added, so no packet reaches the programs ahead of its entry.
    pub fn upsert_leases<'a>(&mut self, leases: impl Iterator<Item = &'a Lease>) -> Result<()> {
        let desired: Vec<Entries> = leases.filter_map(entries).collect();
        let mut subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        for entry in &desired {
            if subnets.get(&entry.subnet, 0).ok() != Some(entry.remote) {
                subnets
                    .insert(&entry.subnet, entry.remote, 0)
                    .context("cannot write the subnet map")?;
            }
        }
        let mut vteps: VtepMap = BpfHashMap::try_from(map_mut(&mut self.ebpf, VTEPS_MAP)?)?;
        for entry in &desired {
            if vteps.get(&entry.public_ip, 0).ok() != Some(entry.vtep_subnet) {
                vteps
                    .insert(entry.public_ip, entry.vtep_subnet, 0)
                    .context("cannot write the VTEP map")?;
            }
        }
        Ok(())
    }

    /// Deletes the entries no lease in `leases` calls for. Call it after the routes of
    /// removed leases are gone.
    pub fn remove_stale<'a>(&mut self, leases: impl Iterator<Item = &'a Lease>) -> Result<()> {
        let desired: Vec<Entries> = leases.filter_map(entries).collect();
        let wanted_subnets: HashSet<(u32, [u8; 4])> = desired
            .iter()
            .map(|entry| (entry.subnet.prefix_len(), entry.subnet.data()))
            .collect();
        let wanted_vteps: HashSet<[u8; 4]> = desired.iter().map(|entry| entry.public_ip).collect();

        let mut subnets: SubnetMap = LpmTrie::try_from(map_mut(&mut self.ebpf, SUBNETS_MAP)?)?;
        let stale: Vec<Key<[u8; 4]>> = subnets
            .keys()
            .filter_map(|key| key.ok())
            .filter(|key| !wanted_subnets.contains(&(key.prefix_len(), key.data())))
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
            .filter(|key| !wanted_vteps.contains(key))
            .collect();
        for key in &stale {
            vteps
                .remove(key)
                .context("cannot delete from the VTEP map")?;
        }
        Ok(())
    }

    /// Makes the endpoint map hold exactly `endpoints` (container address → where it is).
    pub fn sync_endpoints(&mut self, endpoints: &HashMap<[u8; 4], LocalEndpoint>) -> Result<()> {
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
