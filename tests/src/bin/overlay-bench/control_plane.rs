//! The control plane at scale, in a /8 network with one agent: how fast a new lease becomes a
//! route once etcd has acknowledged it (timed by a netlink listener on the host, not by
//! polling), and how long etcd took to acknowledge it, then at each lease count how long the
//! agent takes to be ready, how much memory it holds, how much CPU it burns while nothing
//! changes, with containers on its bridge, and how fast a new lease becomes a route with that
//! many already there.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{JoinHandle, sleep},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, Host},
    netns,
    process::cpu_time,
    seed::Container,
};
use rtnetlink::{
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        route::{RouteAddress, RouteAttribute},
    },
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

use crate::{Mode, Plan, figures::quantile};

/// RTMGRP_IPV4_ROUTE: the legacy group bit for IPv4 route notifications.
const IPV4_ROUTE_GROUP: u32 = 0x40;
/// Time between two new leases, so each one's latency is its own.
const LEASE_SPACING: Duration = Duration::from_millis(20);
const ROUTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent's CPU time is still read after the last new lease's route.
const ROUND_TAIL: Duration = Duration::from_millis(200);

pub struct ControlPlane {
    /// From etcd's acknowledgement of the lease to its route. The clock starts there because
    /// etcd's commit (an fsync on this machine's disk) stalls now and then for 50-140 ms, in
    /// every mode alike, before any agent can see the lease.
    pub route_p50_ms: f64,
    pub route_p99_ms: f64,
    /// From the lease's put to etcd's acknowledgement: the wait the route figures leave out.
    pub put_p99_ms: f64,
    pub scales: Vec<Scale>,
}

/// One agent facing `leases` leases.
pub struct Scale {
    pub leases: usize,
    pub ready_ms: f64,
    pub resident_mib: f64,
    /// Percent of one core, averaged over the idle window.
    pub idle_cpu_percent: f64,
    /// From etcd's acknowledgement of a new lease to its route, with this many already there.
    pub route_p50_ms: f64,
    pub route_p99_ms: f64,
    /// The agent's CPU time over those leases, per lease: its own work for one event, with
    /// whatever it does meanwhile anyway (see `idle_cpu_percent`).
    pub cpu_ms_per_lease: f64,
}

/// The latencies of leases put one at a time.
struct Timed {
    /// From etcd's acknowledgement of each lease to its route on the host.
    to_route: Vec<f64>,
    /// From each put to etcd's acknowledgement.
    to_acknowledgement: Vec<f64>,
}

/// Puts the leases `indexes` one at a time and times each one's route on `host`.
fn time_new_leases(
    cluster: &Cluster,
    etcd: &EtcdWriter,
    host: &Host,
    indexes: std::ops::Range<usize>,
) -> Result<Timed> {
    let routes = RouteListener::start(host.netns.name())?;
    let mut timed = Timed {
        to_route: Vec::new(),
        to_acknowledgement: Vec::new(),
    };
    for index in indexes {
        let written = Instant::now();
        etcd.put(
            &cluster.subnet_key(&remote_subnet(index)),
            &remote_record(index),
        )?;
        let acknowledged = Instant::now();
        let routed = routes.wait_for(&remote_subnet(index), ROUTE_TIMEOUT)?;
        // etcd tells watchers and the writer at about the same time: a route can come first.
        timed
            .to_route
            .push(milliseconds(routed.saturating_duration_since(acknowledged)));
        timed
            .to_acknowledgement
            .push(milliseconds(acknowledged - written));
        sleep(LEASE_SPACING);
    }
    Ok(timed)
}

