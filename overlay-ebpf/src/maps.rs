//! The maps shared with the agent. Their value types live in `overlay-common`.
use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    macros::btf_map,
};
use overlay_common::{Counter, Counters, OverlayConfig};

/// One entry, filled by the agent before it attaches any program.
#[btf_map(name = "config")]
static CONFIG: Array<OverlayConfig, 1> = Array::new();

/// One `Counters` per CPU; the agent sums the copies.
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

#[inline(always)]
pub fn config() -> Option<&'static OverlayConfig> {
    CONFIG.get(0)
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs.
        unsafe { *(*counters).slot_mut(counter) += 1 };
    }
}
