//! `cargo xtask bench`: the seed topology three times, all up at once: `ebpf` (our dataplane),
//! `kernel` (flannel's kernel vxlan) and `host-gw` (plain routing between the hosts, the
//! ceiling for any overlay). The seed is dual-stack, so throughput is measured over each
//! family; IPv6 takes flannel-v6.1 in both vxlan modes. The runs are interleaved: round after
//! round, each row runs once in every mode, the modes in a shuffled order, and each figure's
//! ratio is the median (and interquartile range) of its per-round ratios, so a machine that
//! slows down for a minute slows every mode alike. The three clusters are built afresh every
//! few rounds, so that one build's luck is in the spread rather than in the run's whole
//! result. Writes a table to the terminal and Markdown, JSON and an SVG chart to the output
//! directory (default `target/bench`).
//!
//! Figures are reported, never judged.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    thread::sleep,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use overlay_tests::{
    cluster::Cluster,
    ipv6::{BBOX2_V6, IPV6_NETWORK},
    netns::Netns,
    process::{IPERF3_PORT, Process, iperf3_server_on},
    random::Random,
    seed::{BBOX2, Seed},
};

mod compare;
mod control_plane;
mod figures;
mod report;
mod rows;
mod traffic;

use figures::Figures;
use report::Summary;
use rows::{CONTROL_PLANE, FigureSpec, Row, Selection};
use traffic::{CpuTimes, SOCKPERF_PINNED_PORT, SOCKPERF_PORT, STEAL_LIMIT_PERCENT};

const MODES: [Mode; 3] = [Mode::Ebpf, Mode::Kernel, Mode::HostGw];
/// Times a run is tried while too much CPU time is stolen during it, before its round is
/// left out.
const ATTEMPTS: usize = 3;

const USAGE: &str =
    "usage: overlay-bench [--quick] [--only ROW,...] [--rounds N] [--control-rounds N] [--rebuild-every N] [--seed N] [--out DIR]
       overlay-bench --compare FIRST SECOND

  --quick        2 rounds of 1-s runs and a small control plane: proves the benchmark works
  --only ROWS    only these rows (comma separated), e.g. --only tcp4,tcp4-v6
  --rounds N     rounds of interleaved runs (default 10, 2 with --quick)
  --control-rounds N
                 rounds of the control plane's runs (default 4, 2 with --quick)
  --rebuild-every N
                 build the three clusters afresh every N rounds (default 2, 1 with --quick)
  --seed N       the seed of the modes' shuffled order (default: from the clock)
  --out DIR      where the report goes (default target/bench)
  --compare FIRST SECOND
                 no run: the ratios of two reports (report.json) side by side, which ones'
                 interquartile ranges lie apart, and how many would by chance between two
                 runs of identical code with the same round counts";

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

/// How long and how often to measure.
pub struct Plan {
    rounds: usize,
    /// Rounds of the control plane's runs, each mode once per round in shuffled order.
    control_rounds: usize,
    /// Rounds run on one build of the clusters: whatever one build has of its own then shows
    /// in the spread instead of shifting a whole run.
    rounds_per_build: usize,
    /// Length of each data-path run.
    seconds: u32,
    /// New leases timed from etcd to route, one at a time.
    leases_added: usize,
    /// Lease counts the agent is started against, in increasing order.
    lease_counts: Vec<usize>,
    /// New leases timed from etcd to route at each of those counts.
    leases_added_at_scale: usize,
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
                rounds: 2,
                control_rounds: 2,
                rounds_per_build: 1,
                seconds: 1,
                leases_added: 20,
                lease_counts: vec![100],
                leases_added_at_scale: 5,
                containers: 3,
                settle: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            }
        } else {
            Self {
                rounds: 10,
                control_rounds: 4,
                rounds_per_build: 2,
                seconds: 2,
                leases_added: 200,
                lease_counts: vec![1_000, 10_000],
                leases_added_at_scale: 100,
                containers: 50,
                settle: Duration::from_secs(5),
                idle: Duration::from_secs(60),
            }
        }
    }
}

