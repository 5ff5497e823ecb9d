//! `overlay-bench --quick` runs every row in two interleaved rounds (the control plane in two
//! rounds of its own) and writes its report;
//! this checks the report's shape (every figure for every mode it applies to, each ratio's
//! median and interquartile range over at least two rounds), never how large a figure is.
//! `--only` runs the rows it names and nothing else; `--quick` builds the clusters afresh for
//! each round, and `--rebuild-every 0` is refused. The modes run in a shuffled order that
//! `--seed` repeats. The microbench times every row at both lease counts, each run on its
//! row's path (it fails otherwise), and `--only` keeps the rows it names. The profiler, run
//! over the microbench, attributes the program's samples to its source lines and the helpers
//! it calls.
use std::process::Command;

use anyhow::{Context, Result, ensure};
use overlay_tests::{require_root, scratch::ScratchDir};

/// The throughput rows measured again over IPv6, in every mode.
const IPV6_FIGURES: [&str; 8] = [
    "TCP throughput, 1 stream, IPv6",
    "CPU cost, IPv6",
    "TCP throughput, 4 streams, IPv6",
    "CPU cost, 4 streams, IPv6",
    "TCP throughput, 1 stream, pinned, IPv6",
    "TCP throughput, 4 streams, pinned, IPv6",
    "64-byte UDP received, IPv6",
    "64-byte UDP sent, IPv6",
];
/// Each ratio, with the mode under the line.
const RATIOS: [(&str, &str); 2] = [
    ("ebpf_over_kernel", "kernel"),
    ("ebpf_over_host_gw", "host-gw"),
];

/// overlay-bench with `args`, its report in a scratch directory: (report.json, report.md).
fn bench(args: &[&str]) -> Result<(serde_json::Value, String, ScratchDir)> {
    let (out, _) = run_writing_to_scratch(env!("CARGO_BIN_EXE_overlay-bench"), args)?;
    let report = serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json"))?)?;
    let markdown = std::fs::read_to_string(out.path().join("report.md"))?;
    Ok((report, markdown, out))
}

