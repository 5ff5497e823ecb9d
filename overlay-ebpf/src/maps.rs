//! The maps shared with the agent. Their key and value types live in `overlay-common`.
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    macros::btf_map,
};
use overlay_common::{
    CLAIM_CACHE_SLOTS, CachedClaims, Counter, Counters, DROP_HEAD_LEN, DropEvent, EndpointSlot,
    FlowKey, FlowKey6, LocalEndpoint, OverlayConfig, PeerTraffic, RemoteVtep, RemoteVtep6,
    RoutedFlow, Trace, VtepSubnet, VtepSubnet6, endpoint_slot,
};

/// The object's size for the lease maps; the agent sizes them at load time to the subnets
/// its network config holds (`LeaseCapacity`).
const MAX_REMOTE_HOSTS: usize = 65536;
/// Room for every address of a /18 lease.
const MAX_LOCAL_ENDPOINTS: usize = 16384;
/// The object's size for `endpoints`: the addresses of a /24 lease. The agent sizes it at
/// load time to its own lease (`LeaseCapacity`).
const LEASE_ADDRESSES: usize = 256;
/// Container ports that bind claims at once.
const MAX_CLAIMING_PORTS: usize = 4096;
/// Claims (addresses and MACs together) one container port may bind: a container with a few
/// addresses or MACs of its own stays far below it, and no container can fill the binding maps
/// every other container's first frames need.
pub const CLAIM_QUOTA: u64 = 32;
/// Flows the stack forwards at once between containers and remote subnets, or to and from
/// service addresses; the least recently seen give way.
const MAX_ROUTED_FLOWS: usize = 65536;
/// Flows handed to the stack as they were, at once: only while a container is being learned
/// or, with DirectRouting, per flow from a peer on our segment.
const MAX_HANDED_FLOWS: usize = 16384;
/// IPv6 datagrams containers are sending in fragments at once.
const MAX_FRAGMENTED_DATAGRAMS: usize = 4096;
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;
/// Bytes of drop events in flight between the programs and a monitor: about 1,700 events.
const DROP_EVENTS_BYTES: usize = 256 * 1024;

/// One entry, filled by the agent before it attaches any program.
#[btf_map(name = "config")]
static CONFIG: Array<OverlayConfig, 1> = Array::new();

/// One `Counters` per CPU; the agent sums the copies.
#[btf_map(name = "counters")]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// One slot per remote lease (slot 0 for none), per CPU; the agent sizes it at load time to
/// its lease maps and assigns the slots (`RemoteVtep::peer`, `RemoteVtep6::peer`).
#[btf_map(name = "peer_traffic")]
static PEER_TRAFFIC: PerCpuArray<PeerTraffic, { MAX_REMOTE_HOSTS + 1 }> = PerCpuArray::new();

/// Remote subnet (network order) → the host that leases it.
#[btf_map(name = "subnets")]
static SUBNETS: LpmTrie<[u8; 4], RemoteVtep, MAX_REMOTE_HOSTS> = LpmTrie::new();

/// Remote IPv6 subnet (network order) → the host that leases it, over IPv6.
#[btf_map(name = "subnets6")]
static SUBNETS6: LpmTrie<[u8; 16], RemoteVtep6, MAX_REMOTE_HOSTS> = LpmTrie::new();

/// Remote host's PublicIP (network order) → a subnet it leases: who may send us VXLAN.
#[btf_map(name = "vteps")]
static VTEPS: HashMap<[u8; 4], VtepSubnet, MAX_REMOTE_HOSTS> = HashMap::new();

/// Remote host's PublicIPv6 (network order) → an IPv6 subnet it leases: who may send us VXLAN
/// over IPv6. Which inner sources it may send, `subnets6` says, as `subnets` does for IPv4.
/// Sized as `vteps`, but allocated per entry, so a network without IPv6 pays nothing for it.
#[btf_map(name = "vteps6")]
static VTEPS6: HashMap<[u8; 16], VtepSubnet6, MAX_REMOTE_HOSTS, NO_PREALLOC> = HashMap::new();

