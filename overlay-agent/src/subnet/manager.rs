//! Acquiring this host's subnet lease, in flannel's order, and keeping it alive.
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use tokio::time::{Instant, sleep, sleep_until};

use super::{
    Lease, LeaseAttrs, LeaseSubnets, PublicAddresses, Record, VtepMacs, registry::Registry,
    subnet_from_key,
};
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
pub struct LeaseRevoked(pub LeaseSubnets);

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
    pub public: PublicAddresses,
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
    /// Acquires a subnet (with IPv6, a subnet of each family), in flannel's order: this
    /// host's own record, if it fits the config (a reservation stays a reservation); the
    /// subnets of the previous subnet file, if free and fitting; random free subnets.
    /// Unlike flannel, a subnet that still fits is kept when only the other family's is
    /// missing or misfits: enabling IPv6 does not renumber a host's IPv4 containers.
    /// `vtep_macs`, when known, go into the record; otherwise the own record's MACs are kept,
    /// or new ones made.
    pub async fn acquire(
        &self,
        vtep_macs: VtepMacs,
        mut previous: Option<LeaseSubnets>,
    ) -> Result<Lease> {
        // The MACs of a record of ours deleted for not fitting, kept for the new one.
        let mut recorded = VtepMacs::default();
        for _ in 0..MAX_CREATE_RACES {
            let listing = self.registry.list().await?;
            let leases: Vec<Lease> = listing
                .records
                .iter()
                .filter_map(|record| self.parse_logged(record))
                .collect();

            if let Some(own) = leases
                .iter()
                .find(|lease| self.public.named_in(&lease.attrs))
            {
                if self.fits(own.subnets()) {
                    let macs = self.vtep_macs(vtep_macs, own.attrs.vtep_macs());
                    if let Some(lease) = self.reuse(own, macs).await? {
                        return Ok(lease);
                    }
                    continue;
                }
                log::warn!(
                    "deleting this host's record of {}: it does not fit the network config",
                    own.subnets()
                );
                self.registry.delete(own.subnets()).await?;
                previous = Some(own.subnets());
                recorded = own.attrs.vtep_macs();
                continue;
            }

            let macs = self.vtep_macs(vtep_macs, recorded);
            let attrs = LeaseAttrs::vxlan(self.public, self.config.backend.vni, macs);
            // Every record's key counts as taken, even one whose value is malformed.
            let held: Vec<LeaseSubnets> = listing
                .records
                .iter()
                .filter_map(|record| subnet_from_key(self.registry.prefix(), &record.key))
                .collect();
            let kept = previous.and_then(|subnets| self.keep_free(subnets, &held));
            let candidate = self.with_random_free(kept, &held)?;
            if let Some(etcd_lease) = self
                .registry
                .create(candidate, &attrs, self.timing.ttl)
                .await?
            {
                log::info!("acquired lease {candidate}");
                return Ok(Lease {
                    subnet: candidate.ipv4,
                    ipv6_subnet: candidate.ipv6,
                    attrs,
                    etcd_lease,
                });
            }
            log::info!("{candidate} was taken by another host meanwhile; trying again");
        }
        bail!("could not acquire a subnet: lost {MAX_CREATE_RACES} races with other hosts in a row")
    }

    /// Whether `subnets` are the ones the config hands out: an IPv4 subnet that fits (flannel's
    /// empty one without IPv4) and, exactly when the network has IPv6, an IPv6 one that fits.
    fn fits(&self, subnets: LeaseSubnets) -> bool {
        self.config.fits(subnets.ipv4)
            && match (self.config.ipv6, subnets.ipv6) {
                (Some(range), Some(ipv6)) => range.fits(ipv6),
                (None, None) => true,
                _ => false,
            }
    }

    /// The VTEP MAC of each family of the network: the device's, else the record's, else new.
    fn vtep_macs(&self, devices: VtepMacs, recorded: VtepMacs) -> VtepMacs {
        let pick = |device: Option<MacAddr>, record: Option<MacAddr>| {
            device.or(record).unwrap_or_else(MacAddr::random_local)
        };
        VtepMacs {
            ipv4: self
                .config
                .enable_ipv4
                .then(|| pick(devices.ipv4, recorded.ipv4)),
            ipv6: self.config.ipv6.map(|_| pick(devices.ipv6, recorded.ipv6)),
        }
    }

    /// Re-puts our own record with fresh attributes: a reservation stays without etcd lease,
    /// anything else gets a fresh one. `None` when the record vanished meanwhile.
    async fn reuse(&self, own: &Lease, macs: VtepMacs) -> Result<Option<Lease>> {
        let attrs = LeaseAttrs::vxlan(self.public, self.config.backend.vni, macs);
        let ttl = (!own.is_reservation()).then_some(self.timing.ttl);
        let Some(etcd_lease) = self
            .registry
            .update(own.subnets(), &attrs, self.public, ttl)
            .await?
        else {
            return Ok(None);
        };
        let kind = if own.is_reservation() {
            "reservation"
        } else {
            "lease"
        };
        log::info!("reusing {kind} {} of {}", own.subnets(), self.public);
        Ok(Some(Lease {
            attrs,
            etcd_lease,
            ..own.clone()
        }))
    }

    /// The subnets of `previous` worth keeping: its IPv4 subnet if it fits and is free, else
    /// nothing at all (the IPv4 subnet is what other hosts route by); its IPv6 subnet if it
    /// fits and is free, else none, for [`Self::with_random_free`] to fill in.
    fn keep_free(&self, previous: LeaseSubnets, held: &[LeaseSubnets]) -> Option<LeaseSubnets> {
        let ipv4_free = !held.iter().any(|other| other.ipv4.overlaps(previous.ipv4));
        if self.config.enable_ipv4 && !(self.config.fits(previous.ipv4) && ipv4_free) {
            return None;
        }
        let ipv6 = previous.ipv6.filter(|&ipv6| {
            self.config.ipv6.is_some_and(|range| range.fits(ipv6))
                && !held
                    .iter()
                    .any(|other| other.ipv6.is_some_and(|other| other.overlaps(ipv6)))
        });
        Some(LeaseSubnets {
            ipv4: previous.ipv4,
            ipv6,
        })
    }

    /// The subnets `kept` by [`Self::keep_free`], with random free subnets for the families
    /// of the network they lack, picked as flannel picks them: among the first free ones of
    /// each range. Without IPv4 the IPv4 half is flannel's empty network.
    fn with_random_free(
        &self,
        kept: Option<LeaseSubnets>,
        held: &[LeaseSubnets],
    ) -> Result<LeaseSubnets> {
        let ipv4 = if !self.config.enable_ipv4 {
            self.config.network
        } else if let Some(kept) = kept {
            kept.ipv4
        } else {
            let free = self
                .config
                .subnets()
                .filter(|&subnet| !held.iter().any(|other| other.ipv4.overlaps(subnet)));
            pick_random(free).ok_or_else(|| {
                anyhow!(
                    "no free subnet: all {} /{} subnets of {} between SubnetMin {} and \
                     SubnetMax {} are leased",
                    self.config.subnets().count(),
                    self.config.subnet_len,
                    self.config.network,
                    self.config.subnet_min,
                    self.config.subnet_max
                )
            })?
        };
        let ipv6 = match (self.config.ipv6, kept.and_then(|kept| kept.ipv6)) {
            (None, _) => None,
            (Some(_), Some(ipv6)) => Some(ipv6),
            (Some(range), None) => {
                let free = range.subnets().filter(|&subnet| {
                    !held
                        .iter()
                        .any(|other| other.ipv6.is_some_and(|other| other.overlaps(subnet)))
                });
                Some(pick_random(free).ok_or_else(|| {
                    anyhow!(
                        "no free IPv6 subnet: all {} /{} subnets of {} between IPv6SubnetMin {} \
                         and IPv6SubnetMax {} are leased",
                        range.subnet_count(),
                        range.subnet_len,
                        range.network,
                        range.subnet_min,
                        range.subnet_max
                    )
                })?)
            }
        };
        Ok(LeaseSubnets { ipv4, ipv6 })
    }

    /// The lease `record` holds, if it can be used. Why not is said at debug level only: the
    /// lease watch, which starts right after, warns about each such record once.
    fn parse_logged(&self, record: &Record) -> Option<Lease> {
        record
            .parse(self.registry.prefix())
            .inspect_err(|error| log::debug!("taking a lease, {} is unusable: {error}", record.key))
            .ok()
    }

    /// Publishes when a lease granted just now expires; returns that time.
    fn report_expiry(&self) -> std::time::SystemTime {
        let expiry = std::time::SystemTime::now() + self.timing.ttl;
        let since_epoch = expiry
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics.expiry.set(since_epoch.as_secs_f64());
        expiry
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
                    lease.subnets(),
                    &lease.attrs,
                    self.public,
                    Some(self.timing.ttl),
                )
                .await
            {
                Ok(Some(etcd_lease)) => {
                    lease.etcd_lease = etcd_lease;
                    expiry = Instant::now() + self.timing.ttl;
                    let expires_at = self.report_expiry();
                    self.health.succeeded(Duty::LeaseRenewal);
                    log::info!(
                        "Lease renewed, new expiration: {} ({})",
                        go_time(expires_at),
                        lease.subnets()
                    );
                }
                Ok(None) => return Err(LeaseRevoked(lease.subnets()).into()),
                Err(error) => {
                    self.health.failed(Duty::LeaseRenewal, attempted, &error);
                    let retry = self.timing.retry_delay();
                    log::warn!(
                        "cannot renew lease {}: {error:#}; retrying in {retry:?}",
                        lease.subnets()
                    );
                    sleep(retry).await;
                }
            }
        }
    }
}

