//! The eBPF dataplane: loading the embedded object with its maps pinned, attaching the
//! programs through pinned links (so forwarding survives the agent), writing the map entries
//! the reconciler asks for, and reading the counters. This is the reconciler's sink for maps
//! and links ([`DataplaneSink`]): it never looks at netlink.
mod attach;
pub mod collector;
pub mod filters;
pub mod peers;
pub mod pins;
mod program_log;
pub mod refusals;
pub mod strays;
mod sync;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{SchedClassifier, Xdp},
};
use overlay_common::{Counters, OverlayConfig};

pub use crate::model::{DecapHook, XdpModeChoice};
use crate::{
    model::{Baseline, LeaseEntries, Programs, RefusedPorts, Unwritten, WrittenLeases},
    sinks::DataplaneSink,
};
pub use attach::TcAttach;

/// The eBPF object built by `cargo xtask build`, embedded so the agent needs no file at run time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OVERLAY_EBPF_OBJECT"));

pub const UPLINK_TC_PROGRAM: &str = "tc_uplink_ingress";
pub const UPLINK_XDP_PROGRAM: &str = "xdp_uplink";
pub const VTEP_PROGRAM: &str = "tc_vtep_egress";
pub const VTEP_INGRESS_PROGRAM: &str = "tc_vtep_ingress";
pub const CONTAINER_PROGRAM: &str = "tc_container_ingress";
pub const BRIDGE_PROGRAM: &str = "tc_bridge_egress";
/// Every program, each attached through links pinned as `link_<program>_<ifindex>`, in the
/// order they come off a live node ([`pins::remove`]): the guard of the VXLAN sockets first,
/// which would refuse what the kernel decapsulates once the uplink's program is gone.
pub const PROGRAMS: [&str; 6] = [
    VTEP_INGRESS_PROGRAM,
    UPLINK_TC_PROGRAM,
    UPLINK_XDP_PROGRAM,
    VTEP_PROGRAM,
    CONTAINER_PROGRAM,
    BRIDGE_PROGRAM,
];
const CONFIG_MAP: &str = "config";
const COUNTERS_MAP: &str = "counters";
pub const SUBNETS_MAP: &str = "subnets";
pub const VTEPS_MAP: &str = "vteps";
pub const VTEPS6_MAP: &str = "vteps6";
pub const SUBNETS6_MAP: &str = "subnets6";
const ENDPOINTS_MAP: &str = "endpoints";
const ENDPOINTS6_MAP: &str = "endpoints6";
const BOUND_ADDRESSES_MAP: &str = "bound_addresses";
const BOUND_ADDRESSES6_MAP: &str = "bound_addresses6";
const BOUND_MACS_MAP: &str = "bound_macs";
const CLAIMS_PER_PORT_MAP: &str = "claims_per_port";
const CLAIM_CACHE_MAP: &str = "claim_cache";
const ROUTED_FLOWS_MAP: &str = "routed_flows";
const HANDED_FLOWS_MAP: &str = "handed_flows";
const ROUTED_FLOWS6_MAP: &str = "routed_flows6";
const HANDED_FLOWS6_MAP: &str = "handed_flows6";
const FIRST_FRAGMENTS6_MAP: &str = "first_fragments6";
const MONITOR_MAP: &str = "monitor";
const DROP_EVENTS_MAP: &str = "drop_events";
const PEER_TRAFFIC_MAP: &str = "peer_traffic";
const TRACE_MAP: &str = "trace";
/// Every map, each pinned under the pin directory by its own name.
const MAPS: [&str; 22] = [
    CONFIG_MAP,
    COUNTERS_MAP,
    SUBNETS_MAP,
    SUBNETS6_MAP,
    VTEPS_MAP,
    VTEPS6_MAP,
    ENDPOINTS_MAP,
    ENDPOINTS6_MAP,
    BOUND_ADDRESSES_MAP,
    BOUND_ADDRESSES6_MAP,
    BOUND_MACS_MAP,
    CLAIMS_PER_PORT_MAP,
    CLAIM_CACHE_MAP,
    ROUTED_FLOWS_MAP,
    HANDED_FLOWS_MAP,
    ROUTED_FLOWS6_MAP,
    HANDED_FLOWS6_MAP,
    FIRST_FRAGMENTS6_MAP,
    MONITOR_MAP,
    DROP_EVENTS_MAP,
    PEER_TRAFFIC_MAP,
    TRACE_MAP,
];

