//! `/healthz` and `/readyz` on `--healthz-ip:--healthz-port`, as flanneld serves them:
//! healthz answers 200 while the agent runs, readyz once the subnet file is written. The same
//! port serves `/metrics` (see [`crate::metrics`]).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context, Result};

use crate::metrics::Metrics;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TEXT: &str = "text/plain";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Set once the agent is ready to carry traffic; shared with the health server.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Binds the listener now, so a taken port fails the start, and serves it in the background.
pub async fn serve(address: SocketAddr, readiness: Readiness, metrics: Arc<Metrics>) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for health checks on {address}"))?;
    log::info!("serving /healthz, /readyz and /metrics on {address}");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, readiness.clone(), metrics.clone()));
                }
                Err(error) => log::warn!("health listener: {error}"),
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, readiness: Readiness, metrics: Arc<Metrics>) {
    let mut request = [0; 1024];
    let Ok(read) = stream.read(&mut request).await else {
        return;
    };
    let request_line = String::from_utf8_lossy(&request[..read]);
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = match path {
        "/healthz" => ("200 OK", TEXT, "ok\n".to_string()),
        "/readyz" if readiness.is_ready() => ("200 OK", TEXT, "ok\n".to_string()),
        "/readyz" => (
            "503 Service Unavailable",
            TEXT,
            "not ready: no subnet file yet\n".to_string(),
        ),
        "/metrics" => match metrics.render() {
            Ok(text) => ("200 OK", OPENMETRICS, text),
            Err(error) => (
                "500 Internal Server Error",
                TEXT,
                format!("cannot render the metrics: {error:#}\n"),
            ),
        },
        _ => ("404 Not Found", TEXT, "not found\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}
