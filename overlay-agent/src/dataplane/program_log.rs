//! `--bpf-log`: the programs' aya-log lines, forwarded to the agent's own log.
use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};
use aya_log::{EbpfLogger, Level};
use tokio::io::{Interest, unix::AsyncFd};

/// Sets the level the programs log at: every line with `enabled`, none without. The level is a
/// read-only global, so with logging off the verifier removes the logging code itself.
pub fn set_level(loader: &mut EbpfLoader, enabled: bool) {
    const EVERY_LINE: u8 = Level::Trace as u8;
    const NO_LINE: u8 = 0;
    loader.override_global(
        aya_log::LEVEL,
        if enabled { &EVERY_LINE } else { &NO_LINE },
        true,
    );
}

/// Reads the programs' log ring buffer for as long as the agent runs.
pub fn forward(ebpf: &mut Ebpf) -> Result<()> {
    let logger = EbpfLogger::init(ebpf).context("the eBPF object has no aya-log ring buffer")?;
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, for as long as
    // the AsyncFd holds it.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("cannot poll the aya-log ring buffer")?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(error) => {
                    log::error!("the eBPF programs' log stopped: {error}");
                    return;
                }
            }
        }
    });
    Ok(())
}