/// Local container's IPv4 address and its veth and MAC, in the slot of the address's host
/// part (`endpoint_slot`), learned by the agent from docker0's neighbours and forwarding
/// database. An array, whose lookup the verifier inlines, where a hash's took a helper call.
/// The agent sizes it at load time to its lease's addresses.
#[btf_map(name = "endpoints")]
static ENDPOINTS: Array<EndpointSlot, LEASE_ADDRESSES> = Array::new();

/// Local container's IPv6 address (network order) → its veth and MAC, learned by the agent
/// from docker0's IPv6 neighbours (NDP) and forwarding database.
#[btf_map(name = "endpoints6")]
static ENDPOINTS6: HashMap<[u8; 16], LocalEndpoint, MAX_LOCAL_ENDPOINTS> = HashMap::new();

/// Local container's IPv4 address (network order) → the container port (the host side of its
/// veth) that first sent from it, as ARP sender or IPv4 source. Written by the container
/// program, first come first bound; the agent deletes a port's bindings when the port goes.
#[btf_map(name = "bound_addresses")]
static BOUND_ADDRESSES: HashMap<[u8; 4], u32, MAX_LOCAL_ENDPOINTS> = HashMap::new();

/// Local container's IPv6 address (network order), global or link-local → the container port
/// that first sent from it, as IPv6 source or Neighbour Advertisement target, bound as IPv4
/// addresses are.
#[btf_map(name = "bound_addresses6")]
static BOUND_ADDRESSES6: HashMap<[u8; 16], u32, MAX_LOCAL_ENDPOINTS> = HashMap::new();

/// Source MAC of a local container → the container port that first sent from it, bound as
/// addresses are.
#[btf_map(name = "bound_macs")]
static BOUND_MACS: HashMap<[u8; 6], u32, MAX_LOCAL_ENDPOINTS> = HashMap::new();

/// Each container port's last claims that passed (see [`CachedClaims`]): one array lookup for
/// the frames after the first of a flow. Per CPU, so that no slot is ever half written by one
/// CPU and read by another; the agent empties a gone port's slot with its bindings.
#[btf_map(name = "claim_cache")]
static CLAIM_CACHE: PerCpuArray<CachedClaims, { CLAIM_CACHE_SLOTS as usize }> = PerCpuArray::new();

/// Container port → how many addresses and MACs it has bound (see [`CLAIM_QUOTA`]). Written by
/// the container program; the agent deletes a port's count with its bindings.
#[btf_map(name = "claims_per_port")]
static CLAIMS_PER_PORT: HashMap<u32, u64, MAX_CLAIMING_PORTS> = HashMap::new();

/// First fragments of IPv6 datagrams that containers sent and the checks passed → the
/// container port that sent them: a later fragment passes only behind its first, from the
/// same port. The least recently seen give way.
#[btf_map(name = "first_fragments6")]
static FIRST_FRAGMENTS6: LruHashMap<Fragment6, u32, MAX_FRAGMENTED_DATAGRAMS> = LruHashMap::new();

/// Flows the kernel's stack forwarded here, each under the key of the packets that travel the
/// other way: those must take the routed path too, for conntrack to translate them (NAT) and
/// to see the whole flow. Written by the programs on the stack's exits to the overlay and to
/// the containers; read by the fast path at both ends.
#[btf_map(name = "routed_flows")]
static ROUTED_FLOWS: LruHashMap<FlowKey, RoutedFlow, MAX_ROUTED_FLOWS> = LruHashMap::new();

/// `routed_flows` for IPv6: flows the stack carried into the container bridge from a remote
/// IPv6 subnet translated on the way, under the key of their replies.
#[btf_map(name = "routed_flows6")]
static ROUTED_FLOWS6: LruHashMap<FlowKey6, RoutedFlow, MAX_ROUTED_FLOWS> = LruHashMap::new();

/// `handed_flows` for IPv6: every IPv6 flow from a remote subnet reaches the stack as it
/// arrived (the kernel decapsulates VXLAN over IPv6), noted by the uplink program with the
/// fast path, so that the bridge's watcher can tell a flow the stack translated.
#[btf_map(name = "handed_flows6")]
static HANDED_FLOWS6: LruHashMap<FlowKey6, u32, MAX_HANDED_FLOWS> = LruHashMap::new();

