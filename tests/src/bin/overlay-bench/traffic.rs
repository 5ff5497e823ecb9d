//! The traffic each run sends (iperf3, sockperf), and what the machine's CPUs and our programs
//! did meanwhile (/proc/stat, the kernel's per-program run-time accounting).
use std::{
    collections::{HashMap, HashSet},
    process::{Child, Command, Output, Stdio},
};

use anyhow::{Context, Result};
use overlay_agent::dataplane::{CONTAINER_PROGRAM, UPLINK_TC_PROGRAM};
use overlay_tests::{netns::Netns, process::IPERF3_PORT, seed::BBOX2};

pub const SOCKPERF_PORT: &str = "11111";
/// A second sockperf server, pinned to CPU 0 like its client.
pub const SOCKPERF_PINNED_PORT: &str = "11112";
/// Seconds of each TCP run left out of its figures, so slow start is not measured. UDP has no
/// slow start, and iperf3 3.12 miscounts UDP loss with `-O` (the omitted datagrams' sequence
/// numbers count as lost), so UDP runs take none.
const TCP_OMIT_SECONDS: &str = "1";
/// A run during which more of the machine's CPU time than this was stolen is dropped.
pub const STEAL_LIMIT_PERCENT: f64 = 5.0;

/// The JSON report of an iperf3 client in `client` for `server` with `args`.
fn iperf3_json(client: &Netns, server: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut reports = iperf3_side_by_side(client, server, &[args.to_vec()])?;
    reports.pop().context("iperf3 gave no report")
}

/// The JSON reports of iperf3 clients in `client` for `server`, one per entry of `runs` (its
/// arguments), all started before any is waited for.
fn iperf3_side_by_side(
    client: &Netns,
    server: &str,
    runs: &[Vec<&str>],
) -> Result<Vec<serde_json::Value>> {
    let started: Vec<Result<Child>> = runs
        .iter()
        .map(|args| {
            let mut full = vec!["iperf3", "-c", server, "-J"];
            full.extend_from_slice(args);
            client
                .command(&full)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot start iperf3")
        })
        .collect();
    // Every client is waited for, also when another failed to start.
    let finished: Vec<Result<Output>> = started
        .into_iter()
        .map(|child| child?.wait_with_output().context("iperf3 did not finish"))
        .collect();
    finished
        .into_iter()
        .map(|output| {
            let output = output?;
            let report: serde_json::Value = serde_json::from_slice(&output.stdout)
                .with_context(|| format!("iperf3 printed no JSON ({})", output.status))?;
            if !output.status.success() {
                anyhow::bail!("iperf3 failed ({}): {}", output.status, report["error"]);
            }
            Ok(report)
        })
        .collect()
}

/// Where a TCP run's clients and servers run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Wherever the scheduler puts them.
    Unpinned,
    /// Each client and its server on fixed, opposite CPUs: the first's client on CPU 0 and its
    /// server on CPU 1 (`-A 0,1`), the next the other way round, and so on.
    Opposite,
    /// Every client and server on CPU 0 (`-A 0,0`): that CPU does all the work, with no
    /// wake-up of another CPU to wait for.
    OneCpu,
}

impl Pinning {
    /// iperf3's `-A` for connection `stream`, or none.
    fn cpus(self, stream: u32) -> Option<String> {
        match self {
            Pinning::Unpinned => None,
            Pinning::Opposite => Some(format!("{},{}", stream % 2, (stream + 1) % 2)),
            Pinning::OneCpu => Some("0,0".to_string()),
        }
    }
}

/// iperf3 TCP over `streams` connections after a second left out: Gbit/s, and the CPU seconds
/// the whole machine was busy per GB moved. Each connection has a client and a server process
/// of its own (on ports from [`IPERF3_PORT`] up): iperf3 3.12 serves all the streams of one
/// process (`-P`) from one thread, so four of them would still share one CPU at each end.
pub fn tcp(
    client: &Netns,
    server: &str,
    seconds: u32,
    streams: u32,
    pinning: Pinning,
) -> Result<(f64, f64)> {
    let seconds = seconds.to_string();
    let ports: Vec<String> = (0..streams)
        .map(|stream| (IPERF3_PORT + stream as u16).to_string())
        .collect();
    let cpus: Vec<Option<String>> = (0..streams).map(|stream| pinning.cpus(stream)).collect();
    let runs: Vec<Vec<&str>> = ports
        .iter()
        .zip(&cpus)
        .map(|(port, cpus)| {
            let mut args = vec!["-p", port, "-t", &seconds, "-O", TCP_OMIT_SECONDS];
            if let Some(cpus) = cpus {
                args.extend(["-A", cpus]);
            }
            args
        })
        .collect();
    let before = CpuTimes::now()?;
    let reports = iperf3_side_by_side(client, server, &runs)?;
    let busy = CpuTimes::now()?.busy_seconds_since(&before);
    let mut bits = 0.0;
    let mut bytes = 0.0;
    for report in &reports {
        bits += report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("no TCP rate")?;
        bytes += bytes_sent(report)?;
    }
    Ok((bits / 1e9, busy / (bytes / 1e9)))
}

