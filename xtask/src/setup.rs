//! `cargo xtask setup`: checks every prerequisite and installs what is missing; `build` and
//! `package` check and install the part they need.
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

/// What a command installs. Each scope holds the one before it, so a prerequisite is tagged
/// with the first scope that needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// `build` (and `run`, which builds): the eBPF object and the agent.
    Build,
    /// `package`: the release build, then cargo-deb.
    Package,
    /// `setup`, `test`, `demo` and `bench`: also what the tests, the demo and the benchmark run.
    Everything,
}

/// One prerequisite, needed from `scope` on.
struct Prerequisite {
    name: &'static str,
    scope: Scope,
    kind: Kind,
}

/// Checks one prerequisite and installs it when missing; takes the workspace root.
type EnsureTool = fn(&Path) -> Result<Outcome>;

enum Kind {
    /// A Debian package: the missing ones are installed together, with one apt-get call.
    Apt,
    /// Anything else: checks itself, installs itself when missing.
    Tool(EnsureTool),
}

const fn apt(name: &'static str, scope: Scope) -> Prerequisite {
    Prerequisite {
        name,
        scope,
        kind: Kind::Apt,
    }
}

const fn tool(name: &'static str, scope: Scope, ensure: EnsureTool) -> Prerequisite {
    Prerequisite {
        name,
        scope,
        kind: Kind::Tool(ensure),
    }
}

/// Every prerequisite, in the order they are checked and reported: the Debian packages (etcd
/// for the control plane, the tools the tests and the demo run, protoc for the build), then
/// the toolchain's parts and bpffs.
const PREREQUISITES: &[Prerequisite] = &[
    apt("etcd-server", Scope::Everything),
    apt("etcd-client", Scope::Everything),
    apt("bpftool", Scope::Everything),
    apt("iproute2", Scope::Everything),
    apt("iputils-ping", Scope::Everything),
    apt("traceroute", Scope::Everything),
    apt("iperf3", Scope::Everything),
    apt("sockperf", Scope::Everything),
    apt("nftables", Scope::Everything),
    // flannel's default firewall backend: FLANNEL-FWD and FLANNEL-POSTRTG (iptables-nft).
    apt("iptables", Scope::Everything),
    // The CNI plugins (bridge, host-local, portmap) a Kubernetes node attaches pods with.
    apt("containernetworking-plugins", Scope::Everything),
    apt("tcpdump", Scope::Everything),
    apt("ethtool", Scope::Everything),
    apt("util-linux", Scope::Everything),
    apt("procps", Scope::Everything),
    // The metrics tests count the agent's bpf syscalls with it.
    apt("strace", Scope::Everything),
    // `bench --profile` samples the programs with it.
    apt("linux-perf", Scope::Everything),
    // etcd-client's build script generates its gRPC code with protoc, from protos that import
    // the protobuf well-known types.
    apt("protobuf-compiler", Scope::Build),
    apt("libprotobuf-dev", Scope::Build),
    apt("openssl", Scope::Everything),
    apt("curl", Scope::Everything),
    // The official Prometheus client's OpenMetrics parser reads /metrics in the tests.
    apt("python3-prometheus-client", Scope::Everything),
    // Real Docker engines, one per test host, as flannel's documentation runs them.
    apt("docker.io", Scope::Everything),
    // The containers' image: a static busybox imported into each test dockerd.
    apt("busybox-static", Scope::Everything),
    // dpkg-shlibdeps (the package's Depends) and strip for cargo-deb.
    apt("dpkg-dev", Scope::Package),
    // The tests check the package: lintian, and systemd-analyze on its unit. systemd installs
    // without becoming init: that is systemd-sysv's job.
    apt("lintian", Scope::Everything),
    apt("systemd", Scope::Everything),
    tool("rustfmt and clippy", Scope::Everything, |_| {
        ensure_lint_components()
    }),
    tool("nightly rust-src", Scope::Build, |_| {
        ensure_nightly_rust_src()
    }),
    tool("bpf-linker", Scope::Build, ensure_bpf_linker),
    tool("cargo-deb", Scope::Package, |_| ensure_cargo_deb()),
    tool("bpffs at /sys/fs/bpf", Scope::Everything, |_| {
        ensure_bpffs()
    }),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_DEB_VERSION: &str = "3.8.0";
const BPFFS: &str = "/sys/fs/bpf";

pub enum Outcome {
    Present,
    Installed,
}

/// `cargo xtask setup`, and the setup `test`, `demo` and `bench` start with: everything, as
/// root.
pub fn run(root: &Path) -> Result<()> {
    ensure_linux_root(
        "setup installs packages, loads eBPF programs and mounts bpffs: run it as root",
    )?;
    ensure(root, Scope::Everything)
}

/// Checks the prerequisites `scope` needs and installs the missing ones, one line each.
pub fn ensure(root: &Path, scope: Scope) -> Result<()> {
    let mut failures = Vec::new();
    let mut record = |item: &str, outcome: Result<Outcome>| match outcome {
        Ok(Outcome::Present) => println!("  {item:<28} present"),
        Ok(Outcome::Installed) => println!("  {item:<28} installed"),
        Err(error) => {
            println!("  {item:<28} failed: {error:#}");
            failures.push(item.to_string());
        }
    };
    for (package, outcome) in ensure_apt_packages(&apt_packages(scope)) {
        record(&format!("apt {package}"), outcome);
    }
    for (name, ensure_tool) in tools(scope) {
        record(name, ensure_tool(root));
    }
    if !failures.is_empty() {
        bail!("setup incomplete, failed: {}", failures.join(", "));
    }
    Ok(())
}

fn in_scope(scope: Scope) -> impl Iterator<Item = &'static Prerequisite> {
    PREREQUISITES
        .iter()
        .filter(move |prerequisite| prerequisite.scope <= scope)
}

