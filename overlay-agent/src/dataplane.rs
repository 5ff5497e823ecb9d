//! The eBPF dataplane: loading the embedded object, filling its config, attaching its
//! programs and reading its counters.
use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use overlay_common::{Counters, OverlayConfig};

/// The eBPF object built by `cargo xtask build`, embedded so the agent needs no file at run time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("OVERLAY_EBPF_OBJECT"));

const UPLINK_PROGRAM: &str = "xdp_uplink";
const CONFIG_MAP: &str = "config";
const COUNTERS_MAP: &str = "counters";

/// The loaded programs and maps. Dropping it detaches and unloads everything it attached.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Loads the object into the kernel, writes `config` and loads (but does not attach) the
    /// programs.
    pub fn load(config: &OverlayConfig) -> Result<Self> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context(
            "cannot load the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN, and BTF support)",
        )?;
        let mut config_map: Array<&mut MapData, OverlayConfig> = Array::try_from(
            ebpf.map_mut(CONFIG_MAP)
                .context("object has no config map")?,
        )?;
        config_map
            .set(0, config, 0)
            .context("cannot write the dataplane config map")?;
        let uplink: &mut Xdp = ebpf
            .program_mut(UPLINK_PROGRAM)
            .context("object has no uplink XDP program")?
            .try_into()?;
        uplink
            .load()
            .context("the kernel rejected the uplink XDP program")?;
        Ok(Self { ebpf })
    }

    /// The uplink XDP program, e.g. for BPF_PROG_TEST_RUN.
    pub fn uplink_program(&self) -> Result<&Xdp> {
        let program = self
            .ebpf
            .program(UPLINK_PROGRAM)
            .context("object has no uplink XDP program")?;
        Ok(program.try_into()?)
    }

    /// Attaches the uplink program to `interface` in the calling thread's network namespace.
    pub fn attach_uplink(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        let uplink: &mut Xdp = self
            .ebpf
            .program_mut(UPLINK_PROGRAM)
            .context("object has no uplink XDP program")?
            .try_into()?;
        uplink
            .attach(interface, mode)
            .with_context(|| format!("cannot attach the uplink XDP program to {interface}"))?;
        Ok(())
    }

    /// The counters summed over all CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map: PerCpuArray<&MapData, Counters> = PerCpuArray::try_from(
            self.ebpf
                .map(COUNTERS_MAP)
                .context("object has no counters map")?,
        )?;
        let per_cpu = map.get(&0, 0).context("cannot read the counters map")?;
        let mut total = Counters::default();
        for counters in per_cpu.iter() {
            total.accumulate(counters);
        }
        Ok(total)
    }
}
