//! What a container may send over IPv6 (see `claims` for the frame around it).
//!
//! Every IPv6 source but the unspecified one (duplicate address detection), link-local ones
//! included, is a claim bound to the container port that first sent from it, as IPv4 sources
//! are, and so is the target of a Neighbour Advertisement; in a network with IPv6 either must
//! also be one a container may use (`may_send_from`). Neighbour discovery is checked as the
//! kernel's `ndisc` reads it: a link-layer address option must name the frame's own source,
//! and Router Advertisements and Redirects, which a neighbour would take from whoever sends
//! them, are dropped. The extension header chain is walked to the upper layer (see
//! `ipv6_chain`), so neither UDP to the VXLAN port nor neighbour discovery hides behind it;
//! a fragment after the first passes only behind a first fragment that passed from the same
//! port.
use aya_ebpf::programs::TcContext;
use overlay_common::{Counter, OverlayConfig, ipv6_in_subnet};

use crate::{
    ipv6_chain::{Fragmentation, UpperLayer, read_within, upper_layer},
    maps::{self, Fragment6},
    parse::{IPPROTO_ICMPV6, IPPROTO_UDP, Ipv6Hdr, UdpHdr},
};

/// fe80::/10, in the first 16 bits of an address.
const IPV6_LINK_LOCAL: u16 = 0xfe80;
const IPV6_LINK_LOCAL_MASK: u16 = 0xffc0;
const IPV6_MULTICAST: u8 = 0xff;
/// The bit EUI-64 flips in a MAC's first byte.
const EUI64_UNIVERSAL_LOCAL: u8 = 0x02;
const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
const NEIGHBOUR_SOLICITATION: u8 = 135;
const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const REDIRECT: u8 = 137;
/// Where the options start in a Router Solicitation (type, code, checksum, reserved) and in
/// a Neighbour Solicitation or Advertisement (the same, then the target address).
const ROUTER_SOLICITATION_OPTIONS: usize = 8;
const NEIGHBOUR_MESSAGE_OPTIONS: usize = 24;
const NEIGHBOUR_MESSAGE_TARGET: usize = 8;
const OPTION_SOURCE_LINK_LAYER: u8 = 1;
const OPTION_TARGET_LINK_LAYER: u8 = 2;
/// Options walked before giving up: a solicitation or advertisement carries one or two.
const MAX_NDP_OPTIONS: usize = 4;

/// A neighbour discovery option's type and length (in 8-byte units), and the Ethernet
/// address a link-layer address option holds.
#[repr(C)]
#[derive(Clone, Copy)]
struct NdpOption {
    kind: u8,
    units: u8,
    mac: [u8; 6],
}

/// Checks the IPv6 packet `ip` heads, of a frame from `mac` on container `port` whose source
/// is claimed already.
#[inline(always)]
pub fn check_ipv6(
    ctx: &TcContext,
    ip: &Ipv6Hdr,
    mac: &[u8; 6],
    config: &OverlayConfig,
    port: u32,
) -> Result<(), Counter> {
    let upper = upper_layer(ctx, ip, ctx.len() as usize)?;
    match upper.fragmentation {
        Fragmentation::Later(id) if maps::sent_first_fragment(&datagram(ip, id), port) => {
            return Ok(());
        }
        Fragmentation::Later(_) => return Err(Counter::TxIpv6Unchecked),
        _ => {}
    }
    match upper.protocol {
        IPPROTO_UDP => check_udp(ctx, &upper, config)?,
        IPPROTO_ICMPV6 => check_icmpv6(ctx, &upper, mac, config, port)?,
        _ => {}
    }
    if let Fragmentation::First(id) = upper.fragmentation {
        maps::note_first_fragment(&datagram(ip, id), port);
    }
    Ok(())
}

/// The datagram the fragment `ip`, with identification `id`, belongs to.
#[inline(always)]
fn datagram(ip: &Ipv6Hdr, id: [u8; 4]) -> Fragment6 {
    Fragment6 {
        src: ip.src,
        dst: ip.dst,
        id,
    }
}

#[inline(always)]
fn check_udp(ctx: &TcContext, upper: &UpperLayer, config: &OverlayConfig) -> Result<(), Counter> {
    let udp: UdpHdr = read_within(ctx, upper.offset, upper.end)?;
    if u16::from_be_bytes(udp.dst_port) == config.vxlan_port {
        return Err(Counter::TxVxlanFromContainer);
    }
    Ok(())
}

