//! What a container may send, by allowlist: IPv4, IPv6 and ARP for IPv4 over Ethernet, each
//! checked; every other frame (a VLAN tag, in the frame or taken off by the veth into the
//! packet's metadata; another ethertype; ARP of another shape) is dropped and counted, as no
//! check here looks past it while the host's stack or a neighbour's might. Tagged frames go
//! on, their source MAC still claimed but nothing behind the tag checked, only where the
//! operator asked for it (`--container-vlans`).
//!
//! Every frame's source MAC, IPv4 source and ARP sender address is
//! a claim, bound to the container port (the host side of the veth) that first made it, for
//! as long as that port lives: a neighbour cannot take over an address or a MAC by ARP or by
//! sending from it, so the bridge's forwarding database, the host's neighbour table and the
//! agent's endpoint map, all learned from these frames, stay right. A container cannot send
//! from outside this host's lease either, nor from the host's own addresses, nor to the VXLAN
//! port, where masquerade would make its VXLAN look like this host's.
//!
//! IPv6 sources and Neighbour Advertisement targets are bound the same way, in a map of their
//! own under the same per-port quota; neighbour discovery and the extension header chain are
//! checked too (see `claims6`).
use aya_ebpf::programs::TcContext;
use core::mem::size_of;
use overlay_common::{Counter, OverlayConfig};
use overlay_ebpf::lengths::ipv4_header_len;

use crate::{
    claims6::{check_ipv6, claim_address6, may_claim_address6},
    maps,
    parse::{
        ETH_HEADER_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, EthIpv4Headers, Frame, Headers,
        IPPROTO_UDP, IPV4_NO_OPTIONS, Ipv4Hdr, Ipv6Hdr, UdpHdr,
    },
};

const ETH_P_ARP: u16 = 0x0806;
/// 802.1Q, 802.1ad and the pre-standard QinQ tag.
const ETH_P_VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
/// The hardware types Linux's ARP takes on an Ethernet device: Ethernet and IEEE 802.
const ARP_HARDWARE_ETHERNET: u16 = 1;
const ARP_HARDWARE_IEEE802: u16 = 6;
const ARP_IPV4_LENGTHS: [u8; 2] = [6, 4];

/// An Ethernet header and the start of an ARP message for IPv4 over Ethernet, up to the
/// sender's addresses (the target's are of no concern here).
#[repr(C)]
struct EthArpHeaders {
    eth: EthHdr,
    hardware: [u8; 2],
    protocol: [u8; 2],
    lengths: [u8; 2],
    _operation: [u8; 2],
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
}

/// Checks a frame a container sent; `Err` names the counter of why it is refused.
#[inline(always)]
pub fn check_container_frame(
    ctx: &TcContext,
    frame: &Frame,
    config: &OverlayConfig,
) -> Result<(), Counter> {
    // A frame too short for an Ethernet header the bridge throws away itself.
    let Some(eth) = frame.header::<EthHdr>(0) else {
        return Ok(());
    };
    // SAFETY: the context's skb is valid for the whole program run.
    let (port, vlan_present) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).vlan_present) };
    // The veth may have taken the outer tag off before tc (`vlan_present`): the frame holds
    // what that VLAN carries either way, which nothing here looks behind.
    let tagged = vlan_present != 0 || ETH_P_VLAN_TAGS.contains(&eth.ether_type());
    if tagged && !config.container_vlans() {
        return Err(Counter::TxVlan);
    }
    let ether_type = eth.ether_type();
    match ether_type {
        ETH_P_IPV4 if !tagged => return check_ipv4(ctx, frame, &eth.src, config, port),
        ETH_P_IPV6 if !tagged => return check_ipv6_frame(ctx, &eth.src, config, port),
        _ => {}
    }
    // The bridge learns a tagged frame's source MAC too.
    claim_mac(&eth.src, port, config)?;
    match ether_type {
        _ if tagged => Ok(()),
        ETH_P_ARP => check_arp(frame, config, port),
        _ => Err(Counter::TxUnexpectedFrame),
    }
}

