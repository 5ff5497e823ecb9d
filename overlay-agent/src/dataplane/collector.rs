//! The dataplane's part of `/metrics`: its counters, read from the pinned map at each scrape
//! (one lookup), and its map occupancy and per-peer traffic, read on a thread of its own every
//! [`OCCUPANCY_INTERVAL`]: counting a map's entries, or reading each lease's traffic, takes a
//! syscall per entry, which no scrape may cost.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use overlay_common::{Counter as DataplaneCounter, PeerTraffic};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::pins::{MapOccupancy, PeerRecord, PinnedDataplane};
use crate::metrics::MapLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    reason: &'static str,
    verdict: &'static str,
}

/// How often the map occupancy `/metrics` serves is read.
pub const OCCUPANCY_INTERVAL: Duration = Duration::from_secs(5);

/// What the thread last read of the maps; empty while no dataplane is pinned.
#[derive(Clone, Debug, Default)]
struct MapSnapshot {
    occupancy: Vec<MapOccupancy>,
    peers: Vec<PeerRecord>,
}

type SharedSnapshot = Arc<Mutex<MapSnapshot>>;

/// Reads the pinned counters at each scrape and serves the map snapshot last read; without a
/// pinned dataplane (kernel mode, not loaded yet) it exports nothing.
#[derive(Debug)]
pub struct DataplaneCollector {
    dir: PathBuf,
    snapshot: SharedSnapshot,
}

impl DataplaneCollector {
    /// The collector of the dataplane pinned in `dir`, for `Metrics::new`; starts the thread
    /// that reads the map snapshot.
    pub fn boxed(dir: PathBuf) -> Box<dyn Collector> {
        let snapshot = SharedSnapshot::default();
        keep_snapshot_read(dir.clone(), Arc::clone(&snapshot));
        Box::new(Self { dir, snapshot })
    }

    fn snapshot(&self) -> MapSnapshot {
        self.snapshot.lock().map_or_else(
            |poisoned| poisoned.into_inner().clone(),
            |read| read.clone(),
        )
    }
}

/// Reads the occupancy and per-peer traffic of the dataplane pinned in `dir` into `shared`
/// every [`OCCUPANCY_INTERVAL`], for as long as the agent runs.
fn keep_snapshot_read(dir: PathBuf, shared: SharedSnapshot) {
    let reader = move || {
        loop {
            let read = PinnedDataplane::open(&dir)
                .map(|pinned| MapSnapshot {
                    occupancy: pinned.occupancy().unwrap_or_default(),
                    peers: pinned.peer_traffic().unwrap_or_default(),
                })
                .unwrap_or_default();
            let mut snapshot = shared
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            *snapshot = read;
            drop(snapshot);
            thread::sleep(OCCUPANCY_INTERVAL);
        }
    };
    if let Err(error) = thread::Builder::new()
        .name("map-occupancy".to_string())
        .spawn(reader)
    {
        log::warn!("cannot start the thread that reads the map occupancy for /metrics: {error}");
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(pinned) = PinnedDataplane::open(&self.dir) else {
            return Ok(());
        };
        if let Ok(counters) = pinned.counters() {
            let mut packets = encoder.encode_descriptor(
                "dataplane_packets",
                "Packets the eBPF programs handled, by outcome",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for &counter in DataplaneCounter::ALL {
                let labels = PacketLabels {
                    reason: counter.name(),
                    verdict: counter.verdict().name(),
                };
                ConstCounter::new(counters.get(counter)).encode(packets.encode_family(&labels)?)?;
            }
        }
        let MapSnapshot { occupancy, peers } = self.snapshot();
        if !peers.is_empty() {
            encode_peer_traffic(&mut encoder, &peers)?;
        }
        if !occupancy.is_empty() {
            encode_per_map(
                &mut encoder,
                "map_entries",
                "Entries in each lease and endpoint map",
                &occupancy,
                |map| map.entries as i64,
            )?;
            encode_per_map(
                &mut encoder,
                "map_capacity",
                "Entries each lease and endpoint map can hold",
                &occupancy,
                |map| i64::from(map.capacity),
            )?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    subnet: String,
}

/// One per-peer counter family: its name, its help, and its field of [`PeerTraffic`].
type PeerFamily = (&'static str, &'static str, fn(&PeerTraffic) -> u64);

/// The four per-peer counter families, a sample per remote lease in each.
fn encode_peer_traffic(
    encoder: &mut DescriptorEncoder,
    records: &[PeerRecord],
) -> Result<(), std::fmt::Error> {
    let families: [PeerFamily; 4] = [
        (
            "peer_tx_packets",
            "Packets sent to each remote lease",
            |traffic| traffic.tx_packets,
        ),
        (
            "peer_tx_bytes",
            "Bytes (inner IP packets) sent to each remote lease",
            |traffic| traffic.tx_bytes,
        ),
        (
            "peer_rx_packets",
            "Packets received from each remote lease",
            |traffic| traffic.rx_packets,
        ),
        (
            "peer_rx_bytes",
            "Bytes (inner IP packets) received from each remote lease",
            |traffic| traffic.rx_bytes,
        ),
    ];
    for (name, help, value) in families {
        let mut family = encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for record in records {
            let labels = PeerLabels {
                peer: record.peer.to_string(),
                subnet: record.subnet.to_string(),
            };
            ConstCounter::new(value(&record.traffic)).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// One gauge family with a sample per map, labelled by the map's name.
fn encode_per_map(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    occupancy: &[MapOccupancy],
    value: impl Fn(&MapOccupancy) -> i64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for map in occupancy {
        let labels = MapLabels { map: map.name };
        ConstGauge::new(value(map)).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}