/// What the command line asked for: a run, or a comparison of two reports.
enum Command {
    Run(Options),
    Compare(PathBuf, PathBuf),
}

/// How to run.
struct Options {
    plan: Plan,
    selection: Selection,
    seed: u64,
    out_dir: PathBuf,
}

/// What to do, or None when `--help` asked for the usage alone.
fn parse_options() -> Result<Option<Command>> {
    let mut quick = false;
    let mut selection = Selection::everything();
    let mut rounds = None;
    let mut control_rounds = None;
    let mut rounds_per_build = None;
    let mut seed = None;
    let mut out_dir = None;
    let given: Vec<String> = std::env::args().skip(1).collect();
    if given.first().is_some_and(|arg| arg == "--compare") {
        let [_, first, second] = given.as_slice() else {
            bail!("--compare takes two reports and nothing else\n{USAGE}");
        };
        return Ok(Some(Command::Compare(first.into(), second.into())));
    }
    let mut args = given.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} takes a value"));
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => selection = Selection::only(&value()?)?,
            "--rounds" => rounds = Some(number(&value()?, "--rounds")?),
            "--control-rounds" => {
                control_rounds = Some(number(&value()?, "--control-rounds")?);
            }
            "--rebuild-every" => {
                rounds_per_build = Some(number(&value()?, "--rebuild-every")?);
            }
            "--seed" => seed = Some(number(&value()?, "--seed")?),
            "--out" => out_dir = Some(PathBuf::from(value()?)),
            "--compare" => bail!("--compare takes two reports and nothing else\n{USAGE}"),
            "--help" | "-h" => {
                println!("{USAGE}\n\nrows: {}", rows::row_names());
                return Ok(None);
            }
            _ => bail!("unknown argument {arg:?}\n{USAGE}"),
        }
    }
    let mut plan = Plan::new(quick);
    if let Some(rounds) = rounds {
        plan.rounds = usize::try_from(rounds).context("--rounds is too large")?;
    }
    if let Some(control_rounds) = control_rounds {
        plan.control_rounds =
            usize::try_from(control_rounds).context("--control-rounds is too large")?;
    }
    if let Some(rounds_per_build) = rounds_per_build {
        plan.rounds_per_build =
            usize::try_from(rounds_per_build).context("--rebuild-every is too large")?;
    }
    if plan.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if plan.control_rounds == 0 {
        bail!("--control-rounds must be at least 1");
    }
    if plan.rounds_per_build == 0 {
        bail!("--rebuild-every must be at least 1");
    }
    let seed = match seed {
        Some(0) => bail!("--seed must not be 0"),
        Some(seed) => seed,
        None => clock_seed()?,
    };
    Ok(Some(Command::Run(Options {
        plan,
        selection,
        seed,
        out_dir: out_dir
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")),
    })))
}

fn number(text: &str, flag: &str) -> Result<u64> {
    text.parse()
        .with_context(|| format!("{flag} takes a number, not {text:?}"))
}

/// A non-zero seed from the clock.
fn clock_seed() -> Result<u64> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_nanos();
    Ok((nanos as u64).max(1))
}

