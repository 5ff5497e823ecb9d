//! `/metrics` scraped as Prometheus would, and parsed by the official Prometheus client's
//! OpenMetrics parser (Debian's python3-prometheus-client), not by anything of ours.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{agent::HEALTH_PORT, netns::Netns, wait::wait_for};

/// Debian's interpreter, whose packages include the parser; a python3 earlier on PATH (a
/// pyenv one, say) would not see them.
const PYTHON: &str = "/usr/bin/python3";

const PARSE: &str = "
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
print(json.dumps([
    {'name': sample.name, 'labels': sample.labels, 'value': repr(sample.value)}
    for family in text_string_to_metric_families(sys.stdin.read())
    for sample in family.samples
]))
";

/// One sample: a metric name, its labels, its value.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample `/metrics` on `port` in `netns` serves.
pub fn scrape(netns: &Netns, port: u16) -> Result<Vec<Sample>> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let exposition = netns.exec(&["curl", "-sf", &url])?;
    eprintln!("{exposition}");
    let parsed = parse(&exposition).with_context(|| format!("the exposition:\n{exposition}"))?;
    Ok(parsed)
}

fn parse(exposition: &str) -> Result<Vec<Sample>> {
    let mut parser = std::process::Command::new(PYTHON)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {PYTHON}: `cargo xtask setup` installs it"))?;
    std::io::Write::write_all(
        parser.stdin.as_mut().context("the parser has no stdin")?,
        exposition.as_bytes(),
    )?;
    let output = parser.wait_with_output()?;
    ensure!(
        output.status.success(),
        "the OpenMetrics parser rejected /metrics: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let samples: Vec<Value> = serde_json::from_slice(&output.stdout)?;
    samples.iter().map(sample).collect()
}

fn sample(value: &Value) -> Result<Sample> {
    let labels = value["labels"]
        .as_object()
        .context("labels are not an object")?
        .iter()
        .map(|(key, value)| (key.clone(), value.as_str().unwrap_or_default().to_string()))
        .collect();
    Ok(Sample {
        name: value["name"].as_str().context("no name")?.to_string(),
        labels,
        value: value["value"]
            .as_str()
            .context("no value")?
            .parse()
            .context("the value is not a number")?,
    })
}

/// The value of the sample `name` whose labels include every one of `labels`.
pub fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.iter().any(|(k, v)| k == key && v == value))
        })
        .map(|sample| sample.value)
}

/// How long [`settled_rounds`] waits for the count to stop moving.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The rounds of `scopes` (`overlay_reconcile_duration_seconds_count{scope=...}`, summed) the
/// agent in `netns`, serving metrics on the tests' health port, has made.
pub fn rounds(netns: &Netns, scopes: &[&str]) -> Result<f64> {
    let samples = scrape(netns, HEALTH_PORT)?;
    Ok(scopes
        .iter()
        .filter_map(|scope| {
            value_of(
                &samples,
                "overlay_reconcile_duration_seconds_count",
                &[("scope", scope)],
            )
        })
        .sum())
}

/// The rounds about the leases or the node (scopes `leases` and `node`) the agent in
/// `netns` has made, once two scrapes half a second apart agree: the count of a quiet agent.
pub fn settled_rounds(netns: &Netns) -> Result<f64> {
    let about_leases_or_node = || rounds(netns, &["leases", "node"]);
    let mut last = about_leases_or_node()?;
    let mut settled = None;
    wait_for("the agent's rounds to settle", SETTLE_TIMEOUT, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = about_leases_or_node()?;
        settled = (now == last).then_some(now);
        last = now;
        Ok(settled.is_some())
    })?;
    settled.context("the rounds never settled")
}
