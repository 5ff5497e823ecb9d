//! `/metrics` in Prometheus' text format, served beside `/healthz`: the leases, the
//! reconciler's rounds, the etcd watch's reconnects and this host's lease expiry, and whatever
//! a collector given at start adds (the dataplane's counters and map occupancy).
use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use anyhow::Result;
use prometheus_client::{
    collector::Collector,
    encoding::{EncodeLabelSet, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// What the lease watch and the lease manager report.
#[derive(Clone, Debug, Default)]
pub struct LeaseMetrics {
    /// Other hosts' leases in use.
    pub known: Gauge,
    /// Records that cannot be used (malformed, hostile, another backend, no VTEP yet, a
    /// public address without a route): the sum of the watch's and the reconciler's parts.
    pub skipped: Gauge,
    pub watch_reconnects: Counter,
    /// When this host's lease expires, in seconds since the epoch; +Inf for a reservation.
    pub expiry: Gauge<f64, AtomicU64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    /// The round's scope: containers, node or everything.
    pub scope: &'static str,
}

type Rounds = Family<RoundLabels, Histogram, fn() -> Histogram>;

/// One part of a gauge that several parts of the agent add to: each sets its own part, and
/// the gauge shows their sum.
#[derive(Clone, Debug, Default)]
pub struct GaugePart {
    gauge: Gauge,
    part: Arc<AtomicI64>,
}

impl GaugePart {
    pub fn of(gauge: &Gauge) -> Self {
        Self {
            gauge: gauge.clone(),
            part: Arc::default(),
        }
    }

    pub fn set(&self, value: i64) {
        let before = self.part.swap(value, Ordering::Relaxed);
        self.gauge.inc_by(value - before);
    }
}

/// What the reconciler reports.
#[derive(Clone, Debug)]
pub struct ReconcileMetrics {
    pub duration: Rounds,
    pub errors: Counter,
    /// Its part of `overlay_leases_skipped`: leases whose public address has no route.
    pub unreachable: GaugePart,
    /// Times a lease map was found full, once per change in what it left out.
    pub full_maps: Family<MapLabels, Counter>,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            // From 100 µs to about 3 s.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1e-4, 2.0, 16))
            }),
            errors: Counter::default(),
            unreachable: GaugePart::default(),
            full_maps: Family::default(),
        }
    }
}

/// Every metric of the agent, registered once.
pub struct Metrics {
    registry: Registry,
    pub leases: LeaseMetrics,
    pub reconcile: ReconcileMetrics,
}

impl Metrics {
    /// The agent's metrics, with `collector`'s at each scrape.
    pub fn new(collector: Option<Box<dyn Collector>>) -> Arc<Self> {
        let leases = LeaseMetrics::default();
        let reconcile = ReconcileMetrics {
            unreachable: GaugePart::of(&leases.skipped),
            ..ReconcileMetrics::default()
        };
        let mut registry = Registry::with_prefix("overlay");
        registry.register(
            "leases_known",
            "Other hosts' leases the agent routes to",
            leases.known.clone(),
        );
        registry.register(
            "leases_skipped",
            "Subnet records the agent cannot use (malformed, hostile, another backend, no VTEP \
             yet, a public address without a route)",
            leases.skipped.clone(),
        );
        registry.register(
            "etcd_watch_reconnects",
            "Times the etcd watch was re-established",
            leases.watch_reconnects.clone(),
        );
        registry.register(
            "lease_expiry_timestamp_seconds",
            "When this host's lease expires unless renewed; +Inf for a reservation",
            leases.expiry.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciler round took, by scope",
            reconcile.duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciler rounds that failed and were retried",
            reconcile.errors.clone(),
        );
        registry.register(
            "lease_map_full",
            "Times a lease map was found full with leases left out, once per change in how many",
            reconcile.full_maps.clone(),
        );
        if let Some(collector) = collector {
            registry.register_collector(collector);
        }
        Arc::new(Self {
            registry,
            leases,
            reconcile,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Result<String> {
        let mut text = String::new();
        text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skipped_gauge_adds_the_reconcilers_part_to_the_watchs() {
        let gauge = Gauge::<i64>::default();
        let (watch, reconciler) = (GaugePart::of(&gauge), GaugePart::of(&gauge));
        watch.set(3);
        reconciler.set(2);
        watch.set(1);
        assert_eq!(gauge.get(), 3);
        reconciler.set(0);
        assert_eq!(gauge.get(), 1);
    }
}
