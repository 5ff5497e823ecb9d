//! `cargo xtask setup`: checks every prerequisite and installs what is missing.
//!
//! Idempotent: each item prints one line (present / installed / failed and why), and a run on
//! a machine that has everything installs nothing.
use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages the project uses: etcd for the control plane, the tools the tests and the
/// demo run, and protoc with the protobuf well-known types for etcd-client's generated gRPC code.
const APT_PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "bpftool",
    "iproute2",
    "iputils-ping",
    "traceroute",
    "iperf3",
    "sockperf",
    "nftables",
    // flannel's default firewall backend: FLANNEL-FWD and FLANNEL-POSTRTG (iptables-nft).
    "iptables",
    // The CNI plugins (bridge, host-local, portmap) a Kubernetes node attaches pods with.
    "containernetworking-plugins",
    "tcpdump",
    "ethtool",
    "util-linux",
    "procps",
    "protobuf-compiler",
    "libprotobuf-dev",
    "openssl",
    "curl",
    // The official Prometheus client's OpenMetrics parser reads /metrics in the tests.
    "python3-prometheus-client",
    // Real Docker engines, one per test host, as flannel's documentation runs them.
    "docker.io",
    // The containers' image: a static busybox imported into each test dockerd.
    "busybox-static",
    // `cargo xtask package`: dpkg-shlibdeps (the package's Depends) and strip for cargo-deb,
    // lintian to check the package, systemd-analyze to verify its unit. systemd installs
    // without becoming init: that is systemd-sysv's job.
    "dpkg-dev",
    "lintian",
    "systemd",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";
const BPFFS: &str = "/sys/fs/bpf";

pub enum Outcome {
    Present,
    Installed,
}

pub fn run(root: &Path) -> Result<()> {
    ensure_linux_root(
        "setup installs packages, loads eBPF programs and mounts bpffs: run it as root",
    )?;
    let mut failures = Vec::new();
    let mut record = |item: &str, outcome: Result<Outcome>| match outcome {
        Ok(Outcome::Present) => println!("  {item:<28} present"),
        Ok(Outcome::Installed) => println!("  {item:<28} installed"),
        Err(error) => {
            println!("  {item:<28} failed: {error:#}");
            failures.push(item.to_string());
        }
    };
    for (package, outcome) in ensure_apt_packages() {
        record(&format!("apt {package}"), outcome);
    }
    record("rustfmt and clippy", ensure_lint_components());
    record("nightly rust-src", ensure_nightly_rust_src());
    record("bpf-linker", ensure_bpf_linker(root));
    record("cargo-deb", ensure_cargo_deb());
    record("bpffs at /sys/fs/bpf", ensure_bpffs());
    if !failures.is_empty() {
        bail!("setup incomplete, failed: {}", failures.join(", "));
    }
    Ok(())
}

/// Fails unless this is Linux and the effective user is root; `why_root` says why it must be,
/// and how to run it so.
pub fn ensure_linux_root(why_root: &str) -> Result<()> {
    if !cfg!(target_os = "linux") {
        bail!("overlay needs Linux (eBPF, network namespaces, netlink); this is not Linux");
    }
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let effective_uid = effective_uid(&status).context("/proc/self/status has no Uid line")?;
    if effective_uid != "0" {
        bail!("{why_root} (effective uid is {effective_uid})");
    }
    Ok(())
}

/// The effective uid, the second of the four on the `Uid:` line of /proc/<pid>/status.
fn effective_uid(status: &str) -> Option<&str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
}

/// Checks all packages with one dpkg query, installs the missing ones with one apt-get call,
/// and falls back to one call per package so a failure names the package that failed.
fn ensure_apt_packages() -> Vec<(&'static str, Result<Outcome>)> {
    let installed_before = match installed_packages() {
        Ok(installed) => installed,
        Err(error) => return all_failed(&error),
    };
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| !installed_before.iter().any(|name| name == package))
        .collect();
    if !missing.is_empty() {
        if let Err(error) = apt_get(&["update"]) {
            return all_failed(&error);
        }
        let _no_services = match ServicesHeld::new() {
            Ok(held) => held,
            Err(error) => return all_failed(&error),
        };
        if apt_install(&missing).is_err() {
            for package in &missing {
                let _ = apt_install(&[package]);
            }
        }
    }
    let installed_after = installed_packages().unwrap_or_default();
    APT_PACKAGES
        .iter()
        .map(|&package| {
            let outcome = if !missing.contains(&package) {
                Ok(Outcome::Present)
            } else if installed_after.iter().any(|name| name == package) {
                Ok(Outcome::Installed)
            } else {
                Err(anyhow::anyhow!(
                    "apt-get install {package} did not install it"
                ))
            };
            (package, outcome)
        })
        .collect()
}

/// Keeps package scripts from starting services (dockerd, etcd) in the machine's own network
/// namespace while apt installs: a `policy-rc.d` that refuses every start, removed afterwards
/// unless the machine already had one.
struct ServicesHeld {
    created: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl ServicesHeld {
    fn new() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n")
            .and_then(|()| fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755)))
            .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        Ok(Self { created: true })
    }
}

impl Drop for ServicesHeld {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}

fn all_failed(error: &anyhow::Error) -> Vec<(&'static str, Result<Outcome>)> {
    APT_PACKAGES
        .iter()
        .map(|&package| (package, Err(anyhow::anyhow!("{error:#}"))))
        .collect()
}

