//! `overlay-agent`: the node daemon. All logic lives in the library.
use std::process::ExitCode;

use clap::Parser;
use overlay_agent::options::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.agent.verbosity);
    match overlay_agent::run(cli.agent).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `-v` sets the level, as flanneld's glog verbosity does; RUST_LOG, when set, wins.
fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or(format!("overlay_agent={level},warn")),
    )
    .format_timestamp_millis()
    .init();
}
