//! The uplink's VXLAN classifier: whether a frame is well-formed VXLAN for our port, VNI and
//! address, over IPv4 or IPv6, and what decapsulation and the checks need of it.
use core::mem::size_of;

use overlay_common::{Counter, OverlayConfig};
use overlay_ebpf::{
    ecn::{ECN_MASK, ipv6_ecn},
    lengths::ipv4_header_len,
    vxlan_fields::vni_of,
};

use crate::parse::{
    ETH_HEADER_LEN, EthIpv4Headers, EthIpv6Headers, Frame, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr, Ipv6Udp,
    UdpHdr, UdpPlace, VXLAN_FLAG_VNI, VxlanHdr, ipv6_udp,
};

const IPV4_MIN_HEADER_LEN: usize = size_of::<Ipv4Hdr>();
const IPV4_VERSION: u8 = 4;
const IPV6_VERSION: u8 = 6;

/// What decapsulation needs from a VXLAN frame over IPv4 for our port and VNI.
pub struct VxlanFrame {
    /// The outer source address: the sending host's PublicIP.
    pub outer_src: [u8; 4],
    /// Offset of the inner Ethernet header: how much to strip.
    pub inner_offset: usize,
    /// The inner Ethernet source: the sender's VtepMAC.
    pub inner_eth_src: [u8; 6],
    /// Whether the inner frame carries IPv4.
    pub inner_is_ipv4: bool,
    /// The inner IPv4 source (meaningless unless `inner_is_ipv4`).
    pub inner_src: [u8; 4],
    /// The ECN fields of the outer and (if `inner_is_ipv4`) the inner IPv4 header.
    pub outer_ecn: u8,
    pub inner_ecn: u8,
    /// The first fragment of a fragmented datagram: only the stack can reassemble it.
    pub first_fragment: bool,
    /// The sender set the outer UDP checksum, which only the stack verifies.
    pub has_udp_checksum: bool,
    /// The `peer_traffic` slot of the sender's lease holding the inner source; 0 until the
    /// checks find it.
    pub peer: u32,
}

/// What the checks and the IPv6 fast path need from a VXLAN frame over IPv6 for our port and
/// VNI; what the fast path does not deliver, the kernel decapsulates.
pub struct Vxlan6Frame {
    /// The outer source address: the sending host's PublicIPv6.
    pub outer_src: [u8; 16],
    /// Whether the inner frame carries IPv6.
    pub inner_is_ipv6: bool,
    /// The inner IPv6 source (meaningless unless `inner_is_ipv6`).
    pub inner_src: [u8; 16],
    /// Offset of the inner Ethernet header.
    pub inner_offset: usize,
    /// The outer ECN field.
    pub outer_ecn: u8,
    /// The first fragment of a fragmented datagram: only the stack can reassemble it.
    pub first_fragment: bool,
    /// As [`VxlanFrame::peer`].
    pub peer: u32,
}

/// Classifies an uplink frame whose Ethernet type is IPv4. `Ok` is a well-formed VXLAN frame
/// for our port and VNI; `Err` names the counter that describes why it is not.
#[inline(always)]
pub fn classify_ipv4_vxlan(frame: &Frame, config: &OverlayConfig) -> Result<VxlanFrame, Counter> {
    let ip_offset = ETH_HEADER_LEN;
    let ip: &Ipv4Hdr = frame.header(ip_offset).ok_or(Counter::RxMalformed)?;
    let ip_header_len = ipv4_header_len(ip.version_ihl);
    if ip.version_ihl >> 4 != IPV4_VERSION || ip_header_len < IPV4_MIN_HEADER_LEN {
        return Err(Counter::RxMalformed);
    }
    // Before the length checks: a TCP superpacket GRO merged beyond 64 KiB (BIG TCP) has a
    // total length of 0, which the kernel accepts for GSO TCP.
    if ip.protocol != IPPROTO_UDP {
        return Err(Counter::RxNotUdp);
    }
    let ip_total_len = usize::from(u16::from_be_bytes(ip.total_len));
    if ip_total_len < ip_header_len || ip_offset + ip_total_len > frame.len() {
        return Err(Counter::RxMalformed);
    }
    if ip.is_later_fragment() {
        return Err(Counter::RxIpv4Fragment);
    }
    let udp = UdpPlace {
        offset: ip_offset + ip_header_len,
        room: ip_total_len - ip_header_len,
        // A first fragment carries the headers, but its UDP length is the whole datagram's.
        first_fragment: ip.is_fragment(),
    };
    let payload =
        vxlan_payload::<EthIpv4Headers>(frame, &udp, config, || ip.dst == config.public_ip)?;
    Ok(VxlanFrame {
        outer_src: ip.src,
        inner_offset: payload.inner_offset,
        inner_eth_src: payload.inner.eth.src,
        inner_is_ipv4: payload.inner.eth.is_ipv4(),
        inner_src: payload.inner.ip.src,
        outer_ecn: ip.tos & ECN_MASK,
        inner_ecn: payload.inner.ip.tos & ECN_MASK,
        first_fragment: udp.first_fragment,
        has_udp_checksum: payload.has_udp_checksum,
        peer: 0,
    })
}

