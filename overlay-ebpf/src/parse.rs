//! Packet headers, bounds-checked access, and the flows packets belong to.
//!
//! Every read goes through [`Frame::header`], which proves to the verifier that the whole
//! header lies inside the packet before handing out a reference.
use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use overlay_common::{FlowKey, FlowKey6};
use overlay_ebpf::{
    checksum::{fold, patched, ttl_decremented, word},
    ecn::ECN_CE,
};

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// IPv6's fragment extension header.
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ICMPV6: u8 = 58;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
/// The "valid VNI" flag, the only flag RFC 7348 defines.
pub const VXLAN_FLAG_VNI: u8 = 0x08;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
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
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8) and flow label (20).
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragmentHdr {
    pub next_header: u8,
    pub reserved: u8,
    /// Fragment offset (13 bits, in 8-byte units), two reserved bits, more-fragments.
    pub offset_flags: [u8; 2],
    pub id: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub checksum: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved: [u8; 3],
    pub vni: [u8; 3],
    pub reserved2: u8,
}

pub const ETH_HEADER_LEN: usize = size_of::<EthHdr>();
/// The IPv4 header byte of a header without options.
pub const IPV4_NO_OPTIONS: u8 = 0x45;
/// More-fragments flag and fragment offset, in the host-order `flags_frag_offset` word.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// The fragment offset alone: non-zero for every fragment but the first.
const IPV4_OFFSET: u16 = 0x1fff;
/// The fragment offset in the host-order `offset_flags` word: non-zero for every fragment but
/// the first.
const IPV6_FRAGMENT_OFFSET: u16 = 0xfff8;

impl EthHdr {
    pub fn ether_type(&self) -> u16 {
        u16::from_be_bytes(self.ether_type)
    }

    pub fn is_ipv4(&self) -> bool {
        self.ether_type() == ETH_P_IPV4
    }

    pub fn is_ipv6(&self) -> bool {
        self.ether_type() == ETH_P_IPV6
    }
}

impl Ipv4Hdr {
    /// RFC 1071 checksum of a 20-byte header, computed with its checksum field taken as zero.
    #[inline(always)]
    pub fn checksum(&self) -> [u8; 2] {
        let [length_hi, length_lo] = self.total_len;
        let [id_hi, id_lo] = self.id;
        let [frag_hi, frag_lo] = self.flags_frag_offset;
        let [s0, s1, s2, s3] = self.src;
        let [d0, d1, d2, d3] = self.dst;
        let sum = word(self.version_ihl, self.tos)
            + word(length_hi, length_lo)
            + word(id_hi, id_lo)
            + word(frag_hi, frag_lo)
            + word(self.ttl, self.protocol)
            + word(s0, s1)
            + word(s2, s3)
            + word(d0, d1)
            + word(d2, d3);
        (!fold(sum)).to_be_bytes()
    }

    /// What a router does to a packet it forwards: TTL − 1, with the checksum patched
    /// incrementally. The caller makes sure the TTL is above 1.
    #[inline(always)]
    pub fn decrement_ttl(&mut self) {
        self.ttl = self.ttl.wrapping_sub(1);
        self.checksum = ttl_decremented(self.checksum);
    }

    /// Marks the packet as having met congestion (ECN CE), with the checksum patched
    /// incrementally (RFC 1624, eqn. 3).
    #[inline(always)]
    pub fn set_ce(&mut self) {
        let old = u16::from_be_bytes([self.version_ihl, self.tos]);
        self.tos |= ECN_CE;
        let new = u16::from_be_bytes([self.version_ihl, self.tos]);
        self.checksum = patched(self.checksum, old, new);
    }

    /// Whether this is a fragment, the first one or another.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.flags_frag_offset) & IPV4_MF_OR_OFFSET != 0
    }

    /// Whether this is a fragment, and not the first one.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        u16::from_be_bytes(self.flags_frag_offset) & IPV4_OFFSET != 0
    }
}

/// The packet bytes a program may read, `[start, end)` as the kernel's context gives them,
/// and the packet's whole length, which for an skb may go on beyond them (paged data).
pub struct Frame {
    start: usize,
    end: usize,
    len: usize,
}