pub fn measure(mode: Mode, plan: &Plan) -> Result<ControlPlane> {
    let config = mode.network_config("10.0.0.0/8", None);
    let mut cluster =
        Cluster::with_etcd(&format!("bench-cp-{}", mode.name()), false, Some(&config))?;
    let host = cluster.add_host("host1", "172.20.62.104")?;
    let etcd = EtcdWriter::connect(cluster.underlay.name(), &cluster.etcd.endpoint())?;

    let mut agent = Agent::start(&cluster, &host, mode.agent_flags())?;
    let subnet = agent.wait_ready()?;
    let timed = time_new_leases(&cluster, &etcd, &host, 0..plan.leases_added)?;
    let (route_p50_ms, route_p99_ms) = (
        percentile(&timed.to_route, 0.5),
        percentile(&timed.to_route, 0.99),
    );
    let put_p99_ms = percentile(&timed.to_acknowledgement, 0.99);
    agent.process.terminate(Duration::from_secs(20))?;

    let containers = attach_containers(&host, &subnet, plan.containers)?;
    let mut written = plan.leases_added;
    let mut scales = Vec::new();
    for &leases in &plan.lease_counts {
        let records: Vec<(String, String)> = (written..leases)
            .map(|index| {
                (
                    cluster.subnet_key(&remote_subnet(index)),
                    remote_record(index),
                )
            })
            .collect();
        etcd.put_all(&records)?;
        let started = Instant::now();
        let mut agent = Agent::start(&cluster, &host, mode.agent_flags())?;
        agent.wait_ready()?;
        let ready_ms = started.elapsed().as_secs_f64() * 1e3;
        // The bridge learns every container, and the agent its endpoints, before the window.
        for container in &containers {
            host.netns
                .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", &container.address])?;
        }
        sleep(plan.settle);
        let idle_cpu_percent = cpu_percent(agent.process.id(), plan.idle)?;
        let resident_mib = resident_mib(agent.process.id())?;
        let added = leases..leases + plan.leases_added_at_scale;
        written = added.end;
        let cpu_before = cpu_seconds(agent.process.id())?;
        let timed = time_new_leases(&cluster, &etcd, &host, added)?;
        // The last lease's round ends a little after its route.
        sleep(ROUND_TAIL);
        let cpu_used = cpu_seconds(agent.process.id())? - cpu_before;
        scales.push(Scale {
            leases,
            ready_ms,
            resident_mib,
            idle_cpu_percent,
            route_p50_ms: percentile(&timed.to_route, 0.5),
            route_p99_ms: percentile(&timed.to_route, 0.99),
            cpu_ms_per_lease: cpu_used * 1e3 / plan.leases_added_at_scale as f64,
        });
        agent.process.terminate(Duration::from_secs(20))?;
    }
    drop(containers);
    Ok(ControlPlane {
        route_p50_ms,
        route_p99_ms,
        put_p99_ms,
        scales,
    })
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The value `share` of the way up `values`, which must not be empty.
fn percentile(values: &[f64], share: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, share)
}

/// `count` containers on the host's bridge, at the start of its lease `subnet`.
fn attach_containers(host: &Host, subnet: &str, count: usize) -> Result<Vec<Container>> {
    let network: ipnetwork::Ipv4Network = subnet.parse().context("the agent's subnet")?;
    (0..count)
        .map(|index| {
            let address = network
                .nth(2 + index as u32)
                .with_context(|| format!("{subnet} has no room for {count} containers"))?;
            Container::attach(host, &format!("c{index}"), &address.to_string())
        })
        .collect()
}

/// The `index`th remote /24 of the /8 network, clear of the seed's subnets.
fn remote_subnet(index: usize) -> String {
    format!("10.{}.{}.0/24", 100 + index / 256, index % 256)
}

fn remote_record(index: usize) -> String {
    let address = format!("172.21.{}.{}", index / 250, index % 250 + 1);
    format!(
        r#"{{"PublicIP":"{address}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"1a:4b:d7:{:02x}:{:02x}:01"}}}}"#,
        index / 256,
        index % 256
    )
}

fn resident_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// The CPU `pid` used over `window`, in percent of one core.
fn cpu_percent(pid: u32, window: Duration) -> Result<f64> {
    let before = cpu_seconds(pid)?;
    sleep(window);
    let used = cpu_seconds(pid)? - before;
    Ok(used / window.as_secs_f64() * 100.0)
}

/// The CPU time `pid` has used, every thread's, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_time(pid)?.as_secs_f64())
}

/// Writes records to etcd from this process (spawning etcdctl per record would take longer
/// than what it measures), from a thread inside the underlay, where etcd is.
struct EtcdWriter {
    requests: mpsc::Sender<(String, String, mpsc::Sender<Result<()>>)>,
}

