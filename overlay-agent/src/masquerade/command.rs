//! Running `iptables`, `ip6tables` and `nft` with a deadline: a command that hangs (iptables
//! waiting for the xtables lock another process holds, say) is killed and reported as an error
//! naming it, and the next resync tries again.
use std::{
    io::{Read, Write},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How long one command may take. iptables is told to wait for the xtables lock for less
/// ([`LOCK_WAIT_SECONDS`]), so that a held lock is reported as iptables' own error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
pub const LOCK_WAIT_SECONDS: &str = "5";
const POLL: Duration = Duration::from_millis(10);

/// Runs `program` with `args`, feeding it `stdin`, and returns its output whatever its exit
/// status; an error when it cannot start or does not finish within [`COMMAND_TIMEOUT`].
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    run_within(program, args, stdin, COMMAND_TIMEOUT)
}

fn run_within(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Output> {
    let line = || format!("`{program} {}`", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", line()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("cannot write to {}", line()))?;
    }
    // Drained while it runs, so that a large listing cannot fill a pipe and stall it.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait(&mut child, timeout).with_context(|| format!("{} did not finish", line()))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{} did not finish within {timeout:?}", line());
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The exit status of `child`, or `None` when it is still running after `timeout`.
fn wait(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_hangs_is_an_error_naming_it() {
        let started = Instant::now();
        let error = run_within("sleep", &["60"], None, Duration::from_millis(200)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(error.to_string(), "`sleep 60` did not finish within 200ms");
    }

    #[test]
    fn output_and_status_come_back() {
        let output = run("cat", &[], Some("rules\n")).unwrap();
        assert!(output.status.success());
        assert_eq!(output.stdout, b"rules\n");
    }
}