#[inline(always)]
fn check_ipv4(
    ctx: &TcContext,
    frame: &Frame,
    mac: &[u8; 6],
    config: &OverlayConfig,
    port: u32,
) -> Result<(), Counter> {
    // A truncated header the stack throws away itself; the bridge still learns its MAC.
    let Some(headers) = frame.header::<EthIpv4Headers>(0) else {
        return claim_mac(mac, port, config);
    };
    claim_mac_and_address(mac, &headers.ip.src, port, config)?;
    if udp_destination(ctx, frame, &headers.ip) == Some(config.vxlan_port) {
        return Err(Counter::TxVxlanFromContainer);
    }
    Ok(())
}

/// Checks an IPv6 frame's claims, then its packet (see `claims6`). Reads the header through
/// the helper: it may lie beyond the bytes pulled in for IPv4, and pulling more for every IPv4
/// frame is not free.
#[inline(always)]
fn check_ipv6_frame(
    ctx: &TcContext,
    mac: &[u8; 6],
    config: &OverlayConfig,
    port: u32,
) -> Result<(), Counter> {
    // A truncated header the stack throws away itself; the bridge still learns its MAC.
    let Some(ip) = ctx.read::<Ipv6Hdr>(ETH_HEADER_LEN) else {
        return claim_mac(mac, port, config);
    };
    claim_mac_and_address(mac, &ip.src, port, config)?;
    check_ipv6(ctx, &ip, mac, config, port)
}

/// The UDP destination port of a datagram's first (or only) fragment.
#[inline(always)]
fn udp_destination(ctx: &TcContext, frame: &Frame, ip: &Ipv4Hdr) -> Option<u16> {
    if ip.protocol != IPPROTO_UDP || ip.is_later_fragment() {
        return None;
    }
    let udp: UdpHdr = if ip.version_ihl == IPV4_NO_OPTIONS {
        *frame.header::<UdpHdr>(size_of::<EthIpv4Headers>())?
    } else {
        // Past IPv4 options: a variable offset, which only the helper reads safely.
        let offset = ETH_HEADER_LEN + ipv4_header_len(ip.version_ihl);
        ctx.load(offset).ok()?
    };
    Some(u16::from_be_bytes(udp.dst_port))
}

#[inline(always)]
fn check_arp(frame: &Frame, config: &OverlayConfig, port: u32) -> Result<(), Counter> {
    let Some(arp) = frame.header::<EthArpHeaders>(0) else {
        return Err(Counter::TxUnexpectedFrame);
    };
    let hardware = u16::from_be_bytes(arp.hardware);
    if (hardware != ARP_HARDWARE_ETHERNET && hardware != ARP_HARDWARE_IEEE802)
        || u16::from_be_bytes(arp.protocol) != ETH_P_IPV4
        || arp.lengths != ARP_IPV4_LENGTHS
    {
        return Err(Counter::TxUnexpectedFrame);
    }
    // The bridge learns the Ethernet source, its neighbours the ARP sender: they must agree.
    if arp.sender_mac != arp.eth.src {
        return Err(Counter::TxSpoofedMac);
    }
    // An address probe (RFC 5227) claims nothing.
    if arp.sender_ip == [0; 4] {
        return Ok(());
    }
    claim_address(&arp.sender_ip, port, config)
}

#[inline(always)]
fn claim_mac(mac: &[u8; 6], port: u32, config: &OverlayConfig) -> Result<(), Counter> {
    if !may_claim_mac(mac, config) || !maps::bind_mac(mac, port) {
        return Err(Counter::TxSpoofedMac);
    }
    Ok(())
}

