//! Hand-built frames, byte by byte, independent of the parser under test.

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers: hop-by-hop options, routing, fragment, authentication,
/// destination options.
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_DSTOPTS: u8 = 60;
/// A destination or hop-by-hop options header's body: no options but a PadN of four bytes.
pub const PADDING_OPTIONS: [u8; 7] = [0, 1, 4, 0, 0, 0, 0];
/// Neighbour discovery (RFC 4861): the ICMPv6 types, the hop limit it must carry for the
/// kernel to take it, a Neighbour Advertisement's flags.
pub const ROUTER_SOLICITATION: u8 = 133;
pub const ROUTER_ADVERTISEMENT: u8 = 134;
pub const NEIGHBOUR_SOLICITATION: u8 = 135;
pub const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
pub const REDIRECT: u8 = 137;
pub const NDP_HOP_LIMIT: u8 = 255;
pub const ROUTER: u8 = 0x80;
pub const SOLICITED: u8 = 0x40;
pub const OVERRIDE: u8 = 0x20;
/// ff02::1 and the Ethernet group it maps to.
pub const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

pub const ETH_HEADER_LEN: usize = 14;
pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
pub const UDP_HEADER_LEN: usize = 8;
pub const VXLAN_HEADER_LEN: usize = 8;

pub const HOST1_IP: [u8; 4] = [172, 20, 62, 104];
pub const HOST2_IP: [u8; 4] = [172, 20, 62, 105];
pub const BBOX1_IP: [u8; 4] = [10, 2, 41, 2];
pub const BBOX2_IP: [u8; 4] = [10, 2, 54, 2];
pub const HOST1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x04];
pub const HOST2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x05];
pub const HOST1_VTEP_MAC: [u8; 6] = [0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x88];
pub const HOST2_VTEP_MAC: [u8; 6] = [0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x89];
pub const HOST1_BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0, 0, 0x41, 0x01];
pub const HOST2_BRIDGE_MAC: [u8; 6] = [0x02, 0x42, 0, 0, 0x54, 0x01];
pub const BBOX1_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x02, 0x29, 0x02];
pub const BBOX2_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x02, 0x36, 0x02];
/// The seed's IPv6 side (see `crate::ipv6`): fd00:ff::104 and ::105 on the underlay,
/// fd00:2:0:41::/64 and fd00:2:0:54::/64 leased, bbox1 and bbox2 at ::2 of each.
pub const HOST1_IPV6: [u8; 16] = [0xfd, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x04];
pub const HOST2_IPV6: [u8; 16] = [0xfd, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x05];
pub const BBOX1_IPV6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 2];
pub const BBOX2_IPV6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0x54, 0, 0, 0, 0, 0, 0, 0, 2];
pub const HOST1_VTEP6_MAC: [u8; 6] = [0x1a, 0x4b, 0xd7, 0xf7, 0x66, 0x88];
pub const HOST2_VTEP6_MAC: [u8; 6] = [0x1a, 0x4b, 0xd7, 0xf7, 0x66, 0x89];

/// bbox1's ping to bbox2 over IPv6 (hop limit 64, 8 bytes "overlay!") as host1's
/// flannel-v6.1, the kernel's vxlan device, put it on the wire to host2: captured with
/// tcpdump from a real device (UDP source port 39378 from the flow hash, the UDP checksum
/// set, as IPv6 requires of UDP; checksum offload off, so it is the final one).
pub const FLANNEL_V6_PING: [u8; 140] = [
    0x02, 0x00, 0x00, 0x00, 0x01, 0x05, 0x02, 0x00, 0x00, 0x00, 0x01, 0x04, 0x86, 0xdd, 0x60, 0x00,
    0x00, 0x00, 0x00, 0x56, 0x11, 0x40, 0xfd, 0x00, 0x00, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x01, 0x04, 0xfd, 0x00, 0x00, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x01, 0x05, 0x99, 0xd2, 0x21, 0x18, 0x00, 0x56, 0x02, 0x30, 0x08, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x1a, 0x4b, 0xd7, 0xf7, 0x66, 0x89, 0x1a, 0x4b, 0xd7, 0xf7,
    0x66, 0x88, 0x86, 0xdd, 0x60, 0x06, 0x68, 0x9d, 0x00, 0x10, 0x3a, 0x40, 0xfd, 0x00, 0x00, 0x02,
    0x00, 0x00, 0x00, 0x41, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xfd, 0x00, 0x00, 0x02,
    0x00, 0x00, 0x00, 0x54, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x80, 0x00, 0xa3, 0x8e,
    0x27, 0x1b, 0x00, 0x01, 0x6f, 0x76, 0x65, 0x72, 0x6c, 0x61, 0x79, 0x21,
];
/// Where FLANNEL_V6_PING's outer and inner IPv6 headers start.
pub const V6_OUTER_IP: usize = ETH_HEADER_LEN;
pub const V6_INNER_IP: usize =
    V6_OUTER_IP + IPV6_HEADER_LEN + UDP_HEADER_LEN + VXLAN_HEADER_LEN + ETH_HEADER_LEN;
