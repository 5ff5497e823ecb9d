//! An agent upgraded over the pins an older version left: a pinned map whose shape is this
//! version's is adopted with its contents; one of another shape (an older `counters` with fewer
//! counters, say) is replaced, where adopting it would get the programs rejected by the
//! verifier or let lookups overrun their buffer. So are lease maps sized for another network.
//! An agent loads its dataplane before it takes a lease: one that cannot takes none. An agent
//! upgraded over a dataplane pinned before the IPv6 guards checks IPv6 from its first round.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use aya::maps::MapData;
use overlay_agent::dataplane::{Dataplane, LeaseCapacity, pins};
use overlay_common::{Counter, Counters, OverlayConfig};
use overlay_tests::{
    agent::Agent,
    cluster::{BPFFS, Cluster, PREFIX},
    ipv6::{BBOX1_V6, BBOX2_V6, HOST1_V6, SUBNET1_V6},
    loss::{LossWindow, steady_ping},
    netns::Netns,
    require_root,
    seed::{BBOX2, HOST1, SUBNET2, Seed},
};

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

#[test]
fn an_agent_starts_over_a_config_map_an_older_version_pinned() -> Result<()> {
    let mut cluster = Cluster::new("old-config")?;
    let host = cluster.add_host("host1", HOST1)?;
    // The config map as a version before the lease fields pinned it: 40-byte values.
    std::fs::create_dir_all(host.pin_dir())?;
    let pin = host.pin_dir().join("config");
    overlay_tests::netns::run(std::process::Command::new("bpftool").args([
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        "array",
        "key",
        "4",
        "value",
        "40",
        "entries",
        "1",
        "name",
        "config",
    ]))?;
    let mut agent = Agent::start(&cluster, &host, &[])?;
    agent.wait_ready()?;
    let warning = format!(
        "replacing a map an older version pinned: {}: pinned type 2, key 4 B, value 40 B",
        pin.display()
    );
    assert!(agent.log().contains(&warning), "{}", agent.log());
    let shown = overlay_tests::netns::run(std::process::Command::new("bpftool").args([
        "map",
        "show",
        "pinned",
        &pin.display().to_string(),
    ]))?;
    assert!(
        shown.contains(&format!("value {}B", size_of::<OverlayConfig>())),
        "{shown}"
    );
    Ok(())
}

#[test]
fn an_agent_that_cannot_load_its_dataplane_takes_no_lease() -> Result<()> {
    let mut cluster = Cluster::new("no-dataplane")?;
    let host = cluster.add_host("host1", HOST1)?;
    // A pin directory that cannot be one: a plain file in its place.
    let blocked = host.dir.join("not-a-directory");
    std::fs::write(&blocked, "")?;
    let args: Vec<String> = Agent::flags(&cluster, &host, &[])
        .into_iter()
        .map(|flag| match flag.starts_with("--bpf-pin-dir=") {
            true => format!("--bpf-pin-dir={}", blocked.display()),
            false => flag,
        })
        .collect();
    let mut agent = Agent::start_with(&host, &args, &[])?;
    agent.expect_failure(&format!(
        "cannot create the pin directory {}",
        blocked.display()
    ))?;
    let leases = cluster.etcd.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("{PREFIX}/subnets/"),
    ])?;
    assert!(leases.trim().is_empty(), "no lease was taken: {leases}");
    Ok(())
}

#[test]
fn a_lease_map_replaced_by_an_upgrade_under_traffic_loses_no_packet() -> Result<()> {
    let mut seed = Seed::start("upgrade-gap", &[])?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 500)?;
    seed.agent2.process.terminate(Duration::from_secs(20))?;
    // An older version's `subnets` map, of another capacity, pinned in place of this one's;
    // the attached programs keep the map they were loaded with.
    let pin = seed.host2.pin_dir().join("subnets");
    std::fs::remove_file(&pin)?;
    overlay_tests::netns::run(std::process::Command::new("bpftool").args([
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        "lpm_trie",
        "key",
        "8",
        "value",
        "12",
        "entries",
        "128",
        "name",
        "subnets",
        "flags",
        "1",
    ]))?;
    // The new map gets its entries before the programs that read it are swapped in.
    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &[])?;
    seed.agent2.wait_ready()?;
    window.assert_no_loss(ping, 500, &[])
}

