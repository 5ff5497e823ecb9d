//! Header and segment lengths the programs compute from header fields.
use overlay_common::{Counter, DROP_HEAD_LEN};

/// The IHL field counts 4-byte words.
const IPV4_IHL_UNIT: usize = 4;
const IPV4_IHL_MASK: u8 = 0x0f;
/// TCP's data offset counts 4-byte words, in the top four bits of its byte.
const TCP_DATA_OFFSET_UNIT: u16 = 4;
/// The longest IPv4 header: 15 words, options included.
pub const IPV4_MAX_HEADER_LEN: usize = IPV4_IHL_MASK as usize * IPV4_IHL_UNIT;

/// The length of an IPv4 header, from its first byte (version and IHL).
#[inline(always)]
pub fn ipv4_header_len(version_ihl: u8) -> usize {
    usize::from(version_ihl & IPV4_IHL_MASK) * IPV4_IHL_UNIT
}

/// The transport bytes each packet on the wire carries for a TCP superpacket: its header (as
/// the data offset byte gives it) and one full segment of `gso_size` (not zero) bytes. `Err`
/// names why the outer checksum cannot be had from the headers: a header longer than the
/// payload (`TxSlowPath`), or a last segment shorter than the others (`TxIpv6PartialSegment`).
#[inline(always)]
pub fn tcp_segment_len(payload_len: u16, data_offset: u8, gso_size: u32) -> Result<u16, Counter> {
    let tcp_header_len = u16::from(data_offset >> 4) * TCP_DATA_OFFSET_UNIT;
    let data_len = payload_len
        .checked_sub(tcp_header_len)
        .ok_or(Counter::TxSlowPath)?;
    if u32::from(data_len) % gso_size != 0 {
        return Err(Counter::TxIpv6PartialSegment);
    }
    // gso_size divides a u16, so it fits one.
    Ok(tcp_header_len + gso_size as u16)
}

/// How many bytes of a `len`-byte packet a drop report copies: `len` up to the head's size.
/// Written so the verifier sees 1..=DROP_HEAD_LEN, which the helpers require; with `clamp` the
/// compiler's rewrite loses the lower bound. (A 0-byte packet, which cannot occur, would ask
/// for the whole head and the helper would refuse.)
#[inline(always)]
pub fn drop_head_len(len: u32) -> u32 {
    const MASK: u32 = DROP_HEAD_LEN as u32 - 1;
    (len.min(DROP_HEAD_LEN as u32).wrapping_sub(1) & MASK) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_length_from_ihl() {
        assert_eq!(ipv4_header_len(0x45), 20);
        assert_eq!(ipv4_header_len(0x46), 24);
        assert_eq!(ipv4_header_len(0x4f), 60);
        assert_eq!(IPV4_MAX_HEADER_LEN, 60);
    }

    #[test]
    fn tcp_superpacket_of_whole_segments_gives_one_segment() {
        // A 20-byte header (data offset 5) and three segments of 1,000 bytes.
        assert_eq!(tcp_segment_len(20 + 3_000, 0x50, 1_000), Ok(1_020));
        // A 32-byte header (timestamps, data offset 8).
        assert_eq!(tcp_segment_len(32 + 2 * 1_428, 0x80, 1_428), Ok(32 + 1_428));
    }

    #[test]
    fn tcp_superpacket_with_a_short_tail_is_refused() {
        assert_eq!(
            tcp_segment_len(20 + 2_500, 0x50, 1_000),
            Err(Counter::TxIpv6PartialSegment)
        );
    }

    #[test]
    fn tcp_header_longer_than_the_payload_is_refused() {
        assert_eq!(tcp_segment_len(16, 0x50, 1_000), Err(Counter::TxSlowPath));
    }

    #[test]
    fn drop_head_covers_the_packet_up_to_the_head() {
        let head = DROP_HEAD_LEN as u32;
        assert_eq!(drop_head_len(1), 1);
        assert_eq!(drop_head_len(60), 60.min(head));
        assert_eq!(drop_head_len(head), head);
        assert_eq!(drop_head_len(head + 1), head);
        assert_eq!(drop_head_len(65_535), head);
    }
}
