//! Applying a [`Desired`] through the sinks, in the one order that keeps every packet on a
//! path the programs know: the lease map entries in first (a program never meets a route, or
//! maps an upgrade replaced, without them), then the programs and endpoints (a container port
//! that refuses its program is taken down right after; in kernel mode, which places none, a
//! port an ebpf run took down comes back up), then the kernel's routes, neighbours
//! and FDB entries (none for a lease the maps left out), then the stale map entries out (only
//! once no route leads to them). Room the stale entries made goes to the leases left out at
//! once, in a second pass of the same order.
//!
//! A round about lease events is given what the last round about the leases left
//! ([`LastWritten`]): its first pass writes and removes only the entries that differ from
//! that, without listing the maps or the kernel's entries. A second pass lists them. Its
//! programs step places nothing when the last round placed the same programs, and takes the
//! ports that refused theirs then as refused still.
//!
//! A round that fails keeps its [`Progress`]: its retry, if the desired state is still the
//! same, starts at the step that failed.
use std::collections::BTreeSet;

use anyhow::Result;

use super::desired::Desired;
use crate::{
    model::{
        Baseline, FamilyDevices, LeaseSubnets, PeerEntries, PortIsolation, Programs, RefusedPorts,
        Unwritten, WrittenLeases, WrittenPeers,
    },
    sinks::{DataplaneSink, NodeSink},
};

/// The pass a lease step belongs to: the first, or the one after stale entries made room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    First,
    AfterStaleRemoval,
}

/// One step of a round, in the order [`apply`] takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    WriteLeaseEntries(Pass),
    PlacePrograms,
    /// Container ports without their program down, those with it again up.
    IsolatePorts,
    /// The kernel's entries of one family, by its index in the desired state.
    ConvergePeers(Pass, usize),
    RemoveStaleEntries,
}

/// What the steps of one desired state have done, and what the sinks reported.
#[derive(Debug, Default)]
pub struct Progress {
    /// The state a failed round was applying; none after a round that succeeded.
    failed: Option<Desired>,
    finished: Vec<Step>,
    unwritten: Unwritten,
    refused: RefusedPorts,
    written: WrittenPeers,
    freed: usize,
}

/// What the last round about the leases left in the maps (with the leases changed since) and
/// the kernel, all of it written, and the programs the last round of any scope placed, if it
/// finished.
#[derive(Clone, Copy, Debug)]
pub struct LastWritten<'a> {
    pub entries: &'a WrittenLeases,
    pub peers: &'a WrittenPeers,
    pub placed: Option<Placed<'a>>,
}

/// The programs a round placed, and the container ports that refused theirs.
#[derive(Clone, Copy, Debug)]
pub struct Placed<'a> {
    pub programs: &'a Programs,
    pub refused: &'a RefusedPorts,
}

/// The ports that refused `programs` when a round last placed them, if that is what `last`
/// holds: a round about lease events then leaves the programs, endpoints and claims alone.
fn already_placed<'a>(
    programs: &Programs,
    last: Option<LastWritten<'a>>,
) -> Option<&'a RefusedPorts> {
    let placed = last?.placed?;
    (placed.programs == programs).then_some(placed.refused)
}

/// What the steps of `pass` compare with: in the first pass, what the last round left, if
/// given; otherwise, and in the second pass, the listing.
fn lease_baseline<'a>(pass: Pass, last: Option<LastWritten<'a>>) -> Baseline<'a, WrittenLeases> {
    match (pass, last) {
        (Pass::First, Some(last)) => Baseline::Written(last.entries),
        _ => Baseline::Listed,
    }
}

/// As [`lease_baseline`], for the kernel's entries on one family's `devices`.
fn peer_baseline<'a>(
    pass: Pass,
    last: Option<LastWritten<'a>>,
    devices: FamilyDevices,
) -> Baseline<'a, PeerEntries> {
    match (pass, last.and_then(|last| last.peers.of(devices))) {
        (Pass::First, Some(written)) => Baseline::Written(written),
        _ => Baseline::Listed,
    }
}

/// What a round that succeeded leaves for the reconciler to report.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// What the lease maps left out.
    pub unwritten: Unwritten,
    /// The container ports that refused their program, now down.
    pub refused: RefusedPorts,
    /// The kernel entries each family now holds; none in a round about containers alone.
    pub written: WrittenPeers,
}

