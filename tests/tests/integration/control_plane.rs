//! The control plane against a real etcd: agents in host namespaces lease subnets in flannel's
//! records, keep them, follow every other host's lease, and fail loudly when they must.
use std::{collections::HashSet, net::Ipv4Addr, thread::sleep, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_tests::{
    agent::{Agent, HEALTH_PORT, READY_TIMEOUT, subnet_from_file},
    cluster::{Cluster, Host, PREFIX, SEED_NETWORK_CONFIG},
    metrics::{rounds, scrape, settled_rounds, value_of},
    seed::Container,
    wait::wait_for,
};

const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// flannel's record for `address` with `mac`, as stock flannel writes it today.
fn flannel_record(address: &str, mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{address}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// Asserts `value` is exactly the record our agent on `host` writes, and returns its MAC.
fn assert_record_shape(value: &str, host: &Host) -> String {
    let head = format!(
        r#"{{"PublicIP":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":""#,
        host.address
    );
    let mac = value
        .strip_prefix(&head)
        .and_then(|rest| rest.strip_suffix(r#""}}"#))
        .unwrap_or_else(|| panic!("record of {} is not flannel's shape: {value}", host.name));
    let octets: Vec<_> = mac.split(':').collect();
    assert!(
        octets.len() == 6
            && octets
                .iter()
                .all(|octet| u8::from_str_radix(octet, 16).is_ok() && octet.len() == 2),
        "VtepMAC {mac} is not a MAC"
    );
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(1);
    assert_eq!(
        first & 0x03,
        0x02,
        "VtepMAC {mac} must be locally administered unicast"
    );
    mac.to_string()
}

fn record_of(cluster: &Cluster, subnet: &str) -> Result<String> {
    cluster
        .etcd
        .get(&cluster.subnet_key(subnet))?
        .with_context(|| format!("no record for {subnet}"))
}

/// A cluster with host1 and a reservation of 10.2.41.0/24 for it, which keeps its agent off
/// the subnets a test writes records for.
fn host_with_reservation(tag: &str) -> Result<(Cluster, Host)> {
    let mut cluster = Cluster::new(tag)?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    cluster.reserve("10.2.41.0/24", "172.20.62.104")?;
    Ok((cluster, host1))
}

#[test]
fn two_agents_lease_different_subnets_in_flannels_format() -> Result<()> {
    let mut cluster = Cluster::new("two-agents")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let host2 = cluster.add_host("host2", "172.20.62.105")?;
    let mut agent1 = Agent::start(&cluster, &host1, &[])?;
    let mut agent2 = Agent::start(&cluster, &host2, &[])?;
    let subnet1 = agent1.wait_ready()?;
    let subnet2 = agent2.wait_ready()?;
    assert_ne!(subnet1, subnet2);

    let listing = cluster
        .etcd
        .etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets")])?;
    for (subnet, host, agent) in [(&subnet1, &host1, &agent1), (&subnet2, &host2, &agent2)] {
        assert!(listing.contains(&cluster.subnet_key(subnet)), "{listing}");
        assert_record_shape(&record_of(&cluster, subnet)?, host);
        assert_ne!(
            cluster.etcd.lease_of(&cluster.subnet_key(subnet))?,
            0,
            "a lease, not a reservation"
        );
        let gateway = subnet.replace(".0/", ".1/");
        let contents = std::fs::read_to_string(&agent.subnet_file)?;
        assert_eq!(
            contents,
            format!(
                "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET={gateway}\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
            )
        );
    }
    host1.wait_for_peer(&subnet2, "172.20.62.105", &host2.vtep_mac()?)?;
    host2.wait_for_peer(&subnet1, "172.20.62.104", &host1.vtep_mac()?)?;
    assert!(
        host1.sends_no_peer(&subnet1)?,
        "own lease is ignored: host1 has no peer entry for {subnet1}"
    );
    Ok(())
}

#[test]
fn a_restarted_agent_keeps_its_subnet_by_public_ip_and_by_subnet_file() -> Result<()> {
    let mut cluster = Cluster::new("restart")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    let subnet = agent.wait_ready()?;
    let mac = assert_record_shape(&record_of(&cluster, &subnet)?, &host1);
    let status = agent.process.terminate(EXIT_TIMEOUT)?;
    assert!(
        status.success(),
        "SIGTERM is a clean shutdown: {status}\n{}",
        agent.log()
    );
    assert!(
        record_of(&cluster, &subnet).is_ok(),
        "the lease is kept on shutdown"
    );

    let mut restarted = Agent::start(&cluster, &host1, &[])?;
    assert_eq!(restarted.wait_ready()?, subnet);
    assert_eq!(
        assert_record_shape(&record_of(&cluster, &subnet)?, &host1),
        mac,
        "the VTEP MAC is kept"
    );
    restarted.process.terminate(EXIT_TIMEOUT)?;

    cluster
        .etcd
        .etcdctl(&["del", &cluster.subnet_key(&subnet)])?;
    assert_eq!(
        subnet_from_file(&host1.subnet_file()).as_deref(),
        Some(subnet.as_str())
    );
    let mut from_file = Agent::start(&cluster, &host1, &[])?;
    assert_eq!(
        from_file.wait_ready()?,
        subnet,
        "the previous subnet file's subnet is taken again"
    );
    assert_record_shape(&record_of(&cluster, &subnet)?, &host1);
    Ok(())
}

/// Waits, spinning, until `path` exists: a supervisor that takes the subnet file for readiness
/// may act within microseconds of its rename, and a sleeping poll would miss that window.
fn spin_until_exists(path: &std::path::Path) -> Result<()> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while !path.exists() {
        ensure!(
            std::time::Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::hint::spin_loop();
    }
    Ok(())
}

/// A SIGTERM sent the instant the subnet file appears, as systemd or a swap script may send
/// it, is a clean shutdown every time: the agent catches it from before it writes the file.
#[test]
fn a_sigterm_the_instant_the_subnet_file_appears_is_a_clean_shutdown() -> Result<()> {
    const STARTS: usize = 30;
    let mut cluster = Cluster::new("sigready")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    for start in 1..=STARTS {
        match std::fs::remove_file(host1.subnet_file()) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error)?,
            _ => {}
        }
        let mut agent = Agent::start(&cluster, &host1, &["--dataplane=kernel"])?;
        spin_until_exists(&host1.subnet_file()).with_context(|| agent.log())?;
        let status = agent.process.terminate(EXIT_TIMEOUT)?;
        ensure!(
            status.success(),
            "start {start} of {STARTS}: SIGTERM right after the subnet file appeared ended the \
             agent with {status}\n{}",
            agent.log()
        );
    }
    Ok(())
}

#[test]
fn a_reservation_is_honoured_and_stays_a_reservation() -> Result<()> {
    let mut cluster = Cluster::new("reservation")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let key = cluster.subnet_key("10.2.41.0/24");
    cluster.reserve("10.2.41.0/24", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    assert_eq!(agent.wait_ready()?, "10.2.41.0/24");
    assert_record_shape(&record_of(&cluster, "10.2.41.0/24")?, &host1);
    assert_eq!(
        cluster.etcd.lease_of(&key)?,
        0,
        "a reservation carries no etcd lease"
    );
    Ok(())
}

#[test]
fn the_public_ip_flag_overrides_the_interface_address() -> Result<()> {
    let mut cluster = Cluster::new("public-ip")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(
        &cluster,
        &host1,
        &["--iface=172.20.62.104", "--public-ip=198.51.100.7"],
    )?;
    let subnet = agent.wait_ready()?;
    assert!(record_of(&cluster, &subnet)?.starts_with(r#"{"PublicIP":"198.51.100.7","#));
    Ok(())
}

#[test]
fn an_exhausted_network_is_a_clear_error() -> Result<()> {
    let config = r#"{"Network": "10.3.0.0/28", "Backend": {"Type": "vxlan"}}"#;
    let mut cluster = Cluster::with_etcd("exhausted", false, Some(config))?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    for (index, subnet) in ["10.3.0.4-30", "10.3.0.8-30", "10.3.0.12-30"]
        .iter()
        .enumerate()
    {
        let value = flannel_record(&format!("172.20.62.{}", 110 + index), "1a:4b:d7:f7:16:89");
        cluster
            .etcd
            .put(&format!("{PREFIX}/subnets/{subnet}"), &value)?;
    }
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.expect_failure(
        "no free subnet: all 3 /30 subnets of 10.3.0.0/28 between SubnetMin 10.3.0.4 and SubnetMax 10.3.0.12 are leased",
    )?;
    Ok(())
}

#[test]
fn an_invalid_network_config_is_named_and_retried_until_a_valid_one_appears() -> Result<()> {
    let config = r#"{"Network": "10.2.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}}"#;
    let mut cluster = Cluster::with_etcd("bad-config", false, Some(config))?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    let first = "network config: SubnetLen: /31 is too long";
    agent.wait_for_log(first, 1, EVENT_TIMEOUT)?;
    // flanneld retries every second; a few seconds on, the same error is not repeated.
    sleep(Duration::from_secs(3));
    anyhow::ensure!(
        agent.process.try_exit_status()?.is_none(),
        "the agent exited on an invalid config:\n{}",
        agent.log()
    );
    anyhow::ensure!(
        agent.count_in_log(first) == 1,
        "the same error was logged more than once:\n{}",
        agent.log()
    );
    let readyz = agent.health("/readyz")?.context("/readyz answers")?;
    anyhow::ensure!(
        readyz.status == 503 && readyz.body.contains(first),
        "/readyz does not name the invalid config: {readyz:?}"
    );
    // Another mistake is logged as it appears; a valid config makes the agent ready.
    cluster.etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network": "10.2.0.0/33", "Backend": {"Type": "vxlan"}}"#,
    )?;
    agent.wait_for_log("the network config is invalid", 2, EVENT_TIMEOUT)?;
    cluster
        .etcd
        .put(&format!("{PREFIX}/config"), SEED_NETWORK_CONFIG)?;
    agent.wait_ready()?;
    Ok(())
}

#[test]
fn renewal_keeps_a_short_lease_alive_and_a_killed_agent_s_lease_expires() -> Result<()> {
    let mut cluster = Cluster::new("renewal")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host1, &["--subnet-lease-ttl=5s"])?;
    let subnet = agent.wait_ready()?;
    let key = cluster.subnet_key(&subnet);
    let first_lease = cluster.etcd.lease_of(&key)?;
    // flanneld's line, at info: "Lease renewed, new expiration: 2026-12-06 10:45:00 +0000 UTC".
    agent.wait_for_log("Lease renewed, new expiration: 20", 1, EVENT_TIMEOUT)?;
    sleep(Duration::from_secs(13));
    assert!(
        record_of(&cluster, &subnet).is_ok(),
        "the record outlived more than two TTLs:\n{}",
        agent.log()
    );
    assert_ne!(
        cluster.etcd.lease_of(&key)?,
        first_lease,
        "renewal moves the record to a fresh etcd lease"
    );

    agent.process.kill();
    wait_for(
        "the killed agent's record to expire",
        Duration::from_secs(6),
        || Ok(cluster.etcd.get(&key)?.is_none()),
    )?;
    Ok(())
}

#[test]
fn another_host_s_lease_added_changed_and_expired_are_reported() -> Result<()> {
    let (cluster, host1) = host_with_reservation("events")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;

    let key = cluster.subnet_key("10.2.54.0/24");
    let lease = cluster.etcd.grant(4)?;
    // The seed's record, as an older flannel wrote it: no VNI.
    let seed = r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VtepMAC":"1a:4b:d7:f7:16:89"}}"#;
    cluster.etcd.put_under_lease(&key, seed, &lease)?;
    host1.wait_for_peer("10.2.54.0/24", "172.20.62.105", "1a:4b:d7:f7:16:89")?;

    let changed = r#"{"PublicIP":"172.20.62.105","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:8a"}}"#;
    cluster.etcd.put_under_lease(&key, changed, &lease)?;
    host1.wait_for_peer("10.2.54.0/24", "172.20.62.105", "1a:4b:d7:f7:16:8a")?;

    // The record's etcd lease expires.
    host1.wait_for_no_peer("10.2.54.0/24")?;
    for event in [
        "lease added: 10.2.54.0/24",
        "lease changed: 10.2.54.0/24",
        "lease removed: 10.2.54.0/24",
    ] {
        assert_eq!(
            agent.count_in_log(event),
            1,
            "{event} exactly once:\n{}",
            agent.log()
        );
    }
    Ok(())
}

/// The agent's own route, neighbour and FDB changes come back to it as netlink
/// notifications. Those echo what the round just wrote and must not cost a round of their
/// own: each lease added or removed, one at a time, is one round, in either mode.
#[test]
fn each_lease_added_or_removed_costs_one_reconcile_round() -> Result<()> {
    const LEASES: u8 = 10;
    // Room for a stray notification; the echoes alone made 20 rounds of 10 leases.
    const SLACK: f64 = 2.0;
    for dataplane in ["ebpf", "kernel"] {
        let (cluster, host1) = host_with_reservation(&format!("rounds-{dataplane}"))?;
        let mut agent = Agent::start(&cluster, &host1, &[&format!("--dataplane={dataplane}")])?;
        agent.wait_ready()?;
        let subnets: Vec<String> = (0..LEASES)
            .map(|index| format!("10.2.{}.0/24", 100 + index))
            .collect();

        let start = settled_rounds(&host1.netns)?;
        for (index, subnet) in subnets.iter().enumerate() {
            let (address, mac) = (
                format!("172.20.62.{}", 150 + index),
                format!("1a:4b:d7:f7:17:{index:02x}"),
            );
            cluster
                .etcd
                .put(&cluster.subnet_key(subnet), &flannel_record(&address, &mac))?;
            host1.wait_for_peer(subnet, &address, &mac)?;
        }
        let added = settled_rounds(&host1.netns)?;
        for subnet in &subnets {
            cluster
                .etcd
                .etcdctl(&["del", &cluster.subnet_key(subnet)])?;
            host1.wait_for_no_peer(subnet)?;
        }
        let removed = settled_rounds(&host1.netns)?;

        let leases = f64::from(LEASES);
        for (what, rounds) in [("added", added - start), ("removed", removed - added)] {
            eprintln!("{dataplane}: {LEASES} leases {what}, {rounds} rounds");
            // At least one round each: a count that stays at nothing measured nothing.
            assert!(
                (leases..=leases + SLACK).contains(&rounds),
                "{dataplane}: {LEASES} leases {what} one at a time took {rounds} rounds:\n{}",
                agent.log()
            );
        }
        assert_eq!(
            agent.count_in_log("cannot bring the node in line"),
            0,
            "{}",
            agent.log()
        );
    }
    Ok(())
}

/// A round about lease events compares the map entries of the leases the events name, not
/// every lease's: a lease that moves to another PublicIP must still take its old VTEP entry
/// (who may send VXLAN for it) out, and a lease removed must take both its entries. Checked
/// in the pinned maps within a window without a safety-net round, which would put any map
/// right by listing it.
#[test]
fn a_lease_moved_to_another_public_ip_leaves_no_vtep_entry_at_the_old_one() -> Result<()> {
    let (cluster, host1) = host_with_reservation("moved")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    let subnet = "10.2.54.0/24";
    let key = cluster.subnet_key(subnet);
    let entries = || -> Result<(HashSet<Ipv4Addr>, Option<Ipv4Addr>)> {
        let pinned = PinnedDataplane::open(&host1.pin_dir())?;
        let public_ip = pinned
            .subnet_entries()?
            .get(&subnet.parse()?)
            .map(|remote| Ipv4Addr::from(remote.public_ip));
        Ok((pinned.vtep_addresses()?, public_ip))
    };
    let mac = "1a:4b:d7:f7:16:89";
    let attempts = [
        ("172.20.62.105", "172.20.62.106"),
        ("172.20.62.107", "172.20.62.108"),
        ("172.20.62.109", "172.20.62.110"),
    ];
    for (attempt, (first, moved_to)) in attempts.into_iter().enumerate() {
        cluster.etcd.put(&key, &flannel_record(first, mac))?;
        host1.wait_for_peer(subnet, first, mac)?;
        let full_rounds = rounds(&host1.netns, &["everything"])?;
        cluster.etcd.put(&key, &flannel_record(moved_to, mac))?;
        host1.wait_for_peer(subnet, moved_to, mac)?;
        let moved: Ipv4Addr = moved_to.parse()?;
        let wanted = (HashSet::from([moved]), Some(moved));
        let moved_settled = wait_for("the moved lease's map entries", ROUND_END, || {
            Ok(entries()? == wanted)
        })
        .with_context(|| format!("the maps hold {:?}", entries()));
        cluster.etcd.etcdctl(&["del", &key])?;
        host1.wait_for_no_peer(subnet)?;
        let removed_settled = wait_for("the removed lease's map entries gone", ROUND_END, || {
            Ok(entries()? == (HashSet::new(), None))
        })
        .with_context(|| format!("the maps hold {:?}", entries()));
        if rounds(&host1.netns, &["everything"])? != full_rounds {
            eprintln!("attempt {attempt}: a safety-net round fell in the window");
            continue;
        }
        moved_settled?;
        removed_settled?;
        return Ok(());
    }
    bail!("a safety-net round fell in each window")
}

/// Leases the listing test starts its agent with: each listed round dumps as many routes,
/// neighbours and FDB entries and reads as many map entries, and with DirectRouting asks the
/// kernel how it reaches as many PublicIPs.
const LISTED_LEASES: usize = 200;

/// A lease added or removed costs the writes of its own entries: no netlink dump of the
/// routes, neighbours or FDB, no read of every map entry (at 10,000 leases these cost every
/// event 40-90 ms), and with DirectRouting no route lookup for every peer's PublicIP (480 ms).
/// Counted by strace while one lease comes and goes on an agent that follows
/// [`LISTED_LEASES`], in either mode and with DirectRouting.
#[test]
fn a_lease_event_lists_nothing_and_writes_only_its_own_entries() -> Result<()> {
    let direct_routing =
        r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#;
    for (tag, dataplane, config) in [
        ("ebpf", "ebpf", SEED_NETWORK_CONFIG),
        ("kernel", "kernel", SEED_NETWORK_CONFIG),
        ("direct-routing", "ebpf", direct_routing),
    ] {
        let mut cluster = Cluster::with_etcd(&format!("listing-{tag}"), false, Some(config))?;
        let host1 = cluster.add_host("host1", "172.20.62.104")?;
        cluster.reserve("10.2.41.0/24", "172.20.62.104")?;
        let records: Vec<(String, String)> = (0..LISTED_LEASES)
            .map(|index| {
                let (subnet, address, mac) = listed_lease(index);
                (cluster.subnet_key(&subnet), flannel_record(&address, &mac))
            })
            .collect();
        cluster.etcd.put_many(&records)?;
        let mut agent = Agent::start(&cluster, &host1, &[&format!("--dataplane={dataplane}")])?;
        agent.wait_ready()?;
        let (subnet, address, mac) = listed_lease(LISTED_LEASES - 1);
        host1.wait_for_peer(&subnet, &address, &mac)?;
        let _containers = containers_with_their_programs(&host1, &agent, dataplane)?;

        let calls = calls_of_one_lease_event(&cluster, &host1, &agent, tag)?;
        eprintln!("{tag}: one lease added and removed among {LISTED_LEASES}: {calls:?}");
        // The lease's own writes must be in the trace, or its counts say nothing: strace
        // traced the agent and decoded its netlink requests.
        assert!(
            calls.route_writes >= 2,
            "{tag}: the trace holds {} route writes, not the lease's route added and deleted",
            calls.route_writes
        );
        assert!(
            dataplane == "kernel" || calls.map_calls > 0,
            "{tag}: the trace holds no map syscall, not even the lease's own entries"
        );
        assert_eq!(
            calls.dumps, 0,
            "{tag}: a lease event dumped the node's routes, neighbours or FDB"
        );
        // The lease's own entries take a few; the containers' programs, endpoints and claims
        // are not the lease's business and are not read again.
        assert!(
            calls.map_calls <= LEASE_EVENT_MAP_CALLS,
            "{tag}: a lease event made {} map syscalls at {LISTED_LEASES} leases and \
             {LISTED_CONTAINERS} containers",
            calls.map_calls
        );
        assert!(
            calls.route_lookups <= 1,
            "{tag}: one new lease took {} route lookups",
            calls.route_lookups
        );
        assert_eq!(
            agent.count_in_log("cannot bring the node in line"),
            0,
            "{}",
            agent.log()
        );
    }
    Ok(())
}

/// Containers on the listing test's host, each known to the programs by its endpoint and
/// claims: a round that places the programs reads their entries.
const LISTED_CONTAINERS: usize = 12;

/// The map syscalls one lease added and removed may take: its own subnet and VTEP entries,
/// and the lookups the agent makes every 2 s whatever happens (the counters for the refusal
/// warnings, the trace and monitor switch for a monitor gone), 3 a tick over the few seconds
/// the test watches. A pass over [`LISTED_CONTAINERS`] ports takes about 100.
const LEASE_EVENT_MAP_CALLS: usize = 24;

/// [`LISTED_CONTAINERS`] containers on `host`'s bridge that have pinged its address: in ebpf
/// mode each has its program, its claims and its endpoint entry.
fn containers_with_their_programs(
    host: &Host,
    agent: &Agent,
    dataplane: &str,
) -> Result<Vec<Container>> {
    let containers = (0..LISTED_CONTAINERS)
        .map(|index| {
            Container::attach(
                host,
                &format!("c{index}"),
                &format!("10.2.41.{}", 2 + index),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    if dataplane == "ebpf" {
        wait_for("the containers' programs", EVENT_TIMEOUT, || {
            Ok(agent.count_in_log("tc_container_ingress attached to veth-c") >= LISTED_CONTAINERS)
        })?;
    }
    for container in &containers {
        container.ping("10.2.41.1", 1)?;
    }
    if dataplane == "ebpf" {
        wait_for("the containers' endpoints", EVENT_TIMEOUT, || {
            let samples = scrape(&host.netns, HEALTH_PORT)?;
            let endpoints = value_of(&samples, "overlay_map_entries", &[("map", "endpoints")]);
            Ok(endpoints == Some(LISTED_CONTAINERS as f64))
        })?;
    }
    Ok(containers)
}

/// The `index`th lease of the listing test: its subnet, PublicIP and VtepMAC.
fn listed_lease(index: usize) -> (String, String, String) {
    // 10.2.41.0/24 is the agent's own.
    let third = if index < 41 { index } else { index + 1 };
    (
        format!("10.2.{third}.0/24"),
        format!("172.20.{}.{}", 100 + index / 200, 1 + index % 200),
        format!("1a:4b:d7:f8:{:02x}:{:02x}", index / 256, index % 256),
    )
}

/// Safety-net ticks the listing test sits out: a window the 30-s full round falls in is
/// watched again.
const WINDOWS: usize = 3;

/// What an agent asked the kernel for while one lease came and went.
#[derive(Debug)]
struct Calls {
    /// Netlink dumps of routes or neighbours (FDB entries are neighbours of AF_BRIDGE).
    dumps: usize,
    /// Lookups, updates, deletes and key walks on any map.
    map_calls: usize,
    /// Route lookups (`RTM_GETROUTE` without `NLM_F_DUMP`): how DirectRouting finds a peer.
    route_lookups: usize,
    /// Routes added or deleted (`RTM_NEWROUTE`, `RTM_DELROUTE`).
    route_writes: usize,
}

/// The [`Calls`] `agent` on `host` makes while one more lease is added and then removed, in
/// a window without a full round.
fn calls_of_one_lease_event(
    cluster: &Cluster,
    host: &Host,
    agent: &Agent,
    tag: &str,
) -> Result<Calls> {
    let (subnet, address, mac) = listed_lease(LISTED_LEASES);
    let key = cluster.subnet_key(&subnet);
    for window in 0..WINDOWS {
        let full_rounds = rounds(&host.netns, &["everything"])?;
        let trace = host.dir.join(format!("{tag}-{window}.trace"));
        let mut strace = agent.strace(host, "bpf,sendto,sendmsg", &trace)?;
        cluster.etcd.put(&key, &flannel_record(&address, &mac))?;
        host.wait_for_peer(&subnet, &address, &mac)?;
        // The route comes before the round's last step; no scrape meanwhile, which would
        // read the maps.
        sleep(ROUND_END);
        cluster.etcd.etcdctl(&["del", &key])?;
        host.wait_for_no_peer(&subnet)?;
        let fdb = host
            .netns
            .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
        ensure!(
            !fdb.contains(&mac),
            "{tag}: the removed lease's FDB entry stayed:\n{fdb}"
        );
        sleep(ROUND_END);
        strace.signal(libc::SIGINT)?;
        strace.wait_exit(EXIT_TIMEOUT)?;
        if rounds(&host.netns, &["everything"])? != full_rounds {
            continue;
        }
        let trace = std::fs::read_to_string(&trace)?;
        let requests = |kind: &str, dump: bool| {
            trace
                .lines()
                .filter(|line| line.contains(kind) && line.contains("NLM_F_DUMP") == dump)
                .count()
        };
        let map_calls = [
            "BPF_MAP_LOOKUP_ELEM",
            "BPF_MAP_UPDATE_ELEM",
            "BPF_MAP_DELETE_ELEM",
            "BPF_MAP_GET_NEXT_KEY",
        ]
        .iter()
        .map(|call| trace.matches(call).count())
        .sum();
        return Ok(Calls {
            dumps: requests("RTM_GETROUTE", true) + requests("RTM_GETNEIGH", true),
            map_calls,
            route_lookups: requests("RTM_GETROUTE", false),
            route_writes: requests("RTM_NEWROUTE", false) + requests("RTM_DELROUTE", false),
        });
    }
    bail!("a safety-net round fell in each of {WINDOWS} windows")
}

/// Time for a round to finish its steps after its route appears.
const ROUND_END: Duration = Duration::from_secs(1);

#[test]
fn malformed_records_are_skipped_and_valid_ones_still_processed() -> Result<()> {
    let (cluster, host1) = host_with_reservation("malformed")?;
    let malformed = |round: u8| {
        [
            (format!("{PREFIX}/subnets/10.2.{round}0.0-24"), "{not json".to_string()),
            (format!("{PREFIX}/subnets/garbage{round}"), flannel_record("172.20.62.110", "1a:4b:d7:f7:16:89")),
            (
                format!("{PREFIX}/subnets/10.2.{round}1.0-24"),
                r#"{"PublicIP":"172.20.62.111","BackendType":"udp"}"#.to_string(),
            ),
            (
                format!("{PREFIX}/subnets/10.2.{round}2.0-24"),
                r#"{"PublicIP":"172.20.62.112","BackendType":"vxlan","BackendData":{"VtepMAC":"not-a-mac"}}"#.to_string(),
            ),
            (format!("{PREFIX}/subnets/10.9.{round}3.0-24"), flannel_record("172.20.62.113", "1a:4b:d7:f7:16:89")),
        ]
    };
    // Round 1 exists before the agent starts (the listing); round 2 arrives through the watch.
    for (key, value) in malformed(1) {
        cluster.etcd.put(&key, &value)?;
    }
    cluster.etcd.put(
        &cluster.subnet_key("10.2.19.0/24"),
        &flannel_record("172.20.62.119", "1a:4b:d7:f7:16:19"),
    )?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    host1.wait_for_peer("10.2.19.0/24", "172.20.62.119", "1a:4b:d7:f7:16:19")?;
    for (key, value) in malformed(2) {
        cluster.etcd.put(&key, &value)?;
    }
    cluster.etcd.put(
        &cluster.subnet_key("10.2.29.0/24"),
        &flannel_record("172.20.62.129", "1a:4b:d7:f7:16:29"),
    )?;
    host1.wait_for_peer("10.2.29.0/24", "172.20.62.129", "1a:4b:d7:f7:16:29")?;

    for (key, _) in malformed(1).into_iter().chain(malformed(2)) {
        assert!(
            agent.log().contains(&format!("skipping record {key}: ")),
            "no warning for {key}:\n{}",
            agent.log()
        );
    }
    assert!(agent.log().contains("BackendType \"udp\" is not \"vxlan\""));
    assert!(agent.log().contains("\"not-a-mac\" is not a MAC address"));
    assert!(
        agent
            .log()
            .contains("the subnet lies outside the Network 10.2.0.0/16")
    );
    assert!(
        agent.process.try_exit_status()?.is_none(),
        "the agent keeps running"
    );
    Ok(())
}

#[test]
fn the_watch_survives_an_etcd_restart_and_a_compaction_while_disconnected() -> Result<()> {
    let (mut cluster, host1) = host_with_reservation("watch-resync")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    // Three hosts, each with a VTEP MAC of its own (a copied one would be skipped).
    for (subnet, address, mac) in [
        ("10.2.50.0/24", "172.20.62.150", "1a:4b:d7:f7:16:60"),
        ("10.2.51.0/24", "172.20.62.151", "1a:4b:d7:f7:16:61"),
        ("10.2.52.0/24", "172.20.62.152", "1a:4b:d7:f7:16:62"),
    ] {
        cluster
            .etcd
            .put(&cluster.subnet_key(subnet), &flannel_record(address, mac))?;
        host1.wait_for_peer(subnet, address, mac)?;
    }

    // Keep the agent from reconnecting while etcd restarts and the history is compacted.
    let nft = |rules: &str| host1.netns.exec(&["nft", rules]);
    nft(
        "add table inet cut; add chain inet cut out { type filter hook output priority 0; }; add rule inet cut out tcp dport 2379 drop",
    )?;
    cluster.etcd.restart()?;
    cluster.etcd.put(
        &cluster.subnet_key("10.2.53.0/24"),
        &flannel_record("172.20.62.153", "1a:4b:d7:f7:16:53"),
    )?;
    cluster
        .etcd
        .etcdctl(&["del", &cluster.subnet_key("10.2.50.0/24")])?;
    cluster.etcd.put(
        &cluster.subnet_key("10.2.51.0/24"),
        &flannel_record("172.20.62.151", "1a:4b:d7:f7:16:51"),
    )?;
    cluster.etcd.compact()?;
    nft("delete table inet cut")?;

    host1.wait_for_peer("10.2.53.0/24", "172.20.62.153", "1a:4b:d7:f7:16:53")?;
    host1.wait_for_no_peer("10.2.50.0/24")?;
    host1.wait_for_peer("10.2.51.0/24", "172.20.62.151", "1a:4b:d7:f7:16:51")?;
    cluster.etcd.put(
        &cluster.subnet_key("10.2.54.0/24"),
        &flannel_record("172.20.62.154", "1a:4b:d7:f7:16:54"),
    )?;
    host1.wait_for_peer("10.2.54.0/24", "172.20.62.154", "1a:4b:d7:f7:16:54")?;

    let log = agent.log();
    assert!(
        log.contains("etcd compacted past revision"),
        "the agent says why it listed again:\n{log}"
    );
    for (event, times) in [
        ("lease added: 10.2.50.0/24", 1),
        ("lease added: 10.2.51.0/24", 1),
        ("lease added: 10.2.52.0/24", 1),
        ("lease added: 10.2.53.0/24", 1),
        ("lease removed: 10.2.50.0/24", 1),
        ("lease changed: 10.2.51.0/24", 1),
        ("lease removed: 10.2.52.0/24", 0),
        ("lease changed: 10.2.52.0/24", 0),
    ] {
        assert_eq!(log.matches(event).count(), times, "{event}:\n{log}");
    }
    Ok(())
}

#[test]
fn deleting_the_own_record_makes_the_agent_exit_0_and_a_restart_leases_afresh() -> Result<()> {
    let mut cluster = Cluster::new("revoked")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    let subnet = agent.wait_ready()?;
    cluster
        .etcd
        .etcdctl(&["del", &cluster.subnet_key(&subnet)])?;
    // As flanneld: status 0, so `Restart=on-failure` would leave it stopped.
    let status = agent.process.wait_exit(READY_TIMEOUT)?;
    let log = agent.log();
    anyhow::ensure!(status.success(), "the agent exited with {status}:\n{log}");
    for said in [
        format!("lease revoked: the record of {subnet}"),
        "Lease has been revoked. Shutting down daemon.".to_string(),
    ] {
        anyhow::ensure!(
            log.contains(&said),
            "the agent did not say {said:?}:\n{log}"
        );
    }
    // What the shipped unit's `Restart=always` does next: started again, the agent leases
    // afresh, the subnet of its subnet file, which nobody took meanwhile.
    let mut again = Agent::start(&cluster, &host1, &[])?;
    let leased = again.wait_ready()?;
    anyhow::ensure!(leased == subnet, "restarted into {leased}, not {subnet}");
    anyhow::ensure!(
        cluster.etcd.get(&cluster.subnet_key(&subnet))?.is_some(),
        "no record of {subnet} after the restart"
    );
    Ok(())
}

#[test]
fn the_agent_talks_to_an_etcd_that_requires_client_certificates() -> Result<()> {
    let mut cluster = Cluster::with_tls("tls")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let tls = cluster.scratch.path().to_path_buf();
    let flag = |name: &str, file: &str| format!("--etcd-{name}={}", tls.join(file).display());
    let (ca, cert, key) = (
        flag("cafile", "ca.pem"),
        flag("certfile", "client.pem"),
        flag("keyfile", "client-key.pem"),
    );
    let mut agent = Agent::start(&cluster, &host1, &[&ca, &cert, &key])?;
    let subnet = agent.wait_ready()?;
    assert_record_shape(&record_of(&cluster, &subnet)?, &host1);

    let host2 = cluster.add_host("host2", "172.20.62.105")?;
    let without_certificate = Agent::start(&cluster, &host2, &[&ca])?;
    // The server refuses each handshake, and the agent says it cannot read. (Why, the client
    // sees in some of its attempts only: BadCertificate, or just a closed connection.)
    without_certificate.wait_for_log(
        "cannot read the network config from etcd",
        3,
        EVENT_TIMEOUT,
    )?;
    assert!(
        !host2.subnet_file().exists(),
        "no lease without a client certificate"
    );
    assert_eq!(
        cluster.subnet_keys()?,
        [cluster.subnet_key(&subnet)],
        "host1's lease alone"
    );
    Ok(())
}

#[test]
fn flags_can_come_from_flanneld_environment_variables() -> Result<()> {
    let mut cluster = Cluster::new("env")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let subnet_file = host1.subnet_file().display().to_string();
    let pin_dir = host1.pin_dir().display().to_string();
    let endpoint = cluster.etcd.endpoint();
    let mut agent = Agent::start_with(
        &host1,
        &[],
        &[
            ("FLANNELD_ETCD_ENDPOINTS", &endpoint),
            ("FLANNELD_ETCD_PREFIX", PREFIX),
            ("FLANNELD_SUBNET_FILE", &subnet_file),
            ("FLANNELD_BPF_PIN_DIR", &pin_dir),
            ("FLANNELD_IFACE", "eth0"),
            ("FLANNELD_IP_MASQ", "true"),
            ("FLANNELD_HEALTHZ_IP", "127.0.0.1"),
            ("FLANNELD_HEALTHZ_PORT", "8471"),
        ],
    )?;
    agent.wait_ready()?;
    assert!(std::fs::read_to_string(host1.subnet_file())?.contains("FLANNEL_IPMASQ=true\n"));
    assert!(
        host1.pin_dir().join("config").exists(),
        "the dataplane is pinned where FLANNELD_BPF_PIN_DIR says"
    );
    Ok(())
}

#[test]
fn readyz_turns_ready_once_the_subnet_file_is_written() -> Result<()> {
    let mut cluster = Cluster::with_etcd("healthz", false, None)?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    let status = |path: &str| -> Result<String> {
        let url = format!("http://127.0.0.1:{HEALTH_PORT}{path}");
        host1
            .netns
            .exec(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
    };
    // The health port answers while the agent waits for a network config.
    wait_for("/healthz to answer 200", EVENT_TIMEOUT, || {
        Ok(agent
            .health("/healthz")?
            .is_some_and(|answer| answer.status == 200))
    })?;
    // Not ready before the subnet file exists, naming what is missing: the config.
    wait_for("/readyz to name the missing config", EVENT_TIMEOUT, || {
        Ok(agent.health("/readyz")?.is_some_and(|answer| {
            answer.status == 503
                && answer
                    .body
                    .contains(&format!("not ready: no network config at {PREFIX}/config"))
        }))
    })
    .with_context(|| format!("{:?}", agent.health("/readyz")))?;
    cluster.etcd.put(
        &format!("{PREFIX}/config"),
        overlay_tests::cluster::SEED_NETWORK_CONFIG,
    )?;
    agent.wait_ready()?;
    assert_eq!(status("/readyz")?, "200");
    assert_eq!(status("/nonsense")?, "404");
    Ok(())
}

#[test]
fn a_flanneld_unit_s_command_line_runs_and_systemd_hears_ready() -> Result<()> {
    let (cluster, host1) = host_with_reservation("notify")?;
    // What systemd does for a Type=notify unit: a datagram socket named in NOTIFY_SOCKET.
    let socket = cluster.scratch.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&socket)?;
    systemd.set_read_timeout(Some(READY_TIMEOUT))?;
    // A unit as flannel's documentation writes one: Go-style flags, an env file's variables.
    let flags = [
        format!("-etcd-endpoints={}", cluster.endpoints()),
        format!("-etcd-prefix={PREFIX}"),
        format!("-subnet-file={}", host1.subnet_file().display()),
        "-iface=eth0".to_string(),
        "-ip-masq=true".to_string(),
    ];
    let socket_path = socket.display().to_string();
    let pin_dir = host1.pin_dir().display().to_string();
    let _agent = Agent::start_with(
        &host1,
        &flags,
        &[
            ("NOTIFY_SOCKET", &socket_path),
            ("FLANNELD_IPTABLES_RESYNC", "10"),
            ("FLANNELD_BPF_PIN_DIR", &pin_dir),
        ],
    )?;
    let mut message = [0u8; 64];
    let length = systemd
        .recv(&mut message)
        .context("no notification from the agent")?;
    assert_eq!(
        String::from_utf8_lossy(&message[..length]).trim(),
        "READY=1"
    );
    assert_eq!(
        subnet_from_file(&host1.subnet_file()).as_deref(),
        Some("10.2.41.0/24"),
        "the subnet file is written before READY=1"
    );
    assert!(std::fs::read_to_string(host1.subnet_file())?.contains("FLANNEL_IPMASQ=true\n"));
    Ok(())
}

#[test]
fn agents_racing_for_the_last_subnets_all_get_one() -> Result<()> {
    // A /28 holds three /30 subnets: three agents starting at once collide on create often.
    let config = r#"{"Network": "10.3.0.0/28", "Backend": {"Type": "vxlan"}}"#;
    let mut cluster = Cluster::with_etcd("race", false, Some(config))?;
    let hosts = [
        cluster.add_host("host1", "172.20.62.104")?,
        cluster.add_host("host2", "172.20.62.105")?,
        cluster.add_host("host3", "172.20.62.106")?,
    ];
    let mut agents = hosts
        .iter()
        .map(|host| Agent::start(&cluster, host, &[]))
        .collect::<Result<Vec<_>>>()?;
    let mut subnets = agents
        .iter_mut()
        .map(Agent::wait_ready)
        .collect::<Result<Vec<_>>>()?;
    subnets.sort();
    assert_eq!(subnets, ["10.3.0.12/30", "10.3.0.4/30", "10.3.0.8/30"]);
    Ok(())
}

#[test]
fn the_uplink_is_chosen_by_iface_name_or_regex_on_a_multi_homed_host() -> Result<()> {
    let mut cluster = Cluster::new("multi-homed")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    // A second interface; the default route stays on eth0.
    host1.netns.ip(&[
        "link", "add", "storage0", "type", "veth", "peer", "name", "storage1",
    ])?;
    host1
        .netns
        .ip(&["addr", "add", "192.0.2.4/24", "dev", "storage0"])?;
    host1.netns.ip(&["link", "set", "storage0", "up"])?;

    for (flag, public_ip) in [
        ("--iface=storage0", "192.0.2.4"),
        ("--iface-regex=^192\\.0\\.2\\.", "192.0.2.4"),
        ("--iface-regex=^eth", "172.20.62.104"),
        ("--iface=172.20.62.104", "172.20.62.104"),
    ] {
        let mut agent = Agent::start(&cluster, &host1, &[flag])?;
        let subnet = agent.wait_ready()?;
        let record = record_of(&cluster, &subnet)?;
        assert!(
            record.starts_with(&format!(r#"{{"PublicIP":"{public_ip}","#)),
            "{flag}: {record}"
        );
        agent.process.terminate(EXIT_TIMEOUT)?;
        cluster
            .etcd
            .etcdctl(&["del", &cluster.subnet_key(&subnet)])?;
        std::fs::remove_file(host1.subnet_file())?;
    }

    let mut missing = Agent::start(&cluster, &host1, &["--iface=wlan9"])?;
    missing.expect_failure(
        "no interface matches the --iface, --iface-regex and --iface-can-reach given",
    )?;
    Ok(())
}

#[test]
fn the_agent_logs_in_to_an_etcd_with_authentication() -> Result<()> {
    let mut cluster = Cluster::new("auth")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    cluster.etcd.enable_auth("s3cret")?;
    let mut agent = Agent::start(
        &cluster,
        &host1,
        &["--etcd-username=root", "--etcd-password=s3cret"],
    )?;
    let subnet = agent.wait_ready()?;
    assert_record_shape(&record_of(&cluster, &subnet)?, &host1);
    assert_eq!(
        agent.count_in_log("the etcd password goes unencrypted to http://172.20.62.1:2379"),
        1,
        "a password over plain HTTP is warned about:\n{}",
        agent.log()
    );

    let host2 = cluster.add_host("host2", "172.20.62.105")?;
    let wrong = Agent::start(
        &cluster,
        &host2,
        &["--etcd-username=root", "--etcd-password=guess"],
    )?;
    wrong.wait_for_log("authentication failed", 1, EVENT_TIMEOUT)?;
    assert!(
        !host2.subnet_file().exists(),
        "no lease with a wrong password"
    );
    Ok(())
}

#[test]
fn flags_flanneld_does_not_know_or_overlay_does_not_support_are_refused_by_name() -> Result<()> {
    let mut cluster = Cluster::new("refused-flags")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    let flags = Agent::flags(&cluster, &host1, &["-no-such-flag"]);
    let status = Agent::start_with(&host1, &flags, &[])?
        .expect_failure("flag provided but not defined: -no-such-flag")?;
    // flanneld's status for a flag it does not know (Go's flag package).
    anyhow::ensure!(
        status.code() == Some(2),
        "an unknown flag ended in {status}"
    );
    let unsupported = "flag -kube-subnet-mgr is not supported";
    let flags = Agent::flags(&cluster, &host1, &["-kube-subnet-mgr"]);
    Agent::start_with(&host1, &flags, &[])?.expect_failure(unsupported)?;
    let flags = Agent::flags(&cluster, &host1, &[]);
    let from_env = [("FLANNELD_KUBE_SUBNET_MGR", "true")];
    Agent::start_with(&host1, &flags, &from_env)?
        .expect_failure("FLANNELD_KUBE_SUBNET_MGR (flag -kube-subnet-mgr) is not supported")?;
    Ok(())
}

/// Gives `host` a second interface, eth1 (a veth whose peer stays in the host), up, with
/// `addresses`.
fn add_second_interface(host: &Host, addresses: &[&str]) -> Result<()> {
    host.netns.ip(&[
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "eth1-peer",
    ])?;
    for address in addresses {
        host.netns
            .ip(&["addr", "add", address, "dev", "eth1", "nodad"])?;
    }
    for device in ["eth1", "eth1-peer"] {
        host.netns.ip(&["link", "set", device, "up"])?;
    }
    Ok(())
}

#[test]
fn the_uplink_and_the_tunnel_source_are_chosen_as_flanneld_chooses_them() -> Result<()> {
    let mut cluster = Cluster::new("uplink-choice")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    // A second interface; flanneld takes it when --public-ip names its address.
    add_second_interface(&host1, &["192.168.77.4/24"])?;
    let kernel = ["--dataplane=kernel"];
    let uplink_of = |extra: &[&str]| -> Result<String> {
        let mut agent = Agent::start(&cluster, &host1, &[&kernel[..], extra].concat())?;
        agent.wait_ready()?;
        let device = host1.netns.ip(&["-d", "link", "show", "flannel.1"])?;
        agent.process.terminate(EVENT_TIMEOUT)?;
        Ok(device)
    };

    let device = uplink_of(&["--public-ip=192.168.77.4"])?;
    assert!(device.contains("local 192.168.77.4 dev eth1"), "{device}");
    // A --public-ip the uplink holds is flannel.1's local address, as flanneld makes it since
    // v0.27.4, a secondary address too.
    host1
        .netns
        .ip(&["addr", "add", "172.20.62.204/24", "dev", "eth0"])?;
    let device = uplink_of(&["--iface=eth0", "--public-ip=172.20.62.204"])?;
    assert!(device.contains("local 172.20.62.204 dev eth0"), "{device}");
    // A public IP no interface holds (a NAT's) keeps the interface's address as the source.
    let device = uplink_of(&["--iface=eth0", "--public-ip=203.0.113.9"])?;
    assert!(device.contains("local 172.20.62.104 dev eth0"), "{device}");
    let record = cluster.etcd.etcdctl(&[
        "get",
        "--prefix",
        "--print-value-only",
        &format!("{PREFIX}/subnets"),
    ])?;
    assert!(record.contains(r#""PublicIP":"203.0.113.9""#), "{record}");
    let device = uplink_of(&["--iface-can-reach=192.168.77.1"])?;
    assert!(device.contains("local 192.168.77.4 dev eth1"), "{device}");
    let device = uplink_of(&["--iface=nope", "--iface-regex=^eth1$"])?;
    assert!(device.contains("local 192.168.77.4 dev eth1"), "{device}");

    let flags = Agent::flags(&cluster, &host1, &["--public-ip=203.0.113.9"]);
    Agent::start_with(&host1, &flags, &[])?
        .expect_failure("no interface holds --public-ip 203.0.113.9")?;
    Ok(())
}

#[test]
fn ipv6_addresses_choose_the_uplink_and_serve_health_as_in_flanneld() -> Result<()> {
    let mut cluster = Cluster::with_ipv6(
        "uplink-choice-v6",
        overlay_tests::ipv6::DUAL_STACK_NETWORK_CONFIG,
    )?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    add_second_interface(&host1, &["192.168.77.4/24", "fd00:77::4/64"])?;
    let devices_with = |extra: &[&str]| -> Result<(String, String)> {
        let mut agent = Agent::start(&cluster, &host1, &[&["--dataplane=kernel"], extra].concat())?;
        agent.wait_ready()?;
        let devices = (
            host1.netns.ip(&["-d", "link", "show", "flannel.1"])?,
            host1.netns.ip(&["-d", "link", "show", "flannel-v6.1"])?,
        );
        agent.process.terminate(EVENT_TIMEOUT)?;
        Ok(devices)
    };
    for flag in [
        "--iface=fd00:77::4",
        "--iface-regex=^fd00:77::",
        "--iface-can-reach=fd00:77::1",
    ] {
        let (ipv4, ipv6) = devices_with(&[flag])?;
        anyhow::ensure!(
            ipv4.contains("local 192.168.77.4 dev eth1"),
            "{flag}: {ipv4}"
        );
        anyhow::ensure!(ipv6.contains("local fd00:77::4 dev eth1"), "{flag}: {ipv6}");
    }

    let flags: Vec<String> = Agent::flags(&cluster, &host1, &["--dataplane=kernel"])
        .into_iter()
        .map(|flag| {
            if flag.starts_with("--healthz-ip=") {
                "--healthz-ip=::1".to_string()
            } else {
                flag
            }
        })
        .collect();
    let agent = Agent::start_with(&host1, &flags, &[])?;
    let url = format!("http://[::1]:{HEALTH_PORT}/readyz");
    wait_for("/readyz on ::1 to answer 200", READY_TIMEOUT, || {
        let answer = host1.netns.exec_unchecked(&[
            "curl",
            "-s",
            "-g",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])?;
        Ok(String::from_utf8_lossy(&answer.stdout) == "200")
    })
    .with_context(|| agent.log())?;
    Ok(())
}

/// Makes the agent on `host` take `subnet` ("10.2.41.0/24") as a lease: flannel takes the
/// previous subnet file's subnet again while it is free.
fn leave_previous_subnet(host: &Host, subnet: &str) -> Result<()> {
    let gateway = subnet.replace(".0/", ".1/");
    std::fs::write(
        host.subnet_file(),
        format!("FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET={gateway}\n"),
    )?;
    Ok(())
}

#[test]
fn an_expired_etcd_auth_token_is_renewed_for_renewals_and_the_watch() -> Result<()> {
    let mut cluster = Cluster::new("auth-token")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    cluster.etcd.enable_auth("s3cret")?;
    // Tokens that expire after 2 s unused: far shorter than the agent's quiet spells.
    cluster
        .etcd
        .restart_with_flags(&["--auth-token=simple", "--auth-token-ttl=2"])?;
    leave_previous_subnet(&host1, "10.2.41.0/24")?;
    let mut agent = Agent::start(
        &cluster,
        &host1,
        &[
            "--etcd-username=root",
            "--etcd-password=s3cret",
            "--subnet-lease-ttl=10s",
        ],
    )?;
    assert_eq!(agent.wait_ready()?, "10.2.41.0/24");
    let key = cluster.subnet_key("10.2.41.0/24");
    let first_lease = cluster.etcd.lease_of(&key)?;

    sleep(Duration::from_secs(30));
    // A restart forgets every token.
    cluster.etcd.restart()?;
    cluster.etcd.put(
        &cluster.subnet_key("10.2.54.0/24"),
        &flannel_record("172.20.62.105", "1a:4b:d7:f7:16:89"),
    )?;
    host1.wait_for_peer("10.2.54.0/24", "172.20.62.105", "1a:4b:d7:f7:16:89")?;

    assert!(
        agent.process.try_exit_status()?.is_none(),
        "the agent runs on:\n{}",
        agent.log()
    );
    for line in agent
        .log()
        .lines()
        .filter(|line| line.contains("logged in again"))
    {
        eprintln!("{line}");
    }
    record_of(&cluster, "10.2.41.0/24")?;
    assert_ne!(
        cluster.etcd.lease_of(&key)?,
        first_lease,
        "the record was renewed onto fresh etcd leases"
    );
    Ok(())
}

/// nft rules for `netns` that drop every packet to or from etcd's peer port: the member there
/// keeps serving clients but hears nothing of the others.
const CUT_OFF_FROM_PEERS: &str = "add table inet partition; \
     add chain inet partition in { type filter hook input priority 0; }; \
     add chain inet partition out { type filter hook output priority 0; }; \
     add rule inet partition in tcp dport 2380 drop; \
     add rule inet partition in tcp sport 2380 drop; \
     add rule inet partition out tcp dport 2380 drop; \
     add rule inet partition out tcp sport 2380 drop";

#[test]
fn an_etcd_member_cut_off_from_its_peers_is_left_and_no_event_is_missed() -> Result<()> {
    let mut cluster = Cluster::with_etcd_cluster("partition")?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    cluster.reserve("10.2.41.0/24", "172.20.62.104")?;
    // At first the agent reaches only the second member (172.20.62.2): its watch is there.
    let nft = |rules: &str| host1.netns.exec(&["nft", rules]);
    nft(
        "add table inet only; add chain inet only out { type filter hook output priority 0; }; \
         add rule inet only out ip daddr { 172.20.62.1, 172.20.62.3 } tcp dport 2379 drop",
    )?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    let put = |subnet: &str, address: &str, mac: &str| -> Result<()> {
        // The majority may be electing a new leader: writes wait for it.
        wait_for(
            &format!("the majority to take the record of {subnet}"),
            EVENT_TIMEOUT,
            || {
                Ok(cluster
                    .etcd
                    .put(&cluster.subnet_key(subnet), &flannel_record(address, mac))
                    .is_ok())
            },
        )
    };
    put("10.2.50.0/24", "172.20.62.150", "1a:4b:d7:f7:16:50")?;
    host1.wait_for_peer("10.2.50.0/24", "172.20.62.150", "1a:4b:d7:f7:16:50")?;
    nft("delete table inet only")?;

    cluster.member_namespaces[0]
        .exec(&["nft", CUT_OFF_FROM_PEERS])
        .context("cannot cut the second member off")?;
    let cut = std::time::Instant::now();
    // Written while the agent still watches the member cut off, and after.
    put("10.2.51.0/24", "172.20.62.151", "1a:4b:d7:f7:16:51")?;
    let written = cut.elapsed();
    host1.wait_for_peer("10.2.51.0/24", "172.20.62.151", "1a:4b:d7:f7:16:51")?;
    eprintln!(
        "written {written:?} after the cut, learned {:?} after it",
        cut.elapsed()
    );
    put("10.2.52.0/24", "172.20.62.152", "1a:4b:d7:f7:16:52")?;
    host1.wait_for_peer("10.2.52.0/24", "172.20.62.152", "1a:4b:d7:f7:16:52")?;
    host1.wait_for_peer("10.2.50.0/24", "172.20.62.150", "1a:4b:d7:f7:16:50")?;

    let log = agent.log();
    for subnet in ["10.2.50.0/24", "10.2.51.0/24", "10.2.52.0/24"] {
        assert_eq!(
            log.matches(&format!("lease added: {subnet}")).count(),
            1,
            "{subnet} added once:\n{log}"
        );
        assert_eq!(
            log.matches(&format!("lease removed: {subnet}")).count(),
            0,
            "{subnet} never lost:\n{log}"
        );
    }
    assert!(
        log.contains("no leader"),
        "the agent says why it left the member:\n{log}"
    );
    Ok(())
}
