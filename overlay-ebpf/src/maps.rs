//! The maps shared with the agent. Their key and value types live in `overlay-common`.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use overlay_common::{Counter, Counters, LocalEndpoint, OverlayConfig, RemoteVtep, VtepSubnet};

/// Room for every /24 of a /8 network.
const MAX_REMOTE_HOSTS: usize = 65536;
/// Room for every address of a /18 lease.
const MAX_LOCAL_ENDPOINTS: usize = 16384;

/// One entry, filled by the agent before it attaches any program.
#[btf_map(name = "config")]
static CONFIG: Array<OverlayConfig, 1> = Array::new();

/// One `Counters` per CPU; the agent sums the copies.
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// Remote subnet (network order) → the host that leases it.
#[btf_map(name = "subnets")]
static SUBNETS: LpmTrie<[u8; 4], RemoteVtep, MAX_REMOTE_HOSTS> = LpmTrie::new();

/// Remote host's PublicIP (network order) → the subnet it leases.
#[btf_map(name = "vteps")]
static VTEPS: HashMap<[u8; 4], VtepSubnet, MAX_REMOTE_HOSTS> = HashMap::new();

/// Local container's IPv4 address (network order) → its veth and MAC, learned by the agent
/// from docker0's neighbours and forwarding database.
#[btf_map(name = "endpoints")]
static ENDPOINTS: HashMap<[u8; 4], LocalEndpoint, MAX_LOCAL_ENDPOINTS> = HashMap::new();

#[inline(always)]
pub fn config() -> Option<&'static OverlayConfig> {
    CONFIG.get(0)
}

/// The host whose lease covers `destination`.
#[inline(always)]
pub fn remote_vtep(destination: [u8; 4]) -> Option<RemoteVtep> {
    SUBNETS.get(&Key::new(32, destination)).copied()
}

/// The subnet leased by the host at `public_ip`, if it holds a lease.
#[inline(always)]
pub fn vtep_subnet(public_ip: [u8; 4]) -> Option<VtepSubnet> {
    // SAFETY: the value is copied out at once, before any update could reuse the slot.
    unsafe { VTEPS.get(public_ip) }.copied()
}

/// The local container at `address`, if the agent knows where it is.
#[inline(always)]
pub fn local_endpoint(address: [u8; 4]) -> Option<LocalEndpoint> {
    // SAFETY: the value is copied out at once, before any update could reuse the slot.
    unsafe { ENDPOINTS.get(address) }.copied()
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs.
        unsafe { *(*counters).slot_mut(counter) += 1 };
    }
}