/// Flows the programs handed to the stack as they arrived (for a container not yet learned,
/// or from a DirectRouting peer), keyed as handed over → the interface they arrived on. One
/// that reaches the bridge under the same key was not translated on the way, so the stack
/// need not keep it.
#[btf_map(name = "handed_flows")]
static HANDED_FLOWS: LruHashMap<FlowKey, u32, MAX_HANDED_FLOWS> = LruHashMap::new();

/// Non-zero while `overlay-agent monitor` reads `drop_events`: the programs report drops only
/// then, and look here only when they drop.
#[btf_map(name = "monitor")]
static MONITOR: Array<u32, 1> = Array::new();

/// What `overlay-agent monitor --trace` asks for (see [`Trace`]); every program outcome looks
/// here, once.
#[btf_map(name = "trace")]
static TRACE: Array<Trace, 1> = Array::new();

/// The heads of dropped and traced packets, for `overlay-agent monitor`.
#[btf_map(name = "drop_events")]
static DROP_EVENTS: RingBuf<DropEvent, DROP_EVENTS_BYTES> = RingBuf::new();

#[inline(always)]
pub fn config() -> Option<&'static OverlayConfig> {
    CONFIG.get(0)
}

/// The host whose lease covers `destination`.
#[inline(always)]
pub fn remote_vtep(destination: [u8; 4]) -> Option<RemoteVtep> {
    SUBNETS.get(&Key::new(32, destination)).copied()
}

/// The host whose IPv6 lease covers `destination`.
#[inline(always)]
pub fn remote_vtep6(destination: &[u8; 16]) -> Option<RemoteVtep6> {
    SUBNETS6.get(&Key::new(128, *destination)).copied()
}

/// Whether the host at `public_ip` holds a lease.
#[inline(always)]
pub fn holds_a_lease(public_ip: [u8; 4]) -> bool {
    VTEPS.get_ptr(public_ip).is_some()
}

/// Whether the host at `public_ipv6` holds an IPv6 lease.
#[inline(always)]
pub fn holds_an_ipv6_lease(public_ipv6: &[u8; 16]) -> bool {
    VTEPS6.get_ptr(public_ipv6).is_some()
}

/// The local container at `address`, if the agent knows where it is.
#[inline(always)]
pub fn local_endpoint(address: [u8; 4], config: &OverlayConfig) -> Option<LocalEndpoint> {
    let slot = ENDPOINTS.get(endpoint_slot(address, config.local_netmask))?;
    (slot.address == address && slot.endpoint.ifindex != 0).then_some(slot.endpoint)
}

/// The local container at the IPv6 `address`, if the agent knows where it is.
#[inline(always)]
pub fn local_endpoint6(address: &[u8; 16]) -> Option<LocalEndpoint> {
    // SAFETY: the value is copied out at once, before any update could reuse the slot.
    unsafe { ENDPOINTS6.get(address) }.copied()
}

/// Binds `address` to `port` unless it is bound already; whether it is bound to `port` now.
#[inline(always)]
pub fn bind_address(address: &[u8; 4], port: u32) -> bool {
    bind(&BOUND_ADDRESSES, address, port)
}

/// Binds the IPv6 `address` to `port` unless it is bound already; whether it is bound to
/// `port` now.
#[inline(always)]
pub fn bind_address6(address: &[u8; 16], port: u32) -> bool {
    bind(&BOUND_ADDRESSES6, address, port)
}

/// What tells one IPv6 datagram's fragments from every other's (RFC 8200, 4.5).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Fragment6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: [u8; 4],
}

/// Notes that `port` sent the first fragment of `datagram` and the checks passed it.
#[inline(always)]
pub fn note_first_fragment(datagram: &Fragment6, port: u32) {
    let _ = FIRST_FRAGMENTS6.insert(datagram, port, 0);
}

/// Whether `port` sent the first fragment of `datagram` and the checks passed it.
#[inline(always)]
pub fn sent_first_fragment(datagram: &Fragment6, port: u32) -> bool {
    // SAFETY: the pointer is to a live map value, read at once.
    FIRST_FRAGMENTS6
        .get_ptr(datagram)
        .is_some_and(|sender| unsafe { *sender } == port)
}

