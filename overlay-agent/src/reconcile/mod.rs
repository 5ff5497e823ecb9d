//! The reconciler: one loop fed by lease events, node notifications and a slow safety-net
//! tick. Each round observes the node (devices, containers, which peers share our segment),
//! computes the one [`Desired`](desired::Desired) state from that and the leases
//! ([`desired::compute`], pure), and applies it through the two sinks in the order
//! [`plan`] keeps. It knows the sinks only by their traits ([`NodeSink`], [`DataplaneSink`]).
//!
//! A round about lease events alone writes only what they change, from what the last round
//! about the leases left: at thousands of leases, listing every route, neighbour, FDB entry
//! and map entry again would cost each event tens of milliseconds. The map entries it
//! compares are those of the leases the events named. It lists everything as a
//! round about the node does when that last round left something out or failed.
//!
//! Container programs never wait on the node: when a round about the node fails, a round about
//! the containers alone follows at once, so a port that appeared meanwhile gets its checks (or
//! is taken down) whatever keeps the node's own steps failing.
pub mod desired;
#[cfg(test)]
mod fixtures;
pub mod plan;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Duration,
};

use anyhow::{Result, anyhow};
use tokio::{
    sync::mpsc,
    time::{Instant, MissedTickBehavior, interval_at, sleep_until},
};

use crate::{
    health::{Duty, Health},
    metrics::{MapLabels, ReconcileMetrics, RoundLabels},
    model::{
        Containers, Devices, EntrySet, LeaseSubnets, NodeChange, Programs, Reach, RefusedPorts,
        Unwritten, WrittenLeases, WrittenPeers,
    },
    sinks::{DataplaneSink, NodeSink, NotificationSource},
    subnet::{Lease, LeaseEvent},
};
pub use desired::{NodeIntent, ProgramSettings, Scope};
use desired::{Observed, public_addresses};
use plan::{LastWritten, Placed, Progress};

/// The safety net: a full re-list this often, whatever the notifications said.
const SAFETY_NET_INTERVAL: Duration = Duration::from_secs(30);
/// How soon a reconcile that failed is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(1);

pub struct Reconciler<N, D> {
    node: N,
    /// The eBPF dataplane; none in kernel mode.
    dataplane: Option<D>,
    intent: NodeIntent,
    leases: HashMap<LeaseSubnets, Lease>,
    containers: Containers,
    /// Where the devices were at the last round.
    devices: Option<Devices>,
    /// What a failed round finished, for its retry.
    progress: Progress,
    /// What the lease maps left out at the last round, as last reported.
    unwritten: Unwritten,
    /// How the node reaches the leases' public addresses, with DirectRouting.
    reach: KnownReach,
    /// The leases left out for a public address no route leads to, with why, as last
    /// reported.
    unreachable: BTreeMap<LeaseSubnets, String>,
    /// The container ports that refused their program at the last round, now down.
    refused: RefusedPorts,
    /// The programs the last round placed, if it succeeded: a round about lease events that
    /// wants the same ones takes them, and `refused`, as placed.
    placed: Option<Programs>,
    /// The kernel entries the last round about the leases wrote: notifications that only
    /// echo them call for no round.
    written: WrittenPeers,
    /// The map entries the last round about the leases wrote, kept when that round wrote
    /// every lease's entries, and the leases events changed since: a round about lease events
    /// then takes them, and `written`, as what the node holds.
    mapped: Option<WrittenLeases>,
    metrics: ReconcileMetrics,
}

impl<N: NodeSink, D: DataplaneSink> Reconciler<N, D> {
    /// The reconciler of a node set up as `intent` says, once its first full round over
    /// `leases` (the first listing of the other hosts' leases) has brought the node in line.
    pub async fn start(
        node: N,
        dataplane: Option<D>,
        intent: NodeIntent,
        leases: Vec<Lease>,
        metrics: ReconcileMetrics,
    ) -> Result<Self> {
        let mut reconciler = Self {
            node,
            dataplane,
            intent,
            leases: HashMap::new(),
            containers: Containers::default(),
            devices: None,
            progress: Progress::default(),
            unwritten: Unwritten::default(),
            reach: KnownReach::default(),
            unreachable: BTreeMap::new(),
            refused: RefusedPorts::new(),
            placed: None,
            written: WrittenPeers::default(),
            mapped: None,
            metrics,
        };
        reconciler.apply_initial(leases);
        reconciler.reconcile(Scope::Everything).await?;
        Ok(reconciler)
    }

    /// The eBPF dataplane, in ebpf mode.
    pub fn dataplane(&self) -> Option<&D> {
        self.dataplane.as_ref()
    }

    /// Takes a lease event into the desired state; the next round applies it.
    fn apply(&mut self, event: LeaseEvent) {
        log::info!("{}", describe(&event));
        self.remember(event);
    }

    /// Takes the leases the first listing found, logging each at debug level and their count
    /// at info: at thousands of hosts, one line each would slow the start.
    fn apply_initial(&mut self, leases: Vec<Lease>) {
        log::info!("{} leases of other hosts", leases.len());
        for lease in leases {
            let event = LeaseEvent::Added(lease);
            log::debug!("{}", describe(&event));
            self.remember(event);
        }
    }

