//! Encapsulation into flannel's VXLAN, at two hooks:
//!
//! - `tc_container_ingress`, on the host side of every container's veth: first the checks of
//!   what a container may send (see `claims`), then, with `--fast-path`, the fast path. A
//!   packet a container sends to its gateway for a remote subnet is routed here as docker0
//!   would (TTL − 1), wrapped and sent straight out of the uplink, past docker0, routing and
//!   flannel.1. What a router must answer itself (TTL running out, a packet too big for the
//!   overlay) and everything not for a remote subnet goes on to the bridge untouched.
//! - `tc_vtep_egress`, on flannel.1's egress: the routed path, for whatever the kernel routes
//!   into the overlay (the host's own traffic, the fast path's leftovers). The kernel has
//!   already routed the packet and given it its Ethernet header. On flannel-v6.1's egress
//!   `encap6` takes IPv6, and leaves to the kernel's device what it cannot checksum.
//!
//! Both send the frame to the neighbour the kernel resolves on the uplink.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_check_mtu, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use core::mem::size_of;
use overlay_common::{
    Counter, OverlayConfig, RemoteVtep, VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN,
};

use crate::{
    claims::check_container_frame,
    encap6, maps,
    parse::{
        ECN_CE, ECN_MASK, ETH_HEADER_LEN, ETH_P_IPV4, EthHdr, EthIpv4Headers, FLOW_HEADERS_LEN,
        Frame, IPPROTO_UDP, IPV4_NO_OPTIONS, Ipv4Hdr, TransportHead, UdpHdr, VXLAN_FLAG_VNI,
        VxlanHdr, flow_of, linear_frame,
    },
    routed::remember_replies,
    verdict::tc_act,
};

/// What goes between the outer Ethernet header and the inner IP header.
#[repr(C)]
struct Encapsulation {
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
    inner_eth: EthHdr,
}