/// The lease maps, sized at load time by [`LeaseCapacity`].
const LEASE_MAPS: [&str; 4] = [SUBNETS_MAP, SUBNETS6_MAP, VTEPS_MAP, VTEPS6_MAP];

/// How many entries each lease map (`subnets`, `subnets6`, `vteps`, `vteps6`) is created with,
/// one per subnet the network config holds, and how many slots `endpoints` has, one per
/// address of this host's IPv4 lease; each within bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseCapacity {
    leases: u32,
    lease_addresses: u32,
}

impl LeaseCapacity {
    /// Room for records a narrow SubnetMin..SubnetMax leaves out (reservations, say), at a
    /// cost of kilobytes; and for /24 leases.
    pub const MIN: Self = Self {
        leases: 256,
        lease_addresses: 256,
    };
    /// 2^20 slots: a /8 of /28 leases. `vteps` is a preallocated hash of 80 bytes a slot, 80
    /// MiB of kernel memory at this size (`vteps6` allocates per entry); larger networks get
    /// this many too.
    const MAX_LEASES: u32 = 1 << 20;
    /// A /16 lease's addresses, 1 MiB of `endpoints`: a container in a larger lease whose host
    /// part lies beyond is reached through the stack.
    const MAX_LEASE_ADDRESSES: u32 = 1 << 16;

    /// Room for `subnets` leases, raised to [`Self::MIN`]'s or cut to 2^20, of /24s.
    pub fn for_subnets(subnets: u64) -> Self {
        let leases = subnets.clamp(u64::from(Self::MIN.leases), u64::from(Self::MAX_LEASES));
        Self {
            leases: u32::try_from(leases).unwrap_or(Self::MAX_LEASES),
            ..Self::MIN
        }
    }

    /// The same with leases of `addresses` IPv4 addresses, within 1..=2^16.
    pub fn with_lease_addresses(self, addresses: u64) -> Self {
        let addresses = addresses.clamp(1, u64::from(Self::MAX_LEASE_ADDRESSES));
        Self {
            lease_addresses: u32::try_from(addresses).unwrap_or(Self::MAX_LEASE_ADDRESSES),
            ..self
        }
    }

    /// Entries of each lease map.
    pub fn entries(self) -> u32 {
        self.leases
    }

    /// Each lease map's name with the entries it is created with, `peer_traffic`'s and
    /// `endpoints`'.
    fn sized_maps(self) -> [(&'static str, u32); 6] {
        let [subnets, subnets6, vteps, vteps6] = LEASE_MAPS.map(|name| (name, self.leases));
        let peer_traffic = (PEER_TRAFFIC_MAP, peers::slots_for(self));
        let endpoints = (ENDPOINTS_MAP, self.lease_addresses);
        [subnets, subnets6, vteps, vteps6, peer_traffic, endpoints]
    }
}

/// The loaded programs and maps. Links it attached stay pinned when it is dropped.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: attach::Attachments,
    lease_capacity: LeaseCapacity,
    peer_slots: peers::PeerSlots,
}

