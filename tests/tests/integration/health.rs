//! /healthz and /readyz against real faults: etcd gone, a node the agent cannot bring in line,
//! clients that connect and never ask, and a process out of file descriptors. The agent either
//! does its job or says, on its health port, what keeps it from it. And /metrics walks the maps
//! at most once every 5 s however often it is scraped, holding up no lease, and never while
//! nobody scrapes it.
use std::{
    path::Path,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::{Agent, HEALTH_PORT},
    cluster::{Cluster, Host},
    health::{self, Answer, closed_by_server, cpu_time_over, idle_connections},
    metrics::{scrape, value_of},
    process::Process,
    wait::wait_for,
};

/// How long the tests' agents tolerate a failure before /healthz says so.
const GRACE: (&str, &str) = ("FLANNELD_HEALTHZ_GRACE", "3s");
const VERDICT_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent's limit of health connections at once and how long one may take to ask.
const CONNECTION_LIMIT: usize = 32;
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// An agent on `host` that tolerates failures for [`GRACE`], with `extra` flags.
fn start_agent(cluster: &Cluster, host: &Host, extra: &[&str]) -> Result<Agent> {
    Agent::start_with(host, &Agent::flags(cluster, host, extra), &[GRACE])
}

fn cluster_with_host(tag: &str) -> Result<(Cluster, Host)> {
    let mut cluster = Cluster::new(tag)?;
    let host1 = cluster.add_host("host1", "172.20.62.104")?;
    Ok((cluster, host1))
}

/// Waits until `path` answers `status` with a body holding every one of `phrases`; returns it.
fn wait_for_answer(agent: &Agent, path: &str, status: u16, phrases: &[&str]) -> Result<Answer> {
    agent.wait_for_health(path, status, phrases, VERDICT_TIMEOUT)
}

#[test]
fn healthz_names_a_lost_etcd_and_turns_healthy_once_it_is_back() -> Result<()> {
    let (mut cluster, host1) = cluster_with_host("healthz-etcd")?;
    // A lease renewed every few seconds, so renewals fail while etcd is away.
    let mut agent = start_agent(&cluster, &host1, &["--subnet-lease-ttl=6s"])?;
    let subnet = agent.wait_ready()?;
    wait_for_answer(&agent, "/healthz", 200, &["ok"])?;

    cluster.etcd.stop();
    let stopped = Instant::now();
    let answer = wait_for_answer(
        &agent,
        "/healthz",
        503,
        &["lease watch down for", "lease not renewed for"],
    )?;
    eprintln!(
        "{:?} after etcd stopped, /healthz: {}",
        stopped.elapsed(),
        answer.body
    );
    ensure!(
        stopped.elapsed() > Duration::from_secs(3),
        "a failure shorter than the grace period is tolerated"
    );
    let ready = agent.health("/readyz")?.context("/readyz answers")?;
    ensure!(
        ready.status == 503,
        "/readyz fails with /healthz: {ready:?}"
    );

    cluster.etcd.restart()?;
    wait_for_answer(&agent, "/healthz", 200, &["ok"])?;
    wait_for_answer(&agent, "/readyz", 200, &["ok"])?;
    ensure!(
        cluster.etcd.get(&cluster.subnet_key(&subnet))?.is_some(),
        "the lease outlived the outage"
    );
    Ok(())
}

#[test]
fn healthz_names_a_node_the_agent_cannot_bring_in_line_until_it_can() -> Result<()> {
    let (cluster, host1) = cluster_with_host("healthz-reconcile")?;
    let mut agent = start_agent(&cluster, &host1, &[])?;
    agent.wait_ready()?;

    // Something else takes the bridge's name: the agent cannot make its bridge.
    take_the_bridge_s_name(&agent, &host1)?;
    let answer = wait_for_answer(
        &agent,
        "/healthz",
        503,
        &[
            "reconcile failing for",
            "docker0 exists but is not a bridge",
        ],
    )?;
    eprintln!("/healthz: {}", answer.body);

    host1.netns.ip(&["link", "del", "docker0"])?;
    wait_for_answer(&agent, "/healthz", 200, &["ok"])?;
    ensure!(
        host1
            .netns
            .ip(&["-d", "link", "show", "docker0"])?
            .contains("bridge"),
        "the agent made its bridge again"
    );
    Ok(())
}

