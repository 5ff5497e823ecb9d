//! Acquiring this host's subnet lease, in flannel's order, and keeping it alive.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Result, bail};
use ipnetwork::Ipv4Network;
use tokio::time::{Instant, sleep, sleep_until};

use super::{Lease, LeaseAttrs, Record, registry::Registry, subnet_from_key};
use crate::{
    config::NetworkConfig,
    mac::{MacAddr, random_u64},
};

/// How many times a subnet lost to another host's create is retried with a fresh listing.
const MAX_CREATE_RACES: usize = 10;
/// flannel picks at random among at most this many free subnets.
const RANDOM_CANDIDATES: usize = 100;
/// flannel retries a failed renewal every minute.
const RENEW_RETRY: Duration = Duration::from_secs(60);

/// This host's record disappeared (deleted or expired) or was taken over: the subnet is no
/// longer ours. The agent must stop.
#[derive(Debug)]
pub struct LeaseRevoked(pub Ipv4Network);

impl std::fmt::Display for LeaseRevoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lease revoked: the record of {} is gone or no longer ours",
            self.0
        )
    }
}

impl std::error::Error for LeaseRevoked {}

pub struct LeaseManager {
    pub registry: Registry,
    pub config: NetworkConfig,
    pub public_ip: Ipv4Addr,
    pub timing: LeaseTiming,
}

/// How long a lease lives and when it is renewed.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub renew_margin: Duration,
}

impl LeaseTiming {
    /// `renew_margin` before expiry, as flannel does; a margin as long as the TTL itself
    /// (short test TTLs) renews halfway instead of continuously.
    fn renewal_time(&self, expiry: Instant) -> Instant {
        let margin = if self.renew_margin < self.ttl {
            self.renew_margin
        } else {
            self.ttl / 2
        };
        expiry.checked_sub(margin).unwrap_or(expiry)
    }

    fn retry_delay(&self) -> Duration {
        RENEW_RETRY
            .min(self.ttl / 5)
            .max(Duration::from_millis(200))
    }
}

impl LeaseManager {
    /// Acquires a subnet, in flannel's order: this host's own record, if it fits the config
    /// (a reservation stays a reservation); the subnet of the previous subnet file, if free
    /// and fitting; a random free subnet. `vtep_mac`, when known, goes into the record;
    /// otherwise the own record's MAC is kept, or a new one made.
    pub async fn acquire(
        &self,
        vtep_mac: Option<MacAddr>,
        previous: Option<Ipv4Network>,
    ) -> Result<Lease> {
        for _ in 0..MAX_CREATE_RACES {
            let listing = self.registry.list().await?;
            let leases: Vec<Lease> = listing
                .records
                .iter()
                .filter_map(|record| self.parse_logged(record))
                .collect();

            if let Some(own) = leases
                .iter()
                .find(|lease| lease.attrs.public_ip == self.public_ip)
            {
                if self.config.fits(own.subnet) {
                    let mac = vtep_mac
                        .or(own.attrs.vtep_mac())
                        .unwrap_or_else(MacAddr::random_local);
                    if let Some(lease) = self.reuse(own, mac).await? {
                        return Ok(lease);
                    }
                    continue;
                }
                log::warn!(
                    "deleting this host's record of {}: it does not fit the network config",
                    own.subnet
                );
                self.registry.delete(own.subnet).await?;
                continue;
            }

            let attrs = LeaseAttrs::vxlan(
                self.public_ip,
                self.config.backend.vni,
                vtep_mac.unwrap_or_else(MacAddr::random_local),
            );
            // Every record's key counts as taken, even one whose value is malformed.
            let held: Vec<Ipv4Network> = listing
                .records
                .iter()
                .filter_map(|record| subnet_from_key(self.registry.prefix(), &record.key))
                .collect();
            let taken = |subnet: Ipv4Network| held.iter().any(|other| other.overlaps(subnet));
            let candidate =
                match previous.filter(|&subnet| self.config.fits(subnet) && !taken(subnet)) {
                    Some(subnet) => subnet,
                    None => self.random_free_subnet(&taken)?,
                };
            if let Some(etcd_lease) = self
                .registry
                .create(candidate, &attrs, self.timing.ttl)
                .await?
            {
                log::info!("acquired lease {candidate}");
                return Ok(Lease {
                    subnet: candidate,
                    attrs,
                    etcd_lease,
                });
            }
            log::info!("{candidate} was taken by another host meanwhile; trying again");
        }
        bail!("could not acquire a subnet: lost {MAX_CREATE_RACES} races with other hosts in a row")
    }