/// The bytes a run sent, the left-out second's included, as the CPU time around it is.
fn bytes_sent(json: &serde_json::Value) -> Result<f64> {
    json["intervals"]
        .as_array()
        .context("no iperf3 intervals")?
        .iter()
        .map(|interval| {
            interval["sum"]["bytes"]
                .as_f64()
                .context("no interval bytes")
        })
        .sum()
}

/// 64-byte UDP datagrams from four unthrottled sockets of one iperf3 client (one thread, the
/// bound of this figure): (received, sent) in thousands per s.
pub fn small_udp(client: &Netns, server: &str, seconds: u32) -> Result<(f64, f64)> {
    let json = iperf3_json(
        client,
        server,
        &[
            "-u",
            "-l",
            "64",
            "-b",
            "0",
            "-P",
            "4",
            "-t",
            &seconds.to_string(),
        ],
    )?;
    let sum = &json["end"]["sum"];
    let packets = sum["packets"].as_f64().context("no UDP packet count")?;
    let lost = sum["lost_packets"].as_f64().context("no UDP loss count")?;
    let span = sum["seconds"].as_f64().context("no UDP duration")?;
    Ok(((packets - lost) / span / 1e3, packets / span / 1e3))
}

/// sockperf ping-pong: (p50, p99) of its latency figure, in µs. `pinned`: client and server
/// both on CPU 0, so no wake-up crosses CPUs; on a small VM where each end runs decides
/// between ~8 and ~50 µs and hides the path itself.
pub fn latency(client: &Netns, seconds: u32, pinned: bool) -> Result<(f64, f64)> {
    let seconds = seconds.to_string();
    let (port, pin): (&str, &[&str]) = if pinned {
        (SOCKPERF_PINNED_PORT, &["taskset", "-c", "0"])
    } else {
        (SOCKPERF_PORT, &[])
    };
    let ping_pong = [
        "sockperf",
        "ping-pong",
        "-i",
        BBOX2,
        "-p",
        port,
        "-t",
        &seconds,
    ];
    let output = client.exec(&[pin, &ping_pong[..]].concat())?;
    let percentile = |which: &str| -> Result<f64> {
        output
            .lines()
            .find_map(|line| line.split(&format!("percentile {which} =")).nth(1))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("sockperf printed no percentile {which}:\n{output}"))
    };
    Ok((percentile("50.000")?, percentile("99.000")?))
}

/// The machine's CPU time since boot, summed over all CPUs, from the first line of
/// /proc/stat, in USER_HZ ticks.
pub struct CpuTimes {
    pub total: f64,
    pub idle: f64,
    pub steal: f64,
}

impl CpuTimes {
    pub fn now() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let fields: Vec<f64> = stat
            .lines()
            .next()
            .context("/proc/stat is empty")?
            .split_whitespace()
            .skip(1)
            .filter_map(|field| field.parse().ok())
            .collect();
        let field = |index: usize| fields.get(index).copied().unwrap_or(0.0);
        // user nice system idle iowait irq softirq steal; guest and guest_nice (8 and 9) are
        // already counted in user and nice.
        Ok(Self {
            total: fields.iter().take(8).sum(),
            idle: field(3) + field(4),
            steal: field(7),
        })
    }

    /// Seconds the CPUs ran something of this machine's since `before`: neither idle nor
    /// stolen by the hypervisor.
    pub fn busy_seconds_since(&self, before: &Self) -> f64 {
        let busy = |times: &Self| times.total - times.idle - times.steal;
        // USER_HZ is 100 on Linux.
        (busy(self) - busy(before)) / 100.0
    }

    /// The share of all CPU time since `before` that the hypervisor gave to someone else, in %.
    pub fn steal_percent_since(&self, before: &Self) -> f64 {
        let total = self.total - before.total;
        if total <= 0.0 {
            return 0.0;
        }
        (self.steal - before.steal) / total * 100.0
    }
}

/// What the fast path's programs cost in real traffic, from the kernel's per-program run
/// time accounting (`BPF_ENABLE_STATS`, what `bpftool prog` shows as run_time_ns).
pub struct ProgramCost {
    pub encap_ns: f64,
    pub decap_ns: f64,
    /// Percent of the machine's busy CPU time spent inside our programs.
    pub tcp_share: f64,
}

