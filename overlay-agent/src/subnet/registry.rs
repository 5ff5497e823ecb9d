//! Where the leases live, as the lease manager and the watch see it: flannel's network config,
//! the subnet records, conditional writes on them, and a watch. [`super::etcd`] keeps them in
//! etcd; the unit tests keep them in memory.
use std::{future::Future, time::Duration};

use anyhow::Result;

use super::{LeaseAttrs, LeaseSubnets, PublicAddresses, Record};
use crate::config::NetworkConfig;

/// All subnet records at one revision.
pub struct Listing {
    pub records: Vec<Record>,
    pub revision: i64,
}

/// What [`Registry::release_if_owned`] did with a record.
#[derive(Debug, PartialEq, Eq)]
pub enum Release {
    Deleted,
    /// The record is gone or names another host: left alone.
    NotOwned,
    /// The record is a reservation, the operator's to delete: left alone.
    Reserved,
}

/// The network config could not be read; callers wait and retry on `Missing`.
#[derive(Debug)]
pub enum ConfigReadError {
    Missing(String),
    Invalid(crate::config::ConfigError),
    Etcd(etcd_client::Error),
}

impl std::fmt::Display for ConfigReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(key) => write!(f, "no network config at {key}"),
            Self::Invalid(error) => write!(f, "{error}"),
            Self::Etcd(error) => write!(f, "cannot read the network config from etcd: {error}"),
        }
    }
}

impl std::error::Error for ConfigReadError {}

/// One change to a subnet record, as a watch reports it.
#[derive(Clone, Debug)]
pub struct RecordChange {
    /// The record after a put; for a delete, its key (and nothing else that matters).
    pub record: Record,
    pub deleted: bool,
    /// The revision of the change: a watch resumed from `revision + 1` misses nothing after.
    pub revision: i64,
}

/// What one watch response brought.
#[derive(Clone, Debug)]
pub enum WatchUpdate {
    /// Changes in revision order (possibly none: a progress notification).
    Changes(Vec<RecordChange>),
    /// The revisions asked for were compacted away: list again.
    Compacted,
    /// The response was larger than the client receives: list again, in pages.
    TooLarge,
}

/// A watch over every subnet record from some revision on.
pub trait Watch: Send {
    /// The next response; `None` when the registry closed the watch.
    fn next(&mut self) -> impl Future<Output = Result<Option<WatchUpdate>>> + Send;
}

pub trait Registry: Clone + Send + Sync {
    type Watch: Watch;

    /// The key prefix, flannel's `--etcd-prefix`.
    fn prefix(&self) -> &str;

    fn network_config(&self)
    -> impl Future<Output = Result<NetworkConfig, ConfigReadError>> + Send;

    fn list(&self) -> impl Future<Output = Result<Listing>> + Send;

    /// Creates the record for `subnet` only if no record exists, attached to a fresh etcd lease
    /// of `ttl`. Returns the etcd lease, or `None` when another host holds the subnet.
    fn create(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Rewrites an existing record with `attrs`: attached to a fresh etcd lease of `ttl`, or to
    /// none for a reservation (`ttl` of `None`). Returns the new etcd lease (0 for none), or
    /// `None` when the record no longer exists or no longer names `owner`: the lease was
    /// revoked.
    fn update(
        &self,
        subnets: LeaseSubnets,
        attrs: &LeaseAttrs,
        owner: PublicAddresses,
        ttl: Option<Duration>,
    ) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Deletes the record of `subnets` if it still names `owner` and is a lease; a
    /// reservation (a record without etcd lease, which an operator wrote) stays.
    fn release_if_owned(
        &self,
        subnets: LeaseSubnets,
        owner: PublicAddresses,
    ) -> impl Future<Output = Result<Release>> + Send;

    fn delete(&self, subnets: LeaseSubnets) -> impl Future<Output = Result<()>> + Send;

    /// Watches every subnet record from `revision` on.
    fn watch(&self, revision: i64) -> impl Future<Output = Result<Self::Watch>> + Send;
}

/// The subnets of the record naming `owner`, the record flannel takes as a host's own.
pub async fn own_subnets(
    registry: &impl Registry,
    owner: PublicAddresses,
) -> Result<Option<LeaseSubnets>> {
    let listing = registry.list().await?;
    Ok(listing
        .records
        .iter()
        .filter_map(|record| record.parse(registry.prefix()).ok())
        .find(|lease| owner.named_in(&lease.attrs))
        .map(|lease| lease.subnets()))
}
