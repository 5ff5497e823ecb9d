//! The tc program on the VXLAN device's egress: wraps every IPv4 packet for a remote subnet
//! in flannel's VXLAN and sends it out of the uplink, to the neighbour the kernel resolves.
//!
//! The kernel has already routed the packet to flannel.1 and given it its Ethernet header
//! (our VTEP MAC to the remote VTEP MAC, from the permanent neighbour entry), which becomes
//! the inner header.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use core::mem::size_of;
use overlay_common::{
    Counter, OverlayConfig, RemoteVtep, VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN,
};

use crate::{
    maps,
    parse::{
        ETH_HEADER_LEN, EthHdr, Frame, IPPROTO_UDP, Ipv4Hdr, UdpHdr, VXLAN_FLAG_VNI, VxlanHdr,
    },
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
/// Marks the new headers as a UDP tunnel over IPv4 carrying Ethernet, so GSO can still
/// segment large TCP packets after encapsulation.
const ADJUST_ROOM_FLAGS: u64 = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_FLAG;
const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;
const ECN_ECT0: u8 = 0x02;
const OUTER_TTL: u8 = 64;

#[classifier]
pub fn tc_vtep_egress(ctx: TcContext) -> i32 {
    // An array lookup of index 0 always succeeds; the check only satisfies the verifier.
    let Some(config) = maps::config() else {
        return TC_ACT_SHOT as i32;
    };
    match encapsulate(&ctx, config) {
        Ok(verdict) => {
            maps::count(Counter::TxEncapsulated);
            verdict
        }
        Err(counter) => {
            maps::count(counter);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn encapsulate(ctx: &TcContext, config: &OverlayConfig) -> Result<i32, Counter> {
    const HEADERS: usize = ETH_HEADER_LEN + size_of::<Ipv4Hdr>();
    // Headers of a GSO packet may sit outside the linear area: pull them in only then, as the
    // helper is not free. The frame's own bounds checks below decide.
    if ctx.data() + HEADERS > ctx.data_end() {
        let _ = ctx.pull_data(HEADERS as u32);
    }
    let frame = Frame::new(ctx.data(), ctx.data_end());
    let eth: &EthHdr = frame.header(0).ok_or(Counter::TxMalformed)?;
    if !eth.is_ipv4() {
        return Err(Counter::TxNotIpv4);
    }
    let inner_eth = *eth;
    let ip: &Ipv4Hdr = frame.header(ETH_HEADER_LEN).ok_or(Counter::TxMalformed)?;
    let inner_tos = ip.tos;
    let remote = maps::remote_vtep(ip.dst).ok_or(Counter::TxNoRoute)?;
    // SAFETY: the context's skb is valid for the whole program run.
    let flow_hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };

    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ADJUST_ROOM_FLAGS)
        .map_err(|_| Counter::TxError)?;
    let headers = encapsulation(config, &remote, inner_eth, inner_tos, ctx.len(), flow_hash);
    ctx.store(ETH_HEADER_LEN, &headers, 0)
        .map_err(|_| Counter::TxError)?;

    // SAFETY: a null neighbour parameter asks the kernel to resolve the next hop itself.
    let verdict = unsafe { bpf_redirect_neigh(config.uplink_ifindex, core::ptr::null_mut(), 0, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::TxError);
    }
    Ok(TC_ACT_REDIRECT as i32)
}

/// The outer IPv4, UDP and VXLAN headers for a packet that is `skb_len` bytes long once they
/// are in place, as the kernel's vxlan device writes them.
#[inline(always)]
fn encapsulation(
    config: &OverlayConfig,
    remote: &RemoteVtep,
    inner_eth: EthHdr,
    inner_tos: u8,
    skb_len: u32,
    flow_hash: u32,
) -> Encapsulation {
    let ip_len = skb_len as u16 - ETH_HEADER_LEN as u16;
    let udp_len = ip_len - size_of::<Ipv4Hdr>() as u16;
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: outer_ecn(inner_tos),
        total_len: ip_len.to_be_bytes(),
        id: [0; 2],
        flags_frag_offset: [0; 2],
        ttl: OUTER_TTL,
        protocol: IPPROTO_UDP,
        checksum: [0; 2],
        src: config.public_ip,
        dst: remote.public_ip,
    };
    ip.checksum = ip.checksum();
    let vni = config.vni.to_be_bytes();
    Encapsulation {
        ip,
        udp: UdpHdr {
            src_port: source_port(flow_hash).to_be_bytes(),
            dst_port: config.vxlan_port.to_be_bytes(),
            len: udp_len.to_be_bytes(),
            checksum: [0; 2],
        },
        vxlan: VxlanHdr {
            flags: VXLAN_FLAG_VNI,
            reserved: [0; 3],
            vni: [vni[1], vni[2], vni[3]],
            reserved2: 0,
        },
        inner_eth: EthHdr {
            dst: remote.mac,
            src: config.vtep_mac,
            ether_type: inner_eth.ether_type,
        },
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
fn outer_ecn(inner_tos: u8) -> u8 {
    match inner_tos & ECN_MASK {
        ECN_CE => ECN_ECT0,
        ecn => ecn,
    }
}
