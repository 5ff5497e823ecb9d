//! A real etcd server (Debian's etcd-server) inside the underlay namespace, and etcdctl
//! against it.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use etcd_client::{Txn, TxnOp};

use crate::{netns::run, process::Process, tls::TlsFiles, wait::wait_for};

pub const ETCD_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// etcd's defaults: at most 128 operations in a transaction and 1.5 MiB in a request.
const TXN_OPS: usize = 128;
const TXN_BYTES: usize = 1024 * 1024;

/// `records` cut into runs that fit in one transaction each (a record larger than
/// `TXN_BYTES` alone).
fn batches(records: &[(String, String)]) -> Vec<&[(String, String)]> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, (key, value)) in records.iter().enumerate() {
        let size = key.len() + value.len();
        if index > start && (index - start == TXN_OPS || bytes + size > TXN_BYTES) {
            batches.push(&records[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += size;
    }
    if start < records.len() {
        batches.push(&records[start..]);
    }
    batches
}

/// `name=http://address:2380`, one entry of `--initial-cluster`.
fn peer((name, address): (&str, &str)) -> String {
    format!("{name}=http://{address}:{PEER_PORT}")
}
const STARTUP: Duration = Duration::from_secs(30);

pub struct Etcd {
    netns: String,
    name: String,
    address: String,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    data_dir: PathBuf,
    tls: Option<TlsFiles>,
    /// "user:password" once authentication is on.
    credentials: Option<String>,
    /// Given to every start after the harness's own flags.
    extra_flags: Vec<String>,
    process: Option<Process>,
}

impl Etcd {
    /// Starts a one-member etcd listening on `address` inside `netns`, keeping its data in
    /// `dir`, and waits until it answers.
    pub fn start(netns: &str, address: &str, dir: &Path, tls: Option<TlsFiles>) -> Result<Self> {
        let mut etcd = Self::member(netns, "test", address, &peer(("test", address)), dir, tls);
        etcd.restart()?;
        Ok(etcd)
    }

    /// Starts an etcd cluster with one member on each of `placements` (namespace, address)
    /// and waits until every member answers.
    pub fn start_cluster(placements: &[(&str, &str)], dir: &Path) -> Result<Vec<Self>> {
        let names: Vec<String> = (1..=placements.len())
            .map(|index| format!("member{index}"))
            .collect();
        let initial_cluster = names
            .iter()
            .zip(placements)
            .map(|(name, (_, address))| peer((name, address)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Self> = names
            .iter()
            .zip(placements)
            .map(|(name, (netns, address))| {
                Self::member(
                    netns,
                    name,
                    address,
                    &initial_cluster,
                    &dir.join(name),
                    None,
                )
            })
            .collect();
        for member in &mut members {
            member.spawn()?;
        }
        for member in &members {
            member.wait_healthy()?;
        }
        Ok(members)
    }

    fn member(
        netns: &str,
        name: &str,
        address: &str,
        initial_cluster: &str,
        dir: &Path,
        tls: Option<TlsFiles>,
    ) -> Self {
        Self {
            netns: netns.to_string(),
            name: name.to_string(),
            address: address.to_string(),
            initial_cluster: initial_cluster.to_string(),
            data_dir: dir.join("etcd-data"),
            tls,
            credentials: None,
            extra_flags: Vec::new(),
            process: None,
        }
    }

    pub fn address(&self) -> &str {
        &self.address
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
        self.spawn()?;
        self.wait_healthy()
    }

    /// Restarts etcd with `flags` after the harness's own, now and at every later restart.
    pub fn restart_with_flags(&mut self, flags: &[&str]) -> Result<()> {
        self.extra_flags = flags.iter().map(|flag| flag.to_string()).collect();
        self.restart()
    }

    fn spawn(&mut self) -> Result<()> {
        self.stop();
        let endpoint = self.endpoint();
        let peer_url = format!("http://{}:{PEER_PORT}", self.address);
        let mut args = vec![
            format!("--name={}", self.name),
            format!("--data-dir={}", self.data_dir.display()),
            format!("--listen-client-urls={endpoint}"),
            format!("--advertise-client-urls={endpoint}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={}", self.initial_cluster),
        ];
        if let Some(tls) = &self.tls {
            args.extend([
                format!("--cert-file={}", tls.server_cert.display()),
                format!("--key-file={}", tls.server_key.display()),
                format!("--trusted-ca-file={}", tls.ca.display()),
                "--client-cert-auth".to_string(),
            ]);
        }
        args.extend(self.extra_flags.iter().cloned());
        std::fs::create_dir_all(self.log_path().parent().unwrap_or(Path::new("/tmp")))?;
        self.process = Some(Process::spawn(
            &self.netns,
            Path::new("etcd"),
            &args,
            &[],
            &self.log_path(),
        )?);
        Ok(())
    }

    fn wait_healthy(&self) -> Result<()> {
        wait_for("etcd to answer", STARTUP, || {
            Ok(self.etcdctl(&["endpoint", "health"]).is_ok())
        })
        .with_context(|| {
            format!(
                "etcd log:\n{}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            )
        })
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.with_file_name("etcd.log")
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

    /// Writes `value` at `key` attached to the etcd lease `lease` (from [`Etcd::grant`]).
    pub fn put_under_lease(&self, key: &str, value: &str, lease: &str) -> Result<()> {
        self.etcdctl(&["put", &format!("--lease={lease}"), key, value])
            .map(drop)
    }

    /// Writes every record, many to a transaction, from a client of this process: etcdctl
    /// would take a process per record and an argument per value, which Linux caps at
    /// 128 KiB. Plain-HTTP etcd without authentication only.
    pub fn put_many(&self, records: &[(String, String)]) -> Result<()> {
        ensure!(
            self.tls.is_none() && self.credentials.is_none(),
            "put_many speaks plain HTTP without authentication"
        );
        let endpoint = self.endpoint();
        crate::netns::run_in(&self.netns, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut client = etcd_client::Client::connect([endpoint.as_str()], None)
                    .await
                    .with_context(|| format!("cannot connect to etcd at {endpoint}"))?;
                for batch in batches(records) {
                    let puts: Vec<TxnOp> = batch
                        .iter()
                        .map(|(key, value)| TxnOp::put(key.as_str(), value.as_str(), None))
                        .collect();
                    client
                        .txn(Txn::new().and_then(puts))
                        .await
                        .with_context(|| format!("cannot write {} records", batch.len()))?;
                }
                Ok(())
            })
        })
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

    /// The store's current revision: that of the latest write.
    pub fn revision(&self) -> Result<i64> {
        let status = self.etcdctl(&["endpoint", "status", "-w", "fields"])?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("\"Revision\" : "))
            .context("etcdctl printed no Revision")?
            .trim()
            .parse()
            .context("etcdctl printed a Revision that is not a number")
    }

    /// Compacts the history up to the current revision.
    pub fn compact(&self) -> Result<()> {
        let revision = self.revision()?.to_string();
        self.etcdctl(&["compaction", &revision]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_to_etcds_limits_on_operations_and_bytes() {
        let small = |count: usize| -> Vec<(String, String)> {
            (0..count)
                .map(|index| (index.to_string(), "v".to_string()))
                .collect()
        };
        let lengths = |records: &[(String, String)]| -> Vec<usize> {
            batches(records).iter().map(|batch| batch.len()).collect()
        };
        assert_eq!(lengths(&small(300)), [128, 128, 44]);
        assert!(lengths(&small(0)).is_empty());
        let large = vec![("k".to_string(), "x".repeat(TXN_BYTES)); 3];
        assert_eq!(lengths(&large), [1, 1, 1]);
    }
}