/// `agents`: the pids of the agents whose programs count (other agents on the machine, other
/// tests', run programs of the same names).
pub fn program_cost(client: &Netns, agents: &[u32], seconds: u32) -> Result<ProgramCost> {
    let ours = programs_held_by(agents)?;
    // Counted by the kernel: on while any holder's descriptor is open, so another process
    // switching `kernel.bpf_stats_enabled` off does not switch it off under this run.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable BPF run-time statistics")?;
    let before = program_runs(&ours)?;
    small_udp(client, BBOX2, seconds)?;
    let after = program_runs(&ours)?;
    let per_run = |name: &str| -> Result<f64> {
        let (runs, nanoseconds) = delta_of(&before, &after, name)?;
        Ok(nanoseconds / runs.max(1.0))
    };
    let (encap_ns, decap_ns) = (per_run(CONTAINER_PROGRAM)?, per_run(UPLINK_TC_PROGRAM)?);

    let before = program_runs(&ours)?;
    let busy_before = CpuTimes::now()?;
    tcp(client, BBOX2, seconds, 1, Pinning::Unpinned)?;
    let busy = CpuTimes::now()?.busy_seconds_since(&busy_before);
    let after = program_runs(&ours)?;
    let mut in_programs = 0.0;
    for name in [CONTAINER_PROGRAM, UPLINK_TC_PROGRAM] {
        in_programs += delta_of(&before, &after, name)?.1;
    }
    Ok(ProgramCost {
        encap_ns,
        decap_ns,
        tcp_share: in_programs / 1e9 / busy * 100.0,
    })
}

/// (runs, nanoseconds) of the programs called `name` (every host's copy) between two looks.
fn delta_of(
    before: &HashMap<String, (f64, f64)>,
    after: &HashMap<String, (f64, f64)>,
    name: &str,
) -> Result<(f64, f64)> {
    let (runs, nanoseconds) = after
        .get(name)
        .with_context(|| format!("{name} is not loaded"))?;
    let (runs_before, nanoseconds_before) = before.get(name).copied().unwrap_or_default();
    Ok((runs - runs_before, nanoseconds - nanoseconds_before))
}

/// The ids of the programs `pids` hold open, from each descriptor's /proc fdinfo.
fn programs_held_by(pids: &[u32]) -> Result<HashSet<u64>> {
    let mut ids = HashSet::new();
    for pid in pids {
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
            // A descriptor closed since the listing has no fdinfo left: not a program.
            let Ok(info) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            ids.extend(info.lines().find_map(|line| {
                line.strip_prefix("prog_id:")
                    .and_then(|id| id.trim().parse::<u64>().ok())
            }));
        }
    }
    Ok(ids)
}

/// The run count and run time of the programs of `ids`, summed by name.
fn program_runs(ids: &HashSet<u64>) -> Result<HashMap<String, (f64, f64)>> {
    let output = overlay_tests::netns::run(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let programs: Vec<serde_json::Value> =
        serde_json::from_str(&output).context("bpftool printed no JSON")?;
    Ok(runs_by_name(&programs, ids))
}

/// The run count and run time of those of `programs` (`bpftool -j prog show`) whose id is
/// in `ids`, summed by name.
fn runs_by_name(programs: &[serde_json::Value], ids: &HashSet<u64>) -> HashMap<String, (f64, f64)> {
    let mut runs: HashMap<String, (f64, f64)> = HashMap::new();
    for program in programs {
        let ours = program["id"].as_u64().is_some_and(|id| ids.contains(&id));
        let Some(name) = program["name"].as_str().filter(|_| ours) else {
            continue;
        };
        let entry = runs.entry(name.to_string()).or_default();
        entry.0 += program["run_cnt"].as_f64().unwrap_or(0.0);
        entry.1 += program["run_time_ns"].as_f64().unwrap_or(0.0);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_programs_of_the_given_ids_are_counted() {
        // Two hosts' copies of each program, and a third agent's, as bpftool lists them.
        let programs: Vec<serde_json::Value> = serde_json::from_str(
            r#"[
                {"id": 11, "type": "sched_cls", "name": "tc_container_ingress", "run_time_ns": 300, "run_cnt": 2},
                {"id": 12, "type": "sched_cls", "name": "tc_container_ingress", "run_time_ns": 500, "run_cnt": 1},
                {"id": 13, "type": "sched_cls", "name": "tc_uplink_ingress", "run_time_ns": 70, "run_cnt": 1},
                {"id": 90, "type": "sched_cls", "name": "tc_container_ingress", "run_time_ns": 9000, "run_cnt": 9},
                {"id": 91, "type": "sched_cls", "name": "tc_vtep_egress", "run_time_ns": 9000, "run_cnt": 9},
                {"id": 14, "type": "xdp", "name": "xdp_uplink"}
            ]"#,
        )
        .unwrap();
        let ours = HashSet::from([11, 12, 13, 14]);
        let runs = runs_by_name(&programs, &ours);
        assert_eq!(
            runs,
            HashMap::from([
                ("tc_container_ingress".to_string(), (3.0, 800.0)),
                ("tc_uplink_ingress".to_string(), (1.0, 70.0)),
                // Without BPF_ENABLE_STATS bpftool prints no counts: none counted.
                ("xdp_uplink".to_string(), (0.0, 0.0)),
            ])
        );
    }
}
