//! Values of VXLAN's header fields: the VNI and the outer UDP source port, and the flow hash
//! the port comes from when the packet carries none.
use overlay_common::{FlowKey, FlowKey6, VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN};

/// The kernel's per-flow source port: spreads flows over the receivers' queues, within
/// `VXLAN_SOURCE_PORT_MIN..VXLAN_SOURCE_PORT_MAX`.
#[inline(always)]
pub fn source_port(flow_hash: u32) -> u16 {
    let span = u64::from(VXLAN_SOURCE_PORT_MAX - VXLAN_SOURCE_PORT_MIN);
    VXLAN_SOURCE_PORT_MIN + ((u64::from(flow_hash) * span) >> 32) as u16
}

/// A hash of an IPv4 flow's addresses, ports and protocol. The kernel dissects a packet that
/// carries no hash to make one (a third of encapsulation's time for a 64-byte datagram here);
/// the fast path has the flow already.
#[inline(always)]
pub fn flow_hash(flow: &FlowKey) -> u32 {
    mix_words([
        u32::from_ne_bytes(flow.src),
        u32::from_ne_bytes(flow.dst),
        ports_word(flow.src_port, flow.dst_port),
        u32::from(flow.protocol),
    ])
}

/// [`flow_hash`] of an IPv6 flow.
#[inline(always)]
pub fn flow6_hash(flow: &FlowKey6) -> u32 {
    let word = |bytes: &[u8; 16], at: usize| {
        u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    mix_words([
        word(&flow.src, 0),
        word(&flow.src, 4),
        word(&flow.src, 8),
        word(&flow.src, 12),
        word(&flow.dst, 0),
        word(&flow.dst, 4),
        word(&flow.dst, 8),
        word(&flow.dst, 12),
        ports_word(flow.src_port, flow.dst_port),
        u32::from(flow.protocol),
    ])
}

/// A flow's two ports as one word.
#[inline(always)]
fn ports_word(src: [u8; 2], dst: [u8; 2]) -> u32 {
    u32::from_ne_bytes([src[0], src[1], dst[0], dst[1]])
}

/// Folds `words` into one well-spread 32-bit value: a multiply-rotate per word, then
/// MurmurHash3's finalizer.
#[inline(always)]
fn mix_words<const N: usize>(words: [u32; N]) -> u32 {
    let mut hash = 0x9e37_79b9u32;
    for word in words {
        hash = (hash ^ word).wrapping_mul(0xcc9e_2d51).rotate_left(15);
    }
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// The 24-bit VNI as the header carries it.
#[inline(always)]
pub fn vni_bytes(vni: u32) -> [u8; 3] {
    let [_, high, middle, low] = vni.to_be_bytes();
    [high, middle, low]
}

/// The VNI a header carries.
#[inline(always)]
pub fn vni_of(bytes: [u8; 3]) -> u32 {
    let [high, middle, low] = bytes;
    u32::from_be_bytes([0, high, middle, low])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_port_spans_the_range_by_hash() {
        assert_eq!(source_port(0), VXLAN_SOURCE_PORT_MIN);
        assert_eq!(source_port(u32::MAX), VXLAN_SOURCE_PORT_MAX - 1);
        assert_eq!(
            source_port(1 << 31),
            VXLAN_SOURCE_PORT_MIN + (VXLAN_SOURCE_PORT_MAX - VXLAN_SOURCE_PORT_MIN) / 2
        );
    }

    fn flow(src_port: u16) -> FlowKey {
        FlowKey {
            src: [10, 2, 41, 2],
            dst: [10, 2, 54, 2],
            src_port: src_port.to_be_bytes(),
            dst_port: 5201u16.to_be_bytes(),
            protocol: 17,
            reserved: [0; 3],
        }
    }

    #[test]
    fn one_flow_keeps_its_port_and_flows_spread_over_the_range() {
        assert_eq!(flow_hash(&flow(40000)), flow_hash(&flow(40000)));
        // 4,096 flows of one host pair, by source port, over 16 equal parts of the range.
        let mut parts = [0u32; 16];
        for port in 40000..44096 {
            let port = source_port(flow_hash(&flow(port)));
            let part = usize::from(port - VXLAN_SOURCE_PORT_MIN) * 16
                / usize::from(VXLAN_SOURCE_PORT_MAX - VXLAN_SOURCE_PORT_MIN);
            parts[part] += 1;
        }
        assert!(
            parts.iter().all(|&count| (160..=352).contains(&count)),
            "{parts:?}"
        );
    }

    #[test]
    fn an_ipv6_flow_hash_depends_on_every_address_word() {
        let base = FlowKey6 {
            src: [0xfd; 16],
            dst: [0xfe; 16],
            src_port: [0x9c, 0x40],
            dst_port: [0x14, 0x51],
            protocol: 6,
            reserved: [0; 3],
        };
        for byte in 0..16 {
            let mut changed = base;
            changed.src[byte] ^= 1;
            assert_ne!(
                flow6_hash(&changed),
                flow6_hash(&base),
                "source byte {byte}"
            );
            changed = base;
            changed.dst[byte] ^= 1;
            assert_ne!(
                flow6_hash(&changed),
                flow6_hash(&base),
                "destination byte {byte}"
            );
        }
    }

    #[test]
    fn vni_takes_three_bytes() {
        assert_eq!(vni_bytes(1), [0, 0, 1]);
        assert_eq!(vni_bytes(0x12_3456), [0x12, 0x34, 0x56]);
        assert_eq!(vni_of([0x12, 0x34, 0x56]), 0x12_3456);
        assert_eq!(vni_of(vni_bytes(0xff_ffff)), 0xff_ffff);
    }
}
