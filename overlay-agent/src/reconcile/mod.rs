//! The reconciler: one loop fed by lease events, netlink notifications and a slow safety-net
//! tick. From the leases, the devices and the local containers it computes the desired state
//! ([`desired`], pure), then applies it through two sinks in the one order that never lets a
//! packet reach a route without its map entry: programs and map entries in ([`Dataplane`]),
//! the kernel's routes, neighbours and FDB entries ([`NodeNetwork`]), stale map entries out.
pub mod desired;
mod notifications;

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::Result;
use overlay_common::OverlayConfig;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use tokio::{
    sync::mpsc,
    time::{Instant, MissedTickBehavior, interval_at, sleep_until},
};

use crate::{
    dataplane::{Dataplane, DecapHook, Unwritten, XdpModeChoice, refusals::RefusalWatch},
    health::{Duty, Health},
    masquerade::Masquerade,
    metrics::{MapLabels, ReconcileMetrics, RoundLabels},
    node::{self, NodeNetwork, endpoints, peers::FamilyDevices},
    subnet::{Lease, LeaseEvent, LeaseSubnets},
};
use desired::{Containers, Devices, LeaseEntries, RoutingRules};
pub use notifications::{Notifications, subscribe};

/// The safety net: a full re-list this often, whatever the notifications said.
const SAFETY_NET_INTERVAL: Duration = Duration::from_secs(30);
/// How often the agent looks for refused frames to name in its log.
const REFUSALS_INTERVAL: Duration = Duration::from_secs(2);
/// How soon a reconcile that failed is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// How much of the host one round looks at, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// A container port or address changed: programs and endpoints, from what the
    /// notifications already told.
    Containers,
    /// A lease, a device or an owned entry changed: the devices, the lease entries and the
    /// kernel's entries too.
    Node,
    /// Start, the safety net, lost notifications: the containers re-listed as well.
    Everything,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Containers => "containers",
            Scope::Node => "node",
            Scope::Everything => "everything",
        }
    }
}

/// The eBPF dataplane and how it is placed; without it the kernel's vxlan device forwards.
pub struct EbpfSink {
    pub dataplane: Dataplane,
    /// The programs' settings but for the device facts each round fills in.
    pub config: OverlayConfig,
    /// Whether container traffic bypasses the stack (`--fast-path`).
    pub fast_path: bool,
    pub decap_hook: DecapHook,
    pub xdp_mode: XdpModeChoice,
    pub refusals: RefusalWatch,
}

impl EbpfSink {
    fn warn_about_refusals(&mut self) {
        match self.dataplane.counters() {
            Ok(counters) => {
                for warning in self.refusals.warnings(&counters) {
                    log::warn!("{warning}");
                }
            }
            Err(error) => log::debug!("cannot read the counters: {error:#}"),
        }
    }
}

pub struct Reconciler {
    node: NodeNetwork,
    ebpf: Option<EbpfSink>,
    rules: RoutingRules,
    /// This host's lease, each family's: container addresses lie inside it.
    subnets: LeaseSubnets,
    leases: HashMap<LeaseSubnets, Lease>,
    containers: Containers,
    /// Where the devices were at the last round; none before the first.
    devices: Option<Devices>,
    /// What the lease maps left out at the last round, as last reported.
    unwritten: Unwritten,
    metrics: ReconcileMetrics,
}

impl Reconciler {
    pub fn new(
        node: NodeNetwork,
        ebpf: Option<EbpfSink>,
        rules: RoutingRules,
        subnets: LeaseSubnets,
        metrics: ReconcileMetrics,
    ) -> Self {
        Self {
            node,
            ebpf,
            rules,
            subnets,
            leases: HashMap::new(),
            containers: Containers::default(),
            devices: None,
            unwritten: Unwritten::default(),
            metrics,
        }
    }

    /// The eBPF dataplane, in ebpf mode.
    pub fn dataplane(&self) -> Option<&Dataplane> {
        self.ebpf.as_ref().map(|ebpf| &ebpf.dataplane)
    }

