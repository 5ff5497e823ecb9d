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
        }
    }

    /// Reports every other host's lease as added, then every change, until the receiver is
    /// dropped. Returns an error only when this host's own lease is revoked.
    pub async fn run(mut self, events: mpsc::Sender<LeaseEvent>) -> Result<()> {
        let mut backoff = BACKOFF_FIRST;
        let mut listed = false;
        loop {
            let outcome = if listed {
                self.follow(&events).await
            } else {
                self.resync(&events).await.map(|()| {
                    listed = true;
                    None
                })
            };
            match outcome {
                Ok(None) => backoff = BACKOFF_FIRST,
                Ok(Some(Interruption::Compacted)) => {
                    log::info!(
                        "etcd compacted past revision {}; re-listing",
                        self.next_revision
                    );
                    listed = false;
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

    /// Lists every record and reports the difference to what was reported before.
    async fn resync(&mut self, events: &mpsc::Sender<LeaseEvent>) -> Result<()> {
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
        for subnet in gone {
            if let Some(lease) = self.known.remove(&subnet) {
                send(events, LeaseEvent::Removed(lease)).await?;
            }
        }
        for lease in current.into_values() {
            self.remember(lease, events).await?;
        }
        self.next_revision = listing.revision + 1;
        Ok(())
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
                    self.apply(event, events).await?;
                    self.next_revision = revision + 1;
                }
            }
            if events.is_closed() {
                return Ok(Some(Interruption::Closed));
            }
        }
    }

    async fn apply(&mut self, event: &Event, events: &mpsc::Sender<LeaseEvent>) -> Result<()> {
        let Some(kv) = event.kv() else {
            return Ok(());
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
                Ok(())
            };
        }
        let Some(subnet) = subnet_from_key(self.registry.prefix(), &record.key) else {
            log::warn!(
                "skipping record {}: the key does not end in a subnet such as 10.2.54.0-24",
                record.key
            );
            return Ok(());
        };
        match event.event_type() {
            EventType::Put => match self.parse_remote_logged(&record) {
                Some(lease) => self.remember(lease, events).await,
                None => self.forget(subnet, events).await,
            },
            EventType::Delete => self.forget(subnet, events).await,
        }
    }

    /// Records `lease` and reports it if it is new or its attributes changed (a renewal only
    /// moves it to another etcd lease, which nobody downstream cares about).
    async fn remember(&mut self, lease: Lease, events: &mpsc::Sender<LeaseEvent>) -> Result<()> {
        let event = match self.known.get(&lease.subnet) {
            None => Some(LeaseEvent::Added(lease.clone())),
            Some(known) if known.attrs != lease.attrs => Some(LeaseEvent::Changed(lease.clone())),
            Some(_) => None,
        };
        self.known.insert(lease.subnet, lease);
        match event {
            Some(event) => send(events, event).await,
            None => Ok(()),
        }
    }

    async fn forget(
        &mut self,
        subnet: Ipv4Network,
        events: &mpsc::Sender<LeaseEvent>,
    ) -> Result<()> {
        match self.known.remove(&subnet) {
            Some(lease) => send(events, LeaseEvent::Removed(lease)).await,
            None => Ok(()),
        }
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

async fn send(events: &mpsc::Sender<LeaseEvent>, event: LeaseEvent) -> Result<()> {
    events
        .send(event)
        .await
        .map_err(|_| anyhow!("lease event receiver is gone"))
}
