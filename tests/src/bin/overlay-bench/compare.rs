//! `overlay-bench --compare FIRST SECOND`: two reports' ratios side by side, the ones whose
//! interquartile ranges lie apart, and how many two runs of the same code would leave apart
//! by chance with the same round counts. Whether two runs "agree" is then a measured claim:
//! with 4 rounds, a ratio's IQRs lie apart in about one pair of identical runs in four.
use std::path::Path;

use anyhow::{Context, Result};
use overlay_tests::random::Random;

use crate::figures::Spread;

/// The ratios a report may hold, as report.json names them, with the mode under the line.
const RATIOS: [(&str, &str); 2] = [
    ("ebpf_over_kernel", "kernel"),
    ("ebpf_over_host_gw", "host-gw"),
];
/// Pairs of samples drawn to estimate each chance: its standard error stays under 0.5 %.
const DRAWS: usize = 10_000;

/// One figure's ratio in one report.
struct Ratio {
    name: String,
    spread: Spread,
    /// The per-round ratios the spread was taken over.
    rounds: usize,
}

/// One ratio in both reports.
struct Pair {
    name: String,
    first: Spread,
    second: Spread,
    /// The chance that two runs of one distribution, with these round counts, leave their
    /// IQRs apart.
    chance_apart: f64,
}

impl Pair {
    fn apart(&self) -> bool {
        iqrs_apart(&self.first, &self.second)
    }
}

pub fn run(first: &Path, second: &Path) -> Result<()> {
    let pairs = pairs(&read(first)?, &read(second)?, &mut Random(0x5eed))?;
    print!("{}", table(&pairs, first, second));
    Ok(())
}

