//! A real etcd server (Debian's etcd-server) inside the underlay namespace, and etcdctl
//! against it.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{netns::run, process::Process, tls::TlsFiles, wait::wait_for};

pub const ETCD_PORT: u16 = 2379;
const STARTUP: Duration = Duration::from_secs(30);

pub struct Etcd {
    netns: String,
    address: String,
    data_dir: PathBuf,
    tls: Option<TlsFiles>,
    /// "user:password" once authentication is on.
    credentials: Option<String>,
    process: Option<Process>,
}

impl Etcd {
    /// Starts etcd listening on `address` inside `netns`, keeping its data in `dir`, and waits
    /// until it answers.
    pub fn start(netns: &str, address: &str, dir: &Path, tls: Option<TlsFiles>) -> Result<Self> {
        let mut etcd = Self {
            netns: netns.to_string(),
            address: address.to_string(),
            data_dir: dir.join("etcd-data"),
            tls,
            credentials: None,
            process: None,
        };
        etcd.restart()?;
        Ok(etcd)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{ETCD_PORT}", self.address)
    }

    /// Kills etcd, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// (Re)starts etcd on the same data directory and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let endpoint = self.endpoint();
        let mut args = vec![
            "--name=test".to_string(),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            "--listen-peer-urls=http://127.0.0.1:2380".to_string(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".to_string(),
            "--initial-cluster=test=http://127.0.0.1:2380".to_string(),
        ];
        if let Some(tls) = &self.tls {
            args.extend([
                format!("--cert-file={}", tls.server_cert.display()),
                format!("--key-file={}", tls.server_key.display()),
                format!("--trusted-ca-file={}", tls.ca.display()),
                "--client-cert-auth".to_string(),
            ]);
        }
        let log = self.data_dir.with_file_name("etcd.log");
        self.process = Some(Process::spawn(
            &self.netns,
            Path::new("etcd"),
            &args,
            &[],
            &log,
        )?);
        wait_for("etcd to answer", STARTUP, || {
            Ok(self.etcdctl(&["endpoint", "health"]).is_ok())
        })
        .with_context(|| {
            format!(
                "etcd log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    }

    /// Runs etcdctl (v3 API) against this server; returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.netns, "etcdctl", "--dial-timeout=2s"])
            .arg(format!("--endpoints={}", self.endpoint()))
            .env("ETCDCTL_API", "3");
        if let Some(credentials) = &self.credentials {
            command.arg(format!("--user={credentials}"));
        }
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client_cert.display()))
                .arg(format!("--key={}", tls.client_key.display()));
        }
        run(command.args(args))
    }

    /// Turns on authentication with `root` as the only user; etcdctl logs in from then on.
    pub fn enable_auth(&mut self, password: &str) -> Result<()> {
        self.etcdctl(&["user", "add", &format!("root:{password}")])?;
        self.etcdctl(&["auth", "enable"])?;
        self.credentials = Some(format!("root:{password}"));
        Ok(())
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.etcdctl(&["put", key, value]).map(drop)
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let output = self.etcdctl(&["get", "--print-value-only", key])?;
        Ok(output.lines().next().map(str::to_string))
    }

    /// The etcd lease `key` is attached to (0 for none).
    pub fn lease_of(&self, key: &str) -> Result<i64> {
        let fields = self.etcdctl(&["get", "-w", "fields", key])?;
        fields
            .lines()
            .find_map(|line| line.strip_prefix("\"Lease\" : "))
            .context("etcdctl printed no Lease field")?
            .trim()
            .parse()
            .context("etcdctl printed a Lease that is not a number")
    }

    /// Grants a lease of `ttl` seconds; returns its id as etcdctl prints it (hex).
    pub fn grant(&self, ttl: u64) -> Result<String> {
        let output = self.etcdctl(&["lease", "grant", &ttl.to_string()])?;
        output
            .split_whitespace()
            .nth(1)
            .map(str::to_string)
            .context("etcdctl lease grant printed no lease id")
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) -> Result<()> {
        let status = self.etcdctl(&["endpoint", "status", "-w", "fields"])?;
        let revision = status
            .lines()
            .find_map(|line| line.strip_prefix("\"Revision\" : "))
            .context("etcdctl printed no Revision")?
            .trim()
            .to_string();
        self.etcdctl(&["compaction", &revision]).map(drop)
    }
}
