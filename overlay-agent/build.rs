//! Embeds the eBPF object that `cargo xtask build` produced, so the agent needs no file at run
//! time. OVERLAY_EBPF_OBJECT overrides the default location.
//!
//! Without the object (a fresh clone under `cargo check`, clippy or rust-analyzer) an empty
//! stub is embedded instead, with a warning: the crate still checks, and an agent built that
//! way refuses to load its dataplane, saying how to build it properly.
use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=OVERLAY_EBPF_OBJECT");
    let object = env::var_os("OVERLAY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest_dir.join("../target/ebpf/bpfel-unknown-none/release/overlay-ebpf")
        });
    // Also watched while missing, so the object's arrival rebuilds the agent.
    println!("cargo:rerun-if-changed={}", object.display());
    let embedded = if object.exists() {
        object
    } else {
        println!(
            "cargo:warning=the eBPF object {} does not exist: embedding an empty stub; \
             `cargo xtask build` builds the real one",
            object.display()
        );
        let stub = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
            .join("overlay-ebpf.stub");
        std::fs::write(&stub, []).expect("OUT_DIR is writable");
        stub
    };
    println!("cargo:rustc-env=OVERLAY_EBPF_OBJECT={}", embedded.display());
}
