//! Every figure's values round by round, and what the report makes of them: each mode's
//! median, and the median and interquartile range of the per-round ratios.
use std::collections::BTreeMap;

use crate::{Mode, rows::FigureSpec};

/// Median and quartiles of some values.
#[derive(Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
}

impl Spread {
    /// None for no values; quartiles interpolate between neighbours, so two values give a
    /// range between them and one value a range of none.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Self {
            median: quantile(&values, 0.5),
            q1: quantile(&values, 0.25),
            q3: quantile(&values, 0.75),
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "median": self.median, "q1": self.q1, "q3": self.q3 })
    }
}

/// The value `share` of the way up `sorted`, interpolated between neighbours; `sorted` must
/// not be empty.
pub fn quantile(sorted: &[f64], share: f64) -> f64 {
    let at = (sorted.len() - 1) as f64 * share;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
}

pub struct Figure {
    pub name: String,
    /// The row (`--only` name) that measures it.
    pub row: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Each kept round's value per mode.
    pub rounds: Vec<BTreeMap<&'static str, f64>>,
    /// Rounds left out because a run of theirs kept being stolen from.
    pub dropped: usize,
}

impl Figure {
    fn values(&self, mode: &str) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|round| round.get(mode).copied())
            .collect()
    }

    pub fn spread(&self, mode: &str) -> Option<Spread> {
        Spread::of(self.values(mode))
    }

    pub fn modes(&self) -> impl Iterator<Item = &'static str> + '_ {
        crate::MODES
            .iter()
            .map(|mode| mode.name())
            .filter(|mode| !self.values(mode).is_empty())
    }

    /// ebpf's value over `other`'s, round by round: their median and quartiles.
    pub fn ratio(&self, other: Mode) -> Option<Spread> {
        let ratios = self
            .rounds
            .iter()
            .filter_map(|round| {
                let ours = round.get(Mode::Ebpf.name())?;
                let theirs = round.get(other.name())?;
                (*theirs != 0.0).then(|| ours / theirs)
            })
            .collect();
        Spread::of(ratios)
    }
}

/// The figures in the order they were first recorded, which is the report's.
#[derive(Default)]
pub struct Figures(pub Vec<Figure>);

impl Figures {
    /// One round of `spec`'s figure: a value per mode that ran it.
    pub fn record_round(
        &mut self,
        spec: &FigureSpec,
        row: &'static str,
        round: BTreeMap<&'static str, f64>,
    ) {
        self.figure(spec, row).rounds.push(round);
    }

    /// A round of `spec`'s figure left out.
    pub fn record_dropped(&mut self, spec: &FigureSpec, row: &'static str) {
        self.figure(spec, row).dropped += 1;
    }

    fn figure(&mut self, spec: &FigureSpec, row: &'static str) -> &mut Figure {
        let index = match self.0.iter().position(|figure| figure.name == spec.name) {
            Some(index) => index,
            None => {
                self.0.push(Figure {
                    name: spec.name.clone(),
                    row,
                    unit: spec.unit,
                    higher_is_better: spec.higher_is_better,
                    rounds: Vec::new(),
                    dropped: 0,
                });
                self.0.len() - 1
            }
        };
        &mut self.0[index]
    }
}

#[cfg(test)]
mod tests {
    use super::Spread;

    #[test]
    fn quartiles_interpolate_between_neighbours() {
        let spread = Spread::of(vec![4.0, 1.0, 3.0, 2.0, 5.0]).unwrap();
        assert_eq!((spread.q1, spread.median, spread.q3), (2.0, 3.0, 4.0));
        let spread = Spread::of(vec![1.0, 2.0]).unwrap();
        assert_eq!((spread.q1, spread.median, spread.q3), (1.25, 1.5, 1.75));
        assert!(Spread::of(Vec::new()).is_none());
    }
}
