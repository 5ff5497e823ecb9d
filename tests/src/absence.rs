//! Proof that something did not arrive. A sleep proves nothing: the frame may still be on its
//! way, or the capture may not be watching. So after what must not arrive, a control ping
//! that must arrive goes the same way, and only once the capture has seen it does the test
//! look at what else it saw.
use anyhow::{Result, ensure};

use crate::{capture::Sniffer, netns::Netns};

/// The control ping's payload, a size no other test traffic has: tcpdump reports its ICMP
/// length, 8 more, as `length 230`.
const CONTROL_PAYLOAD: &str = "222";
const CONTROL_MARK: &str = "length 230";

/// Sends one control ping from `from` to `destination`; whether it is answered does not
/// matter, only that the capture sees it.
pub fn send_control_ping(from: &Netns, destination: &str) -> Result<()> {
    let family = if destination.contains(':') {
        "-6"
    } else {
        "-4"
    };
    from.exec_unchecked(&[
        "ping",
        family,
        "-n",
        "-c",
        "1",
        "-W",
        "1",
        "-s",
        CONTROL_PAYLOAD,
        destination,
    ])?;
    Ok(())
}

/// What `sniffer` saw besides a control ping from `from` to `destination`, sent (again every
/// 200 ms) after the test's own traffic until the sniffer sees it.
pub fn seen_besides_control(
    sniffer: Sniffer,
    from: &Netns,
    destination: &str,
) -> Result<Vec<String>> {
    let seen = sniffer.stop_once_seen(CONTROL_MARK, || send_control_ping(from, destination))?;
    Ok(seen
        .into_iter()
        .filter(|line| !line.contains(CONTROL_MARK))
        .collect())
}

/// Fails if `sniffer` saw anything before a control ping from `from` to `destination` arrived
/// on the path it watches; `watched` names that path in the error.
pub fn assert_nothing_but_control(
    sniffer: Sniffer,
    from: &Netns,
    destination: &str,
    watched: &str,
) -> Result<()> {
    let seen = seen_besides_control(sniffer, from, destination)?;
    ensure!(
        seen.is_empty(),
        "{watched} received, besides the control ping from {} to {destination}: {seen:#?}",
        from.name()
    );
    Ok(())
}
