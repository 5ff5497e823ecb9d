//! Capturing real frames off an interface with tcpdump: one, as bytes, or a count of what
//! matches while something happens.
use std::{
    io::{BufRead, BufReader},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;

const PCAP_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 16;
const TIMEOUT: Duration = Duration::from_secs(15);
const TRAFFIC_INTERVAL: Duration = Duration::from_millis(200);

/// The first frame matching the tcpdump `filter` on `interface` of `netns`; `traffic` is
/// called repeatedly until one is caught (tcpdump may not be listening at the first call).
pub fn capture_one(
    netns: &Netns,
    interface: &str,
    filter: &str,
    mut traffic: impl FnMut() -> Result<()>,
) -> Result<Vec<u8>> {
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns.name(),
            "tcpdump",
            "-i",
            interface,
            "-c",
            "1",
            "-U",
            "-w",
            "-",
            filter,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start tcpdump")?;
    let deadline = Instant::now() + TIMEOUT;
    while tcpdump.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = tcpdump.kill();
            bail!("tcpdump caught nothing matching {filter:?} on {interface} within {TIMEOUT:?}");
        }
        traffic()?;
        sleep(TRAFFIC_INTERVAL);
    }
    let output = tcpdump.wait_with_output()?;
    ensure!(
        output.status.success(),
        "tcpdump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    first_record(&output.stdout)
}

/// The first packet of a little-endian pcap file.
fn first_record(pcap: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        pcap.len() >= PCAP_HEADER_LEN + RECORD_HEADER_LEN,
        "the capture is empty"
    );
    ensure!(
        pcap[..4] == [0xd4, 0xc3, 0xb2, 0xa1],
        "not a little-endian pcap file"
    );
    let length_at = PCAP_HEADER_LEN + 8;
    let length = u32::from_le_bytes(pcap[length_at..length_at + 4].try_into()?) as usize;
    let start = PCAP_HEADER_LEN + RECORD_HEADER_LEN;
    pcap.get(start..start + length)
        .map(<[u8]>::to_vec)
        .context("the capture ends inside its first packet")
}

/// A tcpdump on one interface of a namespace, collecting what matches its filter until it is
/// stopped; killed if dropped first.
pub struct Sniffer {
    tcpdump: Child,
    what: String,
    /// tcpdump's lines as it prints them (`-l`), from a thread that reads its stdout to EOF.
    lines: Receiver<String>,
}

impl Sniffer {
    /// Starts tcpdump for `filter` on `interface` of `netns`, once it is listening.
    pub fn start(netns: &Netns, interface: &str, filter: &str) -> Result<Self> {
        let mut tcpdump = Command::new("ip")
            .args(["netns", "exec", netns.name(), "tcpdump", "-n", "-l", "-i"])
            .args([interface, filter])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start tcpdump")?;
        let what = format!("{filter:?} on {interface} of {}", netns.name());
        let stderr = tcpdump.stderr.take().context("tcpdump's stderr")?;
        let lines = forward_lines(tcpdump.stdout.take().context("tcpdump's stdout")?);
        let sniffer = Self {
            tcpdump,
            what,
            lines,
        };
        // "verbose output suppressed ...", then "listening on ...", or an error.
        let mut said = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while !said.contains("listening on") {
            match lines.next() {
                Some(line) => said.push_str(&line?),
                None => bail!("tcpdump for {} did not start: {said}", sniffer.what),
            }
        }
        Ok(sniffer)
    }

    /// Stops tcpdump; the packets it saw, one line each.
    pub fn stop(mut self) -> Result<Vec<String>> {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(self.tcpdump.id() as i32, libc::SIGINT) };
        self.tcpdump.wait()?;
        // The reader thread ends at tcpdump's EOF, which ends this iterator.
        Ok(self.lines.iter().collect())
    }

    /// Calls `traffic` every 200 ms until a packet whose line contains `marker` is seen (at
    /// most 15 s), then stops tcpdump; every packet it saw, the marked ones included.
    pub fn stop_once_seen(
        self,
        marker: &str,
        mut traffic: impl FnMut() -> Result<()>,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        while !seen.iter().any(|line: &String| line.contains(marker)) {
            if Instant::now() > deadline {
                bail!(
                    "tcpdump for {} saw no packet with {marker:?} within {TIMEOUT:?}: {seen:#?}",
                    self.what
                );
            }
            traffic()?;
            let interval_ends = Instant::now() + TRAFFIC_INTERVAL;
            while let Some(left) = interval_ends.checked_duration_since(Instant::now()) {
                match self.lines.recv_timeout(left) {
                    Ok(line) => seen.push(line),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => bail!("tcpdump for {} ended", self.what),
                }
            }
        }
        seen.extend(self.stop()?);
        Ok(seen)
    }
}

/// Sends each non-empty line `stdout` prints, from a thread of its own, until its EOF.
fn forward_lines(stdout: ChildStdout) -> Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !line.trim().is_empty() && sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        let _ = self.tcpdump.kill();
        let _ = self.tcpdump.wait();
    }
}
