//! Long-running processes of a test (etcd, agents): started inside a namespace with nsenter,
//! output kept in a log file, killed when dropped.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::wait::wait_for;

pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program args...` in namespace `netns` (keeping the machine's mount namespace,
    /// so bpffs stays visible), with stdout and stderr appended to `log`.
    pub fn spawn(
        netns: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self> {
        let output = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        for (key, value) in envs {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {} in {netns}", program.display()))?;
        Ok(Self {
            name: format!("{} in {netns}", program.display()),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` (e.g. libc::SIGTERM) without waiting.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!(
                "cannot signal {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// The exit status, if the process has exited.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot check on {}", self.name))
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut status = None;
        wait_for(&format!("{} to exit", self.name), timeout, || {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        })
        .with_context(|| format!("log of {}:\n{}", self.name, self.log()))?;
        status.context("exit status vanished")
    }

    /// SIGKILL and reap, as a crash would end it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(timeout)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The port iperf3 listens on unless told another.
pub const IPERF3_PORT: u16 = 5201;

/// An iperf3 server in `netns` on [`IPERF3_PORT`] (one test only with `once`), started and
/// listening.
pub fn iperf3_server(netns: &crate::netns::Netns, log: &Path, once: bool) -> Result<Process> {
    iperf3_server_on(netns, log, once, IPERF3_PORT)
}

/// An iperf3 server in `netns` on `port`, as [`iperf3_server`].
pub fn iperf3_server_on(
    netns: &crate::netns::Netns,
    log: &Path,
    once: bool,
    port: u16,
) -> Result<Process> {
    let mut args = vec!["-s".to_string(), "-p".to_string(), port.to_string()];
    if once {
        args.push("-1".to_string());
    }
    let server = Process::spawn(netns.name(), Path::new("iperf3"), &args, &[], log)?;
    wait_for("iperf3 to listen", Duration::from_secs(20), || {
        Ok(netns.exec(&["ss", "-ltn"])?.contains(&format!(":{port} ")))
    })?;
    Ok(server)
}

/// The CPU time process `pid` has used, all its threads' (those gone included), to the
/// nanosecond: the kernel's run-time accounting, where /proc/<pid>/stat rounds to 10-ms ticks.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let pid = libc::pid_t::try_from(pid).context("no such process id")?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock id.
    let error = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    if error != 0 {
        return Err(std::io::Error::from_raw_os_error(error))
            .with_context(|| format!("no CPU clock for process {pid}"));
    }
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(clock, &mut time) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read process {pid}'s CPU clock"));
    }
    let seconds = u64::try_from(time.tv_sec).context("a negative CPU time")?;
    let nanoseconds = u32::try_from(time.tv_nsec).context("a CPU time's nanoseconds")?;
    Ok(Duration::new(seconds, nanoseconds))
}