/// The Debian packages `scope` needs.
fn apt_packages(scope: Scope) -> Vec<&'static str> {
    in_scope(scope)
        .filter(|prerequisite| matches!(prerequisite.kind, Kind::Apt))
        .map(|prerequisite| prerequisite.name)
        .collect()
}

/// The other prerequisites `scope` needs, each with what checks and installs it.
fn tools(scope: Scope) -> Vec<(&'static str, EnsureTool)> {
    in_scope(scope)
        .filter_map(|prerequisite| match prerequisite.kind {
            Kind::Tool(ensure_tool) => Some((prerequisite.name, ensure_tool)),
            Kind::Apt => None,
        })
        .collect()
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

/// Checks `packages` with one dpkg query and installs the missing ones.
fn ensure_apt_packages(packages: &[&'static str]) -> Vec<(&'static str, Result<Outcome>)> {
    let installed_before = match installed_packages(packages) {
        Ok(installed) => installed,
        Err(error) => return all_failed(packages, &error),
    };
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !is_listed(&installed_before, package))
        .collect();
    let installing = if missing.is_empty() {
        Ok(())
    } else {
        install_missing(&missing)
    };
    let installed_after = installed_packages(packages).unwrap_or_default();
    packages
        .iter()
        .map(|&package| {
            let outcome = if !missing.contains(&package) {
                Ok(Outcome::Present)
            } else if is_listed(&installed_after, package) {
                Ok(Outcome::Installed)
            } else if let Err(error) = &installing {
                Err(anyhow::anyhow!("{error:#}"))
            } else {
                Err(anyhow::anyhow!(
                    "apt-get install {package} did not install it"
                ))
            };
            (package, outcome)
        })
        .collect()
}

/// Installs `missing` with one apt-get call, and falls back to one call per package so a
/// failure names the package that failed.
fn install_missing(missing: &[&str]) -> Result<()> {
    ensure_linux_root(&format!(
        "installing {} needs root: run this as root",
        missing.join(", ")
    ))?;
    apt_get(&["update"])?;
    let _no_services = ServicesHeld::new()?;
    if apt_install(missing).is_err() {
        for package in missing {
            let _ = apt_install(&[package]);
        }
    }
    Ok(())
}

fn is_listed(installed: &[String], package: &str) -> bool {
    installed.iter().any(|name| name == package)
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

fn all_failed(
    packages: &[&'static str],
    error: &anyhow::Error,
) -> Vec<(&'static str, Result<Outcome>)> {
    packages
        .iter()
        .map(|&package| (package, Err(anyhow::anyhow!("{error:#}"))))
        .collect()
}

/// Those of `packages` that dpkg reports as installed.
fn installed_packages(packages: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits 1 when some package is unknown, so read its stdout whatever the status.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(packages)
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

    fn tool_names(scope: Scope) -> Vec<&'static str> {
        tools(scope).into_iter().map(|(name, _)| name).collect()
    }

    #[test]
    fn build_asks_for_protoc_and_the_ebpf_toolchain_alone() {
        assert_eq!(
            apt_packages(Scope::Build),
            ["protobuf-compiler", "libprotobuf-dev"]
        );
        assert_eq!(tool_names(Scope::Build), ["nightly rust-src", "bpf-linker"]);
    }

    #[test]
    fn package_asks_for_the_build_and_cargo_deb_with_dpkg_dev() {
        assert_eq!(
            apt_packages(Scope::Package),
            ["protobuf-compiler", "libprotobuf-dev", "dpkg-dev"]
        );
        assert_eq!(
            tool_names(Scope::Package),
            ["nightly rust-src", "bpf-linker", "cargo-deb"]
        );
    }

    #[test]
    fn everything_asks_for_every_prerequisite_once() {
        let everything: Vec<_> = apt_packages(Scope::Everything)
            .into_iter()
            .chain(tool_names(Scope::Everything))
            .collect();
        assert_eq!(everything.len(), PREREQUISITES.len());
        for (index, name) in everything.iter().enumerate() {
            assert!(
                !everything[..index].contains(name),
                "{name} is listed twice"
            );
        }
        for test_time in [
            "lintian",
            "systemd",
            "docker.io",
            "etcd-server",
            "iperf3",
            "sockperf",
        ] {
            assert!(everything.contains(&test_time), "{test_time}");
            assert!(
                !apt_packages(Scope::Package).contains(&test_time),
                "{test_time}"
            );
        }
        for tool in ["rustfmt and clippy", "bpffs at /sys/fs/bpf"] {
            assert!(everything.contains(&tool), "{tool}");
            assert!(!tool_names(Scope::Package).contains(&tool), "{tool}");
        }
    }

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
