//! `/healthz` and `/readyz` on `--healthz-ip:--healthz-port`. `/healthz` answers 200 while the
//! agent does its job, and 503 naming the cause once the lease renewal, the lease watch or the
//! reconciler has been failing for longer than `--healthz-grace`. `/readyz` answers as
//! `/healthz` does once the dataplane is loaded and the subnet file written, 503 naming the
//! missing step before. The same port serves `/metrics` (see [`crate::metrics`]).
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task,
    time::{Instant, sleep, timeout},
};

use crate::metrics::Metrics;

const TEXT: &str = "text/plain";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Connections served at once; more are closed as they come.
const MAX_CONNECTIONS: usize = 32;
/// How long a client has to send its request line, and to take the answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// The longest request line read: the path is all the server looks at.
const MAX_REQUEST: usize = 1024;
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the agent must keep doing to be healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Duty {
    LeaseRenewal,
    LeaseWatch,
    Reconcile,
    /// Every container port carries its program (one that does not is taken down).
    ContainerPrograms,
    /// `<prefix>/config` is there, readable and valid (only before the start).
    NetworkConfig,
}

impl Duty {
    fn describe(self, failing_for: Duration, error: &str) -> String {
        let seconds = failing_for.as_secs();
        match self {
            Duty::LeaseRenewal => format!("lease not renewed for {seconds} s: {error}"),
            Duty::LeaseWatch => format!("lease watch down for {seconds} s: {error}"),
            Duty::Reconcile => format!("reconcile failing for {seconds} s: {error}"),
            Duty::ContainerPrograms => {
                format!("container ports down for {seconds} s, without their program: {error}")
            }
            Duty::NetworkConfig => format!("no usable network config for {seconds} s: {error}"),
        }
    }
}

/// How far the start has come; ready once the subnet file is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    #[default]
    Starting,
    DataplaneLoaded,
    Ready,
}

struct Failure {
    since: Instant,
    /// The latest error, with its context.
    error: String,
}

#[derive(Default)]
struct State {
    stage: Stage,
    failing: BTreeMap<Duty, Failure>,
}

/// The agent's health, as its parts report it; shared with the health server.
#[derive(Clone)]
pub struct Health {
    state: Arc<Mutex<State>>,
    /// How long a duty may fail before the agent counts as unhealthy.
    grace: Duration,
}

impl Health {
    pub fn new(grace: Duration) -> Self {
        Self {
            state: Arc::default(),
            grace,
        }
    }

    pub fn reached(&self, stage: Stage) {
        let mut state = self.lock();
        state.stage = state.stage.max(stage);
    }

    /// `duty` failed in an attempt started at `attempted`; it counts as failing from the
    /// first such attempt until it succeeds again.
    pub fn failed(&self, duty: Duty, attempted: Instant, error: &anyhow::Error) {
        let error = format!("{error:#}");
        self.lock()
            .failing
            .entry(duty)
            .and_modify(|failure| failure.error.clone_from(&error))
            .or_insert(Failure {
                since: attempted,
                error,
            });
    }

    pub fn succeeded(&self, duty: Duty) {
        self.lock().failing.remove(&duty);
    }

    /// `Ok` while every duty is done, else what is wrong, one line each.
    pub fn healthz(&self) -> Result<(), String> {
        let now = Instant::now();
        let state = self.lock();
        let problems: Vec<String> = state
            .failing
            .iter()
            .filter_map(|(duty, failure)| {
                let failing_for = now.saturating_duration_since(failure.since);
                (failing_for > self.grace).then(|| duty.describe(failing_for, &failure.error))
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n") + "\n")
        }
    }

    /// As [`Health::healthz`], once the start is complete.
    pub fn readyz(&self) -> Result<(), String> {
        let state = self.lock();
        match state.stage {
            Stage::Starting => {
                return Err(match state.failing.get(&Duty::NetworkConfig) {
                    Some(failure) => format!("not ready: {}\n", failure.error),
                    None => "not ready: dataplane not loaded yet\n".to_string(),
                });
            }
            Stage::DataplaneLoaded => {
                return Err("not ready: subnet file not written yet\n".to_string());
            }
            Stage::Ready => {}
        }
        drop(state);
        self.healthz()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds the listener now, so a taken port fails the start, and serves it in the background.
pub async fn serve(address: SocketAddr, health: Health, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for health checks on {address}"))?;
    log::info!("serving /healthz, /readyz and /metrics on {address}");
    tokio::spawn(accept_forever(listener, health, metrics));
    Ok(())
}

/// Serves up to [`MAX_CONNECTIONS`] at once and closes the rest as they come. When accepting
/// fails (out of file descriptors, say) it waits before trying again, longer each time, and
/// says so once: the pending connection stays queued, so retrying at once would spin.
async fn accept_forever(listener: TcpListener, health: Health, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff: Option<Duration> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if backoff.take().is_some() {
                    log::info!("health listener: accepting connections again");
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    log::debug!(
                        "health listener: closing {peer}: {MAX_CONNECTIONS} connections open"
                    );
                    continue;
                };
                let (health, metrics) = (health.clone(), metrics.clone());
                tokio::spawn(async move {
                    answer(stream, health, metrics).await;
                    drop(slot);
                });
            }
            Err(error) => {
                let delay = match backoff {
                    None => {
                        log::warn!(
                            "health listener: cannot accept connections: {error}; retrying with backoff"
                        );
                        ACCEPT_BACKOFF_FIRST
                    }
                    Some(delay) => {
                        log::debug!("health listener: cannot accept connections: {error}");
                        (delay * 2).min(ACCEPT_BACKOFF_MAX)
                    }
                };
                backoff = Some(delay);
                sleep(delay).await;
            }
        }
    }
}

