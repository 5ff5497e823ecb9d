//! `cargo xtask bench`: the seed topology three times in one run, measured the same way:
//! `ebpf` (our dataplane), `kernel` (flannel's kernel vxlan) and `host-gw` (plain routing
//! between the hosts, the ceiling for any overlay). The seed is dual-stack, so throughput is
//! measured over each family; IPv6 takes flannel-v6.1 in both vxlan modes. Writes a table to
//! the terminal and Markdown, JSON and an SVG chart to the output directory (default
//! `target/bench`).
//!
//! Each figure is the median of its repetitions. Figures are reported, never judged.
use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::Duration,
};

use anyhow::{Context, Result};
use overlay_agent::dataplane::{CONTAINER_PROGRAM, UPLINK_TC_PROGRAM};
use overlay_tests::{
    cluster::Cluster,
    ipv6::{BBOX2_V6, IPV6_NETWORK},
    netns::Netns,
    process::{Process, iperf3_server},
    seed::{BBOX2, Seed},
};

mod control_plane;

const MODES: [Mode; 3] = [Mode::Ebpf, Mode::Kernel, Mode::HostGw];
const SOCKPERF_PORT: &str = "11111";
/// A second sockperf server, pinned to CPU 0 like its client.
const SOCKPERF_PINNED_PORT: &str = "11112";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Kernel,
    HostGw,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Kernel => "kernel",
            Mode::HostGw => "host-gw",
        }
    }

    pub fn agent_flags(self) -> &'static [&'static str] {
        match self {
            Mode::Ebpf => &["--dataplane=ebpf"],
            Mode::Kernel | Mode::HostGw => &["--dataplane=kernel"],
        }
    }

    /// host-gw is flannel's vxlan with DirectRouting between hosts on one segment: plain
    /// routes via the peers' addresses, no encapsulation. `ipv6_network`: an IPv6 network
    /// beside `network`, or none for IPv4 alone.
    pub fn network_config(self, network: &str, ipv6_network: Option<&str>) -> String {
        let direct = self == Mode::HostGw;
        let ipv6 = ipv6_network.map_or_else(String::new, |ipv6_network| {
            format!(r#""EnableIPv6": true, "IPv6Network": "{ipv6_network}", "#)
        });
        format!(
            r#"{{"Network": "{network}", {ipv6}"Backend": {{"Type": "vxlan", "DirectRouting": {direct}}}}}"#
        )
    }
}

/// The address family a throughput figure is measured over.
#[derive(Clone, Copy)]
enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// bbox2's address of this family.
    fn destination(self) -> &'static str {
        match self {
            Family::Ipv4 => BBOX2,
            Family::Ipv6 => BBOX2_V6,
        }
    }

    /// The figure `name` over this family: IPv4's rows keep the names earlier reports used.
    fn figure(self, name: &str) -> String {
        match self {
            Family::Ipv4 => name.to_string(),
            Family::Ipv6 => format!("{name}, IPv6"),
        }
    }
}

/// How long and how often to measure.
pub struct Plan {
    repetitions: usize,
    seconds: u32,
    /// New leases timed from etcd to route, one at a time.
    leases_added: usize,
    /// Lease counts the agent is started against, in increasing order.
    lease_counts: Vec<usize>,
    /// Containers on the agent's bridge during the idle window.
    containers: usize,
    /// Time for the agent to settle after start before the idle window.
    settle: Duration,
    idle: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                repetitions: 1,
                seconds: 1,
                leases_added: 20,
                lease_counts: vec![100],
                containers: 3,
                settle: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            }
        } else {
            Self {
                repetitions: 5,
                seconds: 5,
                leases_added: 200,
                lease_counts: vec![1_000, 10_000],
                containers: 50,
                settle: Duration::from_secs(5),
                idle: Duration::from_secs(60),
            }
        }
    }
}

/// One figure: its name, unit, whether more is better, and a value per mode.
struct Figure {
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    values: BTreeMap<&'static str, f64>,
}

/// The figures in the order they were first recorded, which is the report's.
#[derive(Default)]
struct Figures(Vec<Figure>);

impl Figures {
    fn record(
        &mut self,
        name: &str,
        unit: &'static str,
        higher_is_better: bool,
        mode: Mode,
        value: f64,
    ) {
        match self.0.iter_mut().find(|figure| figure.name == name) {
            Some(figure) => {
                figure.values.insert(mode.name(), value);
            }
            None => self.0.push(Figure {
                name: name.to_string(),
                unit,
                higher_is_better,
                values: [(mode.name(), value)].into(),
            }),
        }
    }
}

