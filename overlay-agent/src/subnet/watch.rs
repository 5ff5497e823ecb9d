//! Following every other host's lease: one listing, then a watch from the listing's revision,
//! reconnecting with backoff and re-listing when etcd has compacted past us.
//!
//! The watcher keeps the leases it has reported, so a re-list emits only the difference: no
//! event is lost across a disconnect and none is reported twice.
use std::{collections::HashMap, time::Duration};

use anyhow::{Result, anyhow, bail};
use etcd_client::{Event, EventType};
use ipnetwork::Ipv4Network;
use tokio::{sync::mpsc, time::sleep};

use super::{
    Lease, LeaseEvent, Record, RecordError, manager::LeaseRevoked, registry::Registry,
    subnet_from_key,
};
use crate::config::NetworkConfig;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

pub struct LeaseWatcher {
    registry: Registry,
    config: NetworkConfig,
    own: Lease,
    known: HashMap<Ipv4Network, Lease>,
    next_revision: i64,
    /// Whether `known` reflects a listing the watch can continue from.
    listed: bool,
}

/// Why following the watch stream stopped without an error of its own.
enum Interruption {
    /// etcd compacted the revisions we still needed: re-list.
    Compacted,
    /// Nobody listens to the events any more.
    Closed,
}

impl LeaseWatcher {
    pub fn new(registry: Registry, config: NetworkConfig, own: Lease) -> Self {
        Self {
            registry,
            config,
            own,
            known: HashMap::new(),
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
                Ok(Some(Interruption::Compacted)) => {
                    log::info!(
                        "etcd compacted past revision {}; re-listing",
                        self.next_revision
                    );
                    self.listed = false;
                }
                Ok(Some(Interruption::Closed)) => return Ok(()),
                Err(error) if error.is::<LeaseRevoked>() => return Err(error),
                Err(_) if events.is_closed() => return Ok(()),
                Err(error) => {
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
            return Err(LeaseRevoked(self.own.subnet).into());
        }
        let current: HashMap<Ipv4Network, Lease> = listing
            .records
            .iter()
            .filter(|record| !self.is_own(record))
            .filter_map(|record| self.parse_remote_logged(record))
            .map(|lease| (lease.subnet, lease))
            .collect();
        let gone: Vec<Ipv4Network> = self
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
        Ok(changes)
    }

    /// Applies watch events until the stream breaks. `Ok(None)` means a response arrived and
    /// the stream then ended normally.
    async fn follow(&mut self, events: &mpsc::Sender<LeaseEvent>) -> Result<Option<Interruption>> {
        let mut stream = self.registry.watch(self.next_revision).await?;
        let mut progressed = false;
        loop {
            let Some(response) = stream.message().await? else {
                return if progressed {
                    Ok(None)
                } else {
                    Err(anyhow!("etcd closed the watch"))
                };
            };
            progressed = true;
            if response.canceled() {
                if response.compact_revision() > 0 {
                    return Ok(Some(Interruption::Compacted));
                }
                bail!("etcd canceled the watch: {}", response.cancel_reason());
            }
            for event in response.events() {
                if let Some(revision) = event.kv().map(|kv| kv.mod_revision()) {
                    if let Some(change) = self.apply(event)? {
                        send_all(events, [change]).await?;
                    }
                    self.next_revision = revision + 1;
                }
            }
            if events.is_closed() {
                return Ok(Some(Interruption::Closed));
            }
        }
    }

    /// Updates what is known from one watch event; returns the change to report, if any.
    fn apply(&mut self, event: &Event) -> Result<Option<LeaseEvent>> {
        let Some(kv) = event.kv() else {
            return Ok(None);
        };
        let record = Record {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            etcd_lease: kv.lease(),
        };
        if self.is_own(&record) {
            let revoked = event.event_type() == EventType::Delete || !self.still_ours(&record);
            return if revoked {
                Err(LeaseRevoked(self.own.subnet).into())
            } else {
                Ok(None)
            };
        }
        let Some(subnet) = subnet_from_key(self.registry.prefix(), &record.key) else {
            log::warn!(
                "skipping record {}: the key does not end in a subnet such as 10.2.54.0-24",
                record.key
            );
            return Ok(None);
        };
        Ok(match event.event_type() {
            EventType::Put => match self.parse_remote_logged(&record) {
                Some(lease) => self.remember(lease),
                None => self.forget(subnet),
            },
            EventType::Delete => self.forget(subnet),
        })
    }

    /// Records `lease`; returns the change if it is new or its attributes changed (a renewal
    /// only moves it to another etcd lease, which nobody downstream cares about).
    fn remember(&mut self, lease: Lease) -> Option<LeaseEvent> {
        let change = match self.known.get(&lease.subnet) {
            None => Some(LeaseEvent::Added(lease.clone())),
            Some(known) if known.attrs != lease.attrs => Some(LeaseEvent::Changed(lease.clone())),
            Some(_) => None,
        };
        self.known.insert(lease.subnet, lease);
        change
    }

    fn forget(&mut self, subnet: Ipv4Network) -> Option<LeaseEvent> {
        self.known.remove(&subnet).map(LeaseEvent::Removed)
    }

    fn is_own(&self, record: &Record) -> bool {
        subnet_from_key(self.registry.prefix(), &record.key) == Some(self.own.subnet)
    }

    fn still_ours(&self, record: &Record) -> bool {
        record
            .parse(self.registry.prefix())
            .is_ok_and(|lease| lease.attrs.public_ip == self.own.attrs.public_ip)
    }

    fn parse_remote_logged(&self, record: &Record) -> Option<Lease> {
        record
            .parse_remote(self.registry.prefix(), &self.config)
            .inspect_err(|error| match error {
                // A reservation whose host has not come up yet: normal, not a fault.
                RecordError::NoVtep => log::info!("waiting for {}: {error}", record.key),
                _ => log::warn!("skipping record {}: {error}", record.key),
            })
            .ok()
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
