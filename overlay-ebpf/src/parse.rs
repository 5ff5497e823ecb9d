//! Bounds-checked header access and the VXLAN classifier.
//!
//! Every read goes through [`Frame::header`], which proves to the verifier that the whole
//! header lies inside the packet before handing out a reference.
use core::mem::size_of;

use overlay_common::{Counter, OverlayConfig};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const IPPROTO_UDP: u8 = 17;
/// The "valid VNI" flag, the only flag RFC 7348 defines.
pub const VXLAN_FLAG_VNI: u8 = 0x08;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub flags_frag_offset: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub checksum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub checksum: [u8; 2],
}

#[repr(C)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved: [u8; 3],
    pub vni: [u8; 3],
    pub reserved2: u8,
}

const IPV4_MIN_HEADER_LEN: usize = size_of::<Ipv4Hdr>();
/// More-fragments flag and fragment offset, in the host-order `flags_frag_offset` word.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;

/// The packet bytes a program may read: `[start, end)` as the kernel's context gives them.
pub struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// The header `T` at `offset`, or `None` when the frame ends before the header does.
    #[inline(always)]
    pub fn header<T>(&self, offset: usize) -> Option<&T> {
        let header_start = self.start + offset;
        if header_start + size_of::<T>() > self.end {
            return None;
        }
        // SAFETY: the header lies inside [start, end), the packet the kernel handed us, and every
        // header type is repr(C) of byte arrays, so any alignment and bit pattern is valid.
        Some(unsafe { &*(header_start as *const T) })
    }
}

/// Classifies an uplink frame. `Ok` means a well-formed VXLAN frame for our port and VNI; `Err`
/// names the counter that describes why it is not.
#[inline(always)]
pub fn classify_vxlan(frame: &Frame, config: &OverlayConfig) -> Result<(), Counter> {
    let eth: &EthHdr = frame.header(0).ok_or(Counter::RxMalformed)?;
    if u16::from_be_bytes(eth.ether_type) != ETH_P_IPV4 {
        return Err(Counter::RxNotIpv4);
    }
    let ip_offset = size_of::<EthHdr>();
    let ip: &Ipv4Hdr = frame.header(ip_offset).ok_or(Counter::RxMalformed)?;
    let ip_header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    let ip_total_len = usize::from(u16::from_be_bytes(ip.total_len));
    if ip.version_ihl >> 4 != 4
        || ip_header_len < IPV4_MIN_HEADER_LEN
        || ip_total_len < ip_header_len
        || ip_offset + ip_total_len > frame.len()
    {
        return Err(Counter::RxMalformed);
    }
    if ip.protocol != IPPROTO_UDP {
        return Err(Counter::RxNotUdp);
    }
    if u16::from_be_bytes(ip.flags_frag_offset) & IPV4_MF_OR_OFFSET != 0 {
        return Err(Counter::RxIpv4Fragment);
    }

    let udp_offset = ip_offset + ip_header_len;
    let udp: &UdpHdr = frame.header(udp_offset).ok_or(Counter::RxMalformed)?;
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    if udp_len < size_of::<UdpHdr>() || udp_len > ip_total_len - ip_header_len {
        return Err(Counter::RxMalformed);
    }
    if u16::from_be_bytes(udp.dst_port) != config.vxlan_port {
        return Err(Counter::RxOtherPort);
    }

    let vxlan_offset = udp_offset + size_of::<UdpHdr>();
    let inner_offset = vxlan_offset + size_of::<VxlanHdr>();
    let vxlan: &VxlanHdr = frame.header(vxlan_offset).ok_or(Counter::RxMalformed)?;
    if udp_len < size_of::<UdpHdr>() + size_of::<VxlanHdr>() + size_of::<EthHdr>()
        || frame.header::<EthHdr>(inner_offset).is_none()
        || vxlan.flags & VXLAN_FLAG_VNI == 0
    {
        return Err(Counter::RxMalformed);
    }
    let [vni_hi, vni_mid, vni_lo] = vxlan.vni;
    if u32::from_be_bytes([0, vni_hi, vni_mid, vni_lo]) != config.vni {
        return Err(Counter::RxVxlanForeignVni);
    }
    Ok(())
}