/// Offsets of the source address and of the next-header field in an IPv6 header.
pub const IPV6_SRC: usize = 8;
pub const IPV6_NEXT_HEADER: usize = 6;
pub const IPV6_HOP_LIMIT: usize = 7;

/// `mac` as `ip` and bridge print it: aa:bb:cc:dd:ee:ff.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|octet| format!("{octet:02x}")).join(":")
}

/// "1a:4b:d7:f7:16:89" as six octets.
pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    use anyhow::Context;
    let octets: Vec<u8> = text
        .trim()
        .split(':')
        .map(|octet| u8::from_str_radix(octet, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {text:?}"))?;
    octets
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {text:?} is not six octets"))
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &src[..], &ether_type.to_be_bytes(), payload].concat()
}

/// An IPv4 packet with a correct header checksum. `options` must be a multiple of 4 bytes.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options must be 4-byte words"
    );
    let header_len = IPV4_HEADER_LEN + options.len();
    let total_len = u16::try_from(header_len + payload.len()).expect("packet fits in 64 KiB");
    let mut header = [
        &[0x40 | (header_len / 4) as u8, 0][..],
        &total_len.to_be_bytes(),
        &[0, 0, 0x40, 0], // id 0, don't fragment
        &[64, protocol, 0, 0],
        &src,
        &dst,
        options,
    ]
    .concat();
    let checksum = internet_checksum(&header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    [header, payload.to_vec()].concat()
}

/// An IPv4 `packet` (without options) cut in two fragments with IP ID `id`, the first
/// carrying `first_len` bytes of its payload (a multiple of 8).
pub fn ipv4_fragments(packet: &[u8], first_len: usize, id: u16) -> [Vec<u8>; 2] {
    assert!(
        first_len.is_multiple_of(8),
        "fragments split at 8-byte units"
    );
    let (header, payload) = packet.split_at(IPV4_HEADER_LEN);
    let (first, rest) = payload.split_at(first_len);
    let fragment = |part: &[u8], flags_offset: u16| {
        let mut header = header.to_vec();
        let total_len = (IPV4_HEADER_LEN + part.len()) as u16;
        header[2..4].copy_from_slice(&total_len.to_be_bytes());
        header[4..6].copy_from_slice(&id.to_be_bytes());
        header[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        header[10..12].fill(0);
        let checksum = internet_checksum(&header);
        header[10..12].copy_from_slice(&checksum.to_be_bytes());
        [header, part.to_vec()].concat()
    };
    const MORE_FRAGMENTS: u16 = 0x2000;
    [
        fragment(first, MORE_FRAGMENTS),
        fragment(rest, (first_len / 8) as u16),
    ]
}

/// A UDP datagram with checksum 0, as VXLAN senders emit it.
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(UDP_HEADER_LEN + payload.len()).expect("datagram fits in 64 KiB");
    [
        &src_port.to_be_bytes()[..],
        &dst_port.to_be_bytes(),
        &len.to_be_bytes(),
        &[0, 0],
        payload,
    ]
    .concat()
}

/// A VXLAN header (flags 0x08: VNI valid) followed by the inner frame.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let vni = vni.to_be_bytes();
    [&[0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0][..], inner].concat()
}

/// A TCP header without options, flags SYN and ACK, checksum left zero (the programs never
/// check it).
pub fn tcp_segment(src_port: u16, dst_port: u16) -> Vec<u8> {
    [
        &src_port.to_be_bytes()[..],
        &dst_port.to_be_bytes(),
        &[0, 0, 0, 1, 0, 0, 0, 1],
        &[0x50, 0x12, 0xff, 0xff, 0, 0, 0, 0],
    ]
    .concat()
}

