//! The benchmark's rows: each is one kind of run with a short name for `--only`, giving one
//! or two figures. The data-path rows run in every mode, round after round; `bpf-stats` in
//! ebpf mode alone; `control-plane` at the end, in rounds of its own.
use anyhow::{Result, bail};
use overlay_tests::{ipv6::BBOX2_V6, netns::Netns, seed::BBOX2};

use crate::traffic::{self, Pinning};

pub const BPF_STATS: &str = "bpf-stats";
pub const CONTROL_PLANE: &str = "control-plane";

/// The address family a data-path row runs over.
#[derive(Clone, Copy)]
pub enum Family {
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

#[derive(Clone, Copy)]
pub enum Workload {
    /// iperf3 TCP, each stream a client and a server of its own.
    Tcp { streams: u32, pinning: Pinning },
    /// 64-byte UDP from four unthrottled sockets of one iperf3 client.
    SmallUdp,
    /// sockperf ping-pong, over IPv4; `pinned`: both ends on CPU 0.
    Latency { pinned: bool },
}

/// One figure's name and how to read it.
pub struct FigureSpec {
    pub name: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

impl FigureSpec {
    pub fn new(name: impl Into<String>, unit: &'static str, higher_is_better: bool) -> Self {
        Self {
            name: name.into(),
            unit,
            higher_is_better,
        }
    }
}

pub struct Row {
    pub key: &'static str,
    pub family: Family,
    pub workload: Workload,
}

const fn row(key: &'static str, family: Family, workload: Workload) -> Row {
    Row {
        key,
        family,
        workload,
    }
}

const fn tcp(streams: u32, pinning: Pinning) -> Workload {
    Workload::Tcp { streams, pinning }
}

/// As many streams as bbox2 has servers.
const fn tcp4(pinning: Pinning) -> Workload {
    tcp(MAX_TCP_STREAMS, pinning)
}

/// The most TCP streams a row runs: bbox2 has an iperf3 server for each.
pub const MAX_TCP_STREAMS: u32 = 4;

/// In report order.
pub const DATA_ROWS: [Row; 13] = [
    row("tcp1", Family::Ipv4, tcp(1, Pinning::Unpinned)),
    row("tcp4", Family::Ipv4, tcp4(Pinning::Unpinned)),
    row("tcp1-pinned", Family::Ipv4, tcp(1, Pinning::Opposite)),
    row("tcp4-pinned", Family::Ipv4, tcp4(Pinning::Opposite)),
    row("tcp1-one-cpu", Family::Ipv4, tcp(1, Pinning::OneCpu)),
    row("udp64", Family::Ipv4, Workload::SmallUdp),
    row("tcp1-v6", Family::Ipv6, tcp(1, Pinning::Unpinned)),
    row("tcp4-v6", Family::Ipv6, tcp4(Pinning::Unpinned)),
    row("tcp1-pinned-v6", Family::Ipv6, tcp(1, Pinning::Opposite)),
    row("tcp4-pinned-v6", Family::Ipv6, tcp4(Pinning::Opposite)),
    row("udp64-v6", Family::Ipv6, Workload::SmallUdp),
    row("latency", Family::Ipv4, Workload::Latency { pinned: false }),
    row(
        "latency-pinned",
        Family::Ipv4,
        Workload::Latency { pinned: true },
    ),
];

impl Row {
    /// The figures one run gives, in the order [`Row::run`] returns their values.
    pub fn figures(&self) -> Vec<FigureSpec> {
        let named = |name: &str, unit, higher_is_better| {
            FigureSpec::new(self.family.figure(name), unit, higher_is_better)
        };
        match self.workload {
            Workload::Tcp { streams, pinning } => {
                let counted = match streams {
                    1 => "1 stream".to_string(),
                    streams => format!("{streams} streams"),
                };
                let pin = match pinning {
                    Pinning::Unpinned => "",
                    Pinning::Opposite => ", pinned",
                    Pinning::OneCpu => ", both ends on CPU 0",
                };
                let mut figures = vec![named(
                    &format!("TCP throughput, {counted}{pin}"),
                    "Gbit/s",
                    true,
                )];
                // Unpinned only; one stream's keeps the name of earlier reports.
                if pinning == Pinning::Unpinned {
                    let cost = match streams {
                        1 => "CPU cost".to_string(),
                        streams => format!("CPU cost, {streams} streams"),
                    };
                    figures.push(named(&cost, "CPU s/GB", false));
                }
                figures
            }
            Workload::SmallUdp => vec![
                named("64-byte UDP received", "kpps", true),
                named("64-byte UDP sent", "kpps", true),
            ],
            Workload::Latency { pinned: false } => vec![
                named("Latency p50 (sockperf, RTT/2)", "µs", false),
                named("Latency p99 (sockperf, RTT/2)", "µs", false),
            ],
            Workload::Latency { pinned: true } => vec![
                named("Latency p50, both ends on CPU 0", "µs", false),
                named("Latency p99, both ends on CPU 0", "µs", false),
            ],
        }
    }