impl Dataplane {
    /// Loads the object into the kernel and loads (but does not attach) its programs. With
    /// `pin_dir`, every map is pinned there, and maps already pinned there by an earlier run are
    /// reused with their contents, unless their shape (the lease maps' `lease_capacity`
    /// included) is not the one asked for. With `bpf_log`, the programs log every verdict
    /// into the agent's log (see `--bpf-log`); this needs a tokio runtime.
    pub fn load(
        pin_dir: Option<&Path>,
        bpf_log: bool,
        lease_capacity: LeaseCapacity,
    ) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!(
                "this overlay-agent was built without its eBPF object (a check build of a fresh \
                 clone embeds an empty stub): build it with `cargo xtask build`"
            );
        }
        let mut loader = EbpfLoader::new();
        program_log::set_level(&mut loader, bpf_log);
        let sized_maps = lease_capacity.sized_maps();
        for (name, entries) in sized_maps {
            loader.map_max_entries(name, entries);
        }
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!(
                        "cannot create the pin directory {}: is bpffs mounted?",
                        dir.display()
                    )
                })?;
                for replaced in pins::unpin_incompatible_maps(dir, EBPF_OBJECT, &sized_maps)? {
                    log::warn!("replacing a map an older version pinned: {replaced}");
                }
                MAPS.iter().map(|name| (*name, dir.join(name))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let started = Instant::now();
        let mut ebpf = loader.load(EBPF_OBJECT).context(
            "cannot load the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN, BTF support, and \
             pinned maps, if any, from a compatible version)",
        )?;
        log::debug!("maps made in {:?}", started.elapsed());
        let uplink: &mut Xdp = program_mut(&mut ebpf, UPLINK_XDP_PROGRAM)?.try_into()?;
        uplink
            .load()
            .with_context(|| format!("the kernel rejected {UPLINK_XDP_PROGRAM}"))?;
        for name in [
            UPLINK_TC_PROGRAM,
            VTEP_PROGRAM,
            VTEP_INGRESS_PROGRAM,
            CONTAINER_PROGRAM,
            BRIDGE_PROGRAM,
        ] {
            let program: &mut SchedClassifier = program_mut(&mut ebpf, name)?.try_into()?;
            let program_started = Instant::now();
            program
                .load()
                .with_context(|| format!("the kernel rejected {name}"))?;
            log::debug!("{name} verified in {:?}", program_started.elapsed());
        }
        log::debug!("eBPF object loaded in {:?}", started.elapsed());
        if bpf_log {
            program_log::forward(&mut ebpf)?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attached: attach::Attachments::default(),
            lease_capacity,
            peer_slots: peers::PeerSlots::new(peers::slots_for(lease_capacity)),
        })
    }

    /// Writes the settings the programs read on every packet, unless they already are.
    pub fn set_config(&mut self, config: &OverlayConfig) -> Result<()> {
        let mut map: Array<&mut MapData, OverlayConfig> =
            Array::try_from(map_mut(&mut self.ebpf, CONFIG_MAP)?)?;
        if map.get(&0, 0).ok().as_ref() == Some(config) {
            return Ok(());
        }
        map.set(0, config, 0)
            .context("cannot write the dataplane config map")
    }

    /// The uplink's XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn uplink_xdp_program(&self) -> Result<&Xdp> {
        Ok(program(&self.ebpf, UPLINK_XDP_PROGRAM)?.try_into()?)
    }

    /// A tc program by name (`UPLINK_TC_PROGRAM`, `VTEP_PROGRAM`, `CONTAINER_PROGRAM`), e.g.
    /// for BPF_PROG_TEST_RUN.
    pub fn tc_program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(program(&self.ebpf, name)?.try_into()?)
    }

    /// What of ours stays attached: the programs loaded now and the netlink filters made.
    pub fn kept(&self) -> Result<strays::Keep> {
        let programs = PROGRAMS
            .iter()
            .map(|name| Ok(program(&self.ebpf, name)?.info()?.id()))
            .collect::<Result<_>>()?;
        Ok(strays::Keep {
            programs,
            filters: self.filters(),
        })
    }

    /// The counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map: PerCpuArray<&MapData, Counters> = PerCpuArray::try_from(
            self.ebpf
                .map(COUNTERS_MAP)
                .context("object has no counters map")?,
        )?;
        sum_per_cpu(&map)
    }
}

