//! Naming refusals in the log: a container claiming a neighbour's address or MAC, or sending
//! VXLAN, and VXLAN that went around the uplink's checks are counted by the programs; the
//! agent also says so, once per look, with how many and where to see each.
use overlay_common::{Counter, Counters};

/// The counters of frames someone on this host, or a sender we did not check, tried to slip
/// past the checks.
const REFUSALS: [Counter; 5] = [
    Counter::TxSpoofedSource,
    Counter::TxIpv6SpoofedSource,
    Counter::TxSpoofedMac,
    Counter::TxVxlanFromContainer,
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