fn main() -> std::process::ExitCode {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let out_dir = std::env::args()
        .skip_while(|arg| arg != "--out")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    match run(&Plan::new(quick), &out_dir) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(plan: &Plan, out_dir: &Path) -> Result<()> {
    let mut figures = Figures::default();
    for mode in MODES {
        println!("== {}: data path", mode.name());
        // Dual-stack, for the IPv6 rows; IPv4 takes the same path as in an IPv4-only network.
        let cluster = Cluster::with_ipv6(
            &format!("bench-{}", mode.name()),
            &mode.network_config("10.2.0.0/16", Some(IPV6_NETWORK)),
        )?;
        let seed = Seed::start_dual_stack_on(cluster, [mode.agent_flags(); 2])?;
        let scratch = seed.cluster.scratch.path().to_path_buf();
        let _iperf = iperf3_server(&seed.bbox2.netns, &scratch.join("iperf3.log"), false)?;
        let _sockperf = Process::spawn(
            seed.bbox2.netns.name(),
            Path::new("sockperf"),
            &["server", "-i", BBOX2, "-p", SOCKPERF_PORT].map(String::from),
            &[],
            &scratch.join("sockperf.log"),
        )?;
        let _sockperf_pinned = Process::spawn(
            seed.bbox2.netns.name(),
            Path::new("taskset"),
            &[
                "-c",
                "0",
                "sockperf",
                "server",
                "-i",
                BBOX2,
                "-p",
                SOCKPERF_PINNED_PORT,
            ]
            .map(String::from),
            &[],
            &scratch.join("sockperf-pinned.log"),
        )?;
        // Steady state: neighbours resolved and, in ebpf mode, the containers learned.
        seed.bbox1.ping(BBOX2, 5)?;
        seed.bbox1.ping6(BBOX2_V6, 5)?;
        sleep(Duration::from_secs(1));
        let client = &seed.bbox1.netns;
        for family in [Family::Ipv4, Family::Ipv6] {
            throughput(&mut figures, plan, client, mode, family)?;
        }
        let (p50, p99) = median_pair(plan, || latency(client, plan.seconds, false))?;
        figures.record("Latency p50 (sockperf, RTT/2)", "µs", false, mode, p50);
        figures.record("Latency p99 (sockperf, RTT/2)", "µs", false, mode, p99);
        let (p50, p99) = median_pair(plan, || latency(client, plan.seconds, true))?;
        figures.record("Latency p50, both ends on CPU 0", "µs", false, mode, p50);
        figures.record("Latency p99, both ends on CPU 0", "µs", false, mode, p99);
        if mode == Mode::Ebpf {
            // A pass of its own: the kernel's run-time accounting costs two clock reads per
            // program run, which the figures above must not carry.
            let cost = program_cost(client, plan.seconds)?;
            figures.record(
                "eBPF per packet, encapsulation (64-byte UDP)",
                "ns",
                false,
                mode,
                cost.encap_ns,
            );
            figures.record(
                "eBPF per packet, decapsulation (64-byte UDP)",
                "ns",
                false,
                mode,
                cost.decap_ns,
            );
            figures.record(
                "eBPF share of busy CPU (TCP, 1 stream)",
                "%",
                false,
                mode,
                cost.tcp_share,
            );
        }
        drop(seed);

        println!("== {}: control plane", mode.name());
        let control = control_plane::measure(mode, plan)?;
        figures.record(
            "Lease to route on another host, p50",
            "ms",
            false,
            mode,
            control.route_p50_ms,
        );
        figures.record(
            "Lease to route on another host, p99",
            "ms",
            false,
            mode,
            control.route_p99_ms,
        );
        for scale in &control.scales {
            let leases = scale.leases;
            figures.record(
                &format!("Start to ready, {leases} leases"),
                "ms",
                false,
                mode,
                scale.ready_ms,
            );
            figures.record(
                &format!("Agent resident memory, {leases} leases"),
                "MiB",
                false,
                mode,
                scale.resident_mib,
            );
            figures.record(
                &format!(
                    "Idle agent CPU, {leases} leases and {} containers",
                    plan.containers
                ),
                "% of a core",
                false,
                mode,
                scale.idle_cpu_percent,
            );
        }
    }
    report(&figures.0, plan, out_dir)
}

/// iperf3 from bbox1 to bbox2 over `family`: TCP with one stream and the CPU it costs, TCP
/// with four, and 64-byte UDP.
fn throughput(
    figures: &mut Figures,
    plan: &Plan,
    client: &Netns,
    mode: Mode,
    family: Family,
) -> Result<()> {
    let server = family.destination();
    let mut record = |name: &str, unit: &'static str, higher_is_better: bool, value: f64| {
        figures.record(&family.figure(name), unit, higher_is_better, mode, value)
    };
    let (gbit, cpu) = median_pair(plan, || tcp_with_cpu(client, server, plan.seconds))?;
    record("TCP throughput, 1 stream", "Gbit/s", true, gbit);
    record("CPU cost", "CPU s/GB", false, cpu);
    let gbit = median(plan, || tcp(client, server, plan.seconds, 4))?;
    record("TCP throughput, 4 streams", "Gbit/s", true, gbit);
    let (received, sent) = median_pair(plan, || small_udp(client, server, plan.seconds))?;
    record("64-byte UDP received", "kpps", true, received);
    record("64-byte UDP sent", "kpps", true, sent);
    Ok(())
}

