//! `/healthz` and `/readyz` on `--healthz-ip:--healthz-port`, as flanneld serves them:
//! healthz answers 200 while the agent runs, readyz once the subnet file is written.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

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
pub async fn serve(address: SocketAddr, readiness: Readiness) -> Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen for health checks on {address}"))?;
    log::info!("serving /healthz and /readyz on {address}");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, readiness.clone()));
                }
                Err(error) => log::warn!("health listener: {error}"),
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, readiness: Readiness) {
    let mut request = [0; 1024];
    let Ok(read) = stream.read(&mut request).await else {
        return;
    };
    let request_line = String::from_utf8_lossy(&request[..read]);
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/healthz" => ("200 OK", "ok\n"),
        "/readyz" if readiness.is_ready() => ("200 OK", "ok\n"),
        "/readyz" => ("503 Service Unavailable", "not ready: no subnet file yet\n"),
        _ => ("404 Not Found", "not found\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}