/// A TCP SYN without options from `src`:`src_port` to `dst`:`dst_port`, its checksum over the
/// IPv4 pseudo-header correct.
pub fn tcp_syn(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut segment = [
        &src_port.to_be_bytes()[..],
        &dst_port.to_be_bytes(),
        &[0, 0, 0, 1, 0, 0, 0, 0],
        &[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0],
    ]
    .concat();
    let length = segment.len() as u16;
    let pseudo_header = [
        &src[..],
        &dst,
        &[0, IPPROTO_TCP],
        &length.to_be_bytes(),
        &segment,
    ]
    .concat();
    let checksum = internet_checksum(&pseudo_header);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// An ICMP echo request with a correct checksum.
pub fn icmp_echo_request(id: u16, sequence: u16, payload: &[u8]) -> Vec<u8> {
    let mut message = [
        &[8, 0, 0, 0][..],
        &id.to_be_bytes(),
        &sequence.to_be_bytes(),
        payload,
    ]
    .concat();
    let checksum = internet_checksum(&message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    message
}

/// bbox2's neighbour on host2, an address host1 does not lease: what a spoofing peer claims.
pub const BBOX2_NEIGHBOUR_IP: [u8; 4] = [10, 2, 54, 7];

/// A ping to bbox2 from `source` as host1 would wrap it: Ethernet from host1's VTEP MAC to
/// `vtep_mac`, IPv4, ICMP echo.
pub fn ping_to_bbox2_from(source: [u8; 4], vtep_mac: [u8; 6]) -> Vec<u8> {
    let ping = ipv4(
        source,
        BBOX2_IP,
        IPPROTO_ICMP,
        &[],
        &icmp_echo_request(1, 1, b"ping"),
    );
    ethernet(vtep_mac, HOST1_VTEP_MAC, ETH_P_IPV4, &ping)
}

/// bbox1's ping to `destination` with `ttl`, header checksum correct.
pub fn bbox1_ping(destination: [u8; 4], ttl: u8) -> Vec<u8> {
    let mut ping = ipv4(
        BBOX1_IP,
        destination,
        IPPROTO_ICMP,
        &[],
        &icmp_echo_request(1, 1, b"overlay!"),
    );
    ping[8] = ttl;
    ping[10..12].fill(0);
    let checksum = internet_checksum(&ping[..IPV4_HEADER_LEN]);
    ping[10..12].copy_from_slice(&checksum.to_be_bytes());
    ping
}

/// bbox1 pinging bbox2, as it crosses the wire from host1 to host2: VXLAN with `vni` to `port`.
pub fn seed_vxlan_frame(vni: u32, port: u16) -> Vec<u8> {
    let inner = ethernet(
        HOST2_VTEP_MAC,
        HOST1_VTEP_MAC,
        ETH_P_IPV4,
        &bbox1_ping(BBOX2_IP, 64),
    );
    outer_udp_frame(&[], 49152, port, &vxlan(vni, &inner))
}

/// host1 to host2 on the underlay: Ethernet, IPv4 with `ip_options`, UDP.
pub fn outer_udp_frame(ip_options: &[u8], src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let datagram = udp(src_port, dst_port, payload);
    let packet = ipv4(HOST1_IP, HOST2_IP, IPPROTO_UDP, ip_options, &datagram);
    ethernet(HOST2_MAC, HOST1_MAC, ETH_P_IPV4, &packet)
}

/// An IPv6 packet, hop limit 64, no flow label.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
    let payload_len = u16::try_from(payload.len()).expect("packet fits in 64 KiB");
    [
        &[0x60, 0, 0, 0][..],
        &payload_len.to_be_bytes(),
        &[next_header, 64],
        &src,
        &dst,
        payload,
    ]
    .concat()
}

/// An IPv6 ping from `src` to `dst`, its ICMPv6 checksum over the pseudo-header correct.
pub fn ipv6_ping(src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let message = [&[128, 0, 0, 0, 0, 1, 0, 1][..], payload].concat();
    ipv6_checksummed(src, dst, IPPROTO_ICMPV6, message, 2)
}

/// An IPv6 packet carrying `message` of protocol `next_header`, whose checksum field at
/// `checksum_at` is filled in over the pseudo-header and the message (RFC 8200, 8.1).
pub fn ipv6_checksummed(
    src: [u8; 16],
    dst: [u8; 16],
    next_header: u8,
    mut message: Vec<u8>,
    checksum_at: usize,
) -> Vec<u8> {
    message[checksum_at..checksum_at + 2].fill(0);
    let checksum = ipv6_upper_layer_checksum(src, dst, next_header, &message);
    message[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());
    ipv6(src, dst, next_header, &message)
}

/// The checksum of an upper-layer `message` over IPv6: 0 when the message holds a valid one.
pub fn ipv6_upper_layer_checksum(
    src: [u8; 16],
    dst: [u8; 16],
    next_header: u8,
    message: &[u8],
) -> u16 {
    let length = u32::try_from(message.len()).expect("message fits in 4 GiB");
    let pseudo_header = [
        &src[..],
        &dst,
        &length.to_be_bytes(),
        &[0, 0, 0, next_header],
        message,
    ]
    .concat();
    internet_checksum(&pseudo_header)
}

/// The IPv6 `frame` (Ethernet first) with an 8-byte extension header `header` (next header
/// `kind`) put between the IPv6 header and what followed it; `body` is the header's bytes
/// after its next-header field.
pub fn with_ipv6_extension(frame: &[u8], kind: u8, body: [u8; 7]) -> Vec<u8> {
    let ip = ETH_HEADER_LEN;
    let after_ip = ip + IPV6_HEADER_LEN;
    let mut header = frame[..after_ip].to_vec();
    let next_header = header[ip + IPV6_NEXT_HEADER];
    header[ip + IPV6_NEXT_HEADER] = kind;
    let payload_len = u16::from_be_bytes([header[ip + 4], header[ip + 5]]) + 8;
    header[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
    [&header[..], &[next_header], &body, &frame[after_ip..]].concat()
}

/// A fragment header's bytes after its next-header field: fragment `offset` (in 8-byte units),
/// more fragments to come, identification 0x4242.
pub fn ipv6_fragment(offset: u16) -> [u8; 7] {
    let [high, low] = (offset << 3 | 1).to_be_bytes();
    [0, high, low, 0, 0, 0x42, 0x42]
}

/// An IPv6 packet's header fields and extension headers: 8 bytes each, as (kind, the bytes
/// after the next-header field), outermost first.
pub struct Ipv6Chain<'a> {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub hop_limit: u8,
    pub chain: &'a [(u8, [u8; 7])],
}

impl Ipv6Chain<'_> {
    /// The packet carrying `message` of protocol `next_header`, its checksum (at
    /// `checksum_at`) filled in.
    pub fn carrying(&self, next_header: u8, message: Vec<u8>, checksum_at: usize) -> Vec<u8> {
        let packet = ipv6_checksummed(self.src, self.dst, next_header, message, checksum_at);
        let mut frame = ethernet([0; 6], [0; 6], ETH_P_IPV6, &packet);
        for &(kind, body) in self.chain.iter().rev() {
            frame = with_ipv6_extension(&frame, kind, body);
        }
        frame[ETH_HEADER_LEN + IPV6_HOP_LIMIT] = self.hop_limit;
        frame.split_off(ETH_HEADER_LEN)
    }
}

