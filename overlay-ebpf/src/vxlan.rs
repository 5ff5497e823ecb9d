//! The headers VXLAN puts in front of a packet, as the kernel's vxlan devices write them, and
//! the outer UDP checksum over IPv6, which encapsulation computes and delivery verifies.
use core::mem::size_of;

use overlay_common::OverlayConfig;
use overlay_ebpf::{
    checksum::{udp_checksum, word, words_sum},
    vxlan_fields::{source_port, vni_bytes},
};

use crate::parse::{
    ETH_P_IPV6, EthHdr, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr, UdpHdr, VXLAN_FLAG_VNI, VxlanHdr,
};

/// What goes between the outer Ethernet header and the inner IPv4 header.
#[repr(C)]
pub struct Encapsulation {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

/// What goes between the outer Ethernet header and the inner IPv6 header.
#[repr(C)]
pub struct Encapsulation6 {
    pub ip: Ipv6Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

pub const ENCAP_LEN: usize = size_of::<Encapsulation>();
pub const ENCAP6_LEN: usize = size_of::<Encapsulation6>();

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
    VxlanHdr {
        flags: VXLAN_FLAG_VNI,
        reserved: [0; 3],
        vni: vni_bytes(config.vni),
        reserved2: 0,
    }
}

/// The inner packet's share of the outer UDP checksum: its IPv6 header and its transport
/// bytes, which sum to the complement of its pseudo-header's sum once their own checksum is
/// complete. Addresses and length are in both and cancel; what is left is the first word
/// pair, next header and hop limit, less the next header.
#[inline(always)]
pub fn inner_checksum_part(ip: &Ipv6Hdr) -> u32 {
    let [vcf0, vcf1, vcf2, vcf3] = ip.version_class_flow;
    word(vcf0, vcf1)
        + word(vcf2, vcf3)
        + word(ip.next_header, ip.hop_limit)
        + u32::from(!u16::from(ip.next_header))
}

/// The outer UDP checksum of a datagram `udp_len` bytes long behind `headers`, whose inner
/// packet contributes `inner_part`: the outer pseudo-header, the UDP, VXLAN and inner
/// Ethernet headers, and the inner packet.
#[inline(always)]
pub fn outer_udp_checksum(headers: &Encapsulation6, inner_part: u32, udp_len: u16) -> u16 {
    let [src_port_hi, src_port_lo] = headers.udp.src_port;
    let [dst_port_hi, dst_port_lo] = headers.udp.dst_port;
    let [vni_hi, vni_mid, vni_lo] = headers.vxlan.vni;
    let eth = &headers.inner_eth;
    udp_checksum(
        words_sum(&headers.ip.src)
            + words_sum(&headers.ip.dst)
            // The length is in the pseudo-header and in the UDP header.
            + 2 * u32::from(udp_len)
            + u32::from(IPPROTO_UDP)
            + word(src_port_hi, src_port_lo)
            + word(dst_port_hi, dst_port_lo)
            + word(headers.vxlan.flags, 0)
            + word(vni_hi, vni_mid)
            + word(vni_lo, 0)
            + words_sum(&eth.dst)
            + words_sum(&eth.src)
            + u32::from(ETH_P_IPV6)
            + inner_part,
    )
}
