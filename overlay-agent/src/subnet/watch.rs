//! Following every other host's lease: one listing, then a watch from the listing's revision,
//! reconnecting with backoff and re-listing when etcd has compacted past us.
//!
//! The watcher keeps the leases it has reported, so a re-list emits only the difference: no
//! event is lost across a disconnect and none is reported twice.
use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use anyhow::{Result, anyhow};
use tokio::{
    sync::mpsc,
    time::{Instant, sleep},
};

use super::{
    Holders, Lease, LeaseEvent, LeaseSubnets, Record, RecordError, check_remote,
    manager::LeaseRevoked,
    registry::{RecordChange, Registry, Watch, WatchUpdate},
    select_remote, subnet_from_key, subnet_key,
};
use crate::{
    config::NetworkConfig,
    health::{Duty, Health},
    metrics::{GaugePart, LeaseMetrics},
};

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub struct LeaseWatcher<R> {
    registry: R,
    config: NetworkConfig,
    own: Lease,
    known: HashMap<LeaseSubnets, Lease>,
    /// The key of the record each known subnet (of either family) and VTEP MAC came from:
    /// another record naming the same subnet (a dual-stack key, say) or MAC is skipped while
    /// this one stands.
    holders: Holders,
    /// Keys of the records that cannot be used.
    skipped: HashSet<String>,
    metrics: LeaseMetrics,
    /// The watch's part of `metrics.skipped`.
    skipped_part: GaugePart,
    health: Health,
    next_revision: i64,
    /// Whether `known` reflects a listing the watch can continue from.
    listed: bool,
}

/// Why following the watch stream stopped without an error of its own.
enum Interruption {
    /// The watch cannot go on from where it is, for the reason given: re-list.
    Relist(String),
    /// Nobody listens to the events any more.
    Closed,
}

impl<R: Registry> LeaseWatcher<R> {
    pub fn new(
        registry: R,
        config: NetworkConfig,
        own: Lease,
        metrics: LeaseMetrics,
        health: Health,
    ) -> Self {
        Self {
            registry,
            config,
            own,
            known: HashMap::new(),
            holders: Holders::default(),
            skipped: HashSet::new(),
            skipped_part: GaugePart::of(&metrics.skipped),
            metrics,
            health,
            next_revision: 0,
            listed: false,
        }
    }

    /// Lists every other host's lease once, before the watch runs, so the agent can build the
    /// node network from the whole picture and never removes what is still leased.
    pub async fn initial_leases(&mut self) -> Result<Vec<Lease>> {
        let events = self.resync().await?;
        Ok(events
            .into_iter()
            .filter_map(|event| match event {
                LeaseEvent::Added(lease) | LeaseEvent::Changed(lease) => Some(lease),
                LeaseEvent::Removed(_) => None,
            })
            .collect())
    }