    /// Takes `event` into the leases, and notes its lease as changed since the last round
    /// about the leases.
    fn remember(&mut self, event: LeaseEvent) {
        let subnets = match event {
            LeaseEvent::Added(lease) | LeaseEvent::Changed(lease) => {
                let subnets = lease.subnets();
                self.leases.insert(subnets, lease);
                subnets
            }
            LeaseEvent::Removed(lease) => {
                let subnets = lease.subnets();
                self.leases.remove(&subnets);
                subnets
            }
        };
        if let Some(mapped) = &mut self.mapped {
            mapped.changed.insert(subnets);
        }
    }

    /// One round: makes the host match the desired state for `scope`; if that fails beyond
    /// the containers, the containers' programs are placed anyway. Its duration and failure go
    /// into the metrics.
    async fn reconcile(&mut self, scope: Scope) -> Result<()> {
        let started = Instant::now();
        let scope = self.widened(scope);
        let outcome = self.converge(scope).await;
        if outcome.is_err() && scope > Scope::Containers {
            // Whatever the failed round wrote is unknown: the next one lists.
            self.mapped = None;
            if self.devices.is_some() {
                // The failed round's progress waits for its retry.
                let failed_round = std::mem::take(&mut self.progress);
                if let Err(error) = self.converge(Scope::Containers).await {
                    log::warn!("cannot place the container programs either: {error:#}");
                }
                self.progress = failed_round;
            }
        }
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

    /// `scope`, or, for a round about lease events that cannot start from what the last round
    /// wrote, a round about the node.
    fn widened(&self, scope: Scope) -> Scope {
        if scope == Scope::Leases && (self.mapped.is_none() || self.devices.is_none()) {
            Scope::Node
        } else {
            scope
        }
    }

    /// Observes what `scope` looks at, computes the desired state and applies it.
    async fn converge(&mut self, scope: Scope) -> Result<()> {
        let devices = match (&self.devices, scope) {
            (Some(devices), Scope::Containers | Scope::Leases) => devices.clone(),
            _ => self.node.ensure_devices().await?,
        };
        self.devices = Some(devices.clone());
        if scope == Scope::Everything {
            self.containers = self
                .node
                .list_containers(devices.bridge.index, &self.containers)
                .await?;
        }
        self.update_reach(scope).await?;
        let observed = Observed {
            scope,
            leases: &self.leases,
            devices: &devices,
            containers: &self.containers,
            reach: &self.reach.reach,
        };
        let desired = desired::compute(&observed, &self.intent);
        if let Some(leases) = &desired.leases {
            report_unreachable(
                &mut self.unreachable,
                leases.unreachable.clone(),
                &self.leases,
                &self.metrics,
            );
        }
        let last = match (scope, &self.mapped) {
            (Scope::Leases, Some(entries)) => Some(LastWritten {
                entries,
                peers: &self.written,
                placed: self.placed.as_ref().map(|programs| Placed {
                    programs,
                    refused: &self.refused,
                }),
            }),
            _ => None,
        };
        let applied = plan::apply(
            &desired,
            &self.node,
            self.dataplane.as_mut(),
            &mut self.progress,
            last,
        )
        .await;
        // What a failed round placed is unknown: the next one places again.
        self.placed = None;
        let applied = applied?;
        if let Some(leases) = desired.leases {
            self.report_unwritten(applied.unwritten);
            self.written = applied.written;
            self.mapped = self.unwritten.is_empty().then(|| WrittenLeases {
                entries: leases.entries,
                changed: EntrySet::default(),
            });
        }
        self.refused = applied.refused;
        self.placed = desired.programs;
        Ok(())
    }

    /// With DirectRouting, brings `self.reach` up to date for the leases' PublicIPs (and
    /// PublicIPv6s, with IPv6): which are on our segment and which have no route at all. A
    /// round about lease events asks the node about new addresses alone; a round about the
    /// node asks about every one, since the uplink's routes that decide it may have changed.
    /// Nothing in a round about containers alone.
    async fn update_reach(&mut self, scope: Scope) -> Result<()> {
        if scope == Scope::Containers || !self.intent.rules.direct_routing {
            return Ok(());
        }
        let with_ipv6 = self.intent.rules.ipv6_network.is_some();
        let addresses: EntrySet<IpAddr> = self
            .leases
            .values()
            .flat_map(|lease| public_addresses(lease, with_ipv6))
            .collect();
        if scope != Scope::Leases {
            self.reach = KnownReach::default();
        }
        let new = addresses.difference(&self.reach.asked).copied().collect();
        let answers = self.node.reach(new).await?;
        self.reach.take(answers, addresses);
        Ok(())
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

    /// Applies lease events and node notifications as they come, batching whatever is queued
    /// into one round, and lists everything again every 30 s. Failures are logged and retried,
    /// never fatal, and reported to `health`. Returns when the lease events end.
    pub async fn run(
        &mut self,
        mut leases: mpsc::Receiver<LeaseEvent>,
        mut notifications: impl NotificationSource<Notification = N::Notification>,
        health: &Health,
    ) {
        // `start` has just listed everything: the first tick is one interval away.
        let mut safety_net = interval_at(Instant::now() + SAFETY_NET_INTERVAL, SAFETY_NET_INTERVAL);
        safety_net.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry: Option<(Instant, Scope)> = None;
        loop {
            let retry_at = retry.map_or_else(Instant::now, |(at, _)| at);
            let mut scope = tokio::select! {
                event = leases.recv() => {
                    let Some(event) = event else { return };
                    self.apply(event);
                    Some(Scope::Leases)
                }
                notification = notifications.recv() => self.classify(&notification),
                _ = safety_net.tick() => Some(Scope::Everything),
                () = sleep_until(retry_at), if retry.is_some() => retry.take().map(|(_, scope)| scope),
            };
            // Whatever else is queued goes into the same round: a burst costs one reconcile.
            while let Ok(event) = leases.try_recv() {
                self.apply(event);
                scope = scope.max(Some(Scope::Leases));
            }
            while let Some(notification) = notifications.try_recv() {
                scope = scope.max(self.classify(&notification));
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
            self.report_refused_ports(health, attempted);
        }
    }

    /// Tells `health` whether container ports are down for want of their program.
    fn report_refused_ports(&self, health: &Health, attempted: Instant) {
        if self.refused.is_empty() {
            health.succeeded(Duty::ContainerPrograms);
            return;
        }
        let ports: Vec<&str> = self.refused.values().map(String::as_str).collect();
        health.failed(
            Duty::ContainerPrograms,
            attempted,
            &anyhow!("{}", ports.join("; ")),
        );
    }

    /// What a node notification calls for: containers it tells about are taken in at once.
    fn classify(&mut self, notification: &N::Notification) -> Option<Scope> {
        let devices = self.devices.as_ref()?;
        match self
            .node
            .classify(notification, devices, &self.written, &mut self.containers)?
        {
            NodeChange::Containers => Some(Scope::Containers),
            NodeChange::Devices => Some(Scope::Node),
            NodeChange::Lost => {
                log::warn!("netlink notifications were lost; re-listing");
                Some(Scope::Everything)
            }
        }
    }
}

/// How the node reached the public addresses it was asked about, and which those were.
#[derive(Debug, Default)]
struct KnownReach {
    reach: Reach,
    asked: EntrySet<IpAddr>,
}

impl KnownReach {
    /// Takes in the `answers` about new addresses, and keeps what it knows of `addresses`
    /// alone: those of the leases there are now.
    fn take(&mut self, answers: Reach, addresses: EntrySet<IpAddr>) {
        self.reach.on_link.extend(answers.on_link);
        self.reach.unreachable.extend(answers.unreachable);
        self.reach
            .on_link
            .retain(|address| addresses.contains(address));
        self.reach
            .unreachable
            .retain(|address, _| addresses.contains(address));
        self.asked = addresses;
    }
}

/// Warns about each lease newly left out for its public address, once, says when one of
/// `leases` has a route again, and counts them among the skipped records.
fn report_unreachable(
    reported: &mut BTreeMap<LeaseSubnets, String>,
    now: BTreeMap<LeaseSubnets, String>,
    leases: &HashMap<LeaseSubnets, Lease>,
    metrics: &ReconcileMetrics,
) {
    if *reported == now {
        return;
    }
    for (subnets, why) in &now {
        if reported.get(subnets) != Some(why) {
            log::warn!("skipping the record of lease {subnets}: {why}");
        }
    }
    let back = reported
        .keys()
        .filter(|subnets| !now.contains_key(subnets) && leases.contains_key(subnets));
    for subnets in back {
        log::info!("lease {subnets}'s public address has a route again");
    }
    metrics.unreachable.set(now.len() as i64);
    *reported = now;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EntryMap;

    fn address(text: &str) -> IpAddr {
        text.parse().expect("a test address")
    }

    #[test]
    fn known_reach_keeps_the_answers_about_the_leases_there_are() {
        let (on_link, gone, new) = (
            address("172.20.62.105"),
            address("0.1.2.3"),
            address("172.20.62.106"),
        );
        let mut known = KnownReach::default();
        let first = Reach {
            on_link: EntrySet::from_iter([on_link]),
            unreachable: EntryMap::from_iter([(gone, "Network is unreachable".to_string())]),
        };
        known.take(first, EntrySet::from_iter([on_link, gone]));
        // The lease of `gone` went and that of `new` came: only `new` was asked about.
        let second = Reach {
            on_link: EntrySet::from_iter([new]),
            unreachable: EntryMap::default(),
        };
        known.take(second, EntrySet::from_iter([on_link, new]));
        assert_eq!(known.reach.on_link, EntrySet::from_iter([on_link, new]));
        assert_eq!(known.reach.unreachable, EntryMap::default());
        assert_eq!(known.asked, EntrySet::from_iter([on_link, new]));
    }
}