/// Answers one request; a client that does not ask, or take the answer, within
/// [`REQUEST_DEADLINE`] is dropped. The answer is made on a blocking thread: a scrape may walk
/// the maps (see `DataplaneCollector`), which must not hold up the workers that renew the
/// lease.
async fn answer(mut stream: TcpStream, health: Health, metrics: Arc<Metrics>) {
    let Ok(Ok(path)) = timeout(REQUEST_DEADLINE, request_path(&mut stream)).await else {
        return;
    };
    let made = task::spawn_blocking(move || respond(&path, &health, &metrics)).await;
    let Ok((status, content_type, body)) = made else {
        return;
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = timeout(REQUEST_DEADLINE, stream.write_all(response.as_bytes())).await;
}

/// The path of the request line, read until its end, the client's end, or [`MAX_REQUEST`].
async fn request_path(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut request = Vec::with_capacity(MAX_REQUEST);
    let mut chunk = [0; MAX_REQUEST];
    while !request.contains(&b'\n') && request.len() < MAX_REQUEST {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let request = String::from_utf8_lossy(&request);
    Ok(request.split_whitespace().nth(1).unwrap_or("").to_string())
}

fn respond(path: &str, health: &Health, metrics: &Metrics) -> (&'static str, &'static str, String) {
    let verdict = |outcome: Result<(), String>| match outcome {
        Ok(()) => ("200 OK", TEXT, "ok\n".to_string()),
        Err(problems) => ("503 Service Unavailable", TEXT, problems),
    };
    match path {
        "/healthz" => verdict(health.healthz()),
        "/readyz" => verdict(health.readyz()),
        "/metrics" => match metrics.render() {
            Ok(text) => ("200 OK", OPENMETRICS, text),
            Err(error) => (
                "500 Internal Server Error",
                TEXT,
                format!("cannot render the metrics: {error:#}\n"),
            ),
        },
        _ => ("404 Not Found", TEXT, "not found\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    fn ago(seconds: u64) -> Instant {
        Instant::now() - Duration::from_secs(seconds)
    }

    #[test]
    fn a_failure_within_the_grace_period_is_tolerated() {
        let health = Health::new(GRACE);
        health.failed(Duty::LeaseWatch, ago(5), &anyhow!("connection refused"));
        assert_eq!(health.healthz(), Ok(()));
    }

    #[test]
    fn a_longer_failure_is_named_with_its_age_and_latest_error() {
        let health = Health::new(GRACE);
        health.failed(Duty::Reconcile, ago(31), &anyhow!("first"));
        health.failed(
            Duty::Reconcile,
            ago(1),
            &anyhow!("docker0 is not a bridge").context("cannot make the bridge"),
        );
        health.failed(Duty::LeaseRenewal, ago(47), &anyhow!("invalid auth token"));
        assert_eq!(
            health.healthz(),
            Err("lease not renewed for 47 s: invalid auth token\n\
                 reconcile failing for 31 s: cannot make the bridge: docker0 is not a bridge\n"
                .to_string())
        );
    }

    #[test]
    fn success_clears_a_failure() {
        let health = Health::new(GRACE);
        health.failed(Duty::LeaseWatch, ago(60), &anyhow!("no leader"));
        health.succeeded(Duty::LeaseWatch);
        assert_eq!(health.healthz(), Ok(()));
    }

    #[test]
    fn readiness_names_a_network_config_problem_at_once_and_health_after_the_grace() {
        let health = Health::new(GRACE);
        let missing = anyhow!("no network config at /coreos.com/network/config");
        health.failed(Duty::NetworkConfig, ago(5), &missing);
        assert_eq!(
            health.readyz(),
            Err("not ready: no network config at /coreos.com/network/config\n".to_string())
        );
        assert_eq!(health.healthz(), Ok(()));
        let long_failing = Health::new(GRACE);
        long_failing.failed(Duty::NetworkConfig, ago(60), &missing);
        assert!(
            long_failing
                .healthz()
                .is_err_and(|body| body.starts_with("no usable network config for"))
        );
        health.succeeded(Duty::NetworkConfig);
        assert_eq!(
            health.readyz(),
            Err("not ready: dataplane not loaded yet\n".to_string())
        );
    }

    #[test]
    fn readiness_names_the_missing_step_then_follows_health() {
        let health = Health::new(GRACE);
        assert_eq!(
            health.readyz(),
            Err("not ready: dataplane not loaded yet\n".to_string())
        );
        health.reached(Stage::DataplaneLoaded);
        assert_eq!(
            health.readyz(),
            Err("not ready: subnet file not written yet\n".to_string())
        );
        health.reached(Stage::Ready);
        assert_eq!(health.readyz(), Ok(()));
        health.failed(Duty::LeaseWatch, ago(60), &anyhow!("no leader"));
        assert!(
            health
                .readyz()
                .is_err_and(|body| body.contains("no leader"))
        );
    }
}
