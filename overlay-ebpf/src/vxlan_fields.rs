//! Values of VXLAN's header fields: the VNI and the outer UDP source port.
use overlay_common::{VXLAN_SOURCE_PORT_MAX, VXLAN_SOURCE_PORT_MIN};

/// The kernel's per-flow source port: spreads flows over the receivers' queues, within
/// `VXLAN_SOURCE_PORT_MIN..VXLAN_SOURCE_PORT_MAX`.
#[inline(always)]
pub fn source_port(flow_hash: u32) -> u16 {
    let span = u64::from(VXLAN_SOURCE_PORT_MAX - VXLAN_SOURCE_PORT_MIN);
    VXLAN_SOURCE_PORT_MIN + ((u64::from(flow_hash) * span) >> 32) as u16
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

    #[test]
    fn vni_takes_three_bytes() {
        assert_eq!(vni_bytes(1), [0, 0, 1]);
        assert_eq!(vni_bytes(0x12_3456), [0x12, 0x34, 0x56]);
        assert_eq!(vni_of([0x12, 0x34, 0x56]), 0x12_3456);
        assert_eq!(vni_of(vni_bytes(0xff_ffff)), 0xff_ffff);
    }
}