impl Progress {
    /// Starts on `desired`: only the retry of a failed round of this same state goes on from
    /// the steps it finished.
    fn begin(&mut self, desired: &Desired) {
        if self.failed.as_ref() != Some(desired) {
            *self = Progress::default();
        }
    }

    fn is_finished(&self, step: Step) -> bool {
        self.finished.contains(&step)
    }
}

/// Makes the host match `desired` through `node` and, in ebpf mode, `dataplane`, writing what
/// differs from `last` if given; returns what the lease maps left out and which ports refused
/// their program. Steps `progress` holds as finished for this same state are not done again;
/// on success `progress` is cleared.
pub async fn apply<N: NodeSink, D: DataplaneSink>(
    desired: &Desired,
    node: &N,
    dataplane: Option<&mut D>,
    progress: &mut Progress,
    last: Option<LastWritten<'_>>,
) -> Result<Applied> {
    progress.begin(desired);
    if let Err(error) = run_passes(desired, node, dataplane, progress, last).await {
        // Kept for the retry only: a round that succeeds copies nothing.
        progress.failed = Some(desired.clone());
        return Err(error);
    }
    let applied = Applied {
        unwritten: std::mem::take(&mut progress.unwritten),
        refused: std::mem::take(&mut progress.refused),
        written: std::mem::take(&mut progress.written),
    };
    *progress = Progress::default();
    Ok(applied)
}

/// The first pass and, if stale entries made room for leases left out, the second.
async fn run_passes<N: NodeSink, D: DataplaneSink>(
    desired: &Desired,
    node: &N,
    mut dataplane: Option<&mut D>,
    progress: &mut Progress,
    last: Option<LastWritten<'_>>,
) -> Result<()> {
    for pass in [Pass::First, Pass::AfterStaleRemoval] {
        let steps = match pass {
            Pass::First => first_pass(desired),
            Pass::AfterStaleRemoval if progress.freed > 0 && !progress.unwritten.is_empty() => {
                second_pass(desired)
            }
            Pass::AfterStaleRemoval => break,
        };
        for step in steps {
            let dataplane = dataplane.as_deref_mut();
            run(step, desired, node, dataplane, progress, last).await?;
        }
    }
    Ok(())
}

/// Lease entries in, programs, each family's kernel entries, stale entries out.
fn first_pass(desired: &Desired) -> Vec<Step> {
    let mut steps = Vec::new();
    let families = desired
        .leases
        .as_ref()
        .map_or(0, |leases| leases.peers.len());
    if desired.leases.is_some() {
        steps.push(Step::WriteLeaseEntries(Pass::First));
    }
    steps.extend([Step::PlacePrograms, Step::IsolatePorts]);
    if desired.leases.is_some() {
        steps.extend((0..families).map(|family| Step::ConvergePeers(Pass::First, family)));
        steps.push(Step::RemoveStaleEntries);
    }
    steps
}

/// The leases left out, written into the room stale entries made, then their routes.
fn second_pass(desired: &Desired) -> Vec<Step> {
    let families = desired
        .leases
        .as_ref()
        .map_or(0, |leases| leases.peers.len());
    std::iter::once(Step::WriteLeaseEntries(Pass::AfterStaleRemoval))
        .chain((0..families).map(|family| Step::ConvergePeers(Pass::AfterStaleRemoval, family)))
        .collect()
}