/// Binds `mac` to `port` unless it is bound already; whether it is bound to `port` now.
#[inline(always)]
pub fn bind_mac(mac: &[u8; 6], port: u32) -> bool {
    bind(&BOUND_MACS, mac, port)
}

/// `port`'s cached claims, if their MAC is `mac`.
#[inline(always)]
pub fn cached_claims(port: u32, mac: &[u8; 6]) -> Option<&'static CachedClaims> {
    let cached = CLAIM_CACHE.get(port % CLAIM_CACHE_SLOTS)?;
    (cached.port == port && cached.mac == *mac).then_some(cached)
}

/// Caches `mac` and one address (which `set` writes) as `port`'s claims, once both are bound
/// to it; the slot's other address stays if the slot is `port`'s already, as every claim a
/// slot holds must be bound to its port.
#[inline(always)]
pub fn cache_claims(port: u32, mac: &[u8; 6], set: impl FnOnce(&mut CachedClaims)) {
    let Some(cached) = CLAIM_CACHE.get_ptr_mut(port % CLAIM_CACHE_SLOTS) else {
        return;
    };
    // SAFETY: this CPU's copy of a live slot, read and written at once.
    let cached = unsafe { &mut *cached };
    if cached.port != port {
        *cached = CachedClaims {
            port,
            ..CachedClaims::default()
        };
    }
    cached.mac = *mac;
    set(cached);
}

/// A full map, or a port at its quota, binds nothing more: the claim fails, so a flood of
/// made-up sources cannot open a way around the check.
#[inline(always)]
fn bind<K, const N: usize>(bindings: &HashMap<K, u32, N>, key: &K, port: u32) -> bool {
    if let Some(bound) = bindings.get_ptr(key) {
        // SAFETY: the pointer is to a live map value, read at once.
        return unsafe { *bound } == port;
    }
    if !take_a_claim(port) {
        return false;
    }
    // Another CPU may bind the same key first; the lookup after says who won.
    let _ = bindings.insert(key, port, u64::from(BPF_NOEXIST));
    // SAFETY: as above.
    bindings
        .get_ptr(key)
        .is_some_and(|bound| unsafe { *bound } == port)
}

/// Counts a new claim of `port` against its quota; whether it is within it. The count is not
/// atomic (the BPF target has no atomic add in `core`): a port whose frames two CPUs handle
/// at once may get a claim or two past its quota, never an unbounded number.
#[inline(always)]
fn take_a_claim(port: u32) -> bool {
    if CLAIMS_PER_PORT.get_ptr(&port).is_none() {
        // A full map counts nothing more, and the lookup below refuses the claim.
        let _ = CLAIMS_PER_PORT.insert(&port, &0, u64::from(BPF_NOEXIST));
    }
    let Some(count) = CLAIMS_PER_PORT.get_ptr_mut(&port) else {
        return false;
    };
    // SAFETY: a live map value, read and written at once.
    unsafe {
        if *count >= CLAIM_QUOTA {
            return false;
        }
        *count += 1;
    }
    true
}

/// A flow key of either family, with the maps its flows are kept in.
pub trait Flow: Sized + 'static {
    fn routed_flows() -> &'static LruHashMap<Self, RoutedFlow, MAX_ROUTED_FLOWS>;
    fn handed_flows() -> &'static LruHashMap<Self, u32, MAX_HANDED_FLOWS>;
    /// The key of the packets travelling the other way.
    fn reversed(&self) -> Self;
}

impl Flow for FlowKey {
    #[inline(always)]
    fn routed_flows() -> &'static LruHashMap<Self, RoutedFlow, MAX_ROUTED_FLOWS> {
        &ROUTED_FLOWS
    }

    #[inline(always)]
    fn handed_flows() -> &'static LruHashMap<Self, u32, MAX_HANDED_FLOWS> {
        &HANDED_FLOWS
    }

    #[inline(always)]
    fn reversed(&self) -> Self {
        FlowKey::reversed(self)
    }
}

