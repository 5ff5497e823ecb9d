//! Explicit congestion notification across a tunnel (RFC 6040).

pub const ECN_MASK: u8 = 0x03;
pub const ECN_NOT_ECT: u8 = 0x00;
pub const ECN_ECT0: u8 = 0x02;
pub const ECN_CE: u8 = 0x03;

/// The outer ECN field for an inner packet whose TOS (or traffic class) is `inner_tos`: a copy
/// of the inner one, but a CE mark becomes ECT(0).
#[inline(always)]
pub fn outer_ecn(inner_tos: u8) -> u8 {
    match inner_tos & ECN_MASK {
        ECN_CE => ECN_ECT0,
        ecn => ecn,
    }
}

/// Whether decapsulation must drop the packet: congestion met outside cannot be marked on an
/// inner packet that is not ECN-capable.
#[inline(always)]
pub fn lost_to_congestion(outer_ecn: u8, inner_ecn: u8) -> bool {
    outer_ecn == ECN_CE && inner_ecn == ECN_NOT_ECT
}

/// The ECN field of an IPv6 header, given its first four bytes (version, traffic class, flow
/// label): the low two bits of the traffic class.
#[inline(always)]
pub fn ipv6_ecn(version_class_flow: [u8; 4]) -> u8 {
    let [first, second, ..] = version_class_flow;
    let traffic_class = (first << 4) | (second >> 4);
    traffic_class & ECN_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    const ECT1: u8 = 0x01;

    #[test]
    fn outer_copies_ecn_but_ce() {
        assert_eq!(outer_ecn(0xb8 | ECN_NOT_ECT), ECN_NOT_ECT);
        assert_eq!(outer_ecn(0xb8 | ECT1), ECT1);
        assert_eq!(outer_ecn(0xb8 | ECN_ECT0), ECN_ECT0);
        assert_eq!(outer_ecn(0xb8 | ECN_CE), ECN_ECT0);
    }

    #[test]
    fn congestion_drops_only_what_cannot_carry_it() {
        assert!(lost_to_congestion(ECN_CE, ECN_NOT_ECT));
        assert!(!lost_to_congestion(ECN_CE, ECN_ECT0));
        assert!(!lost_to_congestion(ECN_CE, ECT1));
        assert!(!lost_to_congestion(ECN_ECT0, ECN_NOT_ECT));
    }

    #[test]
    fn reads_the_ipv6_traffic_class_ecn() {
        // Version 6, traffic class 0xb9 (DSCP 46, ECT(1)), flow label 0x12345.
        assert_eq!(ipv6_ecn([0x6b, 0x91, 0x23, 0x45]), ECT1);
        assert_eq!(ipv6_ecn([0x60, 0x30, 0x00, 0x00]), ECN_CE);
        assert_eq!(ipv6_ecn([0x6f, 0xc0, 0x00, 0x00]), ECN_NOT_ECT);
    }
}
