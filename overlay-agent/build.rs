//! Embeds the eBPF object that `cargo xtask build` produced, so the agent needs no file at run
//! time. OVERLAY_EBPF_OBJECT overrides the default location.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=OVERLAY_EBPF_OBJECT");
    let object = env::var_os("OVERLAY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/overlay-ebpf")
        });
    if !object.exists() {
        panic!(
            "the eBPF object {} does not exist: build with `cargo xtask build`, which builds it first",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=OVERLAY_EBPF_OBJECT={}", object.display());
}