fn read(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the report {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The ratios both reports hold, in the first one's order.
fn pairs(
    first: &serde_json::Value,
    second: &serde_json::Value,
    random: &mut Random,
) -> Result<Vec<Pair>> {
    let theirs = ratios(second)?;
    Ok(ratios(first)?
        .into_iter()
        .filter_map(|ours| {
            let other = theirs.iter().find(|other| other.name == ours.name)?;
            Some(Pair {
                chance_apart: chance_apart(ours.rounds, other.rounds, random),
                name: ours.name,
                first: ours.spread,
                second: other.spread,
            })
        })
        .collect())
}

/// Every ratio of a report.json, named "<figure>, ebpf/<mode>".
fn ratios(report: &serde_json::Value) -> Result<Vec<Ratio>> {
    let figures = report["figures"]
        .as_array()
        .context("the report has no figures")?;
    let mut ratios = Vec::new();
    for figure in figures {
        let name = figure["figure"].as_str().context("a figure has no name")?;
        let rounds = figure["rounds"].as_array().map_or(&[][..], Vec::as_slice);
        for (key, under) in RATIOS {
            let spread = &figure[key];
            let value = |quartile: &str| spread[quartile].as_f64();
            let (Some(median), Some(q1), Some(q3)) = (value("median"), value("q1"), value("q3"))
            else {
                continue;
            };
            let divisible = rounds
                .iter()
                .filter(|round| round["ebpf"].is_f64() && round[under].as_f64() != Some(0.0))
                .count();
            ratios.push(Ratio {
                name: format!("{name}, ebpf/{under}"),
                spread: Spread { median, q1, q3 },
                rounds: divisible,
            });
        }
    }
    Ok(ratios)
}

fn iqrs_apart(first: &Spread, second: &Spread) -> bool {
    first.q3 < second.q1 || second.q3 < first.q1
}

/// The share of `DRAWS` pairs of samples, `first` and `second` values each from one normal
/// distribution, whose interquartile ranges lie apart. The shape matters little: at 4 rounds
/// each, simulated apart, uniform draws give 25 %, normal 23.5 %, exponential 23 %, a
/// t-distribution of 3 degrees 22 %; at 10 rounds, all of them 3.5 %.
fn chance_apart(first: usize, second: usize, random: &mut Random) -> f64 {
    if first == 0 || second == 0 {
        return 0.0;
    }
    let mut sample = |count: usize| {
        let values = (0..count).map(|_| normal(random)).collect();
        Spread::of(values).expect("count is not 0")
    };
    let apart = (0..DRAWS)
        .filter(|_| iqrs_apart(&sample(first), &sample(second)))
        .count();
    apart as f64 / DRAWS as f64
}

/// A standard normal value (Box-Muller).
fn normal(random: &mut Random) -> f64 {
    // In (0, 1], from the top 53 bits: ln(0) is not a number.
    let mut uniform = || ((random.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let (radius, angle) = (uniform(), uniform());
    (-2.0 * radius.ln()).sqrt() * (std::f64::consts::TAU * angle).cos()
}

/// The comparison as Markdown: a row per ratio, then the count apart against the count
/// identical runs would give.
fn table(pairs: &[Pair], first: &Path, second: &Path) -> String {
    let shown =
        |spread: &Spread| format!("{:.2} ({:.2}–{:.2})", spread.median, spread.q1, spread.q3);
    let mut text = format!(
        "| ratio | {} | {} | IQRs apart | chance apart for identical runs |\n|---|---|---|---|---|\n",
        first.display(),
        second.display()
    );
    for pair in pairs {
        text.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} % |\n",
            pair.name,
            shown(&pair.first),
            shown(&pair.second),
            if pair.apart() { "**apart**" } else { "no" },
            pair.chance_apart * 100.0
        ));
    }
    let apart = pairs.iter().filter(|pair| pair.apart()).count();
    let expected: f64 = pairs.iter().map(|pair| pair.chance_apart).sum();
    let none_apart: f64 = pairs.iter().map(|pair| 1.0 - pair.chance_apart).product();
    text.push_str(&format!(
        "\n{apart} of {} ratios have IQRs apart. Two runs of identical code with these round \
         counts would leave {expected:.1} apart on average, and none apart with a chance of \
         {:.0} % (were the ratios independent).\n",
        pairs.len(),
        none_apart * 100.0
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chance_of_iqrs_apart_falls_with_the_rounds() {
        let mut random = Random(7);
        let four = chance_apart(4, 4, &mut random);
        let ten = chance_apart(10, 10, &mut random);
        // 200,000 pairs of normal draws in Python gave 0.231 and 0.034.
        assert!((0.21..0.25).contains(&four), "4 rounds: {four}");
        assert!((0.025..0.045).contains(&ten), "10 rounds: {ten}");
        // One round each: two points, apart unless equal.
        assert_eq!(chance_apart(1, 1, &mut random), 1.0);
        assert_eq!(chance_apart(0, 4, &mut random), 0.0);
    }

    fn report(figures: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "figures": figures })
    }

    #[test]
    fn ratios_are_matched_by_figure_and_mode_and_apart_only_when_their_iqrs_do_not_meet() {
        let rounds = serde_json::json!([
            {"ebpf": 2.0, "kernel": 1.0, "host-gw": 1.0},
            {"ebpf": 2.0, "kernel": 1.0, "host-gw": 1.0},
            {"ebpf": 2.0, "kernel": 1.0, "host-gw": 0.0},
            {"ebpf": 2.0, "kernel": 1.0, "host-gw": 0.0}
        ]);
        let first = report(serde_json::json!([
            {"figure": "Start to ready", "rounds": rounds,
             "ebpf_over_kernel": {"median": 3.2, "q1": 3.1, "q3": 3.3},
             "ebpf_over_host_gw": {"median": 1.0, "q1": 0.9, "q3": 1.1}},
            {"figure": "Only here", "rounds": rounds,
             "ebpf_over_kernel": {"median": 1.0, "q1": 1.0, "q3": 1.0}},
            {"figure": "eBPF encapsulation", "rounds": [], "ebpf_over_kernel": null}
        ]));
        let second = report(serde_json::json!([
            {"figure": "Start to ready", "rounds": rounds,
             "ebpf_over_kernel": {"median": 3.2, "q1": 3.3, "q3": 3.4},
             "ebpf_over_host_gw": {"median": 1.3, "q1": 1.2, "q3": 1.4}}
        ]));
        let pairs = pairs(&first, &second, &mut Random(7)).unwrap();
        let found: Vec<(&str, bool)> = pairs
            .iter()
            .map(|pair| (pair.name.as_str(), pair.apart()))
            .collect();
        assert_eq!(
            found,
            [
                ("Start to ready, ebpf/kernel", false),
                ("Start to ready, ebpf/host-gw", true),
            ]
        );
        // host-gw measured 0 in two rounds: those two rounds give no ratio.
        let chances: Vec<f64> = pairs.iter().map(|pair| pair.chance_apart).collect();
        assert!(chances[0] > 0.2 && chances[1] > 0.5, "{chances:?}");
        let text = table(&pairs, Path::new("a.json"), Path::new("b.json"));
        assert!(
            text.contains(
                "| Start to ready, ebpf/host-gw | 1.00 (0.90–1.10) | 1.30 (1.20–1.40) | **apart** |"
            ),
            "{text}"
        );
        assert!(text.contains("\n1 of 2 ratios have IQRs apart."), "{text}");
    }
}