/// The body of a well-formed 8-byte extension header of `kind`: padding options, a routing
/// header with no segments left, a first fragment, an authentication header without an
/// integrity check value.
pub fn well_formed_extension(kind: u8) -> [u8; 7] {
    match kind {
        IPPROTO_FRAGMENT => ipv6_fragment(0),
        IPPROTO_ROUTING | IPPROTO_AH => [0; 7],
        _ => PADDING_OPTIONS,
    }
}

/// A neighbour discovery message of `kind`: its fixed part (flags `flags` where it has
/// any; the address asked about, advertised or redirected to `target`) and one link-layer
/// address option naming `mac`, source or target as the message carries it.
pub fn ndp_message(kind: u8, flags: u8, target: [u8; 16], mac: [u8; 6]) -> Vec<u8> {
    let head = [kind, 0, 0, 0, flags, 0, 0, 0];
    let source_option = [&[1, 1][..], &mac].concat();
    let target_option = [&[2, 1][..], &mac].concat();
    match kind {
        ROUTER_SOLICITATION => [&head[..], &source_option].concat(),
        ROUTER_ADVERTISEMENT => [
            &[kind, 0, 0, 0, 64, 0, 0x07, 0x08][..],
            &[0; 8],
            &source_option,
        ]
        .concat(),
        NEIGHBOUR_SOLICITATION => [&head[..], &target, &source_option].concat(),
        REDIRECT => [&head[..], &target, &BBOX2_IPV6, &target_option].concat(),
        _ => [&head[..], &target, &target_option].concat(),
    }
}

/// RFC 1071 one's-complement sum.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
