//! The agent's health port as its users meet it: plain HTTP requests from inside the host's
//! namespace, clients that connect and never send, and the agent's CPU time while they do.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{netns::run_in, process::cpu_time};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// What a health endpoint answered.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// GET `path` on 127.0.0.1:`port` in `netns`; `None` when nothing answers (refused, closed or
/// silent for 2 s).
pub fn get(netns: &str, port: u16, path: &str) -> Result<Option<Answer>> {
    let text = run_in(netns, || {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let Ok(mut stream) = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT) else {
            return Ok(None);
        };
        stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n");
        let mut text = String::new();
        let answered = stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.read_to_string(&mut text));
        Ok(answered.ok().map(|_| text))
    })?;
    text.filter(|text| !text.is_empty())
        .map(|text| parse(&text))
        .transpose()
}

fn parse(text: &str) -> Result<Answer> {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok(Answer { status, body })
}

/// `count` connections to 127.0.0.1:`port` in `netns` that send nothing: a slowloris. Those
/// the kernel refuses are left out.
pub fn idle_connections(netns: &str, port: u16, count: usize) -> Result<Vec<TcpStream>> {
    run_in(netns, || {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Ok((0..count)
            .filter_map(|_| TcpStream::connect_timeout(&address, REQUEST_TIMEOUT).ok())
            .collect())
    })
}

/// Whether the server has closed `stream` (it reads end of file or a reset) within `wait`.
pub fn closed_by_server(stream: &mut TcpStream, wait: Duration) -> Result<bool> {
    stream.set_read_timeout(Some(wait))?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(error) if error.kind() == ErrorKind::ConnectionReset => Ok(true),
        Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Ok(false)
        }
        Err(error) => Err(error.into()),
    }
}

/// The CPU time (user and system) process `pid` used over `window`.
pub fn cpu_time_over(pid: u32, window: Duration) -> Result<Duration> {
    let before = cpu_time(pid)?;
    let started = Instant::now();
    std::thread::sleep(window);
    let used = cpu_time(pid)?.saturating_sub(before);
    eprintln!(
        "process {pid} used {used:?} of CPU in {:?}",
        started.elapsed()
    );
    Ok(used)
}

/// How many file descriptors process `pid` has open.
pub fn open_files(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("cannot list /proc/{pid}/fd"))?
        .count())
}

/// Sets process `pid`'s limit of open files (soft and hard) to `limit`, as `prlimit` does.
pub fn limit_open_files(pid: u32, limit: usize) -> Result<()> {
    crate::netns::run(std::process::Command::new("prlimit").args([
        "--pid",
        &pid.to_string(),
        &format!("--nofile={limit}:{limit}"),
    ]))
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_its_status_and_body() -> Result<()> {
        let text = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nbad: why\n";
        assert_eq!(
            parse(text)?,
            Answer {
                status: 503,
                body: "bad: why\n".to_string()
            }
        );
        Ok(())
    }
}