/// Names of the project's packages that dpkg reports as installed.
fn installed_packages() -> Result<Vec<String>> {
    // dpkg-query exits 1 when some package is unknown, so read its stdout whatever the status.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(APT_PACKAGES)
        .output()
        .context("cannot run dpkg-query: is this a Debian machine?")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    Ok(listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(_, status)| status.starts_with("ii"))
        .map(|(name, _)| name.to_string())
        .collect())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt_get(&args)
}

fn apt_get(args: &[&str]) -> Result<()> {
    cmd::output(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .map(drop)
}

fn ensure_lint_components() -> Result<Outcome> {
    let present = |tool: &str| cmd::output(crate::cmd::cargo().args([tool, "--version"])).is_ok();
    if present("fmt") && present("clippy") {
        return Ok(Outcome::Present);
    }
    cmd::output(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))?;
    Ok(Outcome::Installed)
}

/// Adds rust-src to the nightly the machine has; installs a nightly only when there is none.
/// `rustup toolchain install` on an existing nightly would upgrade it to today's, with a new
/// LLVM major, behind the user's back.
fn ensure_nightly_rust_src() -> Result<Outcome> {
    let components = cmd::stdout(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    let args: &[&str] = match &components {
        Ok(components) if components.lines().any(|line| line.starts_with("rust-src")) => {
            return Ok(Outcome::Present);
        }
        Ok(_) => &["component", "add", "rust-src", "--toolchain", "nightly"],
        Err(_) => &[
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ],
    };
    cmd::output(Command::new("rustup").args(args))?;
    Ok(Outcome::Installed)
}

/// Where bpf-linker for the nightly's LLVM major lives: `<root>/.tools/bpf-linker-llvm-NN`.
pub fn bpf_linker_root(root: &Path) -> Result<PathBuf> {
    Ok(root
        .join(".tools")
        .join(format!("bpf-linker-llvm-{}", nightly_llvm_major()?)))
}

fn nightly_llvm_major() -> Result<String> {
    let version = cmd::stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    llvm_major(&version).context("`rustc +nightly -vV` names no LLVM version")
}

/// The LLVM major from `rustc -vV` output, e.g. "22" from "LLVM version: 22.1.4".
fn llvm_major(rustc_version: &str) -> Option<String> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|llvm| llvm.split('.').next())
        .filter(|major| !major.is_empty() && major.bytes().all(|byte| byte.is_ascii_digit()))
        .map(str::to_string)
}

/// bpf-linker links libLLVM dynamically, and its major must match the nightly's. The nightly
/// ships its own libLLVM, so build bpf-linker against that one through a prefix of symlinks.
fn ensure_bpf_linker(root: &Path) -> Result<Outcome> {
    let install_root = bpf_linker_root(root)?;
    let linker = install_root.join("bin/bpf-linker");
    if cmd::output(Command::new(&linker).arg("--version")).is_ok() {
        return Ok(Outcome::Present);
    }
    let llvm_major = nightly_llvm_major()?;
    let llvm_prefix = root.join(".tools").join(format!("llvm-{llvm_major}"));
    link_nightly_libllvm(&llvm_prefix.join("lib"))?;
    cmd::output(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .arg("--root")
            .arg(&install_root)
            .env("LLVM_PREFIX", &llvm_prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    cmd::output(Command::new(&linker).arg("--version"))
        .context("bpf-linker was built but does not run")?;
    Ok(Outcome::Installed)
}

/// Makes `lib_dir` hold `libLLVM.so` and the library's SONAME, both pointing at the nightly's
/// libLLVM, which is what llvm-sys needs to link and the loader needs to run.
fn link_nightly_libllvm(lib_dir: &Path) -> Result<()> {
    let sysroot = cmd::stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name())
        .find(|name| name.to_string_lossy().starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "the nightly ships no libLLVM.so.* in {}",
                sysroot_lib.display()
            )
        })?;
    fs::create_dir_all(lib_dir).with_context(|| format!("cannot create {}", lib_dir.display()))?;
    for name in [std::ffi::OsString::from("libLLVM.so"), libllvm.clone()] {
        let link = lib_dir.join(&name);
        let _ = fs::remove_file(&link);
        symlink(sysroot_lib.join(&libllvm), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    Ok(())
}

/// cargo-deb, pinned, in cargo's own bin directory, where `cargo deb` finds it.
fn ensure_cargo_deb() -> Result<Outcome> {
    let version = cmd::stdout(cmd::cargo().args(["deb", "--version"]));
    if version.is_ok_and(|version| version.trim() == format!("cargo-deb {CARGO_DEB_VERSION}")) {
        return Ok(Outcome::Present);
    }
    cmd::output(
        cmd::cargo()
            .args(["install", "cargo-deb", "--locked", "--force"])
            .args(["--version", CARGO_DEB_VERSION]),
    )?;
    Ok(Outcome::Installed)
}

pub fn ensure_bpffs() -> Result<Outcome> {
    if bpffs_mounted()? {
        return Ok(Outcome::Present);
    }
    cmd::output(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    Ok(Outcome::Installed)
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(mounts.lines().any(|line| {
        let fields: Vec<_> = line.split_whitespace().collect();
        fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_is_read_from_rustc_version() {
        let nightly = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                       host: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(nightly).as_deref(), Some("22"));
        assert_eq!(llvm_major("rustc 1.97.0\nbinary: rustc\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1\n"), None);
    }

    #[test]
    fn the_effective_uid_is_the_second_on_the_uid_line() {
        let status =
            "Name:\txtask\nUmask:\t0022\nUid:\t1000\t65534\t1000\t1000\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some("65534"));
        assert_eq!(effective_uid("Name:\txtask\n"), None);
    }
}
