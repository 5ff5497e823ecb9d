//! The Internet checksum (RFC 1071) in 16-bit big-endian words, and its incremental update
//! (RFC 1624).

/// A big-endian 16-bit word of a checksum.
#[inline(always)]
pub fn word(high: u8, low: u8) -> u32 {
    (u32::from(high) << 8) | u32::from(low)
}

/// The sum of an address's or a MAC's 16-bit words. Word by word: taken apart at once, its
/// bytes would each take a stack slot.
#[inline(always)]
pub fn words_sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0;
    let mut index = 0;
    while index + 1 < N {
        sum += word(bytes[index], bytes[index + 1]);
        index += 2;
    }
    sum
}

/// Folds a sum of 16-bit words into 16 bits, carries added back.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

/// The UDP checksum field for a datagram whose words sum to `sum`. UDP sends a computed zero
/// as all ones: zero means "no checksum".
#[inline(always)]
pub fn udp_checksum(sum: u32) -> u16 {
    match !fold(sum) {
        0 => u16::MAX,
        checksum => checksum,
    }
}

/// An IPv4 header checksum once the TTL went down by one, patched incrementally as the
/// kernel's `ip_decrease_ttl` does, so the bytes match the routed path's.
#[inline(always)]
pub fn ttl_decremented(checksum: [u8; 2]) -> [u8; 2] {
    let sum = u32::from(u16::from_be_bytes(checksum)) + 0x0100;
    ((sum + u32::from(sum >= 0xffff)) as u16).to_be_bytes()
}

/// A checksum once one of the words it covers changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline(always)]
pub fn patched(checksum: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let sum = u32::from(!u16::from_be_bytes(checksum)) + u32::from(!old) + u32::from(new);
    (!fold(sum)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's worked IPv4 header, checksum field zeroed: 4500 0073 0000 4000 4011 ____
    /// c0a8 0001 c0a8 00c7, whose checksum is b861.
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    fn header_checksum(header: &[u8; 20]) -> [u8; 2] {
        (!fold(words_sum(header))).to_be_bytes()
    }

    #[test]
    fn sums_words_big_endian() {
        assert_eq!(word(0x12, 0x34), 0x1234);
        assert_eq!(words_sum(&[0x12, 0x34, 0xab, 0xcd]), 0x1234 + 0xabcd);
        assert_eq!(words_sum(&[0u8; 0]), 0);
    }

    #[test]
    fn folds_carries_back_in() {
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(0xffff_ffff), 0xffff);
        assert_eq!(fold(0x2_0001), 0x0003);
        assert_eq!(fold(0x1234), 0x1234);
    }

    #[test]
    fn computes_rfc_1071_header_checksum() {
        assert_eq!(header_checksum(&HEADER), [0xb8, 0x61]);
    }

    #[test]
    fn udp_sends_a_zero_checksum_as_all_ones() {
        assert_eq!(udp_checksum(0xffff), 0xffff);
        assert_eq!(udp_checksum(0), 0xffff);
        assert_eq!(udp_checksum(0x1234), !0x1234);
    }

    #[test]
    fn ttl_patch_equals_a_full_recomputation() {
        for ttl in [2u8, 0x40, 0xff] {
            for protocol in [0x01u8, 0x11, 0xff] {
                let mut header = HEADER;
                header[8] = ttl;
                header[9] = protocol;
                let before = header_checksum(&header);
                header[8] = ttl - 1;
                assert_eq!(ttl_decremented(before), header_checksum(&header));
            }
        }
    }

    #[test]
    fn word_patch_equals_a_full_recomputation() {
        let mut header = HEADER;
        let before = header_checksum(&header);
        // ECN CE into the TOS byte.
        header[1] |= 0x03;
        let patched = patched(before, 0x4500, 0x4503);
        assert_eq!(patched, header_checksum(&header));
    }
}
