//! A registry in memory for the unit tests of the lease manager and the watch: etcd's
//! semantics for what they use (revisions, conditional writes, watches from a revision,
//! compaction), and nothing else.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::Result;
use tokio::sync::watch;

use super::{
    LeaseAttrs, LeaseSubnets, PublicAddresses, Record, fits_a_record,
    registry::{ConfigReadError, Listing, RecordChange, Registry, Release, Watch, WatchUpdate},
    subnet_key,
};
use crate::config::NetworkConfig;

#[derive(Clone)]
pub struct MemoryRegistry {
    prefix: String,
    config: NetworkConfig,
    state: Arc<Mutex<State>>,
    /// The newest revision, for watches waiting on a change.
    revision: watch::Sender<i64>,
}

#[derive(Default)]
struct State {
    records: BTreeMap<String, Record>,
    /// Every change, oldest first; changes before `compacted` are gone.
    history: Vec<RecordChange>,
    compacted: i64,
    next_etcd_lease: i64,
}

impl MemoryRegistry {
    pub fn new(prefix: &str, config: NetworkConfig) -> Self {
        Self {
            prefix: prefix.to_string(),
            config,
            state: Arc::default(),
            revision: watch::Sender::new(0),
        }
    }

    /// Writes a record as another writer would (another host, an operator).
    pub fn put(&self, subnets: impl Into<LeaseSubnets>, value: &str, etcd_lease: i64) {
        self.put_key(&subnet_key(&self.prefix, subnets.into()), value, etcd_lease);
    }

    /// Writes a record under `key`, whatever it says: a dual-stack key, or a hostile one.
    pub fn put_key(&self, key: &str, value: &str, etcd_lease: i64) {
        let record = Record {
            key: key.to_string(),
            value: fits_a_record(value.as_bytes()).then(|| value.as_bytes().to_vec()),
            etcd_lease,
            create_revision: 0,
        };
        self.commit(record, false);
    }

    /// Deletes the record under `key`, if there is one.
    pub fn remove_key(&self, key: &str) {
        let removed = self.state().records.remove(key);
        if let Some(record) = removed {
            self.commit(record, true);
        }
    }

    /// Deletes a record as another writer would, or as etcd does when its lease expires.
    pub fn remove(&self, subnets: impl Into<LeaseSubnets>) {
        self.remove_key(&subnet_key(&self.prefix, subnets.into()));
    }

    /// Forgets every change up to the newest revision, as etcd's compaction does.
    pub fn compact(&self) {
        let newest = *self.revision.borrow();
        let mut state = self.state();
        state.compacted = newest + 1;
        state.history.clear();
    }

    pub fn record(&self, subnets: impl Into<LeaseSubnets>) -> Option<Record> {
        self.state()
            .records
            .get(&subnet_key(&self.prefix, subnets.into()))
            .cloned()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Stores a change at the next revision; a record put keeps the revision that created it,
    /// as etcd's `create_revision`.
    fn commit(&self, mut record: Record, deleted: bool) {
        let revision = *self.revision.borrow() + 1;
        {
            let mut state = self.state();
            if !deleted {
                record.create_revision = state
                    .records
                    .get(&record.key)
                    .map_or(revision, |stored| stored.create_revision);
                state.records.insert(record.key.clone(), record.clone());
            }
            state.history.push(RecordChange {
                record,
                deleted,
                revision,
            });
        }
        self.revision.send_replace(revision);
    }

    fn grant(&self) -> i64 {
        let mut state = self.state();
        state.next_etcd_lease += 1;
        state.next_etcd_lease
    }

    fn held_by(&self, key: &str, owner: PublicAddresses) -> bool {
        let records = &self.state().records;
        let attrs = records
            .get(key)
            .and_then(|record| record.value.as_deref())
            .and_then(|value| serde_json::from_slice::<LeaseAttrs>(value).ok());
        attrs.is_some_and(|attrs| owner.named_in(&attrs))
    }
}

impl Registry for MemoryRegistry {
    type Watch = MemoryWatch;

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn network_config(&self) -> Result<NetworkConfig, ConfigReadError> {
        Ok(self.config.clone())
    }

    async fn list(&self) -> Result<Listing> {
        let revision = *self.revision.borrow();
        let records = self.state().records.values().cloned().collect();
        Ok(Listing { records, revision })
    }

    async fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        _ttl: Duration,
    ) -> Result<Option<i64>> {
        if self.record(subnets).is_some() {
            return Ok(None);
        }
        let etcd_lease = self.grant();
        self.put(subnets, &attrs.to_json(), etcd_lease);
        Ok(Some(etcd_lease))
    }

    async fn update(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        owner: PublicAddresses,
        ttl: Option<Duration>,
    ) -> Result<Option<i64>> {
        if !self.held_by(&subnet_key(&self.prefix, subnets), owner) {
            return Ok(None);
        }
        let etcd_lease = ttl.map_or(0, |_| self.grant());
        self.put(subnets, &attrs.to_json(), etcd_lease);
        Ok(Some(etcd_lease))
    }

    async fn release_if_owned(
        &self,
        subnets: LeaseSubnets,
        owner: PublicAddresses,
    ) -> Result<Release> {
        let key = subnet_key(&self.prefix, subnets);
        if !self.held_by(&key, owner) {
            return Ok(Release::NotOwned);
        }
        let reserved = self
            .state()
            .records
            .get(&key)
            .is_some_and(|record| record.etcd_lease == 0);
        if reserved {
            return Ok(Release::Reserved);
        }
        self.remove(subnets);
        Ok(Release::Deleted)
    }

    async fn delete(&self, subnets: LeaseSubnets) -> Result<()> {
        self.remove(subnets);
        Ok(())
    }

    async fn watch(&self, revision: i64) -> Result<MemoryWatch> {
        Ok(MemoryWatch {
            registry: self.clone(),
            newest: self.revision.subscribe(),
            next: revision,
        })
    }
}

pub struct MemoryWatch {
    registry: MemoryRegistry,
    newest: watch::Receiver<i64>,
    next: i64,
}

impl Watch for MemoryWatch {
    async fn next(&mut self) -> Result<Option<WatchUpdate>> {
        loop {
            {
                let state = self.registry.state();
                if self.next < state.compacted {
                    return Ok(Some(WatchUpdate::Compacted));
                }
                let changes: Vec<RecordChange> = state
                    .history
                    .iter()
                    .filter(|change| change.revision >= self.next)
                    .cloned()
                    .collect();
                if let Some(last) = changes.last() {
                    self.next = last.revision + 1;
                    return Ok(Some(WatchUpdate::Changes(changes)));
                }
            }
            if self.newest.changed().await.is_err() {
                return Ok(None);
            }
        }
    }
}