/// Runs `binary args... --out <a scratch directory>`, which must succeed; returns the
/// directory and what the binary printed.
fn run_writing_to_scratch(binary: &str, args: &[&str]) -> Result<(ScratchDir, String)> {
    let out = ScratchDir::new("bench")?;
    let output = Command::new(binary)
        .args(args)
        .arg("--out")
        .arg(out.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "{binary} {args:?} failed: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((out, stdout))
}

/// Asserts `spread` holds a finite median inside a finite interquartile range.
fn assert_spread(spread: &serde_json::Value, what: &str) {
    let value = |key: &str| spread[key].as_f64().filter(|value| value.is_finite());
    let (Some(q1), Some(median), Some(q3)) = (value("q1"), value("median"), value("q3")) else {
        panic!("{what} has no median and interquartile range: {spread}");
    };
    assert!(
        q1 <= median && median <= q3,
        "{what}'s median is outside its interquartile range: {spread}"
    );
}

/// Which ratios a figure must have.
#[derive(Clone, Copy)]
enum Ratios {
    Always,
    /// Not where the other mode measured 0 in every round (a quick run's idle CPU: an agent
    /// may not run at all in 1 s).
    WhereDivisible,
}

/// Asserts the shape of an interleaved `figure` over `rounds` rounds: every mode's median
/// and spread, the ratios' median and IQR as `ratios` says, rounds kept.
fn assert_interleaved(figure: &serde_json::Value, name: &str, rounds: u64, ratios: Ratios) {
    let kept = figure["rounds_kept"].as_u64().unwrap_or(0);
    let dropped = figure["rounds_dropped"].as_u64().unwrap_or(0);
    // A round the hypervisor stole too much of is left out by design (and counted); one kept
    // round still gives every figure, a degenerate spread included.
    assert!(
        kept >= 1 && kept + dropped == rounds,
        "{name}: {kept} round(s) kept, {dropped} dropped of {rounds}: {figure}"
    );
    let ebpf_only = name.starts_with("eBPF ");
    let modes: &[&str] = if ebpf_only {
        &["ebpf"]
    } else {
        &["ebpf", "kernel", "host-gw"]
    };
    for mode in modes {
        assert!(
            figure["values"][mode].as_f64().is_some_and(f64::is_finite),
            "{name} has no {mode} median: {figure}"
        );
        assert_spread(&figure["spread"][mode], &format!("{name} in {mode}"));
    }
    for (ratio, under) in RATIOS {
        let rounds = figure["rounds"].as_array().map_or(&[][..], Vec::as_slice);
        let divisible = match ratios {
            Ratios::Always => true,
            Ratios::WhereDivisible => rounds
                .iter()
                .any(|round| round[under].as_f64() != Some(0.0)),
        };
        if ebpf_only {
            assert!(figure[ratio].is_null(), "{name} has a {ratio}: {figure}");
        } else if divisible {
            assert_spread(&figure[ratio], &format!("{name}'s {ratio}"));
        }
    }
}

#[test]
fn the_quick_benchmark_produces_every_figure() -> Result<()> {
    require_root()?;
    let (report, markdown, out) = bench(&["--quick"])?;
    let rounds = report["rounds"].as_u64().context("no round count")?;
    assert!(rounds >= 2, "--quick ran {rounds} round(s)");
    assert_eq!(
        report["builds"].as_u64(),
        Some(rounds),
        "--quick builds the clusters afresh for every round: {report:#}"
    );
    assert!(report["seed"].as_u64().is_some(), "no seed: {report:#}");
    assert!(
        report["runs_dropped"].as_u64().is_some(),
        "no dropped runs count"
    );
    let control_rounds = report["control_rounds"]
        .as_u64()
        .context("no control plane round count")?;
    assert!(
        control_rounds >= 2,
        "--quick ran {control_rounds} control plane round(s)"
    );
    let figures = report["figures"].as_array().context("no figures")?;
    assert_eq!(figures.len(), 33, "{report:#}");
    for figure in figures {
        let name = figure["figure"].as_str().context("unnamed figure")?;
        if figure["row"] == "control-plane" {
            assert_interleaved(figure, name, control_rounds, Ratios::WhereDivisible);
        } else {
            assert_interleaved(figure, name, rounds, Ratios::Always);
        }
    }
    assert!(markdown.contains(&format!("(seed {}; ", report["seed"])));
    assert!(markdown.contains("| figure | row | unit | ebpf | kernel | host-gw | ebpf/kernel | IQR | ebpf/host-gw | IQR | rounds kept/dropped |"));
    let chart = std::fs::read_to_string(out.path().join("chart.svg"))?;
    assert!(chart.starts_with("<svg"));
    for name in IPV6_FIGURES {
        assert!(
            figures.iter().any(|figure| figure["figure"] == name),
            "report.json has no {name} row"
        );
        assert!(
            markdown.contains(&format!("| {name} |")),
            "report.md has no {name} row"
        );
        assert!(
            chart.contains(&format!(">{name} (")),
            "chart.svg has no {name}"
        );
    }
    Ok(())
}

#[test]
fn only_runs_the_rows_it_names() -> Result<()> {
    require_root()?;
    let (report, _, _out) = bench(&["--quick", "--only", "latency-pinned,tcp1"])?;
    let figures = report["figures"].as_array().context("no figures")?;
    let names: Vec<&str> = figures
        .iter()
        .filter_map(|figure| figure["figure"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "TCP throughput, 1 stream",
            "CPU cost",
            "Latency p50, both ends on CPU 0",
            "Latency p99, both ends on CPU 0",
        ]
    );
    for (figure, name) in figures.iter().zip(names) {
        assert_interleaved(figure, name, 2, Ratios::Always);
    }

    let error = refusal(&["--only", "tcp1,tcp5"])?;
    assert!(
        error.contains(r#"unknown row "tcp5""#)
            && error.contains("tcp4-pinned-v6")
            && error.contains("control-plane"),
        "the error names the rows: {error}"
    );
    let error = refusal(&["--rebuild-every", "0"])?;
    assert!(
        error.contains("--rebuild-every must be at least 1"),
        "the error names the flag: {error}"
    );
    let error = refusal(&[
        "--compare",
        "/nonexistent/first.json",
        "/nonexistent/second.json",
    ])?;
    assert!(
        error.contains("cannot read the report /nonexistent/first.json"),
        "the error names the report: {error}"
    );
    let error = refusal(&["--quick", "--compare", "first.json", "second.json"])?;
    assert!(
        error.contains("--compare takes two reports and nothing else"),
        "a run's flags beside --compare are refused: {error}"
    );
    Ok(())
}

/// The modes of `row` in the order a run with `seed` ran them, round after round, from its
/// progress lines ("   latency-pinned ebpf: 8.68 µs, 10.38 µs").
fn order_of_modes(row: &str, seed: &str) -> Result<Vec<Vec<String>>> {
    const ROUNDS: usize = 4;
    let (_out, stdout) = run_writing_to_scratch(
        env!("CARGO_BIN_EXE_overlay-bench"),
        &[
            "--quick",
            "--only",
            row,
            "--rounds",
            &ROUNDS.to_string(),
            "--rebuild-every",
            &ROUNDS.to_string(),
            "--seed",
            seed,
        ],
    )?;
    let modes: Vec<String> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix(&format!("   {row} ")))
        // A run dropped for stolen CPU time is run again in its place.
        .filter(|rest| !rest.contains(": dropped,"))
        .filter_map(|rest| rest.split_once(':').map(|(mode, _)| mode.to_string()))
        .collect();
    ensure!(
        modes.len() == ROUNDS * 3,
        "{ROUNDS} rounds of 3 modes each, no round left out:\n{stdout}"
    );
    Ok(modes.chunks(3).map(<[String]>::to_vec).collect())
}

/// The modes run in a shuffled order, round by round, and `--seed` repeats that order: two
/// runs with one seed run the modes in the same order in every round.
#[test]
fn a_seed_repeats_the_shuffled_order_of_the_modes() -> Result<()> {
    require_root()?;
    let first = order_of_modes("latency-pinned", "7")?;
    let again = order_of_modes("latency-pinned", "7")?;
    ensure!(
        first == again,
        "--seed 7 ran the modes in {first:?}, then in {again:?}"
    );
    // Four rounds in one order by chance: 1 in 216.
    ensure!(
        first.iter().any(|round| round != &first[0]),
        "the modes ran in one order in every round: {first:?}"
    );
    Ok(())
}

/// What overlay-bench says on stderr when it refuses `args`; panics if it takes them.
fn refusal(args: &[&str]) -> Result<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
        .args(args)
        .output()?;
    assert!(!output.status.success(), "overlay-bench took {args:?}");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The rows of `overlay-microbench args...`'s table (its `microbench.md`): (program, frame,
/// leases).
fn microbench(args: &[&str]) -> Result<Vec<(String, String, String)>> {
    let (out, _) = run_writing_to_scratch(env!("CARGO_BIN_EXE_overlay-microbench"), args)?;
    let table = std::fs::read_to_string(out.path().join("microbench.md"))?;
    Ok(table
        .lines()
        .skip(2)
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let [_, program, frame, leases, ..] = cells.as_slice() else {
                return None;
            };
            Some((program.to_string(), frame.to_string(), leases.to_string()))
        })
        .collect())
}