    /// One run from bbox1 (`client`) to bbox2 of `seconds`: the value of each of
    /// [`Row::figures`].
    pub fn run(&self, client: &Netns, seconds: u32) -> Result<Vec<f64>> {
        let server = self.family.destination();
        let values = match self.workload {
            Workload::Tcp { streams, pinning } => {
                let (gbit, cpu) = traffic::tcp(client, server, seconds, streams, pinning)?;
                vec![gbit, cpu]
            }
            Workload::SmallUdp => {
                let (received, sent) = traffic::small_udp(client, server, seconds)?;
                vec![received, sent]
            }
            Workload::Latency { pinned } => {
                let (p50, p99) = traffic::latency(client, seconds, pinned)?;
                vec![p50, p99]
            }
        };
        Ok(values.into_iter().take(self.figures().len()).collect())
    }
}

/// The figures of the `bpf-stats` row, in the order [`crate::traffic::program_cost`] gives them.
pub fn bpf_stats_figures() -> Vec<FigureSpec> {
    vec![
        FigureSpec::new("eBPF per packet, encapsulation (64-byte UDP)", "ns", false),
        FigureSpec::new("eBPF per packet, decapsulation (64-byte UDP)", "ns", false),
        FigureSpec::new("eBPF share of busy CPU (TCP, 1 stream)", "%", false),
    ]
}

/// What `--only` asked for: every row unless it names some.
pub struct Selection {
    pub data_rows: Vec<&'static Row>,
    pub bpf_stats: bool,
    pub control_plane: bool,
}

impl Selection {
    pub fn everything() -> Self {
        Self {
            data_rows: DATA_ROWS.iter().collect(),
            bpf_stats: true,
            control_plane: true,
        }
    }

    /// The rows named in `list`, comma separated; an unknown name fails, naming the rows.
    pub fn only(list: &str) -> Result<Self> {
        let mut selection = Self {
            data_rows: Vec::new(),
            bpf_stats: false,
            control_plane: false,
        };
        for name in list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            match name {
                BPF_STATS => selection.bpf_stats = true,
                CONTROL_PLANE => selection.control_plane = true,
                _ => match DATA_ROWS.iter().find(|row| row.key == name) {
                    Some(row) => selection.data_rows.push(row),
                    None => bail!("unknown row {name:?}; the rows are: {}", row_names()),
                },
            }
        }
        if !selection.needs_data_path() && !selection.control_plane {
            bail!("--only names no row; the rows are: {}", row_names());
        }
        // Report order, whatever the order named.
        selection
            .data_rows
            .sort_by_key(|row| DATA_ROWS.iter().position(|known| known.key == row.key));
        selection.data_rows.dedup_by_key(|row| row.key);
        Ok(selection)
    }

    /// Whether the three data-path clusters are needed.
    pub fn needs_data_path(&self) -> bool {
        !self.data_rows.is_empty() || self.bpf_stats
    }
}

/// Every row's name, comma separated, as `--only` takes them.
pub fn row_names() -> String {
    DATA_ROWS
        .iter()
        .map(|row| row.key)
        .chain([BPF_STATS, CONTROL_PLANE])
        .collect::<Vec<_>>()
        .join(",")
}
