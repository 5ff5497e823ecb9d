//! `cargo xtask bench --micro`: each program's time per packet, from BPF_PROG_TEST_RUN, on
//! fixed frames (64-byte UDP over IPv4 and IPv6, a full-size TCP segment, ARP, the seed's VXLAN
//! frames), with the seed's two hosts alone and with 10,000 leases in the maps. The tool for
//! an A/B of a change to the fast path: no namespaces, no traffic, a few seconds.
//!
//! Each sample is one run (`repeat` 1): the programs rewrite the packet they are given, and
//! BPF_PROG_TEST_RUN hands a repeated run the packet the previous run left, which would time
//! the second run's cheaper path. A single run is timed in steps of about 10 ns here, so
//! beside the median and interquartile range of the samples the report gives the mean of their
//! middle half, which the jitter between runs resolves below a step: the figure for an A/B.
//! Every sample is checked to have taken the path the row names.
//!
//! `--only TEXT` keeps the rows whose program or frame contains TEXT; `--samples N` times N
//! runs per row (20,000 by default), for a profile of one row, say; `--out DIR` puts
//! `microbench.md` there instead of `target/bench`, beside the benchmark's own report.
use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, ensure};
use overlay_agent::{
    dataplane::{Dataplane, LeaseCapacity},
    mac::MacAddr,
    subnet::{Lease, LeaseAttrs},
};
use overlay_common::{Counter, Counters, DEFAULT_VXLAN_PORT};
use overlay_tests::{
    dataplane::{
        HOST1, HOST2, Outcome, SeedHost, UplinkHook, run_container, run_uplink, with_bbox2,
        write_leases,
    },
    frames::*,
};

const DEFAULT_SAMPLES: usize = 20_000;
const WARM_UP: usize = 1_000;
const MANY_LEASES: usize = 10_000;
/// The most a TCP segment carries within the overlay's MTU of 1450: a superpacket cannot be
/// timed, as BPF_PROG_TEST_RUN cannot mark a packet TCP GSO and the kernel refuses to
/// encapsulate GSO of no type.
const TCP_PAYLOAD: usize = 1450 - 40;

/// One run of a program on its frame.
type Run = Box<dyn Fn(&Dataplane) -> Result<Outcome>>;

/// One measured row: a program on a frame, and the counter every run must move (none: the
/// frame goes on uncounted).
struct Row {
    program: &'static str,
    frame_name: &'static str,
    expected: Option<Counter>,
    run: Run,
    /// host1's dataplane (it sends) or host2's (it receives).
    receiver: bool,
}