const ENCAP_LEN: usize = size_of::<Encapsulation>();
/// The inner MAC header length bpf_skb_adjust_room records. GSO takes everything between the
/// outer UDP header and the inner MAC header (the VXLAN header) as tunnel header, so this is
/// the inner Ethernet header alone; counting the VXLAN header too makes segmentation read it
/// as Ethernet and drop every large TCP packet.
const INNER_L2_LEN: u64 = ETH_HEADER_LEN as u64;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`, which the bindings lack: the length sits in the top byte.
const ENCAP_L2_FLAG: u64 = (INNER_L2_LEN & 0xff) << 56;
/// Marks the new headers as a UDP tunnel carrying Ethernet, so GSO can still segment large
/// TCP packets after encapsulation. The segment size stays: it is the inner packets', which
/// already fit the overlay's MTU (the kernel's vxlan device keeps it too).
pub const ADJUST_ROOM_TUNNEL_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_FLAG;
/// The same, with an outer IPv4 header.
const ADJUST_ROOM_FLAGS: u64 = ADJUST_ROOM_TUNNEL_FLAGS | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;
const ECN_ECT0: u8 = 0x02;
/// IPv4's total length field holds at most this.
const IPV4_MAX_LEN: usize = u16::MAX as usize;
const OUTER_TTL: u8 = 64;
/// `bpf_redir_neigh::nh_family` for an IPv4 next hop.
const AF_INET: u32 = 2;

#[classifier]
pub fn tc_container_ingress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_OK as i32;
    };
    let mut frame = linear_frame(&ctx, FLOW_HEADERS_LEN);
    if let Err(refused) = check_container_frame(&ctx, &frame, config) {
        return tc_act(&ctx, refused);
    }
    if !config.fast_path() {
        return TC_ACT_OK as i32;
    }
    let outcome = match frame.header::<EthHdr>(0) {
        Some(eth) if eth.is_ipv6() => encap6::encapsulate_from_container(&ctx, config),
        _ => encapsulate_from_container(&ctx, &mut frame, config),
    };
    match outcome {
        // Not for a remote subnet: the bridge takes it, uncounted.
        Ok(None) => TC_ACT_OK as i32,
        Ok(Some(outcome)) | Err(outcome) => tc_act(&ctx, outcome),
    }
}

#[classifier]
pub fn tc_vtep_egress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_SHOT as i32;
    };
    tc_act(
        &ctx,
        encapsulate_routed(&ctx, config).unwrap_or_else(|outcome| outcome),
    )
}

/// The fast path. `Ok(Some(TxDirect))`: encapsulated (or, with DirectRouting, routed as it is)
/// and sent; `Ok(None)`: not ours, the bridge takes it; `Err(TxSlowPath)` or
/// `Err(TxRoutedFlow)`: ours, but the routed path must take it.
#[inline(always)]
fn encapsulate_from_container(
    ctx: &TcContext,
    frame: &mut Frame,
    config: &OverlayConfig,
) -> Result<Option<Counter>, Counter> {
    let Some(headers) = frame.header::<EthIpv4Headers>(0) else {
        return Ok(None);
    };
    // Only what the container sends to its gateway is routed; frames for a neighbour on the
    // bridge (another container acting as router, say) stay on the bridge.
    if !headers.eth.is_ipv4() || headers.eth.dst != config.bridge_mac {
        return Ok(None);
    }
    let Some(remote) = maps::remote_vtep(headers.ip.dst) else {
        return Ok(None);
    };
    if headers.ip.ttl <= 1
        || headers.ip.version_ihl != IPV4_NO_OPTIONS
        || !fits_device(ctx, config.vtep_ifindex)
    {
        return Err(Counter::TxSlowPath);
    }
    let transport = frame.header::<TransportHead>(size_of::<EthIpv4Headers>());
    let flow = flow_of(&headers.ip, transport).ok_or(Counter::TxRoutedFlow)?;
    if maps::takes_routed_path(&flow) {
        return Err(Counter::TxRoutedFlow);
    }
    let headers: &mut EthIpv4Headers = frame.header_mut(0).ok_or(Counter::TxError)?;
    headers.ip.decrement_ttl();
    if remote.routes_directly() {
        // DirectRouting: the host shares our segment; its PublicIP is the next hop.
        redirect_to_uplink(config, Some(remote.public_ip))?;
        return Ok(Some(Counter::TxDirect));
    }
    let inner_tos = headers.ip.tos;
    encapsulate(ctx, config, &remote, inner_tos)?;
    Ok(Some(Counter::TxDirect))
}

/// The routed path: everything flannel.1 sends must be for a remote subnet. Its flow is
/// remembered, so that the fast path leaves the replies to the stack as well.
/// `Ok(TxEncapsulated)`: encapsulated and sent; on flannel-v6.<VNI>, see `encap6`.
#[inline(always)]
fn encapsulate_routed(ctx: &TcContext, config: &OverlayConfig) -> Result<Counter, Counter> {
    let frame = linear_frame(ctx, FLOW_HEADERS_LEN);
    let eth: &EthHdr = frame.header(0).ok_or(Counter::TxMalformed)?;
    // SAFETY: the context's skb is valid for the whole program run.
    let on_vtep6 = config.ipv6() && unsafe { (*ctx.skb.skb).ifindex } == config.vtep6_ifindex;
    if on_vtep6 && eth.is_ipv6() {
        return Ok(encap6::encapsulate_routed(ctx, config));
    }
    if !eth.is_ipv4() {
        return Err(Counter::TxNotIpv4);
    }
    let ip: &Ipv4Hdr = frame.header(ETH_HEADER_LEN).ok_or(Counter::TxMalformed)?;
    let inner_tos = ip.tos;
    let remote = maps::remote_vtep(ip.dst).ok_or(Counter::TxNoRoute)?;
    remember_replies(&frame, config.vtep_ifindex);
    encapsulate(ctx, config, &remote, inner_tos)?;
    Ok(Counter::TxEncapsulated)
}

/// Whether the packet (each of its segments, for a GSO packet) fits the MTU of the VXLAN
/// device `ifindex`, the check the kernel makes when it forwards into it.
#[inline(always)]
pub fn fits_device(ctx: &TcContext, ifindex: u32) -> bool {
    // Zero: measure the packet itself.
    let mut mtu_len = 0u32;
    // SAFETY: the context's skb is valid for the whole program run; mtu_len outlives the call.
    let verdict = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast(),
            ifindex,
            &mut mtu_len,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    verdict == 0
}

/// Wraps the packet, whose Ethernet header becomes the inner one, for `remote` and redirects
/// it to the uplink.
#[inline(always)]
fn encapsulate(
    ctx: &TcContext,
    config: &OverlayConfig,
    remote: &RemoteVtep,
    inner_tos: u8,
) -> Result<(), Counter> {
    // A superpacket above 64 KiB (BIG TCP) cannot say its length in the outer header; the
    // stack could not split it for us either, as tc runs before segmentation.
    if ctx.len() as usize - ETH_HEADER_LEN + ENCAP_LEN > IPV4_MAX_LEN {
        return Err(Counter::TxTooBig);
    }
    // SAFETY: the context's skb is valid for the whole program run.
    let flow_hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    // RFC 6864: a datagram that may be fragmented (DF clear, as the kernel's vxlan device
    // sends it) needs an ID no other recent one between the same hosts has.
    // SAFETY: a plain helper call without arguments.
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ADJUST_ROOM_FLAGS)
        .map_err(|_| Counter::TxError)?;
    let headers = encapsulation(config, remote, inner_tos, ctx.len(), flow_hash, ip_id);
    ctx.store(ETH_HEADER_LEN, &headers, 0)
        .map_err(|_| Counter::TxError)?;

    redirect_to_uplink(config, None)
}

/// Sends the packet out of the uplink to `next_hop`, or, without one, to the next hop the
/// routing table gives for its destination; the kernel fills the Ethernet header in.
#[inline(always)]
pub fn redirect_to_uplink(
    config: &OverlayConfig,
    next_hop: Option<[u8; 4]>,
) -> Result<(), Counter> {
    let verdict = match next_hop {
        Some(address) => {
            let mut neighbour = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                    // Network order in memory, as the helper reads it.
                    ipv4_nh: u32::from_ne_bytes(address),
                },
            };
            // SAFETY: `neighbour` is a valid bpf_redir_neigh of the size given, alive for the call.
            unsafe {
                bpf_redirect_neigh(
                    config.uplink_ifindex,
                    &mut neighbour,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }
        }
        // SAFETY: a null neighbour parameter asks the kernel to resolve the next hop itself.
        None => unsafe { bpf_redirect_neigh(config.uplink_ifindex, core::ptr::null_mut(), 0, 0) },
    };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::TxError);
    }
    Ok(())
}

/// The outer IPv4, UDP and VXLAN headers for a packet that is `skb_len` bytes long once they
/// are in place, as the kernel's vxlan device writes them.
#[inline(always)]
fn encapsulation(
    config: &OverlayConfig,
    remote: &RemoteVtep,
    inner_tos: u8,
    skb_len: u32,
    flow_hash: u32,
    ip_id: u16,
) -> Encapsulation {
    let ip_len = skb_len as u16 - ETH_HEADER_LEN as u16;
    let udp_len = ip_len - size_of::<Ipv4Hdr>() as u16;
    let mut ip = Ipv4Hdr {
        version_ihl: IPV4_NO_OPTIONS,
        tos: outer_ecn(inner_tos),
        total_len: ip_len.to_be_bytes(),
        id: ip_id.to_be_bytes(),
        flags_frag_offset: [0; 2],
        ttl: OUTER_TTL,
        protocol: IPPROTO_UDP,
        checksum: [0; 2],
        src: config.public_ip,
        dst: remote.public_ip,
    };
    ip.checksum = ip.checksum();
    Encapsulation {
        ip,
        udp: udp_header(config, flow_hash, udp_len),
        vxlan: vxlan_header(config),
        inner_eth: EthHdr {
            dst: remote.mac,
            src: config.vtep_mac,
            ether_type: ETH_P_IPV4.to_be_bytes(),
        },
    }
}

/// The outer UDP header of a datagram `udp_len` bytes long, its checksum left zero.
#[inline(always)]
pub fn udp_header(config: &OverlayConfig, flow_hash: u32, udp_len: u16) -> UdpHdr {
    UdpHdr {
        src_port: source_port(flow_hash).to_be_bytes(),
        dst_port: config.vxlan_port.to_be_bytes(),
        len: udp_len.to_be_bytes(),
        checksum: [0; 2],
    }
}

#[inline(always)]
pub fn vxlan_header(config: &OverlayConfig) -> VxlanHdr {
    let [_, vni_hi, vni_mid, vni_lo] = config.vni.to_be_bytes();
    VxlanHdr {
        flags: VXLAN_FLAG_VNI,
        reserved: [0; 3],
        vni: [vni_hi, vni_mid, vni_lo],
        reserved2: 0,
    }
}

/// The kernel's per-flow source port: spreads flows over the receivers' queues.
#[inline(always)]
fn source_port(flow_hash: u32) -> u16 {
    let span = u64::from(VXLAN_SOURCE_PORT_MAX - VXLAN_SOURCE_PORT_MIN);
    VXLAN_SOURCE_PORT_MIN + ((u64::from(flow_hash) * span) >> 32) as u16
}

/// RFC 6040 encapsulation: the outer header copies the inner ECN field, but a CE mark
/// becomes ECT(0).
#[inline(always)]
pub fn outer_ecn(inner_tos: u8) -> u8 {
    match inner_tos & ECN_MASK {
        ECN_CE => ECN_ECT0,
        ecn => ecn,
    }
}