impl Frame {
    /// A packet that is all readable, as XDP sees it.
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self::with_len(start, end, end - start)
    }

    #[inline(always)]
    pub fn with_len(start: usize, end: usize, len: usize) -> Self {
        Self { start, end, len }
    }

    /// The whole packet's length, readable or not: what header length fields must agree with.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// The header `T` at `offset`, or `None` when the frame ends before the header does.
    #[inline(always)]
    pub fn header<T>(&self, offset: usize) -> Option<&T> {
        self.header_ptr(offset)
            // SAFETY: the header lies inside the packet (header_ptr checked), and every header
            // type is repr(C) of bytes, so any alignment and bit pattern is valid.
            .map(|header| unsafe { &*header })
    }

    /// Like [`Frame::header`], for rewriting the header in place.
    #[inline(always)]
    pub fn header_mut<T>(&mut self, offset: usize) -> Option<&mut T> {
        self.header_ptr(offset)
            // SAFETY: as in `header`; `&mut self` keeps other references to the frame out.
            .map(|header| unsafe { &mut *header })
    }

    #[inline(always)]
    fn header_ptr<T>(&self, offset: usize) -> Option<*mut T> {
        let header_start = self.start + offset;
        if header_start + size_of::<T>() > self.end {
            return None;
        }
        Some(header_start as *mut T)
    }
}

/// Where headers are read from: a frame's readable bytes, or an skb's bytes wherever they
/// lie, through the helper (which copies them).
pub trait Headers {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

impl Headers for Frame {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.header::<T>(offset).copied()
    }
}

impl Headers for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }
}

/// The packet of `ctx` as a frame whose first `wanted` bytes (or all of it, if shorter) are
/// readable. Headers of a GSO packet may sit outside the linear area; they are pulled in only
/// then, as the helper is not free. The frame's own bounds checks decide what is there.
#[inline(always)]
pub fn linear_frame(ctx: &TcContext, wanted: usize) -> Frame {
    let len = ctx.len() as usize;
    let wanted = wanted.min(len);
    if ctx.data() + wanted > ctx.data_end() {
        let _ = ctx.pull_data(wanted as u32);
    }
    Frame::with_len(ctx.data(), ctx.data_end(), len)
}

/// An Ethernet and an IPv4 header, read as one so a single bounds check covers both (the
/// verifier loses the bounds of a variable offset across helper calls).
#[repr(C)]
pub struct EthIpv4Headers {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
}

/// An Ethernet and an IPv6 header, read as one, as [`EthIpv4Headers`].
#[repr(C)]
pub struct EthIpv6Headers {
    pub eth: EthHdr,
    pub ip: Ipv6Hdr,
}

/// The first bytes of a transport header: the ports of TCP, UDP and the like (source, then
/// destination); type, code, checksum and identifier of an ICMP echo.
pub type TransportHead = [u8; 8];
/// The bytes a flow's key comes from: Ethernet, IPv4 without options, the transport head.
pub const FLOW_HEADERS_LEN: usize = size_of::<EthIpv4Headers>() + size_of::<TransportHead>();
/// The same for IPv6, and so for either family.
pub const IPV6_FLOW_HEADERS_LEN: usize = size_of::<EthIpv6Headers>() + size_of::<TransportHead>();

/// The flow `ip` belongs to, given the first bytes of its transport header; `None` for a
/// packet conntrack must see whatever its flow: one with IPv4 options, a fragment (only the
/// first carries ports), or an ICMP error (it is about another flow, whose translation the
/// stack must undo inside it).
#[inline(always)]
pub fn flow_of(ip: &Ipv4Hdr, transport: Option<&TransportHead>) -> Option<FlowKey> {
    let transport = transport?;
    if ip.version_ihl != IPV4_NO_OPTIONS || ip.is_fragment() {
        return None;
    }
    let (src_port, dst_port) = match ip.protocol {
        IPPROTO_ICMP => {
            let [kind, _code, _sum_hi, _sum_lo, id_hi, id_lo, _, _] = *transport;
            if kind != ICMP_ECHO_REQUEST && kind != ICMP_ECHO_REPLY {
                return None;
            }
            ([id_hi, id_lo], [id_hi, id_lo])
        }
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_DCCP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
            let [src_hi, src_lo, dst_hi, dst_lo, ..] = *transport;
            ([src_hi, src_lo], [dst_hi, dst_lo])
        }
        // conntrack tells other protocols' flows apart by their addresses alone.
        _ => ([0; 2], [0; 2]),
    };
    Some(FlowKey {
        src: ip.src,
        dst: ip.dst,
        src_port,
        dst_port,
        protocol: ip.protocol,
        reserved: [0; 3],
    })
}

/// The flow of the IPv6 packet `ip`, given the first bytes of its transport header, for TCP,
/// UDP and ICMPv6 echo right behind the fixed header; `None` for anything else (an ICMPv6
/// error is about another flow, extension headers hide the ports).
#[inline(always)]
pub fn flow_of6(ip: &Ipv6Hdr, transport: Option<&TransportHead>) -> Option<FlowKey6> {
    let transport = transport?;
    let (src_port, dst_port) = match ip.next_header {
        IPPROTO_ICMPV6 => {
            let [kind, _code, _sum_hi, _sum_lo, id_hi, id_lo, _, _] = *transport;
            if kind != ICMPV6_ECHO_REQUEST && kind != ICMPV6_ECHO_REPLY {
                return None;
            }
            ([id_hi, id_lo], [id_hi, id_lo])
        }
        IPPROTO_TCP | IPPROTO_UDP => {
            let [src_hi, src_lo, dst_hi, dst_lo, ..] = *transport;
            ([src_hi, src_lo], [dst_hi, dst_lo])
        }
        _ => return None,
    };
    Some(FlowKey6 {
        src: ip.src,
        dst: ip.dst,
        src_port,
        dst_port,
        protocol: ip.next_header,
        reserved: [0; 3],
    })
}

