//! `overlay-agent`: the node daemon. All logic lives in the library.
use std::process::ExitCode;

use overlay_agent::options::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_flanneld_style(std::env::args_os()).unwrap_or_else(|error| error.exit());
    let outcome = match cli.command {
        None => {
            init_logging(cli.agent.verbosity);
            overlay_agent::run(cli.agent).await
        }
        Some(Command::Status { agent }) => {
            init_logging(agent.verbosity);
            overlay_agent::status::report(&agent)
                .await
                .map(|report| print!("{report}"))
        }
        Some(Command::Monitor { trace, agent }) => {
            init_logging(agent.verbosity);
            overlay_agent::monitor::run(&agent, trace).await
        }
        Some(Command::Teardown {
            release_lease,
            agent,
        }) => {
            init_logging(agent.verbosity);
            overlay_agent::teardown(&agent, release_lease).await
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `-v` sets the level, as flanneld's glog verbosity does; RUST_LOG, when set, wins. The eBPF
/// programs' lines (`overlay_ebpf`) only exist with `--bpf-log`, which asks for all of them.
fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or(format!("overlay_agent={level},overlay_ebpf=trace,warn")),
    )
    .format_timestamp_millis()
    .init();
}