    /// Takes a lease event into the desired state; the next round applies it.
    pub fn apply(&mut self, event: LeaseEvent) {
        log::info!("{}", describe(&event));
        self.remember(event);
    }

    /// Takes the leases the first listing found, logging each at debug level and their count
    /// at info: at thousands of hosts, one line each would slow the start.
    pub fn apply_initial(&mut self, leases: Vec<Lease>) {
        log::info!("{} leases of other hosts", leases.len());
        for lease in leases {
            let event = LeaseEvent::Added(lease);
            log::debug!("{}", describe(&event));
            self.remember(event);
        }
    }

    fn remember(&mut self, event: LeaseEvent) {
        match event {
            LeaseEvent::Added(lease) | LeaseEvent::Changed(lease) => {
                self.leases.insert(lease.subnets(), lease);
            }
            LeaseEvent::Removed(lease) => {
                self.leases.remove(&lease.subnets());
            }
        }
    }

    /// One round: makes the host match the desired state for `scope`. Its duration and
    /// failure go into the metrics.
    pub async fn reconcile(&mut self, scope: Scope) -> Result<()> {
        let started = Instant::now();
        let outcome = self.converge(scope).await;
        self.metrics
            .duration
            .get_or_create(&RoundLabels {
                scope: scope.name(),
            })
            .observe(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            self.metrics.errors.inc();
        }
        outcome
    }

    async fn converge(&mut self, scope: Scope) -> Result<()> {
        let devices = match (&self.devices, scope) {
            (Some(devices), Scope::Containers) => devices.clone(),
            _ => self.node.ensure_devices().await?,
        };
        self.devices = Some(devices.clone());
        if scope == Scope::Everything {
            self.containers = self
                .node
                .list_containers(devices.bridge.index, &self.containers)
                .await?;
        }
        // The order that keeps a packet from meeting a route without its map entry, and a
        // program from meeting maps without their entries (maps an upgrade replaced): lease
        // entries in, then programs, then the kernel's routes, neighbours and FDB, then stale
        // entries out.
        let leases = match scope {
            Scope::Containers => None,
            _ => Some(self.write_lease_entries().await?),
        };
        if let Some(ebpf) = &mut self.ebpf {
            place_programs(ebpf, &devices, &self.containers, &self.subnets)?;
        }
        let Some((on_link, lease_entries, mut unwritten)) = leases else {
            return Ok(());
        };
        let freed = self
            .converge_routes(&devices, &on_link, &lease_entries, &unwritten)
            .await?;
        if freed > 0 && !unwritten.is_empty() {
            // Stale entries leave only after their routes: the room they made goes to the
            // leases left out, now rather than at the next round.
            unwritten = self.write_entries(&lease_entries)?;
            self.converge_routes(&devices, &on_link, &lease_entries, &unwritten)
                .await?;
        }
        self.report_unwritten(unwritten);
        Ok(())
    }

    /// The leases' map entries, written as far as the maps hold them; with the PublicIPs on
    /// our segment and what was left out, for the routes.
    async fn write_lease_entries(
        &mut self,
    ) -> Result<(HashSet<Ipv4Addr>, LeaseEntries, Unwritten)> {
        let on_link = if self.rules.direct_routing {
            let public_ips = self.leases.values().map(|lease| lease.attrs.public_ip);
            self.node.on_link(public_ips).await?
        } else {
            HashSet::new()
        };
        let lease_entries = desired::lease_entries(self.leases.values(), &on_link);
        let unwritten = self.write_entries(&lease_entries)?;
        Ok((on_link, lease_entries, unwritten))
    }

    fn write_entries(&mut self, lease_entries: &LeaseEntries) -> Result<Unwritten> {
        match &mut self.ebpf {
            Some(ebpf) => ebpf.dataplane.write_lease_entries(lease_entries),
            None => Ok(Unwritten::default()),
        }
    }