fn main() -> std::process::ExitCode {
    let outcome = parse_options().and_then(|command| match command {
        None => Ok(()),
        Some(Command::Run(options)) => run(&options),
        Some(Command::Compare(first, second)) => compare::run(&first, &second),
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> Result<()> {
    let (plan, selection) = (&options.plan, &options.selection);
    let mut figures = Figures::default();
    let mut summary = Summary {
        seed: options.seed,
        builds: 0,
        runs: 0,
        runs_dropped: 0,
        max_steal_percent: 0.0,
    };
    let mut random = Random(options.seed);
    if selection.needs_data_path() {
        for first_round in (1..=plan.rounds).step_by(plan.rounds_per_build) {
            // The namespaces' names are fixed: a build must be gone before the next starts.
            let paths = start_data_paths(selection)?;
            summary.builds += 1;
            let last_round = (first_round + plan.rounds_per_build - 1).min(plan.rounds);
            for round in first_round..=last_round {
                println!("== round {round} of {}", plan.rounds);
                for row in &selection.data_rows {
                    run_row(&mut figures, &mut summary, plan, &paths, row, &mut random)?;
                }
                if selection.bpf_stats {
                    run_program_cost(&mut figures, &mut summary, plan, &paths)?;
                }
            }
        }
    }
    if selection.control_plane {
        for round in 1..=plan.control_rounds {
            println!("== control plane, round {round} of {}", plan.control_rounds);
            run_control_plane_round(&mut figures, plan, &mut random)?;
        }
    }
    report::write(&figures.0, plan, &summary, &options.out_dir)
}

/// One mode's seed with bbox2's iperf3 and sockperf servers, up for every round.
struct DataPath {
    /// Before `seed`: the servers stop before their namespace goes.
    _servers: Vec<Process>,
    seed: Seed,
    mode: Mode,
}

impl DataPath {
    fn start(mode: Mode) -> Result<Self> {
        println!("== {}: starting", mode.name());
        // Dual-stack, for the IPv6 rows; IPv4 takes the same path as in an IPv4-only network.
        let cluster = Cluster::with_ipv6(
            &format!("bench-{}", mode.name()),
            &mode.network_config("10.2.0.0/16", Some(IPV6_NETWORK)),
        )?;
        let seed = Seed::start_dual_stack_on(cluster, [mode.agent_flags(); 2])?;
        let scratch = seed.cluster.scratch.path().to_path_buf();
        let server = &seed.bbox2.netns;
        let sockperf = |pin: &[&str], port: &str, log: &str| {
            let command = [pin, &["sockperf", "server", "-i", BBOX2, "-p", port][..]].concat();
            let args: Vec<String> = command[1..].iter().map(|arg| arg.to_string()).collect();
            Process::spawn(
                server.name(),
                Path::new(command[0]),
                &args,
                &[],
                &scratch.join(log),
            )
        };
        let mut servers = vec![
            sockperf(&[], SOCKPERF_PORT, "sockperf.log")?,
            sockperf(
                &["taskset", "-c", "0"],
                SOCKPERF_PINNED_PORT,
                "sockperf-pinned.log",
            )?,
        ];
        for connection in 0..rows::MAX_TCP_STREAMS as u16 {
            let log = scratch.join(format!("iperf3-{connection}.log"));
            let port = IPERF3_PORT + connection;
            servers.push(iperf3_server_on(server, &log, false, port)?);
        }
        // Steady state: neighbours resolved and, in ebpf mode, the containers learned.
        seed.bbox1.ping(BBOX2, 5)?;
        seed.bbox1.ping6(BBOX2_V6, 5)?;
        Ok(Self {
            _servers: servers,
            seed,
            mode,
        })
    }

    fn client(&self) -> &Netns {
        &self.seed.bbox1.netns
    }
}

/// The clusters the selection needs: all three for a data-path row, ebpf's for `bpf-stats`.
fn start_data_paths(selection: &Selection) -> Result<Vec<DataPath>> {
    let modes: &[Mode] = if selection.data_rows.is_empty() {
        &[Mode::Ebpf]
    } else {
        &MODES
    };
    let paths = modes
        .iter()
        .map(|&mode| DataPath::start(mode))
        .collect::<Result<Vec<_>>>()?;
    sleep(Duration::from_secs(1));
    Ok(paths)
}

/// `items` in an order drawn from `random`.
fn shuffled<'a, T>(items: &'a [T], random: &mut Random) -> Vec<&'a T> {
    let mut order: Vec<&T> = items.iter().collect();
    for index in (1..order.len()).rev() {
        order.swap(index, random.below(index + 1));
    }
    order
}

/// One round of `row`: a run in every mode, in shuffled order. The round counts only if
/// every mode's run does.
fn run_row(
    figures: &mut Figures,
    summary: &mut Summary,
    plan: &Plan,
    paths: &[DataPath],
    row: &Row,
    random: &mut Random,
) -> Result<()> {
    let specs = row.figures();
    let mut values = BTreeMap::new();
    for path in shuffled(paths, random) {
        let label = format!("{} {}", row.key, path.mode.name());
        match unstolen(summary, &label, CpuTimes::now, || {
            row.run(path.client(), plan.seconds)
        })? {
            Some(run) => {
                println!("   {label}: {}", shown(&specs, &run));
                values.insert(path.mode.name(), run);
            }
            None => break,
        }
    }
    for (index, spec) in specs.iter().enumerate() {
        if values.len() == paths.len() {
            let round = values.iter().map(|(mode, run)| (*mode, run[index]));
            figures.record_round(spec, row.key, round.collect());
        } else {
            figures.record_dropped(spec, row.key);
        }
    }
    Ok(())
}

/// One round of `bpf-stats`, in ebpf mode alone: a pass of its own, as the kernel's run-time
/// accounting costs two clock reads per program run, which the other rows must not carry.
fn run_program_cost(
    figures: &mut Figures,
    summary: &mut Summary,
    plan: &Plan,
    paths: &[DataPath],
) -> Result<()> {
    let path = paths
        .iter()
        .find(|path| path.mode == Mode::Ebpf)
        .context("no ebpf cluster")?;
    let label = format!("{} ebpf", rows::BPF_STATS);
    let specs = rows::bpf_stats_figures();
    let agents = [&path.seed.agent1, &path.seed.agent2].map(|agent| agent.process.id());
    let cost = unstolen(summary, &label, CpuTimes::now, || {
        traffic::program_cost(path.client(), &agents, plan.seconds)
    })?;
    let values = cost.map(|cost| vec![cost.encap_ns, cost.decap_ns, cost.tcp_share]);
    if let Some(values) = &values {
        println!("   {label}: {}", shown(&specs, values));
    }
    for (index, spec) in specs.iter().enumerate() {
        match &values {
            Some(values) => figures.record_round(
                spec,
                rows::BPF_STATS,
                [(Mode::Ebpf.name(), values[index])].into(),
            ),
            None => figures.record_dropped(spec, rows::BPF_STATS),
        }
    }
    Ok(())
}

/// `run`, tried again while more than [`STEAL_LIMIT_PERCENT`] of the machine's CPU time was
/// stolen during it, up to [`ATTEMPTS`] times; None when every attempt was. `cpu_times`
/// reads the machine's CPU times ([`CpuTimes::now`]).
fn unstolen<T>(
    summary: &mut Summary,
    label: &str,
    cpu_times: impl Fn() -> Result<CpuTimes>,
    mut run: impl FnMut() -> Result<T>,
) -> Result<Option<T>> {
    for _ in 0..ATTEMPTS {
        let before = cpu_times()?;
        let value = run().with_context(|| format!("{label} failed"))?;
        let steal = cpu_times()?.steal_percent_since(&before);
        summary.runs += 1;
        summary.max_steal_percent = summary.max_steal_percent.max(steal);
        if steal <= STEAL_LIMIT_PERCENT {
            return Ok(Some(value));
        }
        summary.runs_dropped += 1;
        println!("   {label}: dropped, {steal:.1} % of the CPU time stolen");
    }
    println!("   {label}: round left out, every attempt stolen from");
    Ok(None)
}

/// "12.34 Gbit/s, 0.56 CPU s/GB": a run's values for the progress lines.
fn shown(specs: &[FigureSpec], values: &[f64]) -> String {
    specs
        .iter()
        .zip(values)
        .map(|(spec, value)| format!("{value:.2} {}", spec.unit))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One round of the control plane: a run in every mode (each takes minutes, on a cluster of
/// its own), in shuffled order.
fn run_control_plane_round(figures: &mut Figures, plan: &Plan, random: &mut Random) -> Result<()> {
    let mut runs = BTreeMap::new();
    for mode in shuffled(&MODES, random) {
        println!("== {}: control plane", mode.name());
        runs.insert(mode.name(), control_plane_figures(plan, *mode)?);
    }
    // Every run yields the same figures, in the same order.
    let Some(first) = runs.values().next() else {
        return Ok(());
    };
    for (index, (spec, _)) in first.iter().enumerate() {
        let round = runs
            .iter()
            .map(|(mode, run)| (*mode, run[index].1))
            .collect();
        figures.record_round(spec, CONTROL_PLANE, round);
    }
    Ok(())
}

/// The control plane's figures in `mode`, from one run.
fn control_plane_figures(plan: &Plan, mode: Mode) -> Result<Vec<(FigureSpec, f64)>> {
    let control = control_plane::measure(mode, plan)?;
    let figure = |name: &str, unit, value| (FigureSpec::new(name, unit, false), value);
    let mut figures = vec![
        figure(
            "Lease to route on another host after etcd's acknowledgement, p50",
            "ms",
            control.route_p50_ms,
        ),
        figure(
            "Lease to route on another host after etcd's acknowledgement, p99",
            "ms",
            control.route_p99_ms,
        ),
        figure(
            "etcd's acknowledgement of a lease, p99",
            "ms",
            control.put_p99_ms,
        ),
    ];
    for scale in &control.scales {
        let leases = scale.leases;
        figures.extend([
            figure(
                &format!("Start to ready, {leases} leases"),
                "ms",
                scale.ready_ms,
            ),
            figure(
                &format!("Agent resident memory, {leases} leases"),
                "MiB",
                scale.resident_mib,
            ),
            figure(
                &format!(
                    "Idle agent CPU, {leases} leases and {} containers",
                    plan.containers
                ),
                "% of a core",
                scale.idle_cpu_percent,
            ),
            figure(
                &format!("Lease to route after etcd's acknowledgement at {leases} leases, p50"),
                "ms",
                scale.route_p50_ms,
            ),
            figure(
                &format!("Lease to route after etcd's acknowledgement at {leases} leases, p99"),
                "ms",
                scale.route_p99_ms,
            ),
            figure(
                &format!("Agent CPU per lease event at {leases} leases"),
                "ms",
                scale.cpu_ms_per_lease,
            ),
        ]);
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn summary() -> Summary {
        Summary {
            seed: 1,
            builds: 0,
            runs: 0,
            runs_dropped: 0,
            max_steal_percent: 0.0,
        }
    }

    /// CPU times of a machine that loses `stolen[n]` % of its time during the nth run.
    fn machine_losing(stolen: &'static [f64]) -> impl Fn() -> Result<CpuTimes> {
        let reads = Cell::new(0);
        let steal = Cell::new(0.0);
        move || {
            let read = reads.get();
            reads.set(read + 1);
            // Reads come in pairs, before and after a run: the second of each adds its theft.
            if read % 2 == 1 {
                steal.set(steal.get() + stolen[read / 2]);
            }
            Ok(CpuTimes {
                total: 100.0 * (read / 2 + read % 2) as f64,
                idle: 0.0,
                steal: steal.get(),
            })
        }
    }

    /// `unstolen` on a machine losing `stolen`, of a run that counts its tries: its value,
    /// the tries and the summary.
    fn retried(stolen: &'static [f64]) -> (Option<u32>, u32, Summary) {
        let mut summary = summary();
        let mut tries = 0;
        let value = unstolen(&mut summary, "udp64 ebpf", machine_losing(stolen), || {
            tries += 1;
            Ok(tries)
        })
        .unwrap();
        (value, tries, summary)
    }

    #[test]
    fn a_run_stolen_from_every_time_is_tried_three_times_then_left_out() {
        let (value, tries, summary) = retried(&[6.0; 3]);
        assert_eq!(value, None);
        assert_eq!((tries, summary.runs, summary.runs_dropped), (3, 3, 3));
        assert_eq!(summary.max_steal_percent, 6.0);
    }

    #[test]
    fn a_run_stolen_from_once_counts_its_second_try() {
        let (value, tries, summary) = retried(&[20.0, 5.0]);
        assert_eq!(value, Some(2), "the limit, 5 %, is still kept");
        assert_eq!((tries, summary.runs, summary.runs_dropped), (2, 2, 1));
        assert_eq!(summary.max_steal_percent, 20.0);
    }
}