/// [`claim_mac`] and the source address's claim at once, as an IP frame makes both: when the
/// port's cached claims are these, the binding maps need no lookup (the checks that need no
/// map are made on every frame).
#[inline(always)]
fn claim_mac_and_address<A: SourceClaim>(
    mac: &[u8; 6],
    address: &A,
    port: u32,
    config: &OverlayConfig,
) -> Result<(), Counter> {
    if !may_claim_mac(mac, config) {
        return Err(Counter::TxSpoofedMac);
    }
    if address.may_be_claimed(config) && address.is_cached(port, mac) {
        return Ok(());
    }
    if !maps::bind_mac(mac, port) {
        return Err(Counter::TxSpoofedMac);
    }
    address.claim(port, config)?;
    address.cache(port, mac);
    Ok(())
}

/// A source address an IP frame claims, of either family: each has its own checks, binding
/// map and field in the port's cached claims.
trait SourceClaim {
    /// Whether a container may claim the address at all (the checks that need no map).
    fn may_be_claimed(&self, config: &OverlayConfig) -> bool;
    /// Whether `port`'s cached claims are `mac` and this address.
    fn is_cached(&self, port: u32, mac: &[u8; 6]) -> bool;
    /// Binds the address to `port`, or names why it may not.
    fn claim(&self, port: u32, config: &OverlayConfig) -> Result<(), Counter>;
    /// Caches `mac` and this address as `port`'s claims, once both are bound to it.
    fn cache(&self, port: u32, mac: &[u8; 6]);
}

impl SourceClaim for [u8; 4] {
    #[inline(always)]
    fn may_be_claimed(&self, config: &OverlayConfig) -> bool {
        is_container_address(self, config)
    }

    #[inline(always)]
    fn is_cached(&self, port: u32, mac: &[u8; 6]) -> bool {
        maps::cached_claims(port, mac).is_some_and(|cached| cached.ipv4 == *self)
    }

    #[inline(always)]
    fn claim(&self, port: u32, config: &OverlayConfig) -> Result<(), Counter> {
        claim_address(self, port, config)
    }

    #[inline(always)]
    fn cache(&self, port: u32, mac: &[u8; 6]) {
        maps::cache_claims(port, mac, |cached| cached.ipv4 = *self);
    }
}

impl SourceClaim for [u8; 16] {
    #[inline(always)]
    fn may_be_claimed(&self, config: &OverlayConfig) -> bool {
        may_claim_address6(self, config)
    }

    #[inline(always)]
    fn is_cached(&self, port: u32, mac: &[u8; 6]) -> bool {
        maps::cached_claims(port, mac).is_some_and(|cached| cached.ipv6 == *self)
    }

    #[inline(always)]
    fn claim(&self, port: u32, config: &OverlayConfig) -> Result<(), Counter> {
        claim_address6(self, port, config)
    }

    #[inline(always)]
    fn cache(&self, port: u32, mac: &[u8; 6]) {
        maps::cache_claims(port, mac, |cached| cached.ipv6 = *self);
    }
}

/// A MAC a container may send from: not a group address, not the bridge's.
#[inline(always)]
fn may_claim_mac(mac: &[u8; 6], config: &OverlayConfig) -> bool {
    mac[0] & 1 == 0 && *mac != config.bridge_mac
}

#[inline(always)]
fn claim_address(address: &[u8; 4], port: u32, config: &OverlayConfig) -> Result<(), Counter> {
    if !is_container_address(address, config) || !maps::bind_address(address, port) {
        return Err(Counter::TxSpoofedSource);
    }
    Ok(())
}

/// An address of this host's lease that is not the host's own: not the bridge's, nor the
/// lease's network or broadcast address.
#[inline(always)]
fn is_container_address(address: &[u8; 4], config: &OverlayConfig) -> bool {
    let address_bits = u32::from_be_bytes(*address);
    let network = u32::from_be_bytes(config.local_subnet);
    let mask = u32::from_be_bytes(config.local_netmask);
    address_bits & mask == network
        && address_bits != network
        && address_bits != network | !mask
        && *address != config.bridge_ip
}