fn median(plan: &Plan, mut measure: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut values = (0..plan.repetitions)
        .map(|_| measure())
        .collect::<Result<Vec<f64>>>()?;
    values.sort_by(f64::total_cmp);
    Ok(values[values.len() / 2])
}

fn median_pair(plan: &Plan, mut measure: impl FnMut() -> Result<(f64, f64)>) -> Result<(f64, f64)> {
    let pairs = (0..plan.repetitions)
        .map(|_| measure())
        .collect::<Result<Vec<_>>>()?;
    let pick = |index: fn(&(f64, f64)) -> f64| {
        let mut values: Vec<f64> = pairs.iter().map(index).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Ok((pick(|pair| pair.0), pick(|pair| pair.1)))
}

fn iperf3_json(client: &Netns, server: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["iperf3", "-c", server, "-J"];
    full.extend_from_slice(args);
    let output = client.exec(&full)?;
    serde_json::from_str(&output).context("iperf3 printed no JSON")
}

fn tcp(client: &Netns, server: &str, seconds: u32, streams: u32) -> Result<f64> {
    let json = iperf3_json(
        client,
        server,
        &["-t", &seconds.to_string(), "-P", &streams.to_string()],
    )?;
    let bits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no TCP rate")?;
    Ok(bits / 1e9)
}

/// One TCP stream: Gbit/s, and the CPU seconds the whole machine spent per GB moved.
fn tcp_with_cpu(client: &Netns, server: &str, seconds: u32) -> Result<(f64, f64)> {
    let before = busy_cpu_seconds()?;
    let json = iperf3_json(client, server, &["-t", &seconds.to_string()])?;
    let cpu = busy_cpu_seconds()? - before;
    let received = &json["end"]["sum_received"];
    let gigabytes = received["bytes"].as_f64().context("no TCP bytes")? / 1e9;
    let bits = received["bits_per_second"]
        .as_f64()
        .context("no TCP rate")?;
    Ok((bits / 1e9, cpu / gigabytes))
}

/// CPU time spent outside idle since boot, over all CPUs, from /proc/stat.
fn busy_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .context("/proc/stat is empty")?
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    let total: f64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0.0) + fields.get(4).copied().unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    Ok((total - idle) / 100.0)
}

/// 64-byte UDP datagrams from four unthrottled senders: (received, sent) in thousands per s.
fn small_udp(client: &Netns, server: &str, seconds: u32) -> Result<(f64, f64)> {
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
fn latency(client: &Netns, seconds: u32, pinned: bool) -> Result<(f64, f64)> {
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

/// BPF_PROG_TEST_RUN over many repetitions: (encapsulation, decapsulation) in ns per packet.
/// What the fast path's programs cost in real traffic, from the kernel's per-program run
/// time accounting (`kernel.bpf_stats_enabled`, what `bpftool prog` shows as run_time_ns).
struct ProgramCost {
    encap_ns: f64,
    decap_ns: f64,
    /// Percent of the machine's busy CPU time spent inside our programs.
    tcp_share: f64,
}

fn program_cost(client: &Netns, seconds: u32) -> Result<ProgramCost> {
    let _stats = BpfStats::enable()?;
    let before = program_runs()?;
    small_udp(client, BBOX2, seconds)?;
    let after = program_runs()?;
    let per_run = |name: &str| -> Result<f64> {
        let (runs, nanoseconds) = delta_of(&before, &after, name)?;
        Ok(nanoseconds / runs.max(1.0))
    };
    let (encap_ns, decap_ns) = (per_run(CONTAINER_PROGRAM)?, per_run(UPLINK_TC_PROGRAM)?);

    let before = program_runs()?;
    let busy_before = busy_cpu_seconds()?;
    tcp(client, BBOX2, seconds, 1)?;
    let busy = busy_cpu_seconds()? - busy_before;
    let after = program_runs()?;
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

/// Every loaded program's run count and run time, summed by name.
fn program_runs() -> Result<HashMap<String, (f64, f64)>> {
    let output = overlay_tests::netns::run(Command::new("bpftool").args(["-j", "prog", "show"]))?;
    let programs: Vec<serde_json::Value> =
        serde_json::from_str(&output).context("bpftool printed no JSON")?;
    let mut runs: HashMap<String, (f64, f64)> = HashMap::new();
    for program in &programs {
        let Some(name) = program["name"].as_str() else {
            continue;
        };
        let entry = runs.entry(name.to_string()).or_default();
        entry.0 += program["run_cnt"].as_f64().unwrap_or(0.0);
        entry.1 += program["run_time_ns"].as_f64().unwrap_or(0.0);
    }
    Ok(runs)
}

/// `kernel.bpf_stats_enabled` on while this lives, as it was afterwards.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let previous =
            std::fs::read_to_string(BPF_STATS).context("cannot read bpf_stats_enabled")?;
        std::fs::write(BPF_STATS, "1").context("cannot enable BPF run-time statistics")?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(BPF_STATS, self.previous.trim()) {
            eprintln!("cannot restore {BPF_STATS}: {error}");
        }
    }
}

fn ratio(figure: &Figure, other: &str) -> Option<f64> {
    let ours = figure.values.get("ebpf")?;
    let theirs = figure.values.get(other)?;
    (*theirs != 0.0).then(|| ours / theirs)
}

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_string(), |value| format!("{value:.2}"))
}

