//! Whether a packet's first bytes, as a monitor event carries them, are to or from the traced
//! prefix: its own addresses, or for VXLAN (outer IPv4 without options, or IPv6 without
//! extension headers) its inner packet's. Every offset is a constant, so the verifier checks
//! each read once.
use overlay_common::{DROP_HEAD_LEN, Trace};

const ETH_P_IPV4: [u8; 2] = 0x0800u16.to_be_bytes();
const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();
const IPV4_NO_OPTIONS: u8 = 0x45;
const IPPROTO_UDP: u8 = 17;
/// The inner Ethernet header of VXLAN over IPv4 without options: behind Ethernet, IPv4, UDP
/// and VXLAN.
const INNER_OVER_IPV4: usize = 14 + 20 + 8 + 8;
/// The same over IPv6.
const INNER_OVER_IPV6: usize = 14 + 40 + 8 + 8;

/// Whether the frame at the start of `head` is to or from an address `trace` holds, or
/// carries VXLAN to `vxlan_port` whose inner packet is.
#[inline(always)]
pub fn head_matches(head: &[u8; DROP_HEAD_LEN], trace: &Trace, vxlan_port: u16) -> bool {
    if addresses_match(head, 0, trace) {
        return true;
    }
    let port = vxlan_port.to_be_bytes();
    match field::<2>(head, 12) {
        Some(ETH_P_IPV4) => {
            field::<1>(head, 14) == Some([IPV4_NO_OPTIONS])
                && field::<1>(head, 23) == Some([IPPROTO_UDP])
                && field::<2>(head, 36) == Some(port)
                && addresses_match(head, INNER_OVER_IPV4, trace)
        }
        Some(ETH_P_IPV6) => {
            field::<1>(head, 20) == Some([IPPROTO_UDP])
                && field::<2>(head, 56) == Some(port)
                && addresses_match(head, INNER_OVER_IPV6, trace)
        }
        _ => false,
    }
}

/// Whether the Ethernet frame at `eth` in `head` carries IP from or to an address `trace`
/// holds.
#[inline(always)]
fn addresses_match(head: &[u8; DROP_HEAD_LEN], eth: usize, trace: &Trace) -> bool {
    match field::<2>(head, eth + 12) {
        Some(ETH_P_IPV4) => [eth + 26, eth + 30]
            .into_iter()
            .any(|at| field::<4>(head, at).is_some_and(|address| trace.holds_ipv4(&address))),
        Some(ETH_P_IPV6) => [eth + 22, eth + 38]
            .into_iter()
            .any(|at| field::<16>(head, at).is_some_and(|address| trace.holds_ipv6(&address))),
        _ => false,
    }
}

#[inline(always)]
fn field<const N: usize>(head: &[u8; DROP_HEAD_LEN], at: usize) -> Option<[u8; N]> {
    head.get(at..at + N)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use overlay_common::{TRACE_IPV4, TRACE_IPV6};

    use super::*;

    const PORT: u16 = 8472;

    fn ipv4_trace(address: [u8; 4], prefix_len: u8) -> Trace {
        let mut padded = [0; 16];
        padded[..4].copy_from_slice(&address);
        Trace {
            family: TRACE_IPV4,
            prefix_len,
            address: padded,
            ..Trace::default()
        }
    }

    /// Ethernet + IPv4 from `source` to `destination`, at `at` in `head`.
    fn put_ipv4(head: &mut [u8; DROP_HEAD_LEN], at: usize, source: [u8; 4], destination: [u8; 4]) {
        head[at + 12..at + 14].copy_from_slice(&ETH_P_IPV4);
        head[at + 14] = IPV4_NO_OPTIONS;
        head[at + 26..at + 30].copy_from_slice(&source);
        head[at + 30..at + 34].copy_from_slice(&destination);
    }

    fn vxlan_over_ipv4(inner_source: [u8; 4], inner_destination: [u8; 4]) -> [u8; DROP_HEAD_LEN] {
        let mut head = [0; DROP_HEAD_LEN];
        put_ipv4(&mut head, 0, [172, 20, 62, 104], [172, 20, 62, 105]);
        head[23] = IPPROTO_UDP;
        head[36..38].copy_from_slice(&PORT.to_be_bytes());
        put_ipv4(&mut head, INNER_OVER_IPV4, inner_source, inner_destination);
        head
    }

    #[test]
    fn inner_and_outer_addresses_match_and_others_do_not() {
        let head = vxlan_over_ipv4([10, 2, 41, 2], [10, 2, 54, 2]);
        assert!(head_matches(&head, &ipv4_trace([10, 2, 54, 2], 32), PORT));
        assert!(head_matches(&head, &ipv4_trace([10, 2, 41, 0], 24), PORT));
        assert!(head_matches(
            &head,
            &ipv4_trace([172, 20, 62, 105], 32),
            PORT
        ));
        assert!(!head_matches(&head, &ipv4_trace([10, 2, 54, 3], 32), PORT));
        assert!(
            !head_matches(&head, &ipv4_trace([10, 2, 54, 2], 32), PORT + 1),
            "another port carries no VXLAN"
        );
        assert!(!head_matches(&head, &Trace::default(), PORT), "off");
    }

    #[test]
    fn inner_ipv6_over_ipv6_matches() {
        let mut head = [0; DROP_HEAD_LEN];
        head[12..14].copy_from_slice(&ETH_P_IPV6);
        head[20] = IPPROTO_UDP;
        head[56..58].copy_from_slice(&PORT.to_be_bytes());
        let inner = INNER_OVER_IPV6;
        head[inner + 12..inner + 14].copy_from_slice(&ETH_P_IPV6);
        let destination = [0xfd, 0, 0, 2, 0, 0, 0, 0x54, 0, 0, 0, 0, 0, 0, 0, 2];
        head[inner + 38..inner + 54].copy_from_slice(&destination);
        let trace = Trace {
            family: TRACE_IPV6,
            prefix_len: 128,
            address: destination,
            ..Trace::default()
        };
        assert!(head_matches(&head, &trace, PORT));
        let other = Trace {
            address: [0xfd; 16],
            ..trace
        };
        assert!(!head_matches(&head, &other, PORT));
    }
}