    /// Reports every change after the initial listing (every lease as added, if nobody took
    /// that), until the receiver is dropped. Returns an error only when this host's own lease
    /// is revoked.
    pub async fn run(mut self, events: mpsc::Sender<LeaseEvent>) -> Result<()> {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let outcome = if self.listed {
                self.follow(&events).await
            } else {
                match self.resync().await {
                    Ok(changes) => send_all(&events, changes).await.map(|()| None),
                    Err(error) => Err(error),
                }
            };
            match outcome {
                Ok(None) => backoff = BACKOFF_FIRST,
                Ok(Some(Interruption::Relist(why))) => {
                    self.metrics.watch_reconnects.inc();
                    log::info!("{why}; re-listing");
                    self.listed = false;
                }
                Ok(Some(Interruption::Closed)) => return Ok(()),
                Err(error) if error.is::<LeaseRevoked>() => return Err(error),
                Err(_) if events.is_closed() => return Ok(()),
                Err(error) => {
                    self.health.failed(Duty::LeaseWatch, Instant::now(), &error);
                    self.metrics.watch_reconnects.inc();
                    log::warn!("lease watch interrupted: {error:#}; reconnecting in {backoff:?}");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Lists every record; returns the difference to what was known before.
    async fn resync(&mut self) -> Result<Vec<LeaseEvent>> {
        let listing = self.registry.list().await?;
        let own_key_present = listing
            .records
            .iter()
            .any(|record| self.is_own(record) && self.still_ours(record));
        if !own_key_present {
            return Err(LeaseRevoked(self.own.subnets()).into());
        }
        let selection = select_remote(
            &listing.records,
            self.registry.prefix(),
            &self.own,
            &self.config,
            &self.holders,
        );
        let still_skipped: HashSet<&String> =
            selection.skipped.iter().map(|(key, _)| key).collect();
        self.skipped.retain(|key| still_skipped.contains(key));
        for (key, error) in &selection.skipped {
            self.skip(key, error);
        }
        self.holders = selection.holders;
        let current: HashMap<LeaseSubnets, Lease> = selection
            .leases
            .into_iter()
            .map(|(_, lease)| (lease.subnets(), lease))
            .collect();
        let gone: Vec<LeaseSubnets> = self
            .known
            .keys()
            .filter(|subnet| !current.contains_key(subnet))
            .copied()
            .collect();
        let mut changes: Vec<LeaseEvent> = gone
            .into_iter()
            .filter_map(|subnet| self.forget(subnet))
            .collect();
        changes.extend(
            current
                .into_values()
                .filter_map(|lease| self.remember(lease)),
        );
        self.next_revision = listing.revision + 1;
        self.listed = true;
        self.report_counts();
        Ok(changes)
    }

    /// Applies watch events until the stream breaks. `Ok(None)` means a response arrived and
    /// the stream then ended normally.
    async fn follow(&mut self, events: &mpsc::Sender<LeaseEvent>) -> Result<Option<Interruption>> {
        let mut watch = self.registry.watch(self.next_revision).await?;
        let mut progressed = false;
        loop {
            let Some(update) = watch.next().await? else {
                return if progressed {
                    Ok(None)
                } else {
                    Err(anyhow!("etcd closed the watch"))
                };
            };
            progressed = true;
            let changes = match update {
                WatchUpdate::Changes(changes) => {
                    self.health.succeeded(Duty::LeaseWatch);
                    changes
                }
                WatchUpdate::Compacted => {
                    let why = format!("etcd compacted past revision {}", self.next_revision);
                    return Ok(Some(Interruption::Relist(why)));
                }
                WatchUpdate::TooLarge => {
                    let why = format!(
                        "the changes from revision {} on are more than one etcd response carries",
                        self.next_revision
                    );
                    return Ok(Some(Interruption::Relist(why)));
                }
            };
            for change in changes {
                if let Some(event) = self.apply(&change)? {
                    send_all(events, [event]).await?;
                }
                self.next_revision = change.revision + 1;
            }
            if events.is_closed() {
                return Ok(Some(Interruption::Closed));
            }
        }
    }

    /// Updates what is known from one record change; returns the event to report, if any.
    fn apply(&mut self, change: &RecordChange) -> Result<Option<LeaseEvent>> {
        let record = &change.record;
        if self.is_own(record) {
            let revoked = change.deleted || !self.still_ours(record);
            return if revoked {
                Err(LeaseRevoked(self.own.subnets()).into())
            } else {
                Ok(None)
            };
        }
        if change.deleted {
            self.skipped.remove(&record.key);
        }
        let Some(subnets) = subnet_from_key(self.registry.prefix(), &record.key) else {
            if !change.deleted {
                self.skip(&record.key, &RecordError::BadKey);
            }
            self.report_counts();
            return Ok(None);
        };
        let held = self.holds(record);
        let usable = if change.deleted {
            None
        } else {
            let checked = check_remote(
                record,
                self.registry.prefix(),
                &self.config,
                &self.own,
                &self.holders,
            );
            match checked {
                Ok(lease) => Some(lease),
                Err(error) => {
                    self.skip(&record.key, &error);
                    None
                }
            }
        };
        let event = match usable {
            Some(lease) => {
                self.skipped.remove(&record.key);
                self.holders.hold(&lease, &record.key, &self.config);
                self.remember(lease)
            }
            // Only the record holding the subnet can take its lease away.
            None if held => {
                self.holders.release(&record.key);
                self.forget(subnets)
            }
            None => None,
        };
        self.report_counts();
        Ok(event)
    }

    fn report_counts(&self) {
        self.metrics.known.set(self.known.len() as i64);
        self.skipped_part.set(self.skipped.len() as i64);
    }

    /// Records `lease`; returns the change if it is new or its attributes changed (a renewal
    /// only moves it to another etcd lease, which nobody downstream cares about).
    fn remember(&mut self, lease: Lease) -> Option<LeaseEvent> {
        let change = match self.known.get(&lease.subnets()) {
            None => Some(LeaseEvent::Added(lease.clone())),
            Some(known) if known.attrs != lease.attrs => Some(LeaseEvent::Changed(lease.clone())),
            Some(_) => None,
        };
        self.known.insert(lease.subnets(), lease);
        change
    }

    fn forget(&mut self, subnets: LeaseSubnets) -> Option<LeaseEvent> {
        self.known.remove(&subnets).map(LeaseEvent::Removed)
    }

    /// Whether `record` is this host's own: its key exactly, not merely its subnet.
    fn is_own(&self, record: &Record) -> bool {
        record.key == subnet_key(self.registry.prefix(), self.own.subnets())
    }

    /// Whether `record` is the one the lease of its subnet came from.
    fn holds(&self, record: &Record) -> bool {
        self.holders
            .hold_its_subnet(record, self.registry.prefix(), &self.config)
    }

    fn still_ours(&self, record: &Record) -> bool {
        record
            .parse(self.registry.prefix())
            .is_ok_and(|lease| self.own.attrs.public().named_in(&lease.attrs))
    }

    /// Counts the record under `key` as skipped, and logs why unless it is already: a record
    /// written again and again with a value that cannot be used is news once, until its value
    /// is usable.
    fn skip(&mut self, key: &str, error: &RecordError) {
        if !self.skipped.insert(key.to_string()) {
            return;
        }
        match error {
            // A reservation whose host has not come up yet: normal, not a fault.
            RecordError::NoVtep => log::info!("waiting for {key}: {error}"),
            _ => log::warn!("skipping record {key}: {error}"),
        }
    }
}

async fn send_all(
    events: &mpsc::Sender<LeaseEvent>,
    changes: impl IntoIterator<Item = LeaseEvent>,
) -> Result<()> {
    for change in changes {
        events
            .send(change)
            .await
            .map_err(|_| anyhow!("lease event receiver is gone"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ipnetwork::Ipv4Network;

    use super::*;
    use crate::{
        mac::MacAddr,
        subnet::{LeaseAttrs, memory::MemoryRegistry},
    };

    const PREFIX: &str = "/docker-test/network";
    const WAIT: Duration = Duration::from_secs(2);

    fn subnet(text: &str) -> Ipv4Network {
        text.parse().expect("test subnet")
    }

    fn config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .expect("the seed's config parses")
    }

    fn record_of(host: u8, mac: MacAddr) -> String {
        LeaseAttrs::ipv4_only(Ipv4Addr::new(172, 20, 62, host), 1, mac).to_json()
    }

    /// A registry holding this host's lease (10.2.41.0/24), and a watcher for it.
    fn watched() -> (MemoryRegistry, LeaseWatcher<MemoryRegistry>) {
        let registry = MemoryRegistry::new(PREFIX, config());
        let own = Lease {
            subnet: subnet("10.2.41.0/24"),
            ipv6_subnet: None,
            attrs: LeaseAttrs::ipv4_only(
                Ipv4Addr::new(172, 20, 62, 104),
                1,
                MacAddr::random_local(),
            ),
            etcd_lease: 1,
        };
        registry.put(own.subnet, &own.attrs.to_json(), 1);
        let watcher = LeaseWatcher::new(
            registry.clone(),
            config(),
            own,
            LeaseMetrics::default(),
            Health::new(WAIT),
        );
        (registry, watcher)
    }

    async fn next_event(events: &mut mpsc::Receiver<LeaseEvent>) -> LeaseEvent {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("an event within 2 s")
            .expect("the watcher is running")
    }

    fn subnet_of(event: &LeaseEvent) -> (&'static str, Ipv4Network) {
        match event {
            LeaseEvent::Added(lease) => ("added", lease.subnet),
            LeaseEvent::Changed(lease) => ("changed", lease.subnet),
            LeaseEvent::Removed(lease) => ("removed", lease.subnet),
        }
    }

    #[tokio::test]
    async fn the_listing_has_every_usable_remote_lease_and_not_our_own() -> Result<()> {
        let (registry, mut watcher) = watched();
        registry.put(
            subnet("10.2.54.0/24"),
            &record_of(105, MacAddr::random_local()),
            2,
        );
        registry.put(subnet("10.2.99.0/24"), "{not json", 3);
        registry.put(subnet("10.2.77.0/24"), r#"{"PublicIP":"172.20.62.177"}"#, 0);
        let leases = watcher.initial_leases().await?;
        let subnets: Vec<_> = leases.iter().map(|lease| lease.subnet).collect();
        assert_eq!(subnets, [subnet("10.2.54.0/24")]);
        Ok(())
    }

    fn key(name: &str) -> String {
        format!("{PREFIX}/subnets/{name}")
    }

    /// Records any member of the cluster can write that would stop, hijack or blind this host
    /// (10.2.41.0/24): one naming our subnet under another key, more specific ones, one
    /// covering the whole network, keys that do not parse exactly.
    const HOSTILE_KEYS: [&str; 5] = [
        "10.2.41.0-24&fc00::-64",
        "10.2.41.0-24&anything",
        "10.2.41.128-25",
        "10.2.0.0-16",
        "10.2.60.0-24&fc00::1-64",
    ];

    #[tokio::test]
    async fn hostile_records_are_skipped_and_never_revoke_our_lease() -> Result<()> {
        let (registry, mut watcher) = watched();
        let hostile = record_of(66, MacAddr::random_local());
        for name in HOSTILE_KEYS {
            registry.put_key(&key(name), &hostile, 5);
        }
        let remote = subnet("10.2.54.0/24");
        registry.put(remote, &record_of(105, MacAddr::random_local()), 2);
        let leases = watcher.initial_leases().await?;
        let subnets: Vec<_> = leases.iter().map(|lease| lease.subnet).collect();
        assert_eq!(subnets, [remote], "only the real lease is used");

        let (sender, mut events) = mpsc::channel(16);
        let running = tokio::spawn(watcher.run(sender));
        for name in HOSTILE_KEYS {
            registry.put_key(&key(name), &record_of(67, MacAddr::random_local()), 6);
        }
        // A lease written after them arrives as usual, and nothing else does.
        let later = subnet("10.2.60.0/24");
        registry.put(later, &record_of(106, MacAddr::random_local()), 7);
        assert_eq!(subnet_of(&next_event(&mut events).await), ("added", later));
        for name in HOSTILE_KEYS {
            registry.remove_key(&key(name));
        }
        registry.remove(later);
        assert_eq!(
            subnet_of(&next_event(&mut events).await),
            ("removed", later)
        );
        assert!(
            !running.is_finished(),
            "the watch goes on: our lease stands"
        );
        running.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_second_record_for_a_leased_subnet_is_skipped_while_the_first_stands() -> Result<()> {
        let (registry, mut watcher) = watched();
        let remote = subnet("10.2.54.0/24");
        let first = record_of(105, MacAddr::random_local());
        registry.put(remote, &first, 2);
        watcher.initial_leases().await?;
        let (sender, mut events) = mpsc::channel(16);
        let running = tokio::spawn(watcher.run(sender));

        let second = key("10.2.54.0-24&fc00::-64");
        registry.put_key(&second, &record_of(66, MacAddr::random_local()), 3);
        registry.remove_key(&second);
        // Only the record holding the lease takes it away.
        registry.remove(remote);
        let event = next_event(&mut events).await;
        assert_eq!(subnet_of(&event), ("removed", remote));
        let LeaseEvent::Removed(lease) = event else {
            unreachable!("checked above");
        };
        assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(172, 20, 62, 105));
        running.abort();
        Ok(())
    }

    #[tokio::test]
    async fn a_record_copying_a_leases_vtep_mac_is_skipped_while_the_lease_stands() -> Result<()> {
        let (registry, mut watcher) = watched();
        let (original, copy, later) = (
            subnet("10.2.54.0/24"),
            subnet("10.2.3.0/24"),
            subnet("10.2.60.0/24"),
        );
        let mac = MacAddr::random_local();
        registry.put(original, &record_of(105, mac), 2);
        watcher.initial_leases().await?;
        let (sender, mut events) = mpsc::channel(16);
        let running = tokio::spawn(watcher.run(sender));

        registry.put(copy, &record_of(66, mac), 3);
        registry.put(later, &record_of(106, MacAddr::random_local()), 4);
        assert_eq!(subnet_of(&next_event(&mut events).await), ("added", later));
        // Gone, the original frees its MAC for the next record that names it.
        registry.remove(original);
        assert_eq!(
            subnet_of(&next_event(&mut events).await),
            ("removed", original)
        );
        registry.put(copy, &record_of(66, mac), 5);
        assert_eq!(subnet_of(&next_event(&mut events).await), ("added", copy));
        running.abort();
        Ok(())
    }

    #[tokio::test]
    async fn puts_and_deletes_become_added_changed_and_removed_once_each() -> Result<()> {
        let (registry, mut watcher) = watched();
        watcher.initial_leases().await?;
        let (sender, mut events) = mpsc::channel(16);
        let running = tokio::spawn(watcher.run(sender));

        let remote = subnet("10.2.54.0/24");
        let mac = MacAddr::random_local();
        registry.put(remote, &record_of(105, mac), 2);
        assert_eq!(subnet_of(&next_event(&mut events).await), ("added", remote));
        // A renewal moves the record to another etcd lease only: nothing to report.
        registry.put(remote, &record_of(105, mac), 3);
        registry.put(remote, &record_of(105, MacAddr::random_local()), 4);
        assert_eq!(
            subnet_of(&next_event(&mut events).await),
            ("changed", remote)
        );
        registry.remove(remote);
        assert_eq!(
            subnet_of(&next_event(&mut events).await),
            ("removed", remote)
        );
        assert!(events.try_recv().is_err(), "nothing more");
        running.abort();
        Ok(())
    }

    #[tokio::test]
    async fn losing_our_own_record_stops_the_watch_with_lease_revoked() -> Result<()> {
        let (registry, mut watcher) = watched();
        watcher.initial_leases().await?;
        let (sender, _events) = mpsc::channel(16);
        let running = tokio::spawn(watcher.run(sender));
        registry.remove(subnet("10.2.41.0/24"));
        let outcome = tokio::time::timeout(WAIT, running).await??;
        let error = outcome.expect_err("the watch stops");
        assert!(error.is::<LeaseRevoked>(), "{error:#}");
        Ok(())
    }

    #[tokio::test]
    async fn after_a_compaction_the_relisting_reports_only_the_difference() -> Result<()> {
        let (registry, mut watcher) = watched();
        let (kept, gone, new) = (
            subnet("10.2.54.0/24"),
            subnet("10.2.55.0/24"),
            subnet("10.2.56.0/24"),
        );
        registry.put(kept, &record_of(105, MacAddr::random_local()), 2);
        registry.put(gone, &record_of(106, MacAddr::random_local()), 3);
        assert_eq!(watcher.initial_leases().await?.len(), 2);
        // Missed while disconnected, and compacted away before the watch resumes.
        registry.remove(gone);
        registry.put(new, &record_of(107, MacAddr::random_local()), 4);
        registry.compact();

        let (sender, mut events) = mpsc::channel(16);
        let running = tokio::spawn(watcher.run(sender));
        let mut seen = vec![
            subnet_of(&next_event(&mut events).await),
            subnet_of(&next_event(&mut events).await),
        ];
        seen.sort();
        assert_eq!(seen, [("added", new), ("removed", gone)]);
        assert!(
            events.try_recv().is_err(),
            "{kept} is reported no second time"
        );
        running.abort();
        Ok(())
    }
}
