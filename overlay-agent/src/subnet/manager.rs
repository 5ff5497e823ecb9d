//! Acquiring this host's subnet lease, in flannel's order, and keeping it alive.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Result, bail};
use ipnetwork::Ipv4Network;
use tokio::time::{Instant, sleep, sleep_until};

use super::{Lease, LeaseAttrs, Record, registry::Registry, subnet_from_key};
use crate::{
    config::NetworkConfig,
    health::{Duty, Health},
    mac::{MacAddr, random_u64},
    metrics::LeaseMetrics,
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

pub struct LeaseManager<R> {
    pub registry: R,
    pub config: NetworkConfig,
    pub public_ip: Ipv4Addr,
    pub timing: LeaseTiming,
    pub metrics: LeaseMetrics,
    pub health: Health,
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

impl<R: Registry> LeaseManager<R> {
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
                self.config.subnet_count(),
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

    /// Publishes when a lease granted just now expires.
    fn report_expiry(&self) {
        let expiry = std::time::SystemTime::now() + self.timing.ttl;
        let since_epoch = expiry
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics.expiry.set(since_epoch.as_secs_f64());
    }

    /// Renews the lease before it expires, for as long as the agent runs; returns only with
    /// an error: [`LeaseRevoked`] when the record is gone. A reservation needs no renewal.
    pub async fn keep_alive(&self, mut lease: Lease) -> Result<()> {
        if lease.is_reservation() {
            self.metrics.expiry.set(f64::INFINITY);
            return std::future::pending().await;
        }
        let mut expiry = Instant::now() + self.timing.ttl;
        self.report_expiry();
        loop {
            sleep_until(self.timing.renewal_time(expiry)).await;
            let attempted = Instant::now();
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
                    self.report_expiry();
                    self.health.succeeded(Duty::LeaseRenewal);
                    log::debug!("renewed lease {}", lease.subnet);
                }
                Ok(None) => return Err(LeaseRevoked(lease.subnet).into()),
                Err(error) => {
                    self.health.failed(Duty::LeaseRenewal, attempted, &error);
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
    use crate::subnet::memory::MemoryRegistry;

    const PREFIX: &str = "/docker-test/network";
    const HOST1: Ipv4Addr = Ipv4Addr::new(172, 20, 62, 104);
    const HOST2: Ipv4Addr = Ipv4Addr::new(172, 20, 62, 105);

    fn subnet(text: &str) -> Ipv4Network {
        text.parse().expect("test subnet")
    }

    fn manager(registry: &MemoryRegistry, ttl: Duration) -> LeaseManager<MemoryRegistry> {
        LeaseManager {
            registry: registry.clone(),
            config: seed_config(),
            public_ip: HOST1,
            timing: LeaseTiming {
                ttl,
                renew_margin: ttl,
            },
            metrics: LeaseMetrics::default(),
            health: Health::new(Duration::from_secs(30)),
        }
    }

    fn seed_config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#)
            .expect("the seed's config parses")
    }

    fn registry() -> MemoryRegistry {
        MemoryRegistry::new(PREFIX, seed_config())
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[tokio::test]
    async fn a_new_host_leases_a_free_subnet_in_flannels_record_format() -> Result<()> {
        let registry = registry();
        registry.put(
            subnet("10.2.54.0/24"),
            &LeaseAttrs::vxlan(HOST2, 1, MacAddr::random_local()).to_json(),
            1,
        );
        let lease = manager(&registry, DAY).acquire(None, None).await?;
        assert!(seed_config().fits(lease.subnet));
        assert_ne!(lease.subnet, subnet("10.2.54.0/24"), "never a held subnet");
        assert_ne!(lease.etcd_lease, 0, "a lease, not a reservation");
        let record = registry
            .record(lease.subnet)
            .expect("the record is written");
        assert_eq!(record.value, Some(lease.attrs.to_json().into_bytes()));
        Ok(())
    }

    #[tokio::test]
    async fn a_reservation_is_kept_and_stays_a_reservation() -> Result<()> {
        let registry = registry();
        let reserved = subnet("10.2.41.0/24");
        registry.put(reserved, r#"{"PublicIP":"172.20.62.104"}"#, 0);
        let mac = MacAddr::random_local();
        let lease = manager(&registry, DAY).acquire(Some(mac), None).await?;
        assert_eq!((lease.subnet, lease.etcd_lease), (reserved, 0));
        assert_eq!(lease.attrs.vtep_mac(), Some(mac));
        let record = registry.record(reserved).expect("still there");
        assert_eq!(record.etcd_lease, 0);
        assert_eq!(
            record.value,
            Some(LeaseAttrs::vxlan(HOST1, 1, mac).to_json().into_bytes())
        );
        Ok(())
    }

    #[tokio::test]
    async fn the_previous_subnet_is_taken_again_only_while_free() -> Result<()> {
        let registry = registry();
        let previous = subnet("10.2.41.0/24");
        let manager = manager(&registry, DAY);
        assert_eq!(
            manager.acquire(None, Some(previous)).await?.subnet,
            previous
        );

        let registry = self::registry();
        registry.put(
            previous,
            &LeaseAttrs::vxlan(HOST2, 1, MacAddr::random_local()).to_json(),
            1,
        );
        let manager = self::manager(&registry, DAY);
        let lease = manager.acquire(None, Some(previous)).await?;
        assert!(!lease.subnet.overlaps(previous), "{} is held", previous);
        Ok(())
    }

    #[tokio::test]
    async fn an_own_record_that_no_longer_fits_the_network_is_replaced() -> Result<()> {
        let registry = registry();
        let outside = subnet("10.9.41.0/24");
        registry.put(
            outside,
            &LeaseAttrs::vxlan(HOST1, 1, MacAddr::random_local()).to_json(),
            1,
        );
        let lease = manager(&registry, DAY).acquire(None, None).await?;
        assert!(seed_config().fits(lease.subnet));
        assert!(registry.record(outside).is_none(), "the misfit is deleted");
        Ok(())
    }

    #[tokio::test]
    async fn keep_alive_renews_and_stops_when_the_record_is_gone() -> Result<()> {
        let registry = registry();
        let manager = manager(&registry, Duration::from_millis(400));
        let lease = manager.acquire(None, None).await?;
        let keep_alive = manager.keep_alive(lease.clone());
        tokio::pin!(keep_alive);
        // Renewals happen halfway through a TTL this short: after 600 ms, at least two.
        let still_running = tokio::time::timeout(Duration::from_millis(600), &mut keep_alive).await;
        assert!(still_running.is_err(), "keep_alive returned early");
        let renewed = registry.record(lease.subnet).expect("the record stays");
        assert!(
            renewed.etcd_lease > lease.etcd_lease,
            "renewed onto a new etcd lease"
        );

        registry.remove(lease.subnet);
        let ended = tokio::time::timeout(Duration::from_secs(2), keep_alive)
            .await
            .expect("keep_alive notices within a TTL");
        let error = ended.expect_err("a revoked lease is an error");
        assert!(error.is::<LeaseRevoked>(), "{error:#}");
        Ok(())
    }

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
