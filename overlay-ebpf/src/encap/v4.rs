//! Encapsulation in VXLAN over IPv4: the outer IPv4 header (TTL 64, ECN per RFC 6040, DF
//! clear and a random ID), UDP without a checksum, as flannel.1 sends it.
use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32},
    programs::TcContext,
};
use core::mem::size_of;
use overlay_common::{Counter, OverlayConfig, RemoteVtep};
use overlay_ebpf::{ecn::outer_ecn, vxlan_fields::flow_hash};

use super::{ADJUST_ROOM_TUNNEL_FLAGS, count_sent, fits_device, packet_hash};
use crate::{
    flows::remember_replies,
    maps,
    parse::{
        ETH_HEADER_LEN, ETH_P_IPV4, EthHdr, EthIpv4Headers, Frame, IPPROTO_UDP, IPV4_NO_OPTIONS,
        Ipv4Hdr, TransportHead, flow_at, flow_of, linear_frame,
    },
    redirect,
    vxlan::{ENCAP_LEN, Encapsulation, udp_header, vxlan_header},
};

/// The tunnel flags, with an outer IPv4 header.
const ADJUST_ROOM_FLAGS: u64 = ADJUST_ROOM_TUNNEL_FLAGS | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;
/// IPv4's total length field holds at most this.
const IPV4_MAX_LEN: usize = u16::MAX as usize;
const OUTER_TTL: u8 = 64;

/// The fast path. `Ok(Some(TxDirect))`: encapsulated (or, with DirectRouting, routed as it is)
/// and sent; `Ok(None)`: not ours, the bridge takes it; `Err(TxSlowPath)` or
/// `Err(TxRoutedFlow)`: ours, but the routed path must take it.
#[inline(always)]
pub fn from_container(
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
        || !fits_device(ctx, config.vtep_ifindex, config.vtep_mtu)
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
        redirect::to_uplink(config, Some(remote.public_ip))?;
        count_sent(ctx, remote.peer, 0);
        return Ok(Some(Counter::TxDirect));
    }
    let inner_tos = headers.ip.tos;
    let hash = packet_hash(ctx, || flow_hash(&flow));
    encapsulate(ctx, config, &remote, inner_tos, hash)?;
    Ok(Some(Counter::TxDirect))
}

/// The routed path for the IPv4 packet in `frame`: everything flannel.1 sends must be for a
/// remote subnet. Its flow is remembered, so that the fast path leaves the replies to the
/// stack as well. `Ok(TxEncapsulated)`: encapsulated and sent.
#[inline(always)]
pub fn routed(ctx: &TcContext, frame: &Frame, config: &OverlayConfig) -> Result<Counter, Counter> {
    let ip: &Ipv4Hdr = frame.header(ETH_HEADER_LEN).ok_or(Counter::TxMalformed)?;
    let inner_tos = ip.tos;
    let remote = maps::remote_vtep(ip.dst).ok_or(Counter::TxNoRoute)?;
    remember_replies::<EthIpv4Headers>(frame, config.vtep_ifindex);
    // As the fast path hashes, so that a flow keeps its source port whichever path it takes.
    let hash = packet_hash(ctx, || match flow_at::<EthIpv4Headers>(frame, 0) {
        Some(flow) => flow_hash(&flow),
        // SAFETY: the context's skb is valid for the whole program run.
        None => unsafe { bpf_get_hash_recalc(ctx.skb.skb) },
    });
    encapsulate(ctx, config, &remote, inner_tos, hash)?;
    Ok(Counter::TxEncapsulated)
}

/// Wraps the packet, whose Ethernet header becomes the inner one and whose flow hashes to
/// `flow_hash`, for `remote` and redirects it to the uplink.
#[inline(always)]
fn encapsulate(
    ctx: &TcContext,
    config: &OverlayConfig,
    remote: &RemoteVtep,
    inner_tos: u8,
    flow_hash: u32,
) -> Result<(), Counter> {
    // A superpacket above 64 KiB (BIG TCP) cannot say its length in the outer header; the
    // stack could not split it for us either, as tc runs before segmentation.
    if ctx.len() as usize - ETH_HEADER_LEN + ENCAP_LEN > IPV4_MAX_LEN {
        return Err(Counter::TxTooBig);
    }
    // RFC 6864: a datagram that may be fragmented (DF clear, as the kernel's vxlan device
    // sends it) needs an ID no other recent one between the same hosts has.
    // SAFETY: a plain helper call without arguments.
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ADJUST_ROOM_FLAGS)
        .map_err(|_| Counter::TxError)?;
    // Written in place: the room just made is in the linear area, and the store helper would
    // make the packet writable once more.
    let mut frame = linear_frame(ctx, ETH_HEADER_LEN + ENCAP_LEN);
    let place: &mut Encapsulation = frame.header_mut(ETH_HEADER_LEN).ok_or(Counter::TxError)?;
    *place = encapsulation(config, remote, inner_tos, ctx.len(), flow_hash, ip_id);
    redirect::to_uplink(config, None)?;
    count_sent(ctx, remote.peer, ENCAP_LEN);
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