/// Neighbour discovery, whatever its hop limit and code (the kernel takes only 255 and 0,
/// but nothing a container sends needs any other).
#[inline(always)]
fn check_icmpv6(
    ctx: &TcContext,
    upper: &UpperLayer,
    mac: &[u8; 6],
    config: &OverlayConfig,
    port: u32,
) -> Result<(), Counter> {
    let [kind, _code]: [u8; 2] = read_within(ctx, upper.offset, upper.end)?;
    let neighbour_discovery = matches!(
        kind,
        ROUTER_SOLICITATION | NEIGHBOUR_SOLICITATION | NEIGHBOUR_ADVERTISEMENT
    );
    match kind {
        ROUTER_ADVERTISEMENT | REDIRECT => Err(Counter::TxRouterMessage),
        // The kernel takes fragmented neighbour discovery where `suppress_frag_ndisc` is off.
        _ if neighbour_discovery && upper.fragmentation != Fragmentation::Whole => {
            Err(Counter::TxIpv6Unchecked)
        }
        ROUTER_SOLICITATION => {
            check_link_layer_options(ctx, upper.offset + ROUTER_SOLICITATION_OPTIONS, upper, mac)
        }
        NEIGHBOUR_SOLICITATION => {
            check_link_layer_options(ctx, upper.offset + NEIGHBOUR_MESSAGE_OPTIONS, upper, mac)
        }
        NEIGHBOUR_ADVERTISEMENT => {
            let target: [u8; 16] =
                read_within(ctx, upper.offset + NEIGHBOUR_MESSAGE_TARGET, upper.end)?;
            claim_address6(&target, port, config)?;
            check_link_layer_options(ctx, upper.offset + NEIGHBOUR_MESSAGE_OPTIONS, upper, mac)
        }
        _ => Ok(()),
    }
}

/// Every source or target link-layer address option from `offset` to the end of the message
/// must name `mac`, the frame's source: the receiver's neighbour entry takes it.
#[inline(always)]
fn check_link_layer_options(
    ctx: &TcContext,
    mut offset: usize,
    upper: &UpperLayer,
    mac: &[u8; 6],
) -> Result<(), Counter> {
    for _ in 0..MAX_NDP_OPTIONS {
        if offset >= upper.end {
            return Ok(());
        }
        // An option shorter than 8 bytes, or of length 0, makes the kernel drop the message.
        let option: NdpOption = read_within(ctx, offset, upper.end)?;
        if option.units == 0 {
            return Err(Counter::TxIpv6Unchecked);
        }
        let link_layer = matches!(
            option.kind,
            OPTION_SOURCE_LINK_LAYER | OPTION_TARGET_LINK_LAYER
        );
        if link_layer && option.mac != *mac {
            return Err(Counter::TxSpoofedMac);
        }
        offset += usize::from(option.units) * 8;
    }
    if offset >= upper.end {
        Ok(())
    } else {
        Err(Counter::TxIpv6Unchecked)
    }
}

/// Binds `address`, an IPv6 source or advertised target, to `port`; the unspecified address
/// binds nothing.
#[inline(always)]
pub fn claim_address6(
    address: &[u8; 16],
    port: u32,
    config: &OverlayConfig,
) -> Result<(), Counter> {
    if *address == [0; 16] {
        return Ok(());
    }
    if !may_claim_address6(address, config) || !maps::bind_address6(address, port) {
        return Err(Counter::TxIpv6SpoofedSource);
    }
    Ok(())
}

/// An IPv6 address a port may bind: no multicast address, not the bridge's link-local one,
/// and in a network with IPv6 one a container may send from.
#[inline(always)]
pub fn may_claim_address6(address: &[u8; 16], config: &OverlayConfig) -> bool {
    address[0] != IPV6_MULTICAST
        && *address != bridge_link_local(config)
        && (!config.ipv6() || may_send_from(address, config))
}

/// The bridge's link-local address as the kernel makes it by default (`addr_gen_mode`
/// eui64): fe80:: and the EUI-64 interface identifier of its MAC. The host's own, which its
/// containers' neighbour entries for their gateway may name.
#[inline(always)]
fn bridge_link_local(config: &OverlayConfig) -> [u8; 16] {
    let [m0, m1, m2, m3, m4, m5] = config.bridge_mac;
    [
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m0 ^ EUI64_UNIVERSAL_LOCAL,
        m1,
        m2,
        0xff,
        0xfe,
        m3,
        m4,
        m5,
    ]
}

/// An IPv6 source a container may use: unspecified, link-local, or an address of this host's
/// IPv6 lease that is not the host's own (the bridge's, the lease's network address).
#[inline(always)]
fn may_send_from(address: &[u8; 16], config: &OverlayConfig) -> bool {
    let [first, second, ..] = *address;
    let link_local = u16::from_be_bytes([first, second]) & IPV6_LINK_LOCAL_MASK == IPV6_LINK_LOCAL;
    *address == [0; 16]
        || link_local
        || (ipv6_in_subnet(address, &config.local_subnet6, &config.local_netmask6)
            && *address != config.local_subnet6
            && *address != config.bridge_ipv6)
}
