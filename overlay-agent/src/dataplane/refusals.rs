//! Naming refusals in the log: a container claiming a neighbour's address or MAC, or sending
//! VXLAN, and VXLAN that went around the uplink's checks are counted by the programs; the
//! agent also says so, once per look, with how many and where to see each.
use std::{path::PathBuf, time::Duration};

use overlay_common::{Counter, Counters};

use super::pins::PinnedDataplane;

/// How often the agent looks for refused frames to name in its log.
const REFUSALS_INTERVAL: Duration = Duration::from_secs(2);

/// The counters of frames someone on this host, or a sender we did not check, tried to slip
/// past the checks.
const REFUSALS: [Counter; 9] = [
    Counter::TxSpoofedSource,
    Counter::TxIpv6SpoofedSource,
    Counter::TxSpoofedMac,
    Counter::TxVxlanFromContainer,
    Counter::TxVlan,
    Counter::TxUnexpectedFrame,
    Counter::TxIpv6Unchecked,
    Counter::TxRouterMessage,
    Counter::RxUncheckedVxlan,
];

/// The refusal counts at the last look.
#[derive(Default)]
pub struct RefusalWatch {
    seen: Option<Counters>,
}

impl RefusalWatch {
    /// One warning per refusal counter that grew since the last call. The first call only
    /// takes note: what an earlier run refused was reported by that run.
    pub fn warnings(&mut self, counters: &Counters) -> Vec<String> {
        let warnings = match &self.seen {
            Some(seen) => REFUSALS
                .iter()
                .filter(|counter| counters.get(**counter) > seen.get(**counter))
                .map(|counter| {
                    format!(
                        "refused {} frame(s) as {} (`overlay-agent monitor` shows each)",
                        counters.get(*counter) - seen.get(*counter),
                        counter.name()
                    )
                })
                .collect(),
            None => Vec::new(),
        };
        self.seen = Some(*counters);
        warnings
    }
}

/// Names the refusals of the dataplane pinned in `pin_dir` in the log, every two seconds, for
/// as long as it is polled.
pub async fn warn_about_refusals(pin_dir: PathBuf) {
    let mut watch = RefusalWatch::default();
    let mut ticks = tokio::time::interval(REFUSALS_INTERVAL);
    loop {
        ticks.tick().await;
        match PinnedDataplane::open(&pin_dir).and_then(|pinned| pinned.counters()) {
            Ok(counters) => {
                for warning in watch.warnings(&counters) {
                    log::warn!("{warning}");
                }
            }
            Err(error) => log::debug!("cannot read the counters: {error:#}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_growth_since_the_last_look_is_reported() {
        let mut watch = RefusalWatch::default();
        let earlier = Counters {
            tx_spoofed_mac: 4,
            ..Counters::default()
        };
        assert!(watch.warnings(&earlier).is_empty());
        let now = Counters {
            tx_spoofed_mac: 4,
            tx_spoofed_source: 2,
            rx_delivered: 100,
            ..Counters::default()
        };
        assert_eq!(
            watch.warnings(&now),
            ["refused 2 frame(s) as tx_spoofed_source (`overlay-agent monitor` shows each)"]
        );
        assert!(watch.warnings(&now).is_empty());
    }
}