impl Flow for FlowKey6 {
    #[inline(always)]
    fn routed_flows() -> &'static LruHashMap<Self, RoutedFlow, MAX_ROUTED_FLOWS> {
        &ROUTED_FLOWS6
    }

    #[inline(always)]
    fn handed_flows() -> &'static LruHashMap<Self, u32, MAX_HANDED_FLOWS> {
        &HANDED_FLOWS6
    }

    #[inline(always)]
    fn reversed(&self) -> Self {
        FlowKey6::reversed(self)
    }
}

/// Whether the stack forwarded the other direction of `flow`, so it must carry `flow` too.
#[inline(always)]
pub fn takes_routed_path<F: Flow>(flow: &F) -> bool {
    F::routed_flows().get_ptr(flow).is_some()
}

/// Notes that the stack sent a packet out of `ifindex` whose replies have the key `reply`.
#[inline(always)]
pub fn remember_routed<F: Flow>(reply: &F, ifindex: u32) {
    insert_once(F::routed_flows(), reply, RoutedFlow { ifindex });
}

/// Notes that `flow` was handed to the stack as it is, arriving on `ifindex`.
#[inline(always)]
pub fn note_handed<F: Flow>(flow: &F, ifindex: u32) {
    insert_once(F::handed_flows(), flow, ifindex);
}

/// Whether `flow` was handed to the stack under this very key.
#[inline(always)]
pub fn was_handed<F: Flow>(flow: &F) -> bool {
    F::handed_flows().get_ptr(flow).is_some()
}

/// Adds `key` to an LRU flow map unless it is there: rewriting an entry costs a new element
/// per packet. A full map makes room by evicting its least recently used flow.
#[inline(always)]
fn insert_once<K, V, const N: usize>(flows: &LruHashMap<K, V, N>, key: &K, value: V) {
    if flows.get_ptr(key).is_none() {
        let _ = flows.insert(key, value, 0);
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; nothing else writes it
        // while this program runs.
        unsafe { *(*counters).slot_mut(counter) += 1 };
    }
}

/// Which way a packet went between this host and a remote lease.
#[derive(Clone, Copy)]
pub enum Direction {
    Sent,
    Received,
}

/// Counts a packet of `bytes` that went `direction` to or from the lease in `peer`'s slot.
#[inline(always)]
pub fn count_peer(peer: u32, direction: Direction, bytes: u32) {
    let Some(traffic) = PEER_TRAFFIC.get_ptr_mut(peer) else {
        return;
    };
    // SAFETY: this CPU's copy of a live slot; nothing else writes it while this program runs.
    let traffic = unsafe { &mut *traffic };
    let (packets, total) = match direction {
        Direction::Sent => (&mut traffic.tx_packets, &mut traffic.tx_bytes),
        Direction::Received => (&mut traffic.rx_packets, &mut traffic.rx_bytes),
    };
    *packets += 1;
    *total += u64::from(bytes);
}

/// Whether a monitor is reading drop events.
#[inline(always)]
pub fn monitoring() -> bool {
    MONITOR.get(0).is_some_and(|attached| *attached != 0)
}

/// The trace a monitor set, if it set one.
#[inline(always)]
pub fn trace() -> Option<&'static Trace> {
    TRACE.get(0).filter(|trace| trace.family != 0)
}

/// Reports a packet with the outcome `reason` on `ifindex`, `len` bytes long; `copy_head`
/// fills the event's head with the packet's first bytes and returns how many, and `wanted`
/// says from the head whether to send it. A full ring buffer loses the event, never the
/// verdict.
#[inline(always)]
pub fn report(
    reason: Counter,
    ifindex: u32,
    len: u32,
    copy_head: impl FnOnce(&mut [u8; DROP_HEAD_LEN]) -> u32,
    wanted: impl FnOnce(&[u8; DROP_HEAD_LEN]) -> bool,
) {
    let Some(mut entry) = DROP_EVENTS.reserve(0) else {
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the entry is a reserved, exclusively owned slot the size of a DropEvent; every
    // field is written before it is submitted.
    unsafe {
        (*event).reason = reason as u32;
        (*event).ifindex = ifindex;
        (*event).len = len;
        (*event).head = [0; DROP_HEAD_LEN];
        (*event).captured = copy_head(&mut (*event).head);
        if !wanted(&(*event).head) {
            entry.discard(0);
            return;
        }
    }
    entry.submit(0);
}
