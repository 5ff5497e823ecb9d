//! Running external programs with errors that say what was run.
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Runs `command` with inherited stdio and fails unless it exits 0.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(command));
    }
    Ok(())
}

/// Runs `command` capturing its output and fails unless it exits 0.
pub fn output(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {}", describe(command)))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}: {}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Runs `command` capturing its output; returns stdout as text.
pub fn stdout(command: &mut Command) -> Result<String> {
    let output = output(command)?;
    String::from_utf8(output.stdout)
        .with_context(|| format!("{} printed non-UTF-8", describe(command)))
}

/// The cargo that runs `cargo xtask`, for the userspace crates.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// rustup's cargo for the nightly toolchain, freed from the variables the outer cargo set for
/// itself, so the inner one picks the nightly's own rustc.
pub fn cargo_nightly() -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    command
}

fn describe(command: &Command) -> String {
    let args: Vec<_> = command
        .get_args()
        .map(|arg| arg.to_string_lossy())
        .collect();
    format!(
        "`{} {}`",
        command.get_program().to_string_lossy(),
        args.join(" ")
    )
}