/// An older version kept `endpoints` as a hash keyed by address, where this one keeps an array
/// of slots: upgraded under traffic, the agent replaces the map and fills the new one. No ping
/// is lost, and bbox2 is in the new map, for the programs to deliver straight into it again.
#[test]
fn an_endpoint_hash_pinned_by_an_older_version_is_replaced_under_traffic_losing_no_packet()
-> Result<()> {
    let mut seed = Seed::start("upgrade-ep", &[])?;
    let window = LossWindow::over_seed(&seed)?;
    let ping = steady_ping(&seed.cluster, &seed.bbox1, BBOX2, 500)?;
    seed.agent2.process.terminate(Duration::from_secs(20))?;
    pin_map(
        &seed.host2.pin_dir().join("endpoints"),
        "endpoints",
        "hash",
        12,
    )?;
    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &[])?;
    seed.agent2.wait_ready()?;
    let pins = pins::PinnedDataplane::open(&seed.host2.pin_dir())?;
    overlay_tests::wait::wait_for(
        "bbox2 in the new endpoint map",
        Duration::from_secs(20),
        || {
            let occupancy = pins.occupancy()?;
            Ok(occupancy
                .iter()
                .any(|map| map.name == "endpoints" && map.entries == 1))
        },
    )?;
    let delivered = || -> Result<u64> { Ok(pins.counters()?.get(Counter::RxDelivered)) };
    let filled = delivered()?;
    seed.bbox1.ping(BBOX2, 3)?;
    assert!(
        delivered()? >= filled + 3,
        "three more pings, each delivered straight into bbox2"
    );
    window.assert_no_loss(ping, 500, &[])
}

/// Creates the map `name` at `pin` as bpftool would: `kind`, 4-byte keys, `value`-byte values.
fn pin_map(pin: &Path, name: &str, kind: &str, value: usize) -> Result<()> {
    std::fs::remove_file(pin)?;
    overlay_tests::netns::run(std::process::Command::new("bpftool").args([
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        kind,
        "key",
        "4",
        "value",
        &value.to_string(),
        "entries",
        "1",
        "name",
        name,
    ]))?;
    Ok(())
}

#[test]
fn an_upgrade_over_a_dataplane_pinned_before_the_ipv6_guards_guards_ipv6_at_once() -> Result<()> {
    let mut seed = Seed::start_dual_stack("upgrade-v6", [&[], &[]])?;
    seed.agent2.process.terminate(Duration::from_secs(20))?;
    // The maps as the version before pinned them: no `vteps6`, a config without the IPv6
    // fields (52 bytes), four counters fewer.
    let dir = seed.host2.pin_dir();
    std::fs::remove_file(dir.join("vteps6"))?;
    pin_map(&dir.join("config"), "config", "array", 52)?;
    let older_counters = size_of::<Counters>() - 4 * size_of::<u64>();
    pin_map(
        &dir.join("counters"),
        "counters",
        "percpu_array",
        older_counters,
    )?;

    seed.agent2 = Agent::start(&seed.cluster, &seed.host2, &[])?;
    assert_eq!(seed.agent2.wait_ready()?, SUBNET2);
    for map in ["config", "counters"] {
        let warning = format!(
            "replacing a map an older version pinned: {}",
            dir.join(map).display()
        );
        assert!(
            seed.agent2.log().contains(&warning),
            "{}",
            seed.agent2.log()
        );
    }
    let pinned = pins::PinnedDataplane::open(&dir)?;
    let expected = (HOST1_V6.parse()?, SUBNET1_V6.parse()?);
    overlay_tests::wait::wait_for(
        "host1 in the new vteps6 map",
        Duration::from_secs(20),
        || {
            Ok(pinned
                .ipv6_vtep_entries()?
                .into_iter()
                .any(|entry| entry == expected))
        },
    )?;
    seed.bbox1.ping6(BBOX2_V6, 2)?;
    seed.bbox2.ping6(BBOX1_V6, 2)?;
    let counters = pinned.counters()?;
    let passed = [Counter::RxChecked, Counter::RxDelivered]
        .map(|counter| counters.get(counter))
        .iter()
        .sum::<u64>();
    assert!(
        passed >= 2,
        "host1's VXLAN over IPv6 passed the checks: {counters:?}"
    );
    Ok(())
}