#[test]
fn the_microbench_times_every_row_at_both_lease_counts_and_only_those_asked() -> Result<()> {
    require_root()?;
    let every = microbench(&["--samples", "20"])?;
    let at = |leases: &str| -> Vec<(&str, &str)> {
        every
            .iter()
            .filter(|row| row.2 == leases)
            .map(|(program, frame, _)| (program.as_str(), frame.as_str()))
            .collect()
    };
    let (two, many) = (at("2"), at("10,000"));
    ensure!(
        !two.is_empty() && two == many && two.len() * 2 == every.len(),
        "every row once with 2 leases and once with 10,000: {every:?}"
    );
    let arp = microbench(&["--only", "ARP", "--samples", "20"])?;
    let expected: Vec<_> = every.iter().filter(|row| row.1.contains("ARP")).collect();
    ensure!(
        !expected.is_empty() && arp.iter().collect::<Vec<_>>() == expected,
        "--only ARP gave {arp:?}"
    );
    Ok(())
}

/// overlay-profile over the microbench's 64-byte UDP rows: the program they run gets a
/// section, with samples of its own instructions on the eBPF crate's lines, samples in the
/// helper that makes room for the outer headers, charged to the call in `encap`, and none of
/// its functions taken for a kernel function it called.
#[test]
fn the_profile_charges_a_program_s_samples_to_its_lines_and_the_helpers_it_calls() -> Result<()> {
    require_root()?;
    let out = ScratchDir::new("profile")?;
    let output = Command::new(env!("CARGO_BIN_EXE_overlay-profile"))
        .arg("--out")
        .arg(out.path())
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_overlay-microbench"))
        // Both families: IPv6 encapsulation is a function of its own, and the rows load the
        // programs twice, with maps of two sizes.
        .args(["--only", "64-byte UDP", "--samples", "150000"])
        .arg("--out")
        .arg(out.path())
        .output()?;
    ensure!(
        output.status.success(),
        "overlay-profile failed: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let profile = std::fs::read_to_string(out.path().join("profile.md"))?;
    let section = profile
        .split("\n## ")
        .find(|section| section.starts_with("tc_container_ingress: "))
        .with_context(|| format!("no section for tc_container_ingress:\n{profile}"))?;
    ensure!(
        section.contains("| own instructions | overlay-ebpf/src/"),
        "no own instruction on an eBPF source line:\n{section}"
    );
    // The call is inlined from aya's helper binding, after the line of ours that made it.
    ensure!(
        section
            .lines()
            .any(|row| row.contains("| calls `bpf_skb_adjust_room` |")
                && row.contains(", after overlay-ebpf/src/encap/")),
        "no sample in adjust_room charged to encap's call:\n{section}"
    );
    // A function of a loaded program is charged by its own lines, never as a callee.
    ensure!(
        !section.contains("| calls `bpf_prog_"),
        "a function of the program taken for a kernel function:\n{section}"
    );
    Ok(())
}
