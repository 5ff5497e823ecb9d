//! `cargo xtask build`: installs what the build needs if it is missing, then builds the eBPF
//! object first and the agent that embeds it.
use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{cmd, setup};

const BPF_TARGET: &str = "bpfel-unknown-none";

/// The eBPF build's own target directory, so the nightly build never invalidates the stable
/// one. overlay-agent's build script reads the object from `<this>/bpfel-unknown-none/release`.
fn ebpf_target_dir(root: &Path) -> PathBuf {
    root.join("target/ebpf")
}

pub fn run(root: &Path, release: bool) -> Result<()> {
    setup::ensure(root, setup::Scope::Build)?;
    build(root, release)
}

/// The build alone, for commands that installed its prerequisites already.
pub fn build(root: &Path, release: bool) -> Result<()> {
    build_ebpf(root)?;
    let mut agent = cmd::cargo();
    agent
        .current_dir(root)
        .args(["build", "--package", "overlay-agent"]);
    if release {
        agent.arg("--release");
    }
    cmd::run(&mut agent)
}

/// Where `build` leaves the agent.
pub fn agent_binary(root: &Path, release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    root.join("target").join(profile).join("overlay-agent")
}

/// Always optimised: the verifier cannot follow unoptimised BPF. Debuginfo plus `--btf` give
/// the object BTF, so the maps are BTF-typed and bpftool prints their field names.
fn build_ebpf(root: &Path) -> Result<()> {
    let linker_bin = setup::bpf_linker_root(root)?.join("bin");
    let path = env::join_paths(
        std::iter::once(linker_bin)
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .context("PATH holds an entry that cannot be joined")?;
    cmd::run(
        cmd::cargo_nightly()
            .current_dir(root)
            .args(["build", "--package", "overlay-ebpf", "--release"])
            .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(ebpf_target_dir(root))
            .env("PATH", path)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
            ),
    )
}
