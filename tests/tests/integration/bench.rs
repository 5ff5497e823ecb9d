//! `overlay-bench --quick` runs every measurement once and writes its report; this checks that
//! every figure was produced for every mode it applies to, IPv6's throughput included, never
//! how large it is.
use std::process::Command;

use anyhow::{Context, Result};
use overlay_tests::{require_root, scratch::ScratchDir};

/// The throughput rows measured again over IPv6, in every mode.
const IPV6_FIGURES: [&str; 5] = [
    "TCP throughput, 1 stream, IPv6",
    "CPU cost, IPv6",
    "TCP throughput, 4 streams, IPv6",
    "64-byte UDP received, IPv6",
    "64-byte UDP sent, IPv6",
];

#[test]
fn the_quick_benchmark_produces_every_figure() -> Result<()> {
    require_root()?;
    let out = ScratchDir::new("bench")?;
    let status = Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
        .args(["--quick", "--out"])
        .arg(out.path())
        .status()?;
    assert!(status.success(), "overlay-bench --quick failed: {status}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json"))?)?;
    let figures = report["figures"].as_array().context("no figures")?;
    assert_eq!(figures.len(), 22, "{report:#}");
    for figure in figures {
        let name = figure["figure"].as_str().context("unnamed figure")?;
        let modes: &[&str] = if name.starts_with("eBPF ") {
            &["ebpf"]
        } else {
            &["ebpf", "kernel", "host-gw"]
        };
        for mode in modes {
            let value = figure["values"][mode].as_f64();
            assert!(
                value.is_some_and(f64::is_finite),
                "{name} has no {mode} figure: {figure}"
            );
        }
    }
    let markdown = std::fs::read_to_string(out.path().join("report.md"))?;
    assert!(
        markdown
            .contains("| figure | unit | ebpf | kernel | host-gw | ebpf/kernel | ebpf/host-gw |")
    );
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