impl EtcdWriter {
    fn connect(netns: &str, endpoint: &str) -> Result<Self> {
        let (requests, received) = mpsc::channel::<(String, String, mpsc::Sender<Result<()>>)>();
        let (connected_sender, connected) = mpsc::channel();
        let (netns, endpoint) = (netns.to_string(), endpoint.to_string());
        std::thread::spawn(move || {
            let client = (|| -> Result<_> {
                netns::enter(&netns)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let client = runtime
                    .block_on(etcd_client::Client::connect([endpoint.as_str()], None))
                    .with_context(|| format!("cannot connect to etcd at {endpoint}"))?;
                Ok((runtime, client))
            })();
            let (runtime, client) = match client {
                Ok(connected) => {
                    let _ = connected_sender.send(Ok(()));
                    connected
                }
                Err(error) => {
                    let _ = connected_sender.send(Err(error));
                    return;
                }
            };
            for (key, value, reply) in received {
                let mut client = client.clone();
                let outcome = runtime
                    .block_on(client.put(key.as_str(), value, None))
                    .map(drop)
                    .with_context(|| format!("cannot put {key}"));
                let _ = reply.send(outcome);
            }
        });
        connected.recv().context("the etcd writer thread died")??;
        Ok(Self { requests })
    }

    fn put(&self, key: &str, value: &str) -> Result<()> {
        let (reply, outcome) = mpsc::channel();
        self.requests
            .send((key.to_string(), value.to_string(), reply))
            .context("the etcd writer thread is gone")?;
        outcome.recv().context("the etcd writer thread is gone")?
    }

    fn put_all(&self, records: &[(String, String)]) -> Result<()> {
        records
            .iter()
            .try_for_each(|(key, value)| self.put(key, value))
    }
}

/// The moment each IPv4 route appears in a namespace, as its netlink notification arrives.
struct RouteListener {
    added: mpsc::Receiver<(String, Instant)>,
    seen: std::cell::RefCell<HashMap<String, Instant>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl RouteListener {
    fn start(netns: &str) -> Result<Self> {
        let namespace = netns.to_string();
        let (sender, added) = mpsc::channel();
        let (ready_sender, ready) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || -> Result<()> {
            netns::enter(&namespace)?;
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind(&SocketAddr::new(0, IPV4_ROUTE_GROUP))?;
            socket.set_non_blocking(true)?;
            let _ = ready_sender.send(());
            let mut buffer = Vec::with_capacity(1 << 16);
            while !stopped.load(Ordering::Relaxed) {
                buffer.clear();
                match socket.recv(&mut buffer, 0) {
                    Ok(_) => {
                        let now = Instant::now();
                        for destination in new_routes(&buffer) {
                            let _ = sender.send((destination, now));
                        }
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        sleep(Duration::from_micros(200));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            Ok(())
        });
        ready
            .recv_timeout(Duration::from_secs(5))
            .context("the route listener did not start")?;
        Ok(Self {
            added,
            seen: Default::default(),
            stop,
            thread: Some(thread),
        })
    }

    /// When the route to `destination` appeared, waiting up to `timeout` for it.
    fn wait_for(&self, destination: &str, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.seen.borrow().get(destination) {
                return Ok(*at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.added.recv_timeout(left) {
                Ok((route, at)) => {
                    self.seen.borrow_mut().entry(route).or_insert(at);
                }
                Err(_) => bail!("{destination} got no route within {timeout:?}"),
            }
        }
    }
}

impl Drop for RouteListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// "a.b.c.d/len" of every route added in one netlink datagram.
fn new_routes(datagram: &[u8]) -> Vec<String> {
    let mut routes = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
        else {
            break;
        };
        let length = message.header.length as usize;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) = message.payload
        {
            let destination = route
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(address)) => Some(*address),
                    _ => None,
                });
            if let Some(address) = destination {
                routes.push(format!(
                    "{address}/{}",
                    route.header.destination_prefix_length
                ));
            }
        }
        if length == 0 {
            break;
        }
        // Messages in a datagram start on 4-byte boundaries.
        offset += (length + 3) & !3;
    }
    routes
}