impl DataplaneSink for Dataplane {
    fn write_lease_entries(
        &mut self,
        entries: &LeaseEntries,
        baseline: Baseline<'_, WrittenLeases>,
    ) -> Result<Unwritten> {
        Dataplane::write_lease_entries(self, entries, baseline)
    }

    fn place_programs(&mut self, programs: &Programs) -> Result<RefusedPorts> {
        let refused = self.place(&programs.placement)?;
        self.sync_endpoints(&programs.endpoints, &programs.endpoints6)?;
        self.release_claims_of_gone_ports(&programs.live_ports)?;
        Ok(refused)
    }

    fn remove_stale_lease_entries(
        &mut self,
        entries: &LeaseEntries,
        baseline: Baseline<'_, WrittenLeases>,
    ) -> Result<usize> {
        Dataplane::remove_stale_lease_entries(self, entries, baseline)
    }
}

/// Sums the per-CPU copies of the counters.
pub fn sum_per_cpu(map: &PerCpuArray<&MapData, Counters>) -> Result<Counters> {
    let per_cpu = map.get(&0, 0).context("cannot read the counters map")?;
    let mut total = Counters::default();
    for counters in per_cpu.iter() {
        total.accumulate(counters);
    }
    Ok(total)
}

fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a aya::programs::Program> {
    ebpf.program(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("the eBPF object has no map {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfig;

    fn capacity_of(config: &str) -> u32 {
        let config = NetworkConfig::parse(config).expect("a valid network config");
        LeaseCapacity::for_subnets(config.subnet_count()).entries()
    }

    #[test]
    fn the_lease_maps_hold_every_subnet_of_the_network_within_bounds() {
        let vxlan = r#""Backend": {"Type": "vxlan"}"#;
        // The seed's /16 of /24s: 255 between SubnetMin and SubnetMax, raised to the floor.
        assert_eq!(
            capacity_of(&format!(r#"{{"Network": "10.2.0.0/16", {vxlan}}}"#)),
            256
        );
        assert_eq!(
            capacity_of(&format!(r#"{{"Network": "10.0.0.0/8", {vxlan}}}"#)),
            65535
        );
        assert_eq!(
            capacity_of(&format!(
                r#"{{"Network": "10.0.0.0/8", "SubnetMin": "10.1.0.0", "SubnetMax": "10.8.255.0", {vxlan}}}"#
            )),
            8 * 256,
            "SubnetMin and SubnetMax narrow it"
        );
        assert_eq!(
            capacity_of(&format!(
                r#"{{"Network": "10.0.0.0/8", "SubnetLen": 30, {vxlan}}}"#
            )),
            LeaseCapacity::MAX_LEASES
        );
    }

    #[test]
    fn the_endpoint_map_has_a_slot_for_each_address_of_the_lease_within_bounds() {
        let endpoint_slots = |config: &str| {
            let config = NetworkConfig::parse(config).expect("a valid network config");
            let capacity = LeaseCapacity::for_subnets(config.subnet_count())
                .with_lease_addresses(config.lease_addresses());
            capacity
                .sized_maps()
                .into_iter()
                .find(|(name, _)| *name == ENDPOINTS_MAP)
                .map(|(_, entries)| entries)
        };
        let vxlan = r#""Backend": {"Type": "vxlan"}"#;
        for (network, slots) in [
            (r#""Network": "10.2.0.0/16""#, 256),
            (r#""Network": "10.0.0.0/8", "SubnetLen": 30"#, 4),
            (r#""Network": "10.0.0.0/8", "SubnetLen": 12"#, 1 << 16),
            (
                r#""EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:2::/56""#,
                1,
            ),
        ] {
            assert_eq!(
                endpoint_slots(&format!("{{{network}, {vxlan}}}")),
                Some(slots),
                "{network}"
            );
        }
    }
}
