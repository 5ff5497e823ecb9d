//! Encapsulation in VXLAN over IPv6. The fast path, in `tc_container_ingress`: a container's
//! IPv6 packet for a remote IPv6 subnet is routed here as docker0 would (hop limit − 1),
//! wrapped in VXLAN over IPv6 as flannel-v6.<VNI> wraps it, and sent straight out of the
//! uplink.
//!
//! Over IPv6 the outer UDP checksum is not optional: flannel-v6.<VNI> sends it, and a stock
//! flannel receiver drops a datagram without one. It is computed from the headers alone. An
//! inner TCP, UDP or ICMPv6 packet carries a checksum over its pseudo-header and payload, so
//! once that checksum is complete (now, or when the uplink or the stack completes an
//! offloaded one) the inner transport bytes sum to the complement of the inner pseudo-header
//! sum; the outer checksum is that plus the sum of every header in between. The payload is
//! never read. A TCP superpacket gets the checksum of one full segment: segmentation changes
//! nothing the outer checksum covers but the UDP length (the inner lengths and addresses
//! cancel against the inner pseudo-header), so every segment of the same length carries the
//! right one. A superpacket whose last segment would be shorter, and whatever the identity
//! does not hold for, take the routed path.
//!
//! On flannel-v6.<VNI>'s egress (the routed path: the host's own packets, the fast path's
//! leftovers, flows conntrack translated) the same encapsulation takes what the stack has
//! routed, hop limit already spent; what the headers cannot give a checksum for goes on to
//! flannel-v6.<VNI>, which checksums each segment itself.
use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::bpf_get_hash_recalc,
    programs::TcContext,
};
use core::mem::size_of;
use overlay_common::{Counter, OverlayConfig, RemoteVtep6};
use overlay_ebpf::{
    ecn::{ipv6_ecn, outer_ecn},
    lengths::tcp_segment_len,
    vxlan_fields::flow6_hash,
};

use super::{ADJUST_ROOM_TUNNEL_FLAGS, count_sent, fits_device, packet_hash};
use crate::{
    flows::remember_replies,
    maps,
    parse::{
        ETH_HEADER_LEN, ETH_P_IPV6, EthIpv6Headers, Frame, IPPROTO_TCP, IPPROTO_UDP, Ipv6Hdr,
        TransportHead, UdpHdr, VxlanHdr, checksums_itself, flow_at, flow_of6, linear_frame,
    },
    redirect,
    vxlan::{
        ENCAP6_LEN, Encapsulation6, inner_checksum_part, outer_udp_checksum, udp_header,
        vxlan_header,
    },
};

/// What the outer UDP length counts beyond the inner transport header and payload.
const UDP_HEADERS_LEN: usize =
    size_of::<UdpHdr>() + size_of::<VxlanHdr>() + size_of::<EthIpv6Headers>();
const ADJUST_ROOM_FLAGS6: u64 = ADJUST_ROOM_TUNNEL_FLAGS | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64;
/// Where the inner transport header starts, in the frame as the container sent it.
const TRANSPORT_OFFSET: usize = size_of::<EthIpv6Headers>();
/// The bytes read: Ethernet, IPv6, and the TCP header up to its data offset.
const HEADERS_LEN: usize = TRANSPORT_OFFSET + size_of::<TcpHead>();
/// The most the outer IPv6 payload length (and the UDP length) can say.
const IPV6_MAX_PAYLOAD: usize = u16::MAX as usize;
/// The outer hop limit flannel-v6.<VNI> sends with (the kernel's default, `ttl auto`).
const OUTER_HOP_LIMIT: u8 = 64;
const IPV6_VERSION_BITS: u8 = 0x60;

/// A TCP header up to the data offset, which gives the header's length.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    ports_and_numbers: [u8; 12],
    data_offset: u8,
}

