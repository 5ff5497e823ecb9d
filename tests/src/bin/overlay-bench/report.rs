//! The report: a table on the terminal and in `report.md`, the same figures with every
//! round's values in `report.json`, and the modes' medians as bars in `chart.svg`.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context, Result};

use crate::{
    Mode, Plan,
    figures::{Figure, Spread},
    rows::CONTROL_PLANE,
    traffic::STEAL_LIMIT_PERCENT,
};

/// How the runs went, for the report's method paragraph.
pub struct Summary {
    pub seed: u64,
    /// Times the three clusters were built for the rounds.
    pub builds: usize,
    pub runs: usize,
    pub runs_dropped: usize,
    pub max_steal_percent: f64,
}

const HEADER: &str = "| figure | row | unit | ebpf | kernel | host-gw | ebpf/kernel | IQR | ebpf/host-gw | IQR | rounds kept/dropped |\n|---|---|---|---|---|---|---|---|---|---|---|\n";

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "—".to_string(), |value| format!("{value:.2}"))
}

fn range(spread: Spread) -> String {
    format!("{:.2}–{:.2}", spread.q1, spread.q3)
}

/// A ratio's interquartile range, if there is a ratio.
fn ratio_range(ratio: Option<Spread>) -> String {
    ratio.map_or_else(|| "—".to_string(), range)
}

/// A mode's median; for a figure of ebpf mode alone, which has no ratio, with its IQR.
fn mode_cell(figure: &Figure, mode: Mode) -> String {
    let Some(spread) = figure.spread(mode.name()) else {
        return "—".to_string();
    };
    if figure.modes().count() == 1 {
        format!("{:.2} (IQR {})", spread.median, range(spread))
    } else {
        format!("{:.2}", spread.median)
    }
}

fn rounds(figure: &Figure) -> String {
    format!("{}/{}", figure.rounds.len(), figure.dropped)
}

fn table(figures: &[Figure]) -> Result<String> {
    let mut table = String::from(HEADER);
    for figure in figures {
        let (over_kernel, over_host_gw) = (figure.ratio(Mode::Kernel), figure.ratio(Mode::HostGw));
        writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            figure.name,
            figure.row,
            figure.unit,
            mode_cell(figure, Mode::Ebpf),
            mode_cell(figure, Mode::Kernel),
            mode_cell(figure, Mode::HostGw),
            cell(over_kernel.map(|ratio| ratio.median)),
            ratio_range(over_kernel),
            cell(over_host_gw.map(|ratio| ratio.median)),
            ratio_range(over_host_gw),
            rounds(figure),
        )?;
    }
    Ok(table)
}

fn method(figures: &[Figure], plan: &Plan, summary: &Summary) -> String {
    let mut text = format!(
        "{} round(s): in each, every row runs once in every mode, the modes in an order shuffled \
         per round and row (seed {seed}; `--seed {seed}` with the same rows repeats the order), \
         all three clusters up throughout a round. Runs of {} s, a TCP run's after one more \
         second left out (`iperf3 -O 1`). A run during which more than {STEAL_LIMIT_PERCENT} % \
         of the machine's CPU time was stolen is dropped and run again, up to {} times, before \
         its round is left out: {} of {} runs dropped (most stolen: {:.1} %). The mode columns \
         are each mode's median over the kept rounds (for a figure of ebpf mode alone, with \
         its IQR); the ratios are the median and interquartile range of the per-round ratios.",
        plan.rounds,
        plan.seconds,
        crate::ATTEMPTS,
        summary.runs_dropped,
        summary.runs,
        summary.max_steal_percent,
        seed = summary.seed,
    );
    if summary.builds > 0 {
        text.push_str(&format!(
            " The clusters were built afresh every {} round(s), {} time(s) in all, so that the \
             spread takes in how one build differs from the next.",
            plan.rounds_per_build, summary.builds,
        ));
    }
    if figures.iter().any(|figure| figure.row == CONTROL_PLANE) {
        text.push_str(&format!(
            " Control plane rows: {} round(s), in each a run in every mode, one after the \
             other in a shuffled order (a run takes minutes, on a cluster of its own); the \
             ratios are again those of each round; lease to route over {} added leases, and \
             {} more at each lease count, from etcd's acknowledgement of each to its route, \
             timed by a netlink listener; the agent's CPU per lease event over those {}, by \
             its process CPU clock; idle CPU over {} s with {} containers.",
            plan.control_rounds,
            plan.leases_added,
            plan.leases_added_at_scale,
            plan.leases_added_at_scale,
            plan.idle.as_secs(),
            plan.containers,
        ));
    }
    text
}

fn figure_json(figure: &Figure) -> serde_json::Value {
    let medians: serde_json::Map<String, serde_json::Value> = figure
        .modes()
        .filter_map(|mode| Some((mode.to_string(), figure.spread(mode)?.median.into())))
        .collect();
    let spreads: serde_json::Map<String, serde_json::Value> = figure
        .modes()
        .filter_map(|mode| Some((mode.to_string(), figure.spread(mode)?.to_json())))
        .collect();
    serde_json::json!({
        "figure": figure.name,
        "row": figure.row,
        "unit": figure.unit,
        "higher_is_better": figure.higher_is_better,
        "values": medians,
        "spread": spreads,
        "ebpf_over_kernel": figure.ratio(Mode::Kernel).map(Spread::to_json),
        "ebpf_over_host_gw": figure.ratio(Mode::HostGw).map(Spread::to_json),
        "rounds_kept": figure.rounds.len(),
        "rounds_dropped": figure.dropped,
        "rounds": figure.rounds,
    })
}

pub fn write(figures: &[Figure], plan: &Plan, summary: &Summary, out_dir: &Path) -> Result<()> {
    let machine = machine_description()?;
    let markdown = format!(
        "# overlay benchmark\n\n{machine}\n\n{}\n\n{}",
        method(figures, plan, summary),
        table(figures)?
    );
    println!("\n{markdown}");
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    std::fs::write(out_dir.join("report.md"), &markdown)?;
    let document = serde_json::json!({
        "machine": machine,
        "seed": summary.seed,
        "rounds": plan.rounds,
        "control_rounds": plan.control_rounds,
        "rounds_per_build": plan.rounds_per_build,
        "builds": summary.builds,
        "seconds": plan.seconds,
        "steal_limit_percent": STEAL_LIMIT_PERCENT,
        "runs": summary.runs,
        "runs_dropped": summary.runs_dropped,
        "max_steal_percent": summary.max_steal_percent,
        "figures": figures.iter().map(figure_json).collect::<Vec<_>>(),
    });
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

/// One group of bars per figure, each mode's median scaled to the group's largest.
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
        let medians: Vec<Option<f64>> = colors
            .iter()
            .map(|(mode, _)| figure.spread(mode).map(|spread| spread.median))
            .collect();
        let largest = medians
            .iter()
            .flatten()
            .copied()
            .fold(f64::MIN_POSITIVE, f64::max);
        for (index, ((_, color), value)) in colors.iter().zip(&medians).enumerate() {
            let Some(value) = value else {
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