fn rows() -> Vec<Row> {
    let udp64 = from_bbox1(
        ETH_P_IPV4,
        &ipv4(
            BBOX1_IP,
            BBOX2_IP,
            IPPROTO_UDP,
            &[],
            &udp(40000, 5201, &[0; 18]),
        ),
    );
    let udp64_v6 = from_bbox1(
        ETH_P_IPV6,
        &ipv6_checksummed(
            BBOX1_IPV6,
            BBOX2_IPV6,
            IPPROTO_UDP,
            udp(40000, 5201, &[0; 18]),
            6,
        ),
    );
    let tcp = [tcp_segment(40000, 5201), vec![0; TCP_PAYLOAD]].concat();
    let full_segment = from_bbox1(
        ETH_P_IPV4,
        &ipv4(BBOX1_IP, BBOX2_IP, IPPROTO_TCP, &[], &tcp),
    );
    let arp = from_bbox1(
        ETH_P_ARP,
        &[
            &[0, 1, 8, 0, 6, 4, 0, 1][..],
            &BBOX1_MAC,
            &BBOX1_IP,
            &[0; 6],
            &[10, 2, 41, 1],
        ]
        .concat(),
    );
    let vxlan = seed_vxlan_frame(1, DEFAULT_VXLAN_PORT);
    let vxlan6 = FLANNEL_V6_PING.to_vec();
    let vxlan_xdp = vxlan.clone();
    vec![
        Row {
            program: "tc_container_ingress",
            frame_name: "64-byte UDP, encapsulated",
            expected: Some(Counter::TxDirect),
            run: Box::new(move |dataplane| run_container(dataplane, &udp64)),
            receiver: false,
        },
        Row {
            program: "tc_container_ingress",
            frame_name: "64-byte UDP over IPv6, encapsulated",
            expected: Some(Counter::TxDirect),
            run: Box::new(move |dataplane| run_container(dataplane, &udp64_v6)),
            receiver: false,
        },
        Row {
            program: "tc_container_ingress",
            frame_name: "full-size TCP segment, encapsulated",
            expected: Some(Counter::TxDirect),
            run: Box::new(move |dataplane| run_container(dataplane, &full_segment)),
            receiver: false,
        },
        Row {
            program: "tc_container_ingress",
            frame_name: "ARP request, checked",
            expected: None,
            run: Box::new(move |dataplane| run_container(dataplane, &arp)),
            receiver: false,
        },
        Row {
            program: "tc_uplink_ingress",
            frame_name: "the seed's VXLAN ping, delivered",
            expected: Some(Counter::RxDelivered),
            run: Box::new(move |dataplane| run_uplink(UplinkHook::Tc, dataplane, &vxlan)),
            receiver: true,
        },
        Row {
            program: "xdp_uplink",
            frame_name: "the seed's VXLAN ping, checked",
            expected: Some(Counter::RxChecked),
            run: Box::new(move |dataplane| run_uplink(UplinkHook::Xdp, dataplane, &vxlan_xdp)),
            receiver: true,
        },
        Row {
            program: "tc_uplink_ingress",
            frame_name: "flannel-v6.1's VXLAN ping, delivered",
            expected: Some(Counter::RxDelivered),
            run: Box::new(move |dataplane| run_uplink(UplinkHook::Tc, dataplane, &vxlan6)),
            receiver: true,
        },
    ]
}

fn from_bbox1(ether_type: u16, packet: &[u8]) -> Vec<u8> {
    ethernet(HOST1_BRIDGE_MAC, BBOX1_MAC, ether_type, packet)
}

/// `host`'s dataplane knowing `peer` and `extra` made-up leases besides, with bbox2 as a
/// local endpoint on host2.
fn dataplane(host: &SeedHost, peer: &SeedHost, extra: usize) -> Result<Dataplane> {
    let capacity = LeaseCapacity::for_subnets((extra + 1) as u64);
    let mut dataplane = Dataplane::load(None, false, capacity)?;
    dataplane.set_config(&host.config(1, DEFAULT_VXLAN_PORT))?;
    let leases: Vec<Lease> = std::iter::once(Ok(peer.lease()))
        .chain((0..extra).map(made_up_lease))
        .collect::<Result<_>>()?;
    write_leases(&mut dataplane, &leases)?;
    with_bbox2(&mut dataplane)?;
    Ok(dataplane)
}

/// Lease `index` of the made-up ones: 10.100.0.0/24 onwards, from 100.64.0.1 onwards.
fn made_up_lease(index: usize) -> Result<Lease> {
    let index = u32::try_from(index)?;
    let subnet = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + (index << 8));
    let public_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + index);
    let [_, _, high, low] = index.to_be_bytes();
    Ok(Lease {
        subnet: ipnetwork::Ipv4Network::new(subnet, 24)?,
        ipv6_subnet: None,
        attrs: LeaseAttrs::ipv4_only(public_ip, 1, MacAddr([0x1a, 0, 0, 0, high, low])),
        etcd_lease: 0,
    })
}

const USAGE: &str = "usage: overlay-microbench [--only TEXT] [--samples N] [--out DIR]

  --only TEXT    only the rows whose program or frame contains TEXT, e.g. --only ARP
  --samples N    runs timed per row (default 20,000)
  --out DIR      where microbench.md goes (default target/bench)";

