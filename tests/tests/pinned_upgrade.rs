//! An agent upgraded over the pins an older version left: a pinned map whose shape is this
//! version's is adopted with its contents; one of another shape (an older `counters` with fewer
//! counters, say) is replaced, where adopting it would get the programs rejected by the
//! verifier or let lookups overrun their buffer. So are lease maps sized for another network.
use std::path::{Path, PathBuf};

use anyhow::Result;
use aya::maps::MapData;
use overlay_agent::dataplane::{Dataplane, LeaseCapacity, pins};
use overlay_common::{Counters, OverlayConfig};
use overlay_tests::{cluster::BPFFS, netns::Netns, require_root};

/// A pin directory of the test's own, removed with everything in it when the test ends.
struct PinDir {
    path: PathBuf,
    /// Names the directory, and lets a later run's stale-name sweep find it after a crash.
    _netns: Netns,
}

impl PinDir {
    fn new(tag: &str) -> Result<Self> {
        let netns = Netns::new(tag)?;
        Ok(Self {
            path: Path::new(BPFFS).join(netns.name()),
            _netns: netns,
        })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = pins::remove(&self.path);
    }
}

#[test]
fn a_pinned_map_of_another_shape_is_replaced_and_one_of_this_shape_adopted() -> Result<()> {
    require_root()?;
    let pins_dir = PinDir::new("upgrade")?;
    let config = OverlayConfig {
        vni: 7,
        ..OverlayConfig::default()
    };
    Dataplane::load(Some(&pins_dir.path), false, LeaseCapacity::MIN)?.set_config(&config)?;

    // What the version before the routed flows pinned: 19 counters, not this version's.
    let counters = pins_dir.path.join("counters");
    pins::remove_map_pin(&counters)?;
    overlay_tests::netns::run(std::process::Command::new("bpftool").args([
        "map",
        "create",
        &counters.display().to_string(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "152",
        "entries",
        "1",
        "name",
        "counters",
    ]))?;

    let upgraded = Dataplane::load(Some(&pins_dir.path), false, LeaseCapacity::MIN)?;
    let value_size = MapData::from_pin(&counters)?.info()?.value_size();
    assert_eq!(
        value_size as usize,
        size_of::<Counters>(),
        "counters replaced"
    );
    assert_eq!(upgraded.counters()?, Counters::default());
    assert_eq!(
        pins::PinnedDataplane::open(&pins_dir.path)?.config()?,
        config,
        "the config map, of this version's shape, adopted with its contents"
    );
    Ok(())
}

#[test]
fn lease_maps_pinned_for_another_network_are_replaced_at_the_size_asked_for() -> Result<()> {
    require_root()?;
    let pins_dir = PinDir::new("resize")?;
    let capacity = |map: &str| -> Result<u32> {
        Ok(MapData::from_pin(pins_dir.path.join(map))?
            .info()?
            .max_entries())
    };
    drop(Dataplane::load(
        Some(&pins_dir.path),
        false,
        LeaseCapacity::MIN,
    )?);
    assert_eq!(capacity("subnets")?, 256);
    let larger = LeaseCapacity::for_subnets(65535);
    drop(Dataplane::load(Some(&pins_dir.path), false, larger)?);
    for map in ["subnets", "vteps"] {
        assert_eq!(capacity(map)?, 65535, "{map} resized");
    }
    Ok(())
}