/// Classifies an uplink frame whose Ethernet type is IPv6, as [`classify_ipv4_vxlan`] does
/// IPv4. A UDP header behind one fragment header is found (only a first fragment has one);
/// behind any other extension header it is not looked for (`RxNotUdp`).
#[inline(always)]
pub fn classify_ipv6_vxlan(frame: &Frame, config: &OverlayConfig) -> Result<Vxlan6Frame, Counter> {
    let ip: &Ipv6Hdr = frame.header(ETH_HEADER_LEN).ok_or(Counter::RxMalformed)?;
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    if ip.version_class_flow[0] >> 4 != IPV6_VERSION
        || size_of::<EthIpv6Headers>() + payload_len > frame.len()
    {
        return Err(Counter::RxMalformed);
    }
    let udp = match ipv6_udp(frame, ip).ok_or(Counter::RxMalformed)? {
        Ipv6Udp::At(udp) => udp,
        Ipv6Udp::LaterFragment => return Err(Counter::RxIpv6Fragment),
        Ipv6Udp::NotUdp => return Err(Counter::RxNotUdp),
    };
    let payload =
        vxlan_payload::<EthIpv6Headers>(frame, &udp, config, || ip.dst == config.public_ipv6)?;
    Ok(Vxlan6Frame {
        outer_src: ip.src,
        inner_is_ipv6: payload.inner.eth.is_ipv6(),
        inner_src: payload.inner.ip.src,
        inner_offset: payload.inner_offset,
        outer_ecn: ipv6_ecn(ip.version_class_flow),
        first_fragment: udp.first_fragment,
        peer: 0,
    })
}

/// The VXLAN payload of a datagram: its inner Ethernet and IP headers (`Inner`).
struct VxlanPayload<'a, Inner> {
    /// Offset of the inner Ethernet header: how much to strip.
    inner_offset: usize,
    inner: &'a Inner,
    has_udp_checksum: bool,
}

/// Checks the UDP datagram at `udp` for VXLAN to our port, address (`to_us`) and VNI, with a
/// whole `Inner` in it; `Err` names why it is not. What is not ours is told apart first and
/// passes; only then do the strict checks of our own VXLAN apply.
#[inline(always)]
fn vxlan_payload<'a, Inner>(
    frame: &'a Frame,
    udp: &UdpPlace,
    config: &OverlayConfig,
    to_us: impl FnOnce() -> bool,
) -> Result<VxlanPayload<'a, Inner>, Counter> {
    let header: &UdpHdr = frame.header(udp.offset).ok_or(Counter::RxMalformed)?;
    if udp.room < size_of::<UdpHdr>() {
        return Err(Counter::RxMalformed);
    }
    if u16::from_be_bytes(header.dst_port) != config.vxlan_port {
        return Err(Counter::RxOtherPort);
    }
    if !to_us() {
        return Err(Counter::RxOtherDestination);
    }
    let udp_len = usize::from(u16::from_be_bytes(header.len));
    if udp_len < size_of::<UdpHdr>() || (!udp.first_fragment && udp_len > udp.room) {
        return Err(Counter::RxMalformed);
    }
    // What of the datagram this packet carries: a first fragment's ends with the fragment,
    // whatever bytes the frame has behind it.
    let carried = udp_len.min(udp.room);
    let vxlan_offset = udp.offset + size_of::<UdpHdr>();
    let inner_offset = vxlan_offset + size_of::<VxlanHdr>();
    let vxlan: &VxlanHdr = frame.header(vxlan_offset).ok_or(Counter::RxMalformed)?;
    if carried < size_of::<UdpHdr>() + size_of::<VxlanHdr>() {
        return Err(Counter::RxMalformed);
    }
    if vni_of(vxlan.vni) != config.vni {
        return Err(Counter::RxVxlanForeignVni);
    }
    let inner: &Inner = frame.header(inner_offset).ok_or(Counter::RxMalformed)?;
    // The kernel's vxlan device, without extensions, drops a frame with any other flag or
    // a reserved bit set.
    if carried < size_of::<UdpHdr>() + size_of::<VxlanHdr>() + size_of::<Inner>()
        || vxlan.flags != VXLAN_FLAG_VNI
        || vxlan.reserved != [0; 3]
        || vxlan.reserved2 != 0
    {
        return Err(Counter::RxMalformed);
    }
    Ok(VxlanPayload {
        inner_offset,
        inner,
        has_udp_checksum: header.checksum != [0; 2],
    })
}