/// What the command line asks for.
struct Options {
    only: Option<String>,
    samples: usize,
    out: PathBuf,
}

impl Options {
    /// The options, or None when `--help` asked for the usage alone.
    fn parse() -> Result<Option<Self>> {
        let mut options = Options {
            only: None,
            samples: DEFAULT_SAMPLES,
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--only" => options.only = Some(value()?),
                "--samples" => {
                    options.samples = value()?.parse().context("--samples takes a count")?;
                    ensure!(options.samples > 0, "--samples must be at least 1");
                }
                "--out" => options.out = PathBuf::from(value()?),
                "--help" | "-h" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        Ok(Some(options))
    }

    fn wants(&self, row: &Row) -> bool {
        self.only
            .as_deref()
            .is_none_or(|only| row.program.contains(only) || row.frame_name.contains(only))
    }
}

/// The ns of `count` runs of `row` (after a warm-up), sorted.
fn sample(row: &Row, dataplane: &Dataplane, count: usize) -> Result<Vec<u64>> {
    let mut samples = Vec::with_capacity(count);
    for index in 0..WARM_UP + count {
        let before = dataplane.counters()?;
        let outcome = (row.run)(dataplane)?;
        let moved = match row.expected {
            Some(counter) => outcome.counters.get(counter) == before.get(counter) + 1,
            None => outcome.counters == before,
        };
        ensure!(
            moved,
            "{} on {}: the run did not take the path measured ({:?}) but moved {:?}",
            row.program,
            row.frame_name,
            row.expected.map(Counter::name),
            moved_counters(&before, &outcome.counters)
        );
        if index >= WARM_UP {
            samples.push(as_ns(outcome.duration));
        }
    }
    samples.sort_unstable();
    Ok(samples)
}

fn moved_counters(before: &Counters, after: &Counters) -> Vec<&'static str> {
    Counter::ALL
        .iter()
        .filter(|&&counter| after.get(counter) != before.get(counter))
        .map(|counter| counter.name())
        .collect()
}

fn as_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn quantile(sorted: &[u64], fraction: f64) -> u64 {
    let at = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[at]
}

/// The mean of the samples between the first and third quartiles of `sorted`.
fn middle_half_mean(sorted: &[u64]) -> f64 {
    let (first, last) = (sorted.len() / 4, sorted.len() * 3 / 4);
    let middle = &sorted[first..last.max(first + 1)];
    middle.iter().sum::<u64>() as f64 / middle.len() as f64
}

fn main() -> Result<()> {
    let Some(options) = Options::parse()? else {
        return Ok(());
    };
    overlay_tests::require_root()?;
    let mut report = String::from(
        "| program | frame | leases | median ns | IQR ns | middle-half mean ns |\n\
         |---|---|---|---|---|---|\n",
    );
    for (leases, extra) in [("2", 0), ("10,000", MANY_LEASES - 1)] {
        let sender = dataplane(&HOST1, &HOST2, extra)?;
        let receiver = dataplane(&HOST2, &HOST1, extra)?;
        for row in rows().into_iter().filter(|row| options.wants(row)) {
            let dataplane = if row.receiver { &receiver } else { &sender };
            let samples = sample(&row, dataplane, options.samples)?;
            let line = format!(
                "| {} | {} | {leases} | {} | {}–{} | {:.1} |",
                row.program,
                row.frame_name,
                quantile(&samples, 0.5),
                quantile(&samples, 0.25),
                quantile(&samples, 0.75),
                middle_half_mean(&samples),
            );
            println!("{line}");
            writeln!(report, "{line}")?;
        }
    }
    let out = &options.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join("microbench.md");
    std::fs::write(&path, report).with_context(|| format!("cannot write {}", path.display()))?;
    println!("written to {}", path.display());
    Ok(())
}
