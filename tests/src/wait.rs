//! Polling for a condition a user would wait for, with a deadline that fails the test.
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

const POLL: Duration = Duration::from_millis(50);

/// What the README promises for a repair of something deleted by hand or lost in a flap; they
/// took 2-110 ms here, up to 300 ms with three busy loops on the two CPUs.
pub const WITHIN_A_SECOND: Duration = Duration::from_secs(1);

/// Polls `condition` until it holds or `timeout` passes; `what` names the wait in the error.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}