    /// The kernel's entries for the leases but those left out of the maps, then the stale
    /// map entries out; returns how many stale entries went.
    async fn converge_routes(
        &mut self,
        devices: &Devices,
        on_link: &HashSet<Ipv4Addr>,
        lease_entries: &LeaseEntries,
        unwritten: &Unwritten,
    ) -> Result<usize> {
        if let Some(vtep) = &devices.vtep {
            let peers = desired::peer_entries(
                self.leases.values(),
                vtep,
                &devices.uplink,
                &self.rules,
                on_link,
                &unwritten.leases,
            );
            let family = FamilyDevices {
                vtep_index: vtep.index,
                uplink_index: devices.uplink.index,
                network: self.rules.network.into(),
            };
            self.node.converge_peers(family, &peers).await?;
        }
        if let (Some(vtep6), Some(network)) = (&devices.vtep6, self.rules.ipv6_network) {
            let on_link = if self.rules.direct_routing {
                let public_ipv6s = self
                    .leases
                    .values()
                    .filter_map(|lease| lease.attrs.public_ipv6);
                self.node.on_link(public_ipv6s).await?
            } else {
                HashSet::new()
            };
            // A lease left out of the maps gets no route: its host's VXLAN is dropped here.
            let mapped = self
                .leases
                .values()
                .filter(|lease| !unwritten.leases.contains(&lease.subnets()));
            let peers = desired::ipv6_peer_entries(mapped, vtep6, &devices.uplink, &on_link);
            let family = FamilyDevices {
                vtep_index: vtep6.index,
                uplink_index: devices.uplink.index,
                network: network.into(),
            };
            self.node.converge_peers(family, &peers).await?;
        }
        match &mut self.ebpf {
            Some(ebpf) => ebpf.dataplane.remove_stale_lease_entries(lease_entries),
            None => Ok(0),
        }
    }

    /// Warns about leases the maps left out, and counts each full map, when that differs from
    /// the last round: once per change, not every round.
    fn report_unwritten(&mut self, unwritten: Unwritten) {
        if unwritten == self.unwritten {
            return;
        }
        for (&map, full) in &unwritten.full {
            self.metrics
                .full_maps
                .get_or_create(&MapLabels { map })
                .inc();
            log::warn!(
                "the {map} map is full ({} entries): {} leases do not fit and get no route",
                full.capacity,
                full.leases_left_out
            );
        }
        for (subnet, reason) in &unwritten.refused {
            log::warn!("lease {subnet} gets no route: {reason}");
        }
        if unwritten.is_empty() {
            log::info!("every lease has its map entries again");
        }
        self.unwritten = unwritten;
    }

    /// After a first `reconcile(Scope::Everything)` and `masquerade.ensure()`: applies lease
    /// events and notifications as they come, batching whatever is queued into one round, and
    /// checks the forward and masquerade rules every `resync`. Failures are logged and retried,
    /// never fatal, and reported to `health`. Returns when the lease events end.
    pub async fn run(
        &mut self,
        mut leases: mpsc::Receiver<LeaseEvent>,
        mut notifications: Notifications,
        masquerade: &mut Masquerade,
        resync: Duration,
        health: &Health,
    ) {
        // The caller has just done both: the first ticks are one interval away.
        let mut safety_net = interval_at(Instant::now() + SAFETY_NET_INTERVAL, SAFETY_NET_INTERVAL);
        let mut masquerade_timer = interval_at(Instant::now() + resync, resync);
        let mut refusals_timer = interval_at(Instant::now(), REFUSALS_INTERVAL);
        safety_net.set_missed_tick_behavior(MissedTickBehavior::Delay);
        masquerade_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry: Option<(Instant, Scope)> = None;
        loop {
            let retry_at = retry.map_or_else(Instant::now, |(at, _)| at);
            let mut scope = tokio::select! {
                event = leases.recv() => {
                    let Some(event) = event else { return };
                    self.apply(event);
                    Some(Scope::Node)
                }
                notification = notifications.recv() => self.classify(notification),
                _ = safety_net.tick() => Some(Scope::Everything),
                () = sleep_until(retry_at), if retry.is_some() => retry.take().map(|(_, scope)| scope),
                _ = masquerade_timer.tick() => {
                    // iptables and nft are programs: run them off the async workers' clock.
                    if let Err(error) = tokio::task::block_in_place(|| masquerade.ensure()) {
                        log::warn!("cannot restore the forward and masquerade rules: {error:#}");
                    }
                    None
                }
                _ = refusals_timer.tick() => {
                    if let Some(ebpf) = &mut self.ebpf {
                        ebpf.warn_about_refusals();
                    }
                    None
                }
            };
            // Whatever else is queued goes into the same round: a burst costs one reconcile.
            while let Ok(event) = leases.try_recv() {
                self.apply(event);
                scope = scope.max(Some(Scope::Node));
            }
            while let Some(notification) = notifications.try_recv() {
                scope = scope.max(self.classify(notification));
            }
            // A pending retry joins a round that runs anyway; a wake-up that calls for none
            // leaves it waiting for its delay.
            let Some(mut scope) = scope else {
                continue;
            };
            if let Some((_, pending)) = retry.take() {
                scope = scope.max(pending);
            }
            let attempted = Instant::now();
            match self.reconcile(scope).await {
                Ok(()) => health.succeeded(Duty::Reconcile),
                Err(error) => {
                    health.failed(Duty::Reconcile, attempted, &error);
                    log::warn!("cannot bring the node in line: {error:#}; retrying");
                    retry = Some((Instant::now() + RETRY_DELAY, scope));
                }
            }
        }
    }