/// Replaces docker0 with a veth of the same name while the agent is stopped: running, it
/// would make its bridge again before the name could be taken.
fn take_the_bridge_s_name(agent: &Agent, host: &Host) -> Result<()> {
    agent.process.signal(libc::SIGSTOP)?;
    let taken = host.netns.ip(&["link", "del", "docker0"]).and_then(|_| {
        host.netns.ip(&[
            "link", "add", "docker0", "type", "veth", "peer", "name", "squatter",
        ])
    });
    agent.process.signal(libc::SIGCONT)?;
    taken.map(drop)
}

#[test]
fn idle_clients_neither_block_the_health_port_nor_keep_their_connections() -> Result<()> {
    let (cluster, host1) = cluster_with_host("healthz-slowloris")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    let netns = host1.netns.name();

    let mut few = idle_connections(netns, HEALTH_PORT, 8)?;
    let asked = Instant::now();
    wait_for_answer(&agent, "/healthz", 200, &["ok"])?;
    ensure!(
        asked.elapsed() < Duration::from_secs(1),
        "idle clients delayed /healthz by {:?}",
        asked.elapsed()
    );

    // Far more idle connections than the agent takes: those over its limit are closed at
    // once, the rest when they have not asked within the deadline.
    let mut many = idle_connections(netns, HEALTH_PORT, 4 * CONNECTION_LIMIT)?;
    let opened = Instant::now();
    let refused = count_closed(&mut many, Duration::from_millis(200))?;
    eprintln!(
        "of {} idle connections, {refused} were closed at once",
        many.len()
    );
    ensure!(
        refused >= many.len() - CONNECTION_LIMIT,
        "connections over the limit of {CONNECTION_LIMIT} stay open: {refused} of {} closed",
        many.len()
    );
    sleep(REQUEST_DEADLINE.saturating_sub(opened.elapsed()));
    let all = few.len() + many.len();
    let closed = count_closed(&mut few, Duration::from_secs(3))?
        + count_closed(&mut many, Duration::from_secs(3))?;
    ensure!(
        closed == all,
        "{closed} of {all} idle connections closed after the deadline"
    );
    wait_for_answer(&agent, "/healthz", 200, &["ok"])?;
    Ok(())
}

/// How many of `streams` the server has closed, waiting up to `wait` for each.
fn count_closed(streams: &mut [std::net::TcpStream], wait: Duration) -> Result<usize> {
    let mut closed = 0;
    for stream in streams {
        if closed_by_server(stream, wait)? {
            closed += 1;
        }
    }
    Ok(closed)
}

#[test]
fn running_out_of_file_descriptors_does_not_make_the_health_port_spin() -> Result<()> {
    let (cluster, host1) = cluster_with_host("healthz-fds")?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    agent.wait_ready()?;
    let pid = agent.process.id();
    let open = health::open_files(pid)?;
    health::limit_open_files(pid, open + 4)?;

    let connections = idle_connections(host1.netns.name(), HEALTH_PORT, 64)?;
    // Let the accept errors start, then measure.
    sleep(Duration::from_millis(500));
    let used = cpu_time_over(pid, Duration::from_secs(3))?;
    // One episode so far: the idle connections it took hold their descriptors until their
    // 5-s deadline, after this window.
    let warnings = agent.count_in_log("; retrying with backoff");
    ensure!(
        used < Duration::from_millis(300),
        "the agent spun on accept errors: {used:?} of CPU in 3 s"
    );
    ensure!(
        warnings == 1,
        "{warnings} warnings for one episode of accept errors:\n{}",
        agent.log()
    );

    drop(connections);
    wait_for_answer(&agent, "/healthz", 200, &["ok"])?;
    Ok(())
}