fn report(figures: &[Figure], plan: &Plan, out_dir: &Path) -> Result<()> {
    let mut table = String::from(
        "| figure | unit | ebpf | kernel | host-gw | ebpf/kernel | ebpf/host-gw |\n|---|---|---|---|---|---|---|\n",
    );
    for figure in figures {
        let value = |mode: &str| figure.values.get(mode).copied();
        writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} |",
            figure.name,
            figure.unit,
            cell(value("ebpf")),
            cell(value("kernel")),
            cell(value("host-gw")),
            cell(ratio(figure, "kernel")),
            cell(ratio(figure, "host-gw")),
        )?;
    }
    let machine = machine_description()?;
    let markdown = format!(
        "# overlay benchmark\n\n{machine}\n\nMedian of {} run(s) of {} s each; lease to route over {} added leases, timed by a netlink listener; idle CPU over {} s with {} containers.\n\n{table}",
        plan.repetitions,
        plan.seconds,
        plan.leases_added,
        plan.idle.as_secs(),
        plan.containers
    );
    println!("\n{markdown}");
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    std::fs::write(out_dir.join("report.md"), &markdown)?;
    let json: Vec<serde_json::Value> = figures
        .iter()
        .map(|figure| {
            serde_json::json!({
                "figure": figure.name,
                "unit": figure.unit,
                "higher_is_better": figure.higher_is_better,
                "values": figure.values,
                "ebpf_over_kernel": ratio(figure, "kernel"),
                "ebpf_over_host_gw": ratio(figure, "host-gw"),
            })
        })
        .collect();
    let document = serde_json::json!({ "machine": machine, "figures": json });
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&document)?,
    )?;
    std::fs::write(out_dir.join("chart.svg"), chart(figures))?;
    println!(
        "Wrote report.md, report.json and chart.svg to {}",
        out_dir.display()
    );
    Ok(())
}

fn machine_description() -> Result<String> {
    let kernel = String::from_utf8(Command::new("uname").arg("-r").output()?.stdout)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|name| name.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    Ok(format!(
        "Machine: {cpu}, {cores} cores, Linux {}; all hosts are network namespaces joined by veth.",
        kernel.trim()
    ))
}

/// One group of bars per figure, each bar scaled to the group's largest value.
fn chart(figures: &[Figure]) -> String {
    const WIDTH: usize = 900;
    const ROW: usize = 60;
    const BAR: usize = 16;
    const LEFT: usize = 330;
    let colors = [
        ("ebpf", "#2a9d8f"),
        ("kernel", "#e76f51"),
        ("host-gw", "#8d99ae"),
    ];
    let height = 40 + figures.len() * ROW;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    for (index, (mode, color)) in colors.iter().enumerate() {
        let x = LEFT + index * 110;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="8" width="12" height="12" fill="{color}"/><text x="{}" y="18">{mode}</text>"#,
            x + 16
        );
    }
    for (row, figure) in figures.iter().enumerate() {
        let top = 34 + row * ROW;
        let direction = if figure.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = write!(
            svg,
            r#"<text x="4" y="{}">{} ({}, {direction})</text>"#,
            top + 20,
            figure.name,
            figure.unit
        );
        let largest = figure
            .values
            .values()
            .copied()
            .fold(f64::MIN_POSITIVE, f64::max);
        for (index, (mode, color)) in colors.iter().enumerate() {
            let Some(value) = figure.values.get(mode) else {
                continue;
            };
            let length = ((value / largest) * (WIDTH - LEFT - 80) as f64).max(1.0);
            let y = top + index * BAR;
            let _ = write!(
                svg,
                r#"<rect x="{LEFT}" y="{y}" width="{length:.0}" height="{}" fill="{color}"/><text x="{:.0}" y="{}">{value:.2}</text>"#,
                BAR - 2,
                LEFT as f64 + length + 4.0,
                y + BAR - 5
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