/// Ethernet and IP headers read as one, of either family, whose packet belongs to a flow.
pub trait EthIpHeaders {
    type Flow;

    /// The flow, given the first bytes of the transport header (see `flow_of`, `flow_of6`).
    fn flow(&self, transport: Option<&TransportHead>) -> Option<Self::Flow>;
}

impl EthIpHeaders for EthIpv4Headers {
    type Flow = FlowKey;

    #[inline(always)]
    fn flow(&self, transport: Option<&TransportHead>) -> Option<FlowKey> {
        flow_of(&self.ip, transport)
    }
}

impl EthIpHeaders for EthIpv6Headers {
    type Flow = FlowKey6;

    #[inline(always)]
    fn flow(&self, transport: Option<&TransportHead>) -> Option<FlowKey6> {
        flow_of6(&self.ip, transport)
    }
}

/// The flow of the packet whose Ethernet header is at `offset` in `frame`.
#[inline(always)]
pub fn flow_at<H: EthIpHeaders>(frame: &Frame, offset: usize) -> Option<H::Flow> {
    let headers = frame.header::<H>(offset)?;
    headers.flow(frame.header::<TransportHead>(offset + size_of::<H>()))
}

/// Whether the IPv6 packet `ip`, whose transport header starts at `transport` in `frame`,
/// carries a checksum over its pseudo-header and every byte behind it (TCP, UDP with a
/// checksum, or ICMPv6, right behind the fixed header) and ends where `frame` does: then its
/// transport bytes sum to the complement of its pseudo-header's sum, and an outer UDP
/// checksum around it follows from the headers alone.
#[inline(always)]
pub fn checksums_itself(frame: &Frame, transport: usize, ip: &Ipv6Hdr) -> bool {
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    // A zero length is a jumbogram's (BIG TCP).
    if payload_len == 0 || transport + payload_len != frame.len() {
        return false;
    }
    match ip.next_header {
        IPPROTO_TCP | IPPROTO_ICMPV6 => true,
        // A zero UDP checksum is no checksum.
        IPPROTO_UDP => frame
            .header::<UdpHdr>(transport)
            .is_some_and(|udp| udp.checksum != [0; 2]),
        _ => false,
    }
}

/// Where a UDP header starts, and how many bytes the IP header leaves it.
pub struct UdpPlace {
    pub offset: usize,
    /// The IP payload's length from the UDP header on: the UDP length may not exceed it, but
    /// for a first fragment.
    pub room: usize,
    /// The first fragment of a fragmented datagram.
    pub first_fragment: bool,
}

/// Where an IPv6 packet's UDP header is.
pub enum Ipv6Udp {
    /// Right behind the fixed header, or behind a fragment header at offset 0.
    At(UdpPlace),
    /// A fragment but the first: no headers to read.
    LaterFragment,
    /// Another protocol, or UDP behind another extension header.
    NotUdp,
}

/// Finds the UDP header of the IPv6 packet `ip` in `packet`; `None` when a fragment header is
/// cut short.
#[inline(always)]
pub fn ipv6_udp(packet: &impl Headers, ip: &Ipv6Hdr) -> Option<Ipv6Udp> {
    let after_ip = size_of::<EthIpv6Headers>();
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    match ip.next_header {
        IPPROTO_UDP => Some(Ipv6Udp::At(UdpPlace {
            offset: after_ip,
            room: payload_len,
            first_fragment: false,
        })),
        IPPROTO_FRAGMENT => {
            let fragment: Ipv6FragmentHdr = packet.read(after_ip)?;
            if payload_len < size_of::<Ipv6FragmentHdr>() {
                return None;
            }
            if u16::from_be_bytes(fragment.offset_flags) & IPV6_FRAGMENT_OFFSET != 0 {
                return Some(Ipv6Udp::LaterFragment);
            }
            if fragment.next_header != IPPROTO_UDP {
                return Some(Ipv6Udp::NotUdp);
            }
            Some(Ipv6Udp::At(UdpPlace {
                offset: after_ip + size_of::<Ipv6FragmentHdr>(),
                room: payload_len - size_of::<Ipv6FragmentHdr>(),
                first_fragment: true,
            }))
        }
        _ => Some(Ipv6Udp::NotUdp),
    }
}