/// The IPv6 fast path, as `v4::from_container` is IPv4's. Not inlined: the verifier's
/// 512-byte stack cannot hold both families' paths in one frame.
#[inline(never)]
pub fn from_container(ctx: &TcContext, config: &OverlayConfig) -> Result<Option<Counter>, Counter> {
    let mut frame = linear_frame(ctx, HEADERS_LEN);
    let Some(headers) = frame.header::<EthIpv6Headers>(0) else {
        return Ok(None);
    };
    if !config.ipv6() || headers.eth.dst != config.bridge_mac {
        return Ok(None);
    }
    let Some(remote) = maps::remote_vtep6(&headers.ip.dst) else {
        return Ok(None);
    };
    if headers.ip.hop_limit <= 1 || !fits_device(ctx, config.vtep6_ifindex, config.vtep6_mtu) {
        return Err(Counter::TxSlowPath);
    }
    let segment_len = transport_segment_len(ctx, &frame, &headers.ip)?;
    let flow = flow_of6(&headers.ip, frame.header::<TransportHead>(TRANSPORT_OFFSET))
        .ok_or(Counter::TxRoutedFlow)?;
    if maps::takes_routed_path(&flow) {
        return Err(Counter::TxRoutedFlow);
    }
    let headers: &mut EthIpv6Headers = frame.header_mut(0).ok_or(Counter::TxError)?;
    headers.ip.hop_limit -= 1;
    let inner = InnerPacket::of(&headers.ip, segment_len);
    let hash = packet_hash(ctx, || flow6_hash(&flow));
    encapsulate(ctx, config, &remote, &inner, hash)?;
    Ok(Some(Counter::TxDirect))
}

/// The routed path for IPv6, on flannel-v6.<VNI>'s egress: the stack has routed the packet
/// and addressed it to the peer's VTEP. Its flow is remembered, as on flannel.<VNI>. What the
/// headers give an outer checksum for is encapsulated here (`TxEncapsulated`); the rest, and
/// what no IPv6 lease covers (the kernel's own neighbour discovery, say), goes on to
/// flannel-v6.<VNI> (`TxIpv6Routed`). Not inlined, as `from_container`.
#[inline(never)]
pub fn routed(ctx: &TcContext, config: &OverlayConfig) -> Counter {
    let frame = linear_frame(ctx, HEADERS_LEN);
    let Some(headers) = frame.header::<EthIpv6Headers>(0) else {
        return Counter::TxMalformed;
    };
    remember_replies::<EthIpv6Headers>(&frame, config.vtep6_ifindex);
    let Some(remote) = maps::remote_vtep6(&headers.ip.dst) else {
        return Counter::TxIpv6Routed;
    };
    let Ok(segment_len) = transport_segment_len(ctx, &frame, &headers.ip) else {
        return Counter::TxIpv6Routed;
    };
    let inner = InnerPacket::of(&headers.ip, segment_len);
    // As the fast path hashes, so that a flow keeps its source port whichever path it takes.
    let hash = packet_hash(ctx, || match flow_at::<EthIpv6Headers>(&frame, 0) {
        Some(flow) => flow6_hash(&flow),
        // SAFETY: the context's skb is valid for the whole program run.
        None => unsafe { bpf_get_hash_recalc(ctx.skb.skb) },
    });
    match encapsulate(ctx, config, &remote, &inner, hash) {
        Ok(()) => Counter::TxEncapsulated,
        Err(failure) => failure,
    }
}

/// The length of the inner transport segment each packet on the wire will carry: the whole
/// transport payload, or for a TCP superpacket one full segment. `Err` when the outer
/// checksum cannot be had from the headers (see the module's comment).
#[inline(always)]
fn transport_segment_len(ctx: &TcContext, frame: &Frame, ip: &Ipv6Hdr) -> Result<u16, Counter> {
    if !checksums_itself(frame, TRANSPORT_OFFSET, ip)
        || ctx.len() as usize + ENCAP6_LEN - size_of::<EthIpv6Headers>() > IPV6_MAX_PAYLOAD
    {
        return Err(Counter::TxSlowPath);
    }
    let payload_len = u16::from_be_bytes(ip.payload_len);
    // SAFETY: the context's skb is valid for the whole program run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return Ok(payload_len);
    }
    if ip.next_header != IPPROTO_TCP {
        return Err(Counter::TxSlowPath);
    }
    let tcp: &TcpHead = frame.header(TRANSPORT_OFFSET).ok_or(Counter::TxSlowPath)?;
    tcp_segment_len(payload_len, tcp.data_offset, gso_size)
}

