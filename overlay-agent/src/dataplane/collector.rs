//! The dataplane's part of `/metrics`: its counters and map occupancy, read from the pinned
//! maps at each scrape.
use std::path::PathBuf;

use overlay_common::Counter as DataplaneCounter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::pins::{MapOccupancy, PinnedDataplane};
use crate::metrics::MapLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    reason: &'static str,
    verdict: &'static str,
}

/// Reads the pinned dataplane at each scrape; without one (kernel mode, not loaded yet) it
/// exports nothing.
#[derive(Debug)]
pub struct DataplaneCollector {
    dir: PathBuf,
}

impl DataplaneCollector {
    /// The collector of the dataplane pinned in `dir`, for `Metrics::new`.
    pub fn boxed(dir: PathBuf) -> Box<dyn Collector> {
        Box::new(Self { dir })
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
        if let Ok(occupancy) = pinned.occupancy() {
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
