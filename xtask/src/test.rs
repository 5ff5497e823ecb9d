//! `cargo xtask test`: setup and build, then the format and lint checks, the Debian package,
//! every test and the demo once. A failing step does not stop the ones after it: the run shows
//! every failure, and its last line counts them all.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context, Result};

use crate::{build, cmd, demo, package, setup};

/// The crates that run in user space; overlay-ebpf's programs only build for the BPF target.
const USERSPACE_CRATES: &[&str] = &["overlay-common", "overlay-agent", "xtask", "overlay-tests"];
/// overlay-ebpf's library, the programs' pure arithmetic, builds for the host too: its unit
/// tests run with everyone's. Its binary (`test = false`) is left out.
const EBPF_LIBRARY: &str = "overlay-ebpf";

pub fn run(root: &Path) -> Result<ExitCode> {
    setup::run(root)?;
    build::build(root, false)?;
    let mut tally = Tally::default();
    tally.step(
        "formatting",
        cmd::cargo()
            .current_dir(root)
            .args(["fmt", "--all", "--check"]),
    );
    tally.step(
        "clippy",
        cmd::cargo()
            .current_dir(root)
            .arg("clippy")
            .args(package_args())
            .args(["--all-targets", "--all-features", "--", "-D", "warnings"]),
    );
    tally.step(
        "clippy (overlay-ebpf's library)",
        cmd::cargo()
            .current_dir(root)
            .args(["clippy", "--package", EBPF_LIBRARY, "--lib", "--tests"])
            .args(["--", "-D", "warnings"]),
    );
    // Before the tests: tests/tests/integration/package.rs checks the package this leaves in
    // target/debian.
    tally.record("package", package::build(root));
    tally.tests(
        cmd::cargo()
            .current_dir(root)
            .arg("test")
            .arg("--no-fail-fast")
            .args(package_args())
            .args(["--package", EBPF_LIBRARY])
            .arg("--all-features"),
    );
    println!("\nThe demo, once, as a user would run it:");
    tally.step("demo", &mut demo::command(root, true));
    Ok(tally.finish())
}

fn package_args() -> Vec<&'static str> {
    USERSPACE_CRATES
        .iter()
        .flat_map(|name| ["--package", name])
        .collect()
}

/// Passes and failures over the whole run: each test, and each step that is not a test
/// (formatting, clippy, the package, the demo) as one.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

impl Tally {
    fn step(&mut self, what: &str, command: &mut Command) {
        self.record(what, cmd::run(command));
    }

    fn record(&mut self, what: &str, outcome: Result<()>) {
        match outcome {
            Ok(()) => self.passed += 1,
            Err(error) => self.fail(format!("{what}: {error:#}")),
        }
    }

    /// Runs `cargo test`, passing its output through and adding up its `test result:` lines.
    /// A run that fails without a failing test (a build error, a crashed test binary) counts
    /// as one failure.
    fn tests(&mut self, command: &mut Command) {
        match run_counting_tests(command) {
            Ok((counts, success)) => {
                self.passed += counts.passed;
                self.failed += counts.failed;
                if counts.failed > 0 {
                    self.failures
                        .push(format!("{} tests (listed above)", counts.failed));
                }
                if !success && counts.failed == 0 {
                    self.fail("cargo test failed without a failing test: see above".into());
                }
            }
            Err(error) => self.fail(format!("cargo test: {error:#}")),
        }
    }

    fn fail(&mut self, failure: String) {
        self.failed += 1;
        self.failures.push(failure);
    }

    /// Prints what failed, then the summary line, and says how to exit.
    fn finish(self) -> ExitCode {
        println!();
        for failure in &self.failures {
            println!("FAILED: {failure}");
        }
        println!("{} passed, {} failed", self.passed, self.failed);
        if self.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct TestCounts {
    passed: u64,
    failed: u64,
}

/// Runs `command`, echoing its stdout line by line; returns the summed test counts and
/// whether it exited 0.
fn run_counting_tests(command: &mut Command) -> Result<(TestCounts, bool)> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut counts = TestCounts::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read cargo test's output")?;
        println!("{line}");
        if let Some(result) = parse_test_result(&line) {
            counts.passed += result.passed;
            counts.failed += result.failed;
        }
    }
    let status = child.wait().context("cannot wait for cargo test")?;
    Ok((counts, status.success()))
}

/// The counts of one libtest summary:
/// `test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; ...`
fn parse_test_result(line: &str) -> Option<TestCounts> {
    let (_, counts) = line.strip_prefix("test result: ")?.split_once(". ")?;
    let count_of = |what: &str| {
        counts.split("; ").find_map(|part| {
            let (number, name) = part.split_once(' ')?;
            (name == what).then(|| number.parse().ok()).flatten()
        })
    };
    Some(TestCounts {
        passed: count_of("passed")?,
        failed: count_of("failed")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libtest_summaries() {
        assert_eq!(
            parse_test_result(
                "test result: FAILED. 6 passed; 1 failed; 0 ignored; 0 measured; \
                 0 filtered out; finished in 95.12s"
            ),
            Some(TestCounts {
                passed: 6,
                failed: 1
            })
        );
        assert_eq!(
            parse_test_result("test result: ok. 22 passed; 0 failed; 2 ignored"),
            Some(TestCounts {
                passed: 22,
                failed: 0
            })
        );
        assert_eq!(parse_test_result("test a_test ... ok"), None);
        assert_eq!(parse_test_result("test result: garbled"), None);
    }
}