/// `time` as Go prints a UTC `time.Time`, as flanneld's log lines show it
/// (`2026-12-06 10:45:00.123 +0000 UTC`, milliseconds here).
fn go_time(time: std::time::SystemTime) -> String {
    match jiff::Timestamp::try_from(time) {
        Ok(timestamp) => timestamp
            .strftime("%Y-%m-%d %H:%M:%S%.3f +0000 UTC")
            .to_string(),
        Err(_) => format!("{time:?}"),
    }
}

/// One of the first [`RANDOM_CANDIDATES`] of `free`, at random.
fn pick_random<T>(free: impl Iterator<Item = T>) -> Option<T> {
    let mut candidates: Vec<T> = free.take(RANDOM_CANDIDATES).collect();
    if candidates.is_empty() {
        return None;
    }
    let index = (random_u64() % candidates.len() as u64) as usize;
    Some(candidates.swap_remove(index))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use ipnetwork::Ipv4Network;

    use super::*;
    use crate::subnet::{
        memory::MemoryRegistry,
        registry::{Release, own_subnets},
    };

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
            public: PublicAddresses {
                ipv4: HOST1,
                ipv6: None,
            },
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

    fn ipv6_manager(
        registry: &MemoryRegistry,
        config: &str,
        public: PublicAddresses,
    ) -> LeaseManager<MemoryRegistry> {
        LeaseManager {
            config: NetworkConfig::parse(config).expect("the test's config parses"),
            public,
            ..manager(registry, DAY)
        }
    }

    const DUAL_STACK: &str = r#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:2::/48", "Backend": {"Type": "vxlan"}}"#;
    const IPV6_ONLY: &str = r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:2::/48", "IPv6SubnetMax": "fd00:2:0:2::", "Backend": {"Type": "vxlan"}}"#;

    #[tokio::test]
    async fn an_ipv6_only_hosts_own_record_is_found_by_its_public_ipv6() -> Result<()> {
        let registry = registry();
        let public = PublicAddresses {
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv6: Some("fd00:ff::1".parse()?),
        };
        let lease = ipv6_manager(&registry, IPV6_ONLY, public)
            .acquire(VtepMacs::default(), None)
            .await?;
        assert_eq!(own_subnets(&registry, public).await?, Some(lease.subnets()));
        let stranger = PublicAddresses {
            ipv6: Some("fd00:ff::2".parse()?),
            ..public
        };
        assert_eq!(own_subnets(&registry, stranger).await?, None);
        Ok(())
    }

    #[tokio::test]
    async fn a_dual_stack_host_leases_a_subnet_of_each_family_under_flannels_key() -> Result<()> {
        let registry = registry();
        let public = PublicAddresses {
            ipv4: HOST1,
            ipv6: Some("fd00:ff::1".parse()?),
        };
        let manager = ipv6_manager(&registry, DUAL_STACK, public);
        let lease = manager.acquire(VtepMacs::default(), None).await?;
        let ipv6 = lease.ipv6_subnet.expect("an IPv6 subnet");
        assert!(manager.config.ipv6.unwrap().fits(ipv6));
        let record = registry.record(lease.subnets()).expect("written");
        assert!(
            record.key.contains(&format!(
                "{}-24&{}-64",
                lease.subnet.network(),
                ipv6.network()
            )),
            "{}",
            record.key
        );
        let written: serde_json::Value = serde_json::from_slice(&record.value.unwrap())?;
        assert_eq!(written["PublicIPv6"], "fd00:ff::1");
        assert_eq!(written["BackendV6Data"]["VNI"], 1);
        assert_ne!(
            written["BackendV6Data"]["VtepMAC"],
            written["BackendData"]["VtepMAC"]
        );

        let again = manager.acquire(VtepMacs::default(), None).await?;
        assert_eq!(
            (again.subnets(), again.attrs.vtep_macs()),
            (lease.subnets(), lease.attrs.vtep_macs()),
            "its own record is reused with its MACs"
        );
        Ok(())
    }

    #[tokio::test]
    async fn enabling_ipv6_keeps_the_ipv4_subnet_and_adds_an_ipv6_one() -> Result<()> {
        let registry = registry();
        let public = PublicAddresses {
            ipv4: HOST1,
            ipv6: Some("fd00:ff::1".parse()?),
        };
        let own = subnet("10.2.41.0/24");
        let mac = MacAddr::random_local();
        registry.put(own, &LeaseAttrs::ipv4_only(HOST1, 1, mac).to_json(), 3);
        let manager = ipv6_manager(&registry, DUAL_STACK, public);
        let lease = manager.acquire(VtepMacs::default(), None).await?;
        assert_eq!(lease.subnet, own, "the IPv4 subnet stays");
        assert!(lease.ipv6_subnet.is_some());
        assert_eq!(
            lease.attrs.vtep_mac(),
            Some(mac),
            "and so does flannel.1's MAC"
        );
        assert!(
            registry.record(own).is_none(),
            "the IPv4-only record is gone"
        );
        assert!(registry.record(lease.subnets()).is_some());

        // The same from a subnet file written before IPv6, with no record left.
        let registry = self::registry();
        let manager = ipv6_manager(&registry, DUAL_STACK, public);
        let lease = manager
            .acquire(VtepMacs::default(), Some(own.into()))
            .await?;
        assert_eq!(lease.subnet, own);
        assert!(lease.ipv6_subnet.is_some());
        Ok(())
    }

    #[tokio::test]
    async fn ipv6_only_hosts_are_told_apart_by_public_ipv6_and_get_distinct_subnets() -> Result<()>
    {
        let registry = registry();
        let host = |last: u16| PublicAddresses {
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv6: Some(Ipv6Addr::new(0xfd00, 0xff, 0, 0, 0, 0, 0, last)),
        };
        let first = ipv6_manager(&registry, IPV6_ONLY, host(1))
            .acquire(VtepMacs::default(), None)
            .await?;
        let second = ipv6_manager(&registry, IPV6_ONLY, host(2))
            .acquire(VtepMacs::default(), None)
            .await?;
        assert_eq!(first.subnet, "0.0.0.0/0".parse()?);
        assert!(first.attrs.backend_data.is_none(), "no IPv4 VTEP");
        assert_eq!(first.attrs.public_ip, Ipv4Addr::UNSPECIFIED);
        assert_ne!(first.ipv6_subnet, second.ipv6_subnet);
        let key = registry.record(first.subnets()).expect("written").key;
        assert!(
            key.starts_with(&format!("{PREFIX}/subnets/0.0.0.0-0&fd00:2:0:")),
            "{key}"
        );
        let third = ipv6_manager(&registry, IPV6_ONLY, host(3))
            .acquire(VtepMacs::default(), None)
            .await;
        assert!(
            third
                .unwrap_err()
                .to_string()
                .starts_with("no free IPv6 subnet: all 2 /64 subnets of fd00:2::/48")
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_new_host_leases_a_free_subnet_in_flannels_record_format() -> Result<()> {
        let registry = registry();
        registry.put(
            subnet("10.2.54.0/24"),
            &LeaseAttrs::ipv4_only(HOST2, 1, MacAddr::random_local()).to_json(),
            1,
        );
        let lease = manager(&registry, DAY)
            .acquire(VtepMacs::default(), None)
            .await?;
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
        let lease = manager(&registry, DAY)
            .acquire(
                VtepMacs {
                    ipv4: Some(mac),
                    ipv6: None,
                },
                None,
            )
            .await?;
        assert_eq!((lease.subnet, lease.etcd_lease), (reserved, 0));
        assert_eq!(lease.attrs.vtep_mac(), Some(mac));
        let record = registry.record(reserved).expect("still there");
        assert_eq!(record.etcd_lease, 0);
        assert_eq!(
            record.value,
            Some(LeaseAttrs::ipv4_only(HOST1, 1, mac).to_json().into_bytes())
        );
        Ok(())
    }

    #[tokio::test]
    async fn releasing_keeps_a_reservation_and_another_hosts_record() -> Result<()> {
        let registry = registry();
        let (leased, reserved, others) = (
            subnet("10.2.41.0/24"),
            subnet("10.2.42.0/24"),
            subnet("10.2.54.0/24"),
        );
        registry.put(leased, r#"{"PublicIP":"172.20.62.104"}"#, 7);
        registry.put(reserved, r#"{"PublicIP":"172.20.62.104"}"#, 0);
        registry.put(others, r#"{"PublicIP":"172.20.62.105"}"#, 8);
        let owner = manager(&registry, DAY).public;
        let release = |subnets: Ipv4Network| registry.release_if_owned(subnets.into(), owner);
        assert_eq!(release(reserved).await?, Release::Reserved);
        assert_eq!(release(others).await?, Release::NotOwned);
        assert_eq!(release(leased).await?, Release::Deleted);
        assert!(registry.record(leased).is_none());
        assert!(registry.record(reserved).is_some() && registry.record(others).is_some());
        Ok(())
    }

    #[tokio::test]
    async fn the_previous_subnet_is_taken_again_only_while_free() -> Result<()> {
        let registry = registry();
        let previous = subnet("10.2.41.0/24");
        let manager = manager(&registry, DAY);
        assert_eq!(
            manager
                .acquire(VtepMacs::default(), Some(previous.into()))
                .await?
                .subnet,
            previous
        );

        let registry = self::registry();
        registry.put(
            previous,
            &LeaseAttrs::ipv4_only(HOST2, 1, MacAddr::random_local()).to_json(),
            1,
        );
        let manager = self::manager(&registry, DAY);
        let lease = manager
            .acquire(VtepMacs::default(), Some(previous.into()))
            .await?;
        assert!(!lease.subnet.overlaps(previous), "{} is held", previous);
        Ok(())
    }

    #[tokio::test]
    async fn an_own_record_that_no_longer_fits_the_network_is_replaced() -> Result<()> {
        let registry = registry();
        let outside = subnet("10.9.41.0/24");
        registry.put(
            outside,
            &LeaseAttrs::ipv4_only(HOST1, 1, MacAddr::random_local()).to_json(),
            1,
        );
        let lease = manager(&registry, DAY)
            .acquire(VtepMacs::default(), None)
            .await?;
        assert!(seed_config().fits(lease.subnet));
        assert!(registry.record(outside).is_none(), "the misfit is deleted");
        Ok(())
    }

    #[tokio::test]
    async fn keep_alive_renews_and_stops_when_the_record_is_gone() -> Result<()> {
        let registry = registry();
        let manager = manager(&registry, Duration::from_millis(400));
        let lease = manager.acquire(VtepMacs::default(), None).await?;
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