/// Leases of hosts that do not exist, for the lease maps to hold many entries: 10.2.(100 +
/// i).0/24 at 172.20.63.(i + 1), each with a MAC of its own.
const MAPPED_LEASES: u32 = 150;
/// Map entries those leases make: one in `subnets`, one in `vteps` each.
const MAPPED_ENTRIES: u32 = 2 * MAPPED_LEASES;
/// How long a lease written while the scrapes run may take to be routed, as without them.
const ROUTED_WITHIN: Duration = Duration::from_secs(2);
/// The lease written while the scrapes run: its PublicIP and VtepMAC.
const LATER_VTEP: (&str, &str) = ("172.20.62.106", "1a:4b:d7:f7:16:8a");

fn mapped_leases(cluster: &Cluster) -> Vec<(String, String)> {
    (0..MAPPED_LEASES)
        .map(|index| {
            let subnet = format!("10.2.{}.0/24", 100 + index);
            let value = format!(
                r#"{{"PublicIP":"172.20.63.{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"1a:4b:d7:f7:18:{index:02x}"}}}}"#,
                index + 1
            );
            (cluster.subnet_key(&subnet), value)
        })
        .collect()
}

/// How long the agent idles unscraped under `strace`: more than twice the 5 s at which the
/// agent used to read the maps for `/metrics`.
const UNSCRAPED_FOR: Duration = Duration::from_secs(11);
/// Unscraped windows watched before the test gives up on seeing one without a map walk. A
/// reconcile round walks the lease maps too (its stale-entry sweep: 304 calls at 150 leases,
/// seen once in CI), and rounds come without a scrape: on the 30-s safety net, or on a
/// notification about the node's devices. At most one of three back-to-back windows holds the
/// safety net's tick, while an agent that read the maps on a timer for `/metrics` would walk
/// them in every window.
const UNSCRAPED_WINDOWS: usize = 3;

/// An agent nobody scrapes walks no map for `/metrics`, and the scrape that comes after a
/// change serves the maps as they are, not as a timer last read them.
#[test]
fn an_agent_nobody_scrapes_walks_no_map_and_a_scrape_reads_them_afresh() -> Result<()> {
    let (cluster, host1) = cluster_with_host("unscraped")?;
    cluster.etcd.put_many(&mapped_leases(&cluster))?;
    let mut agent = start_agent(&cluster, &host1, &[])?;
    let subnet = agent.wait_ready()?;
    host1.wait_for_peer("10.2.249.0/24", "172.20.63.150", "1a:4b:d7:f7:18:95")?;

    let mut walks = Vec::new();
    for window in 0..UNSCRAPED_WINDOWS {
        let walked = bpf_map_walk_calls(&host1, &agent, window)?;
        eprintln!("{walked} BPF_MAP_GET_NEXT_KEY calls in {UNSCRAPED_FOR:?} unscraped");
        walks.push(walked);
        if walked < MAPPED_LEASES as usize {
            break;
        }
    }
    ensure!(
        walks.iter().any(|&walked| walked < MAPPED_LEASES as usize),
        "BPF_MAP_GET_NEXT_KEY calls in each of {UNSCRAPED_WINDOWS} windows of \
         {UNSCRAPED_FOR:?} while nobody scraped /metrics: {walks:?} ({MAPPED_ENTRIES} map \
         entries): the agent walks the maps for nobody"
    );

    let later = write_later_lease(&cluster, &subnet)?;
    let (public_ip, mac) = LATER_VTEP;
    host1.wait_for_peer(later, public_ip, mac)?;
    let samples = scrape(&host1.netns, HEALTH_PORT)?;
    let subnets = value_of(&samples, "overlay_map_entries", &[("map", "subnets")]);
    ensure!(
        subnets == Some(f64::from(MAPPED_LEASES + 1)),
        "the first scrape after lease {later} was routed counts {subnets:?} entries in \
         `subnets`, not {}: it served an older read of the maps",
        MAPPED_LEASES + 1
    );
    Ok(())
}

/// The `BPF_MAP_GET_NEXT_KEY` calls `agent` makes in [`UNSCRAPED_FOR`], counted by `strace`
/// into a trace file of its own for `window`.
fn bpf_map_walk_calls(host: &Host, agent: &Agent, window: usize) -> Result<usize> {
    let trace = host.dir.join(format!("bpf-{window}.trace"));
    let mut strace = agent.strace(host, "bpf", &trace)?;
    sleep(UNSCRAPED_FOR);
    strace.signal(libc::SIGINT)?;
    strace.wait_exit(VERDICT_TIMEOUT)?;
    Ok(std::fs::read_to_string(&trace)?
        .matches("BPF_MAP_GET_NEXT_KEY")
        .count())
}

