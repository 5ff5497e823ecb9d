//! The dataplane's part of `/metrics`: its counters, read from the pinned map at each scrape
//! (one lookup), and its map occupancy and per-peer traffic, read at a scrape too but at most
//! once every [`MAP_READ_INTERVAL`]: counting a map's entries, or reading each lease's traffic,
//! takes a syscall per entry, so scrapes in a loop must not repeat it, and an agent nobody
//! scrapes reads nothing.
use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
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

/// The shortest time between two reads of the map occupancy and per-peer traffic.
pub const MAP_READ_INTERVAL: Duration = Duration::from_secs(5);

/// What a scrape last read of the maps, and when; empty while no dataplane is pinned.
#[derive(Debug, Default)]
struct MapSnapshot {
    read_at: Option<Instant>,
    occupancy: Vec<MapOccupancy>,
    peers: Vec<PeerRecord>,
}

impl MapSnapshot {
    fn read(dir: &Path) -> Self {
        let (occupancy, peers) = match PinnedDataplane::open(dir) {
            Ok(pinned) => (
                pinned.occupancy().unwrap_or_default(),
                pinned.peer_traffic().unwrap_or_default(),
            ),
            Err(_) => Default::default(),
        };
        Self {
            read_at: Some(Instant::now()),
            occupancy,
            peers,
        }
    }

    fn is_recent(&self) -> bool {
        self.read_at
            .is_some_and(|read_at| read_at.elapsed() < MAP_READ_INTERVAL)
    }
}

/// Reads the pinned counters at each scrape, and the map snapshot when the last is older
/// than [`MAP_READ_INTERVAL`]; without a pinned dataplane (kernel mode, not loaded yet) it
/// exports nothing.
#[derive(Debug)]
pub struct DataplaneCollector {
    dir: PathBuf,
    snapshot: Mutex<MapSnapshot>,
}

impl DataplaneCollector {
    /// The collector of the dataplane pinned in `dir`, for `Metrics::new`.
    pub fn boxed(dir: PathBuf) -> Box<dyn Collector> {
        Box::new(Self {
            dir,
            snapshot: Mutex::default(),
        })
    }

    /// The map snapshot, read again first if the last read is older than
    /// [`MAP_READ_INTERVAL`]. Concurrent scrapes wait for one read.
    fn recent_snapshot(&self) -> MutexGuard<'_, MapSnapshot> {
        let mut snapshot = self.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        if !snapshot.is_recent() {
            *snapshot = MapSnapshot::read(&self.dir);
        }
        snapshot
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
        let snapshot = self.recent_snapshot();
        let MapSnapshot {
            occupancy, peers, ..
        } = &*snapshot;
        if !peers.is_empty() {
            encode_peer_traffic(&mut encoder, peers)?;
        }
        if !occupancy.is_empty() {
            encode_per_map(
                &mut encoder,
                "map_entries",
                "Entries in each lease and endpoint map",
                occupancy,
                |map| map.entries as i64,
            )?;
            encode_per_map(
                &mut encoder,
                "map_capacity",
                "Entries each lease and endpoint map can hold",
                occupancy,
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
