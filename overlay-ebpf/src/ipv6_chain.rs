//! IPv6's extension header chain, walked to the upper-layer header the way the kernel's
//! receive path walks it: hop-by-hop, routing, destination options, authentication and
//! fragment headers, each read through the helper (the offsets vary), within the IP payload
//! (bytes after it are padding the stack trims) and at most [`MAX_EXTENSION_HEADERS`] of
//! them. What cannot be followed that far is `tx_ipv6_unchecked`.
use core::mem::size_of;

use overlay_common::Counter;

use crate::parse::{EthIpv6Headers, Headers, IPPROTO_FRAGMENT, Ipv6FragmentHdr, Ipv6Hdr};

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up: what a host sends carries one or two.
const MAX_EXTENSION_HEADERS: usize = 8;
/// The fragment offset in the host-order `offset_flags` word: non-zero for every fragment but
/// the first.
const FRAGMENT_OFFSET: u16 = 0xfff8;

/// Whether a datagram comes whole or in fragments, and which.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragmentation {
    Whole,
    /// The first fragment (offset 0) of the datagram with this identification.
    First([u8; 4]),
    /// A fragment but the first: the chain and the upper-layer header are not in it.
    Later([u8; 4]),
}

/// Where an IPv6 packet's upper-layer header is.
pub struct UpperLayer {
    /// Its protocol (the last next-header value), or, in a later fragment, the fragment
    /// header's next header.
    pub protocol: u8,
    pub offset: usize,
    /// Where the IP payload ends in the packet.
    pub end: usize,
    pub fragmentation: Fragmentation,
}

/// Walks the extension headers of the IPv6 packet `ip` in `packet`, `packet_len` bytes long,
/// to its upper-layer header.
#[inline(always)]
pub fn upper_layer(
    packet: &impl Headers,
    ip: &Ipv6Hdr,
    packet_len: usize,
) -> Result<UpperLayer, Counter> {
    let mut upper = UpperLayer {
        protocol: ip.next_header,
        offset: size_of::<EthIpv6Headers>(),
        end: payload_end(ip, packet_len),
        fragmentation: Fragmentation::Whole,
    };
    for _ in 0..MAX_EXTENSION_HEADERS {
        let length = match upper.protocol {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let [next, units]: [u8; 2] = read_within(packet, upper.offset, upper.end)?;
                upper.protocol = next;
                (usize::from(units) + 1) * 8
            }
            IPPROTO_AH => {
                let [next, units]: [u8; 2] = read_within(packet, upper.offset, upper.end)?;
                upper.protocol = next;
                (usize::from(units) + 2) * 4
            }
            IPPROTO_FRAGMENT => {
                let fragment: Ipv6FragmentHdr = read_within(packet, upper.offset, upper.end)?;
                upper.protocol = fragment.next_header;
                if u16::from_be_bytes(fragment.offset_flags) & FRAGMENT_OFFSET != 0 {
                    upper.fragmentation = Fragmentation::Later(fragment.id);
                    return Ok(upper);
                }
                upper.fragmentation = Fragmentation::First(fragment.id);
                size_of::<Ipv6FragmentHdr>()
            }
            _ => return Ok(upper),
        };
        upper.offset += length;
    }
    match upper.protocol {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
            Err(Counter::TxIpv6Unchecked)
        }
        _ => Ok(upper),
    }
}

/// Where the payload of `ip` ends; a zero payload length is a jumbogram's (BIG TCP), which
/// runs to the end of the packet.
#[inline(always)]
fn payload_end(ip: &Ipv6Hdr, packet_len: usize) -> usize {
    match usize::from(u16::from_be_bytes(ip.payload_len)) {
        0 => packet_len,
        payload_len => size_of::<EthIpv6Headers>() + payload_len,
    }
}

/// The `T` at `offset`, if it lies inside the IP payload, which ends at `end`.
#[inline(always)]
pub fn read_within<T: Copy>(
    packet: &impl Headers,
    offset: usize,
    end: usize,
) -> Result<T, Counter> {
    if offset + size_of::<T>() > end {
        return Err(Counter::TxIpv6Unchecked);
    }
    packet.read(offset).ok_or(Counter::TxIpv6Unchecked)
}