    /// What a netlink notification calls for: containers it tells about are taken in at once.
    fn classify(&mut self, notification: NetlinkMessage<RouteNetlinkMessage>) -> Option<Scope> {
        let message = match notification.payload {
            NetlinkPayload::InnerMessage(message) => message,
            NetlinkPayload::Overrun(_) => {
                log::warn!("netlink notifications were lost; re-listing");
                return Some(Scope::Everything);
            }
            _ => return None,
        };
        let devices = self.devices.as_ref()?;
        if endpoints::observe(&mut self.containers, &message, devices.bridge.index) {
            Some(Scope::Containers)
        } else if node::touches_devices(&message, devices) {
            Some(Scope::Node)
        } else {
            None
        }
    }
}

/// Points the programs at the current devices and containers, and with the fast path puts
/// every container's address into the endpoint map (without it, makes sure none is there).
/// Addresses and MACs claimed by ports that are gone are free again.
fn place_programs(
    ebpf: &mut EbpfSink,
    devices: &Devices,
    containers: &Containers,
    subnets: &LeaseSubnets,
) -> Result<()> {
    let placement = desired::placement(&ebpf.config, devices, containers, subnets, ebpf.fast_path);
    let (endpoints, endpoints6) = if ebpf.fast_path {
        (
            subnets
                .ipv4_subnet()
                .map(|subnet| desired::endpoints(containers, subnet))
                .unwrap_or_default(),
            subnets
                .ipv6
                .map(|subnet6| desired::endpoints6(containers, subnet6))
                .unwrap_or_default(),
        )
    } else {
        Default::default()
    };
    ebpf.dataplane
        .place(&placement, ebpf.decap_hook, ebpf.xdp_mode)?;
    ebpf.dataplane.sync_endpoints(&endpoints, &endpoints6)?;
    ebpf.dataplane
        .release_claims_of_gone_ports(&containers.ports.keys().copied().collect())
}

/// "lease added: 10.2.54.0/24 via 172.20.62.105 (VTEP 1a:4b:d7:f7:16:89)"
fn describe(event: &LeaseEvent) -> String {
    let (what, lease) = match event {
        LeaseEvent::Added(lease) => ("added", lease),
        LeaseEvent::Changed(lease) => ("changed", lease),
        LeaseEvent::Removed(lease) => ("removed", lease),
    };
    let vtep = lease
        .attrs
        .vtep_mac()
        .map(|mac| format!(" via {} (VTEP {mac})", lease.attrs.public_ip))
        .unwrap_or_default();
    let vtep6 = lease
        .ipv6_peer()
        .map(|(_, address, mac)| format!(" via {address} (VTEP {mac})"))
        .unwrap_or_default();
    format!("lease {what}: {}{vtep}{vtep6}", lease.subnets())
}