async fn run<N: NodeSink, D: DataplaneSink>(
    step: Step,
    desired: &Desired,
    node: &N,
    dataplane: Option<&mut D>,
    progress: &mut Progress,
    last: Option<LastWritten<'_>>,
) -> Result<()> {
    if progress.is_finished(step) {
        return Ok(());
    }
    match (step, &desired.leases, dataplane) {
        (Step::WriteLeaseEntries(pass), Some(leases), Some(dataplane)) => {
            let baseline = lease_baseline(pass, last);
            progress.unwritten = dataplane.write_lease_entries(&leases.entries, baseline)?;
        }
        (Step::PlacePrograms, _, Some(dataplane)) => {
            if let Some(programs) = &desired.programs {
                progress.refused = match already_placed(programs, last) {
                    Some(refused) => refused.clone(),
                    None => dataplane.place_programs(programs)?,
                };
            }
        }
        // Kernel mode places no program, so no port refuses one: every port down for want of
        // one comes back up.
        (Step::IsolatePorts, _, _) => {
            let change = PortIsolation::between(&desired.ports_down, &progress.refused);
            if !change.is_empty() {
                node.isolate_ports(&change).await?;
            }
        }
        (Step::ConvergePeers(pass, family), Some(leases), _) => {
            let unmapped: &BTreeSet<LeaseSubnets> = &progress.unwritten.leases;
            let peers = &leases.peers[family];
            let entries = peers.entries(unmapped);
            let baseline = peer_baseline(pass, last, peers.devices);
            node.converge_peers(peers.devices, &entries, baseline)
                .await?;
            progress.written.record(peers.devices, entries);
        }
        (Step::RemoveStaleEntries, Some(leases), Some(dataplane)) => {
            let baseline = lease_baseline(Pass::First, last);
            progress.freed = dataplane.remove_stale_lease_entries(&leases.entries, baseline)?;
        }
        // Kernel mode: no maps, no programs.
        _ => {}
    }
    progress.finished.push(step);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        collections::{HashMap, HashSet},
        net::IpAddr,
        rc::Rc,
    };

    use anyhow::bail;
    use ipnetwork::{IpNetwork, Ipv4Network};

    use super::*;
    use crate::reconcile::fixtures::{VTEP_MAC, devices};
    use crate::{
        mac::MacAddr,
        model::Device,
        model::{
            Containers, DecapHook, Devices, FamilyDevices, FullMap, LeaseEntries, NodeChange,
            PeerEntries, Programs, Reach, RoutingRules, XdpModeChoice,
        },
        reconcile::desired::{NodeIntent, Observed, ProgramSettings, Scope, compute},
        subnet::{Lease, LeaseAttrs},
    };

    const LEASE_MAP: &str = "subnets";

    /// The host as the fakes see it: the subnets in the lease map, the routes into
    /// flannel.1, every call in order, and every broken promise.
    #[derive(Default)]
    struct World {
        map: BTreeSet<Ipv4Network>,
        map_capacity: usize,
        routes: BTreeSet<IpNetwork>,
        calls: Vec<String>,
        violations: Vec<String>,
        /// Calls (by name) that fail the next time they are made.
        failing: HashSet<&'static str>,
        /// Container ports that refuse their program.
        refusing: BTreeSet<u32>,
        /// Container ports the node has taken down.
        down: BTreeSet<u32>,
        /// What each lease step compared with, in order: "listed" or "written".
        baselines: Vec<&'static str>,
    }

    impl World {
        fn call(&mut self, name: &'static str) -> Result<()> {
            self.calls.push(name.to_string());
            if self.failing.remove(name) {
                bail!("{name} failed");
            }
            Ok(())
        }
    }

    fn kind<T>(baseline: Baseline<'_, T>) -> &'static str {
        match baseline {
            Baseline::Listed => "listed",
            Baseline::Written(_) => "written",
        }
    }

    type Shared = Rc<RefCell<World>>;

    struct FakeNode(Shared);
    struct FakeDataplane(Shared);

    impl NodeSink for FakeNode {
        type Notification = ();

        async fn ensure_devices(&mut self) -> Result<Devices> {
            Ok(devices())
        }

        async fn list_containers(&self, _: u32, _: &Containers) -> Result<Containers> {
            Ok(Containers::default())
        }

        async fn reach(&self, _: Vec<IpAddr>) -> Result<Reach> {
            Ok(Reach::default())
        }

        async fn converge_peers(
            &self,
            _: FamilyDevices,
            entries: &PeerEntries,
            baseline: Baseline<'_, PeerEntries>,
        ) -> Result<()> {
            let mut world = self.0.borrow_mut();
            world.call("converge_peers")?;
            world.baselines.push(kind(baseline));
            let routes: BTreeSet<IpNetwork> = entries
                .routes
                .iter()
                .map(|route| route.destination)
                .collect();
            for route in &routes {
                let mapped = matches!(route, IpNetwork::V4(subnet) if world.map.contains(subnet));
                if !mapped {
                    world
                        .violations
                        .push(format!("route to {route} before its map entry"));
                }
            }
            world.routes = routes;
            Ok(())
        }

        async fn isolate_ports(&self, change: &PortIsolation) -> Result<()> {
            let mut world = self.0.borrow_mut();
            world.call("isolate_ports")?;
            world.down.extend(change.isolate.keys());
            world.down.retain(|port| !change.restore.contains(port));
            Ok(())
        }

        fn classify(
            &self,
            _: &(),
            _: &Devices,
            _: &WrittenPeers,
            _: &mut Containers,
        ) -> Option<NodeChange> {
            None
        }
    }

    impl DataplaneSink for FakeDataplane {
        fn write_lease_entries(
            &mut self,
            entries: &LeaseEntries,
            baseline: Baseline<'_, WrittenLeases>,
        ) -> Result<Unwritten> {
            let mut world = self.0.borrow_mut();
            world.call("write_lease_entries")?;
            world.baselines.push(kind(baseline));
            let mut unwritten = Unwritten::default();
            let mut desired: Vec<_> = entries.subnets.iter().collect();
            desired.sort_by_key(|(subnet, _)| **subnet);
            for (subnet, (_, lease)) in desired {
                if world.map.contains(subnet) {
                    continue;
                }
                if world.map.len() < world.map_capacity {
                    world.map.insert(*subnet);
                } else {
                    unwritten.leases.insert(*lease);
                    let full = unwritten.full.entry(LEASE_MAP).or_insert(FullMap {
                        capacity: world.map_capacity as u32,
                        leases_left_out: 0,
                    });
                    full.leases_left_out += 1;
                }
            }
            Ok(unwritten)
        }

        fn place_programs(&mut self, programs: &Programs) -> Result<RefusedPorts> {
            let mut world = self.0.borrow_mut();
            world.call("place_programs")?;
            Ok(programs
                .live_ports
                .intersection(&world.refusing)
                .map(|port| (*port, format!("port {port} refused")))
                .collect())
        }

        fn remove_stale_lease_entries(
            &mut self,
            entries: &LeaseEntries,
            baseline: Baseline<'_, WrittenLeases>,
        ) -> Result<usize> {
            let mut world = self.0.borrow_mut();
            world.call("remove_stale_lease_entries")?;
            world.baselines.push(kind(baseline));
            let stale: Vec<Ipv4Network> = world
                .map
                .iter()
                .filter(|subnet| !entries.subnets.contains_key(subnet))
                .copied()
                .collect();
            for subnet in &stale {
                if world.routes.contains(&IpNetwork::V4(*subnet)) {
                    world
                        .violations
                        .push(format!("map entry of {subnet} removed under its route"));
                }
                world.map.remove(subnet);
            }
            Ok(stale.len())
        }
    }

    fn lease(subnet: &str, host: u8) -> Lease {
        let public_ip = std::net::Ipv4Addr::new(172, 20, 62, host);
        Lease {
            subnet: subnet.parse().expect("test subnet"),
            ipv6_subnet: None,
            attrs: LeaseAttrs::ipv4_only(public_ip, 1, VTEP_MAC),
            etcd_lease: 7,
        }
    }

    fn intent() -> NodeIntent {
        NodeIntent {
            rules: RoutingRules {
                network: "10.2.0.0/16".parse().expect("test network"),
                ipv6_network: None,
                install_fdb: false,
                direct_routing: false,
            },
            own: LeaseSubnets::ipv4("10.2.41.0/24".parse().expect("test subnet")),
            programs: Some(ProgramSettings {
                vni: 1,
                vxlan_port: 8472,
                tunnel_source: Some(std::net::Ipv4Addr::new(172, 20, 62, 104)),
                tunnel_source6: None,
                vtep_mac: Some(VTEP_MAC),
                vtep6_mac: None,
                vtep_mtu: 1450,
                vtep6_mtu: 0,
                uplink_mac: MacAddr([2, 0, 0, 0, 0, 2]),
                direct_routing: false,
                fast_path: true,
                container_vlans: false,
                accept_nat_peers: false,
                decap_hook: DecapHook::Tc,
                xdp_mode: XdpModeChoice::Auto,
            }),
        }
    }

    /// The desired state of a full round with `leases`.
    fn desired(leases: &[Lease]) -> Desired {
        let leases: HashMap<LeaseSubnets, Lease> = leases
            .iter()
            .map(|lease| (lease.subnets(), lease.clone()))
            .collect();
        let observed = Observed {
            scope: Scope::Node,
            leases: &leases,
            devices: &devices(),
            containers: &Containers::default(),
            reach: &Reach::default(),
        };
        compute(&observed, &intent())
    }

    fn world(map_capacity: usize) -> Shared {
        Rc::new(RefCell::new(World {
            map_capacity,
            ..World::default()
        }))
    }

    async fn round(
        world: &Shared,
        desired: &Desired,
        progress: &mut Progress,
    ) -> Result<Unwritten> {
        let node = FakeNode(world.clone());
        let mut dataplane = FakeDataplane(world.clone());
        apply(desired, &node, Some(&mut dataplane), progress, None)
            .await
            .map(|applied| applied.unwritten)
    }

    fn subnets(names: &[&str]) -> BTreeSet<IpNetwork> {
        names
            .iter()
            .map(|name| name.parse().expect("test subnet"))
            .collect()
    }

    #[tokio::test]
    async fn a_route_never_appears_before_its_map_entry() {
        let world = world(16);
        let two = [lease("10.2.54.0/24", 105), lease("10.2.55.0/24", 106)];
        let unwritten = round(&world, &desired(&two), &mut Progress::default())
            .await
            .expect("round");
        assert!(unwritten.is_empty());
        let world = world.borrow();
        assert_eq!(world.violations, Vec::<String>::new());
        assert_eq!(world.routes, subnets(&["10.2.54.0/24", "10.2.55.0/24"]));
        assert_eq!(
            world.calls,
            [
                "write_lease_entries",
                "place_programs",
                "converge_peers",
                "remove_stale_lease_entries"
            ]
        );
    }

    #[tokio::test]
    async fn stale_map_entries_go_only_after_their_routes() {
        let world = world(16);
        let two = [lease("10.2.54.0/24", 105), lease("10.2.55.0/24", 106)];
        let unwritten = round(&world, &desired(&two), &mut Progress::default())
            .await
            .expect("first round");
        assert!(unwritten.is_empty());
        let unwritten = round(&world, &desired(&two[..1]), &mut Progress::default())
            .await
            .expect("second round");
        assert!(unwritten.is_empty());
        let world = world.borrow();
        assert_eq!(world.violations, Vec::<String>::new());
        assert_eq!(world.routes, subnets(&["10.2.54.0/24"]));
        assert_eq!(
            world.map,
            BTreeSet::from(["10.2.54.0/24".parse().expect("subnet")])
        );
    }

    #[tokio::test]
    async fn a_full_maps_leftovers_get_no_route_until_room_is_made() {
        let world = world(1);
        let first = [lease("10.2.54.0/24", 105)];
        let unwritten = round(&world, &desired(&first), &mut Progress::default())
            .await
            .expect("first round");
        assert!(unwritten.is_empty());
        // 10.2.54.0/24 goes, 10.2.55.0/24 and 10.2.56.0/24 come: one fits once the stale
        // entry is out, in the same round; the other gets no route.
        let next = [lease("10.2.55.0/24", 106), lease("10.2.56.0/24", 107)];
        let unwritten = round(&world, &desired(&next), &mut Progress::default())
            .await
            .expect("second round");
        let world = world.borrow();
        assert_eq!(world.violations, Vec::<String>::new());
        assert_eq!(world.routes, subnets(&["10.2.55.0/24"]));
        assert_eq!(
            unwritten.leases,
            BTreeSet::from([next[1].subnets()]),
            "the lease that did not fit is reported"
        );
        assert_eq!(
            unwritten.full[LEASE_MAP],
            FullMap {
                capacity: 1,
                leases_left_out: 1
            }
        );
    }

    #[tokio::test]
    async fn a_round_from_the_last_written_state_lists_only_in_its_second_pass() {
        let world = world(1);
        let first = [lease("10.2.54.0/24", 105)];
        let first_desired = desired(&first);
        let mut progress = Progress::default();
        let node = FakeNode(world.clone());
        let mut dataplane = FakeDataplane(world.clone());
        let applied = apply(
            &first_desired,
            &node,
            Some(&mut dataplane),
            &mut progress,
            None,
        )
        .await
        .expect("first round");
        assert_eq!(world.borrow().baselines, ["listed"; 3]);
        let written = WrittenLeases {
            entries: first_desired
                .leases
                .as_ref()
                .expect("leases")
                .entries
                .clone(),
            changed: Default::default(),
        };
        let last = LastWritten {
            entries: &written,
            peers: &applied.written,
            placed: None,
        };

        // The same change as above: the stale entry makes room, and the second pass lists.
        world.borrow_mut().baselines.clear();
        let next = [lease("10.2.55.0/24", 106), lease("10.2.56.0/24", 107)];
        let applied = apply(
            &desired(&next),
            &node,
            Some(&mut dataplane),
            &mut progress,
            Some(last),
        )
        .await
        .expect("second round");
        let world = world.borrow();
        assert_eq!(
            world.baselines,
            ["written", "written", "written", "listed", "listed"],
            "first pass: write, converge, remove stale; second pass: write, converge"
        );
        assert_eq!(world.violations, Vec::<String>::new());
        assert_eq!(world.routes, subnets(&["10.2.55.0/24"]));
        assert_eq!(
            applied.unwritten.leases,
            BTreeSet::from([next[1].subnets()])
        );
    }

    #[tokio::test]
    async fn a_failing_step_retries_without_redoing_finished_ones() {
        let world = world(16);
        world.borrow_mut().failing.insert("converge_peers");
        let one = [lease("10.2.54.0/24", 105)];
        let desired = desired(&one);
        let mut progress = Progress::default();
        assert!(round(&world, &desired, &mut progress).await.is_err());
        let unwritten = round(&world, &desired, &mut progress)
            .await
            .expect("the retry");
        assert!(unwritten.is_empty());
        let calls = world.borrow().calls.clone();
        assert_eq!(
            calls,
            [
                "write_lease_entries",
                "place_programs",
                "converge_peers",
                "converge_peers",
                "remove_stale_lease_entries"
            ]
        );
        assert_eq!(world.borrow().routes, subnets(&["10.2.54.0/24"]));
        // A later round starts from the beginning again.
        let unwritten = round(&world, &desired, &mut progress)
            .await
            .expect("the next round");
        assert!(unwritten.is_empty());
        assert_eq!(world.borrow().calls.len(), 9);
    }

    #[tokio::test]
    async fn a_retry_of_a_changed_state_starts_over() {
        let world = world(16);
        world.borrow_mut().failing.insert("converge_peers");
        let mut progress = Progress::default();
        let one = [lease("10.2.54.0/24", 105)];
        assert!(round(&world, &desired(&one), &mut progress).await.is_err());
        let two = [lease("10.2.54.0/24", 105), lease("10.2.55.0/24", 106)];
        let unwritten = round(&world, &desired(&two), &mut progress)
            .await
            .expect("the retry");
        assert!(unwritten.is_empty());
        let world = world.borrow();
        assert_eq!(
            world.calls.first().map(String::as_str),
            Some("write_lease_entries")
        );
        assert_eq!(
            world
                .calls
                .iter()
                .filter(|call| *call == "write_lease_entries")
                .count(),
            2
        );
        assert_eq!(world.violations, Vec::<String>::new());
        assert_eq!(world.routes, subnets(&["10.2.54.0/24", "10.2.55.0/24"]));
    }

    #[tokio::test]
    async fn a_round_about_containers_places_programs_alone() {
        let world = world(16);
        let leases = HashMap::new();
        let observed = Observed {
            scope: Scope::Containers,
            leases: &leases,
            devices: &devices(),
            containers: &Containers::default(),
            reach: &Reach::default(),
        };
        let desired = compute(&observed, &intent());
        let unwritten = round(&world, &desired, &mut Progress::default())
            .await
            .expect("round");
        assert!(unwritten.is_empty());
        assert_eq!(world.borrow().calls, ["place_programs"]);
    }

    /// A round about the containers alone, with `ports` live and `isolated` of them down, on
    /// a node set up as `intent` says.
    fn containers_round(ports: &[u32], isolated: &[u32], intent: &NodeIntent) -> Desired {
        let containers = Containers {
            ports: ports
                .iter()
                .map(|&index| {
                    let name = format!("veth{index}");
                    (index, Device { name, index })
                })
                .collect(),
            isolated: isolated.iter().copied().collect(),
            ..Containers::default()
        };
        let observed = Observed {
            scope: Scope::Containers,
            leases: &HashMap::new(),
            devices: &devices(),
            containers: &containers,
            reach: &Reach::default(),
        };
        compute(&observed, intent)
    }

    #[tokio::test]
    async fn a_port_that_refuses_its_program_goes_down_until_it_takes_it() {
        let world = world(16);
        world.borrow_mut().refusing = BTreeSet::from([7]);
        let node = FakeNode(world.clone());
        let mut dataplane = FakeDataplane(world.clone());
        let mut progress = Progress::default();
        // Ports 7 and 8 live, those of `isolated` down: one round about them.
        let mut round_with_down = async |isolated: &[u32]| {
            let desired = containers_round(&[7, 8], isolated, &intent());
            apply(&desired, &node, Some(&mut dataplane), &mut progress, None)
                .await
                .expect("round")
        };
        let applied = round_with_down(&[]).await;
        assert_eq!(applied.refused.keys().copied().collect::<Vec<_>>(), [7]);
        assert_eq!(world.borrow().down, BTreeSet::from([7]));

        // Still refused, already down: nothing to change.
        round_with_down(&[7]).await;
        let isolations = |world: &Shared| {
            let world = world.borrow();
            world
                .calls
                .iter()
                .filter(|call| *call == "isolate_ports")
                .count()
        };
        assert_eq!(isolations(&world), 1);

        world.borrow_mut().refusing.clear();
        let applied = round_with_down(&[7]).await;
        assert!(applied.refused.is_empty());
        assert_eq!(world.borrow().down, BTreeSet::new());
    }

    #[tokio::test]
    async fn a_round_about_leases_keeps_the_programs_the_last_round_placed() {
        let world = world(16);
        world.borrow_mut().refusing = BTreeSet::from([7]);
        world.borrow_mut().down = BTreeSet::from([7]);
        let node = FakeNode(world.clone());
        let mut dataplane = FakeDataplane(world.clone());
        let one = [lease("10.2.54.0/24", 105)];
        // Ports 7 and 8 live, 7 down: what a round about them placed.
        let placed = containers_round(&[7, 8], &[7], &intent());
        let programs = placed.programs.clone().expect("ebpf mode places programs");
        let refused = RefusedPorts::from([(7, "port 7 refused".to_string())]);
        let about_leases = |ports: &[u32]| Desired {
            scope: Scope::Leases,
            leases: desired(&one).leases,
            ..containers_round(ports, &[7], &intent())
        };
        let (written, peers) = (WrittenLeases::default(), WrittenPeers::default());
        let last = LastWritten {
            entries: &written,
            peers: &peers,
            placed: Some(Placed {
                programs: &programs,
                refused: &refused,
            }),
        };
        let mut progress = Progress::default();
        // A round about lease events with `ports` live, after the one that placed `programs`.
        let mut round_with_ports = async |ports: &[u32]| {
            apply(
                &about_leases(ports),
                &node,
                Some(&mut dataplane),
                &mut progress,
                Some(last),
            )
            .await
            .expect("round")
        };

        let applied = round_with_ports(&[7, 8]).await;
        assert_eq!(
            world.borrow().calls,
            [
                "write_lease_entries",
                "converge_peers",
                "remove_stale_lease_entries"
            ],
            "the same programs are not placed again, and port 7 stays down"
        );
        assert_eq!(applied.refused, refused);
        assert_eq!(world.borrow().down, BTreeSet::from([7]));

        // A port came with the lease event: the programs are placed.
        world.borrow_mut().calls.clear();
        let applied = round_with_ports(&[7, 8, 9]).await;
        assert!(
            world
                .borrow()
                .calls
                .iter()
                .any(|call| call == "place_programs")
        );
        assert_eq!(applied.refused.keys().copied().collect::<Vec<_>>(), [7]);
    }

    #[tokio::test]
    async fn kernel_mode_brings_back_up_the_ports_taken_down_for_want_of_a_program() {
        let world = world(16);
        world.borrow_mut().down = BTreeSet::from([7]);
        let kernel_mode = NodeIntent {
            programs: None,
            ..intent()
        };
        let desired = containers_round(&[7, 8], &[7], &kernel_mode);
        apply(
            &desired,
            &FakeNode(world.clone()),
            None::<&mut FakeDataplane>,
            &mut Progress::default(),
            None,
        )
        .await
        .expect("round");
        assert_eq!(world.borrow().down, BTreeSet::new());
    }
}