/// Writes the lease of [`LATER_VTEP`] for a subnet other than `own`; returns the subnet.
fn write_later_lease(cluster: &Cluster, own: &str) -> Result<&'static str> {
    let later = ["10.2.60.0/24", "10.2.61.0/24"]
        .into_iter()
        .find(|later| *later != own)
        .context("a free subnet")?;
    let (public_ip, mac) = LATER_VTEP;
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    cluster.etcd.put(&cluster.subnet_key(later), &value)?;
    Ok(later)
}

/// `/metrics` scraped from `host`'s namespace in a loop, one line in its log per scrape,
/// until it is dropped or a scrape fails.
fn scrape_in_a_loop(host: &Host) -> Result<Process> {
    let script = format!(
        "while curl -sf -o /dev/null http://127.0.0.1:{HEALTH_PORT}/metrics; do echo scraped; done"
    );
    let log = host.dir.join("scrapes.log");
    Process::spawn(
        host.netns.name(),
        Path::new("sh"),
        &["-c".to_string(), script],
        &[],
        &log,
    )
}

/// Issue 28: each scrape of `/metrics` walked the lease, endpoint and flow maps entry by
/// entry, a BPF_MAP_GET_NEXT_KEY syscall per entry, on the tokio workers that also renew the
/// lease and follow etcd. Scraped in a loop, the agent renews its lease and routes a lease
/// written meanwhile as usual, and its map walks (the reconciler's, and those for `/metrics`,
/// at most one every 5 s) come to less than a tenth of a walk per scrape.
#[test]
fn scrapes_in_a_loop_walk_no_map_and_hold_up_no_lease() -> Result<()> {
    let (cluster, host1) = cluster_with_host("scrape-loop")?;
    let leases = mapped_leases(&cluster);
    cluster.etcd.put_many(&leases)?;
    let mut agent = start_agent(&cluster, &host1, &["--subnet-lease-ttl=6s"])?;
    let subnet = agent.wait_ready()?;
    host1.wait_for_peer("10.2.249.0/24", "172.20.63.150", "1a:4b:d7:f7:18:95")?;
    let key = cluster.subnet_key(&subnet);
    let first_lease = cluster.etcd.lease_of(&key)?;

    let trace = host1.dir.join("bpf.trace");
    let mut strace = agent.strace(&host1, "bpf", &trace)?;
    let mut scrapes = scrape_in_a_loop(&host1)?;
    wait_for("the lease renewed", VERDICT_TIMEOUT, || {
        Ok(cluster.etcd.lease_of(&key)? != first_lease)
    })
    .with_context(|| agent.log())?;
    let later = write_later_lease(&cluster, &subnet)?;
    let written = Instant::now();
    host1.wait_for_peer_within(later, LATER_VTEP, written, ROUTED_WITHIN)?;
    ensure!(
        scrapes.try_exit_status()?.is_none(),
        "a scrape failed:\n{}",
        scrapes.log()
    );
    scrapes.kill();
    strace.signal(libc::SIGINT)?;
    strace.wait_exit(VERDICT_TIMEOUT)?;

    let scraped = scrapes.log().matches("scraped").count();
    let walked = std::fs::read_to_string(&trace)?
        .matches("BPF_MAP_GET_NEXT_KEY")
        .count();
    eprintln!("{scraped} scrapes, {walked} BPF_MAP_GET_NEXT_KEY calls, {MAPPED_ENTRIES} entries");
    ensure!(scraped >= 50, "only {scraped} scrapes");
    ensure!(
        walked * 10 < scraped * MAPPED_ENTRIES as usize,
        "{walked} BPF_MAP_GET_NEXT_KEY calls during {scraped} scrapes of {MAPPED_ENTRIES} map \
         entries: the scrapes walk the maps"
    );
    Ok(())
}