/// What the outer headers need of the inner packet, read before they go in front of it.
struct InnerPacket {
    /// The inner packet's share of the outer UDP checksum (see `inner_checksum_part`).
    checksum_part: u32,
    /// The inner ECN field.
    ecn: u8,
    /// The length of the transport segment each packet on the wire carries.
    segment_len: u16,
}

impl InnerPacket {
    /// `ip` as it goes on the wire, each packet carrying `segment_len` transport bytes.
    #[inline(always)]
    fn of(ip: &Ipv6Hdr, segment_len: u16) -> Self {
        Self {
            checksum_part: inner_checksum_part(ip),
            ecn: ipv6_ecn(ip.version_class_flow),
            segment_len,
        }
    }
}

/// Wraps the packet, whose Ethernet header becomes the inner one and whose flow hashes to
/// `flow_hash`, for `remote` and redirects it to the uplink.
#[inline(always)]
fn encapsulate(
    ctx: &TcContext,
    config: &OverlayConfig,
    remote: &RemoteVtep6,
    inner: &InnerPacket,
    flow_hash: u32,
) -> Result<(), Counter> {
    ctx.adjust_room(ENCAP6_LEN as i32, BPF_ADJ_ROOM_MAC, ADJUST_ROOM_FLAGS6)
        .map_err(|_| Counter::TxError)?;
    let mut frame = linear_frame(ctx, ETH_HEADER_LEN + ENCAP6_LEN);
    let headers: &mut Encapsulation6 = frame.header_mut(ETH_HEADER_LEN).ok_or(Counter::TxError)?;
    write_encapsulation6(headers, config, remote, inner, ctx.len(), flow_hash);
    redirect::to_uplink(config, None)?;
    count_sent(ctx, remote.peer, ENCAP6_LEN);
    Ok(())
}

/// Writes the outer IPv6, UDP and VXLAN headers, in place, for a packet that is `skb_len`
/// bytes long with them, as flannel-v6.<VNI> writes them: traffic class from the inner ECN
/// field (RFC 6040), no flow label, hop limit 64, and the UDP checksum of a packet whose inner
/// transport segment is `inner.segment_len` bytes long. In place: a copy on the stack would
/// hold every address byte in a slot of its own.
#[inline(always)]
fn write_encapsulation6(
    headers: &mut Encapsulation6,
    config: &OverlayConfig,
    remote: &RemoteVtep6,
    inner: &InnerPacket,
    skb_len: u32,
    flow_hash: u32,
) {
    let payload_len = skb_len as u16 - size_of::<EthIpv6Headers>() as u16;
    let ip = &mut headers.ip;
    ip.version_class_flow = [IPV6_VERSION_BITS, outer_ecn(inner.ecn) << 4, 0, 0];
    ip.payload_len = payload_len.to_be_bytes();
    ip.next_header = IPPROTO_UDP;
    ip.hop_limit = OUTER_HOP_LIMIT;
    ip.src = config.public_ipv6;
    ip.dst = remote.public_ipv6;
    headers.udp = udp_header(config, flow_hash, payload_len);
    headers.vxlan = vxlan_header(config);
    headers.inner_eth.dst = remote.mac;
    headers.inner_eth.src = config.vtep6_mac;
    headers.inner_eth.ether_type = ETH_P_IPV6.to_be_bytes();
    let segment_udp_len = UDP_HEADERS_LEN as u16 + inner.segment_len;
    headers.udp.checksum =
        outer_udp_checksum(headers, inner.checksum_part, segment_udp_len).to_be_bytes();
}