    /// Re-puts our own record with fresh attributes: a reservation stays without etcd lease,
    /// anything else gets a fresh one. `None` when the record vanished meanwhile.
    async fn reuse(&self, own: &Lease, vtep_mac: MacAddr) -> Result<Option<Lease>> {
        let attrs = LeaseAttrs::vxlan(self.public_ip, self.config.backend.vni, vtep_mac);
        let ttl = (!own.is_reservation()).then_some(self.timing.ttl);
        let Some(etcd_lease) = self
            .registry
            .update(own.subnet, &attrs, self.public_ip, ttl)
            .await?
        else {
            return Ok(None);
        };
        let kind = if own.is_reservation() {
            "reservation"
        } else {
            "lease"
        };
        log::info!("reusing {kind} {} of {}", own.subnet, self.public_ip);
        Ok(Some(Lease {
            subnet: own.subnet,
            attrs,
            etcd_lease,
        }))
    }

    fn random_free_subnet(&self, taken: &dyn Fn(Ipv4Network) -> bool) -> Result<Ipv4Network> {
        let free: Vec<Ipv4Network> = self
            .config
            .subnets()
            .filter(|&subnet| !taken(subnet))
            .take(RANDOM_CANDIDATES)
            .collect();
        if free.is_empty() {
            bail!(
                "no free subnet: all {} /{} subnets of {} between SubnetMin {} and SubnetMax {} are leased",
                self.config.subnets().count(),
                self.config.subnet_len,
                self.config.network,
                self.config.subnet_min,
                self.config.subnet_max
            );
        }
        Ok(free[(random_u64() % free.len() as u64) as usize])
    }

    fn parse_logged(&self, record: &Record) -> Option<Lease> {
        record
            .parse(self.registry.prefix())
            .inspect_err(|error| log::warn!("skipping record {}: {error}", record.key))
            .ok()
    }

    /// Renews the lease before it expires, for as long as the agent runs; returns only with
    /// an error: [`LeaseRevoked`] when the record is gone. A reservation needs no renewal.
    pub async fn keep_alive(&self, mut lease: Lease) -> Result<()> {
        if lease.is_reservation() {
            return std::future::pending().await;
        }
        let mut expiry = Instant::now() + self.timing.ttl;
        loop {
            sleep_until(self.timing.renewal_time(expiry)).await;
            match self
                .registry
                .update(
                    lease.subnet,
                    &lease.attrs,
                    self.public_ip,
                    Some(self.timing.ttl),
                )
                .await
            {
                Ok(Some(etcd_lease)) => {
                    lease.etcd_lease = etcd_lease;
                    expiry = Instant::now() + self.timing.ttl;
                    log::debug!("renewed lease {}", lease.subnet);
                }
                Ok(None) => return Err(LeaseRevoked(lease.subnet).into()),
                Err(error) => {
                    let retry = self.timing.retry_delay();
                    log::warn!(
                        "cannot renew lease {}: {error:#}; retrying in {retry:?}",
                        lease.subnet
                    );
                    sleep(retry).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn renewal_offset(ttl: u64, margin: u64) -> Duration {
        let expiry = Instant::now() + Duration::from_secs(ttl);
        let timing = LeaseTiming {
            ttl: Duration::from_secs(ttl),
            renew_margin: Duration::from_secs(margin),
        };
        expiry - timing.renewal_time(expiry)
    }

    #[test]
    fn renewal_starts_a_margin_before_expiry_or_halfway_for_short_leases() {
        assert_eq!(
            renewal_offset(86400, 3600),
            Duration::from_secs(3600),
            "flannel's default: 1 h before"
        );
        assert_eq!(
            renewal_offset(5, 3600),
            Duration::from_millis(2500),
            "a 5 s test lease renews halfway"
        );
    }
}
