//! Types that cross the boundary between the overlay eBPF programs and the agent.
//!
//! Every map key, map value and config record is defined here once, `#[repr(C)]`, so both
//! sides agree on the layout and the object's BTF names the fields (`bpftool map dump` prints
//! them). The `user` feature adds the `aya::Pod` impls the agent needs to read and write maps.
#![no_std]

/// UDP port of VXLAN when the network config leaves `Port` at 0: the Linux default, which
/// flannel uses too (not IANA's 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// First UDP source port of encapsulated traffic: the kernel's default ephemeral range, which
/// the kernel's vxlan device hashes flows into as well.
pub const VXLAN_SOURCE_PORT_MIN: u16 = 32768;
/// Upper bound of the UDP source port range; a flow's port is
/// `MIN + hash · (MAX − MIN) / 2³²`, the kernel's own formula.
pub const VXLAN_SOURCE_PORT_MAX: u16 = 60999;

/// Runtime settings of the dataplane, written by the agent into the one-entry config map.
///
/// Numbers are in host byte order; addresses are in network order, as they sit in packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig {
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// UDP destination port of VXLAN traffic.
    pub vxlan_port: u16,
    /// `CONFIG_*` bits; the field also keeps the layout free of implicit padding.
    pub flags: u16,
    /// The outer source of what this host encapsulates: the uplink's address, which is also
    /// the public IP unless `--public-ip` names another (flannel's tunnel source); 0.0.0.0
    /// in an IPv6-only network.
    pub public_ip: [u8; 4],
    /// MAC of this host's VXLAN device, the inner source of what it encapsulates.
    pub vtep_mac: [u8; 6],
    /// MAC of the uplink: decapsulated frames are addressed to it, so the stack takes them.
    pub uplink_mac: [u8; 6],
    /// Interface encapsulated packets leave through.
    pub uplink_ifindex: u32,
    /// The VXLAN device: a container's packet too big for its MTU takes the routed path,
    /// where the kernel fragments it or answers "fragmentation needed".
    pub vtep_ifindex: u32,
    /// MAC of the container bridge: containers address remote traffic to it, and packets
    /// delivered straight into a container come from it.
    pub bridge_mac: [u8; 6],
    /// Keeps the layout free of implicit padding.
    pub reserved2: u16,
    /// This host's lease (network order): the addresses its containers may send from;
    /// 0.0.0.0/32, which holds none, in an IPv6-only network.
    pub local_subnet: [u8; 4],
    pub local_netmask: [u8; 4],
    /// The bridge's own address in the lease, the containers' gateway: no container may
    /// claim it.
    pub bridge_ip: [u8; 4],
    /// The outer destination of VXLAN over IPv6 for this host: the uplink's IPv6 address,
    /// flannel-v6.<VNI>'s tunnel source (all zero without IPv6).
    pub public_ipv6: [u8; 16],
    /// This host's IPv6 lease, with `CONFIG_IPV6` (network order): the global addresses its
    /// containers may send from.
    pub local_subnet6: [u8; 16],
    pub local_netmask6: [u8; 16],
    /// The bridge's own IPv6 address in the lease, the containers' gateway.
    pub bridge_ipv6: [u8; 16],
    /// flannel-v6.<VNI>, with `CONFIG_IPV6`: a container's IPv6 packet too big for its MTU
    /// takes the routed path, where the kernel answers "packet too big".
    pub vtep6_ifindex: u32,
    /// MAC of flannel-v6.<VNI>, the inner source of the IPv6 this host encapsulates.
    pub vtep6_mac: [u8; 6],
    /// Keeps the layout free of implicit padding.
    pub reserved3: u16,
    /// The MTUs the agent keeps on flannel.<VNI> and flannel-v6.<VNI>: a packet that is not a
    /// superpacket fits when it is within one past its Ethernet header, which the programs
    /// check without asking the kernel to look the device up.
    pub vtep_mtu: u32,
    pub vtep6_mtu: u32,
}

/// [`OverlayConfig::flags`]: the network config's `DirectRouting` is on, so peers on our
/// segment send their containers' packets to us as they are, without VXLAN.
pub const CONFIG_DIRECT_ROUTING: u16 = 1;
/// [`OverlayConfig::flags`]: container traffic for remote subnets is encapsulated at the
/// container's veth (`--fast-path`); without it, the container program only checks what
/// containers send.
pub const CONFIG_FAST_PATH: u16 = 2;
/// [`OverlayConfig::flags`]: the network has IPv6 and this host an IPv6 lease, so the
/// containers' IPv6 sources are checked against `local_subnet6`.
pub const CONFIG_IPV6: u16 = 4;
/// [`OverlayConfig::flags`]: VLAN-tagged frames from containers go on unchecked
/// (`--container-vlans`); without it they are dropped, as nothing checks what a tag hides.
pub const CONFIG_CONTAINER_VLANS: u16 = 8;
/// [`OverlayConfig::flags`]: VXLAN over IPv4 from an outer source no lease names (a peer
/// behind NAT) is accepted when its inner Ethernet source is the VtepMAC of the lease holding
/// its inner IPv4 source (`--accept-nat-peers`); without it, such a frame is dropped.
pub const CONFIG_ACCEPT_NAT_PEERS: u16 = 16;

/// The `skb->mark` bit the uplink program sets on VXLAN it checked and hands to the VXLAN
/// device, decapsulated or for its socket. The VXLAN device's ingress program lets through
/// only what carries it, and clears it: what the device's socket decapsulated without our
/// checks (VXLAN from another interface or a local sender, reassembled from unchecked
/// fragments) has no way to carry it. Bit 20 is used by neither kube-proxy (14, 15) nor
/// Weave (17, 18) nor Docker.
pub const CHECKED_MARK: u32 = 1 << 20;

impl OverlayConfig {
    pub const fn direct_routing(&self) -> bool {
        self.flags & CONFIG_DIRECT_ROUTING != 0
    }

    pub const fn fast_path(&self) -> bool {
        self.flags & CONFIG_FAST_PATH != 0
    }

    pub const fn ipv6(&self) -> bool {
        self.flags & CONFIG_IPV6 != 0
    }

    pub const fn container_vlans(&self) -> bool {
        self.flags & CONFIG_CONTAINER_VLANS != 0
    }

    pub const fn accept_nat_peers(&self) -> bool {
        self.flags & CONFIG_ACCEPT_NAT_PEERS != 0
    }
}

/// Value of the subnet map (an LPM trie keyed by remote subnet): where that subnet's host is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteVtep {
    /// The remote host's PublicIP: the outer destination.
    pub public_ip: [u8; 4],
    /// The remote host's VtepMAC: the inner destination.
    pub mac: [u8; 6],
    /// `REMOTE_*` bits; the field also keeps the layout free of implicit padding.
    pub flags: u16,
    /// This lease's slot in `peer_traffic` (see [`PeerTraffic`]); 0, a slot no one reads, for
    /// a lease the agent counts nothing for.
    pub peer: u32,
}

/// [`RemoteVtep::flags`]: the host shares our segment and `DirectRouting` is on, so its
/// containers' packets go to its PublicIP as they are, without VXLAN, as flannel routes them.
pub const REMOTE_ROUTE_DIRECTLY: u16 = 1;

impl RemoteVtep {
    pub const fn routes_directly(&self) -> bool {
        self.flags & REMOTE_ROUTE_DIRECTLY != 0
    }
}

/// Value of the IPv6 subnet map (an LPM trie keyed by remote IPv6 subnet): where that
/// subnet's host is over IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteVtep6 {
    /// The remote host's PublicIPv6: the outer destination.
    pub public_ipv6: [u8; 16],
    /// The remote host's IPv6 VtepMAC (`BackendV6Data`): the inner destination.
    pub mac: [u8; 6],
    /// Keeps the layout free of implicit padding.
    pub reserved: u16,
    /// This lease's slot in `peer_traffic`, as [`RemoteVtep::peer`].
    pub peer: u32,
}

/// Value of the `peer_traffic` map, a per-CPU array with one slot per remote lease (the slot
/// the agent writes into the lease's `subnets` or `subnets6` entry): what this host's
/// programs exchanged with the containers behind that lease. A packet is one the programs
/// handled, so a GSO superpacket counts once with all its bytes; bytes are the inner IP
/// packet's, without Ethernet or VXLAN headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTraffic {
    /// Encapsulated for the lease's host (or, with DirectRouting, routed to it as it is).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Arrived from the lease's host, checked, from inside the lease.
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl PeerTraffic {
    /// Adds `other` field by field, e.g. to sum the per-CPU copies.
    pub fn accumulate(&mut self, other: &PeerTraffic) {
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
    }
}

/// Value of the VTEP map (keyed by a remote host's PublicIP): a subnet that host leases. The
/// programs only ask whether a host holds a lease; which inner sources it may send, the subnet
/// map says (a host may lease more than one subnet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtepSubnet {
    /// The subnet's network address.
    pub subnet: [u8; 4],
    pub prefix_len: u32,
}

/// Value of the IPv6 VTEP map (keyed by a remote host's PublicIPv6): an IPv6 subnet that host
/// leases. As for [`VtepSubnet`], the programs only ask whether a host holds a lease; which
/// inner sources it may send, the IPv6 subnet map says (a host may lease more than one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtepSubnet6 {
    /// The subnet's network address.
    pub subnet: [u8; 16],
    pub prefix_len: u32,
}

impl VtepSubnet6 {
    /// Whether `address` lies in the subnet.
    #[inline(always)]
    pub fn contains(&self, address: &[u8; 16]) -> bool {
        ipv6_in_subnet(address, &self.subnet, &ipv6_netmask(self.prefix_len))
    }
}

/// The netmask of an IPv6 prefix of `prefix_len` bits (network order); beyond 128, all ones.
#[inline(always)]
pub fn ipv6_netmask(prefix_len: u32) -> [u8; 16] {
    let high = prefix_mask(prefix_len);
    let low = prefix_mask(prefix_len.saturating_sub(64));
    join_halves(high, low)
}

/// Whether `address` lies in the subnet `network`/`netmask` (all network order).
#[inline(always)]
pub fn ipv6_in_subnet(address: &[u8; 16], network: &[u8; 16], netmask: &[u8; 16]) -> bool {
    // In 64-bit halves: the BPF target has no 128-bit shifts, and two words beat 16 bytes.
    let (address_high, address_low) = halves(address);
    let (network_high, network_low) = halves(network);
    let (mask_high, mask_low) = halves(netmask);
    address_high & mask_high == network_high && address_low & mask_low == network_low
}

/// The 64-bit mask of the first `bits` bits (64 and more: all ones).
#[inline(always)]
fn prefix_mask(bits: u32) -> u64 {
    match bits {
        0 => 0,
        1..=63 => u64::MAX << (64 - bits),
        _ => u64::MAX,
    }
}

#[inline(always)]
fn halves(bytes: &[u8; 16]) -> (u64, u64) {
    let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p] = *bytes;
    (
        u64::from_be_bytes([a, b, c, d, e, f, g, h]),
        u64::from_be_bytes([i, j, k, l, m, n, o, p]),
    )
}

#[inline(always)]
fn join_halves(high: u64, low: u64) -> [u8; 16] {
    let [a, b, c, d, e, f, g, h] = high.to_be_bytes();
    let [i, j, k, l, m, n, o, p] = low.to_be_bytes();
    [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p]
}

/// Where to deliver a decapsulated packet for a local container without routing it through
/// docker0: the value of `endpoints6` (keyed by the container's IPv6 address) and of each
/// `endpoints` slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The host-side veth of the container, a port of the container bridge.
    pub ifindex: u32,
    /// The container's own MAC, on the far end of that veth.
    pub mac: [u8; 6],
    /// Keeps the layout free of implicit padding.
    pub reserved: u16,
}

/// Value of the IPv4 endpoint map, an array indexed by [`endpoint_slot`]: the decapsulator
/// finds a container by its address's host part, without hashing it. All zeros when empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlot {
    /// The container's address (network order): the slot is only this address's.
    pub address: [u8; 4],
    pub endpoint: LocalEndpoint,
}

/// The `endpoints` slot of a container `address` in this host's lease, whose netmask is
/// `netmask` (both in network order): the address's host part.
#[inline(always)]
pub fn endpoint_slot(address: [u8; 4], netmask: [u8; 4]) -> u32 {
    u32::from_be_bytes(address) & !u32::from_be_bytes(netmask)
}

/// Value of the claim cache (a per-CPU array, slot = container port's ifindex modulo its
/// size): the source MAC of the last IPv4 or IPv6 frame whose claims a port made good, and
/// the source of the last of each family, each bound to that port (all zeros where no frame
/// of the port set it). A frame holding the same again needs no lookup in the binding maps,
/// which bind each claim to a port and no MAC to an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedClaims {
    /// The container port; 0 (no interface) for an empty slot.
    pub port: u32,
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    pub mac: [u8; 6],
    /// Keeps the layout free of implicit padding.
    pub reserved: u16,
}

/// Slots of the claim cache.
pub const CLAIM_CACHE_SLOTS: u32 = 4096;

/// Key of the routed-flows map: one direction of a flow, as the programs see its packets.
/// Ports are those of TCP, UDP, SCTP, DCCP and UDP-Lite; an ICMP echo flow carries its
/// identifier in both, so a request's key reversed is its reply's; other protocols leave them
/// zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    /// Addresses in network order, as they sit in packets.
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Ports in network order, as they sit in packets.
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    /// The IP protocol number.
    pub protocol: u8,
    /// Keeps the layout free of implicit padding; always zero.
    pub reserved: [u8; 3],
}

impl FlowKey {
    /// The key of the packets that travel the other way.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..*self
        }
    }
}

/// Key of the IPv6 routed-flows map: one direction of an IPv6 flow, as [`FlowKey`] is of an
/// IPv4 one. An ICMPv6 echo flow carries its identifier in both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey6 {
    /// Addresses in network order, as they sit in packets.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Ports in network order, as they sit in packets.
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    /// The next header: TCP, UDP or ICMPv6.
    pub protocol: u8,
    /// Keeps the layout free of implicit padding; always zero.
    pub reserved: [u8; 3],
}

impl FlowKey6 {
    /// The key of the packets that travel the other way.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..*self
        }
    }
}

/// Value of the routed-flows map: a flow the kernel's stack forwarded on this host, whose
/// packets the fast path must leave to the stack too, so that conntrack sees all of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutedFlow {
    /// The interface the stack sent the flow's other direction out of: the VXLAN device or
    /// the container bridge.
    pub ifindex: u32,
}

/// What a program does with a packet, once it has counted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// On to the stack, as it is now (untouched, or decapsulated).
    Pass,
    /// Thrown away.
    Drop,
    /// Sent on by the program itself, to another interface or straight into a container.
    Redirect,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Redirect => "redirect",
        }
    }
}

/// How many bytes of a dropped packet a drop event carries: enough for the outer headers and
/// the inner ones up to the ports (14 + 20 + 8 + 8 + 14 + 20 + 4 = 88, with room for IPv4
/// options).
pub const DROP_HEAD_LEN: usize = 128;

/// What `overlay-agent monitor` asks the programs to report, the one entry of the `trace`
/// map: with a family, every packet to or from an address in the prefix (outer or, for VXLAN,
/// inner addresses), whatever its outcome.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// The process of the monitor that set it (0: none), for the log of the agent that finds
    /// the reports on after that monitor ended without turning them off.
    pub monitor_pid: u32,
    /// `TRACE_IPV4` or `TRACE_IPV6`; 0 traces nothing.
    pub family: u8,
    pub prefix_len: u8,
    /// Keeps the layout free of implicit padding.
    pub reserved: u16,
    /// The prefix's address (network order); an IPv4 one in the first four bytes.
    pub address: [u8; 16],
}

/// [`Trace::family`] of an IPv4 prefix.
pub const TRACE_IPV4: u8 = 4;
/// [`Trace::family`] of an IPv6 prefix.
pub const TRACE_IPV6: u8 = 6;

impl Trace {
    /// Whether `address` lies in the traced IPv4 prefix.
    #[inline(always)]
    pub fn holds_ipv4(&self, address: &[u8; 4]) -> bool {
        let [a, b, c, d, ..] = self.address;
        // The first `prefix_len` of 64 bits, moved down to the 32 of an IPv4 address.
        let mask = (prefix_mask(u32::from(self.prefix_len)) >> 32) as u32;
        let differing = u32::from_be_bytes(*address) ^ u32::from_be_bytes([a, b, c, d]);
        self.family == TRACE_IPV4 && differing & mask == 0
    }

    /// Whether `address` lies in the traced IPv6 prefix.
    #[inline(always)]
    pub fn holds_ipv6(&self, address: &[u8; 16]) -> bool {
        self.family == TRACE_IPV6
            && ipv6_in_subnet(
                address,
                &self.address,
                &ipv6_netmask(u32::from(self.prefix_len)),
            )
    }
}

/// One dropped or traced packet, as the programs report it to `overlay-agent monitor` through
/// the `drop_events` ring buffer while a monitor is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// Why: the counter the packet moved (for a drop, a drop counter), as `Counter as u32`.
    pub reason: u32,
    /// The interface the program saw the packet on.
    pub ifindex: u32,
    /// The packet's whole length.
    pub len: u32,
    /// How many bytes at the start of `head` hold the packet's first bytes.
    pub captured: u32,
    pub head: [u8; DROP_HEAD_LEN],
}

macro_rules! define_counters {
    ($($(#[doc = $doc:literal])+ $field:ident => $variant:ident: $verdict:ident,)+) => {
        /// The dataplane's named counters, one `u64` per outcome.
        ///
        /// The stats map is a per-CPU array holding one `Counters`, so `bpftool map dump`
        /// shows every counter by name for every CPU.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $($(#[doc = $doc])+ pub $field: u64,)+
        }

        /// Names one field of [`Counters`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Counter {
            /// Every counter, in field order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// The counter's field name, as bpftool prints it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => stringify!($field),)+
                }
            }

            /// What the program does with the packets it counts. Every counter declares its
            /// own, so a new one cannot fall into a default.
            pub const fn verdict(self) -> Verdict {
                match self {
                    $(Counter::$variant => Verdict::$verdict,)+
                }
            }
        }

        impl Counters {
            /// The slot of one counter; with a constant `counter` this folds to a field access.
            #[inline(always)]
            pub fn slot_mut(&mut self, counter: Counter) -> &mut u64 {
                match counter {
                    $(Counter::$variant => &mut self.$field,)+
                }
            }

            /// The value of one counter.
            pub fn get(&self, counter: Counter) -> u64 {
                match counter {
                    $(Counter::$variant => self.$field,)+
                }
            }
        }
    };
}

define_counters! {
    /// Uplink frame that is neither IPv4 nor IPv6 (ARP, VLAN-tagged, ...): passed.
    rx_not_ip => RxNotIp: Pass,
    /// Uplink IP packet that is not UDP (TCP superpackets GRO merged beyond 64 KiB, IPv4 total
    /// length 0, among them), or IPv6 whose UDP header follows an extension header
    /// other than one fragment header: passed (unchecked: should the stack find VXLAN behind
    /// the extension headers, flannel-v6's guard drops it, see `rx_unchecked_vxlan`).
    rx_not_udp => RxNotUdp: Pass,
    /// Uplink IPv4 fragment after the first: passed, only the stack can reassemble it (the
    /// reassembled packet carries the first fragment's mark, see `rx_checked`).
    rx_ipv4_fragment => RxIpv4Fragment: Pass,
    /// Uplink IPv6 fragment after the first: passed, as `rx_ipv4_fragment`.
    rx_ipv6_fragment => RxIpv6Fragment: Pass,
    /// Uplink UDP datagram (IPv4 or IPv6) to a port other than the VXLAN port: passed.
    rx_other_port => RxOtherPort: Pass,
    /// Uplink VXLAN frame carrying another VNI, whatever its flags (GBP, say): passed.
    rx_vxlan_foreign_vni => RxVxlanForeignVni: Pass,
    /// Uplink VXLAN frame for our port whose outer destination is not this host's tunnel
    /// address, whatever its VNI and flags: passed, to be routed on (or, for another local address, refused with
    /// `rx_unchecked_vxlan`).
    rx_other_destination => RxOtherDestination: Pass,
    /// Uplink VXLAN frame decapsulated and put into the VXLAN device, as if the kernel had
    /// decapsulated it there, for the stack to route: its TTL runs out here, or its
    /// destination is not a known local container (the host itself, say).
    rx_decapsulated => RxDecapsulated: Redirect,
    /// Uplink VXLAN frame decapsulated and put into the VXLAN device because conntrack must
    /// see it: its flow takes the routed path on this host (see `routed_flows`), or it is an
    /// IPv4 fragment, an ICMP error or has IPv4 options.
    rx_routed_flow => RxRoutedFlow: Redirect,
    /// Uplink VXLAN frame (over IPv4 or IPv6) decapsulated and put straight into the
    /// destination container.
    rx_delivered => RxDelivered: Redirect,
    /// Uplink VXLAN frame from a peer that passed every check, handed on still encapsulated:
    /// at the XDP hook, to the tc program behind it; at tc, a first fragment, a frame with a
    /// UDP checksum over IPv4, VXLAN over IPv6 the fast path does not deliver (see the
    /// README's "IPv6 fast path"), marked for the VXLAN device's own socket (the kernel
    /// reassembles, verifies the checksum and decapsulates).
    rx_checked => RxChecked: Pass,
    /// Uplink VXLAN frame whose outer source is no current lease's PublicIP: dropped.
    rx_unknown_vtep => RxUnknownVtep: Drop,
    /// Uplink VXLAN frame whose inner source lies outside the sender's subnet and is not the
    /// sender's PublicIP: dropped.
    rx_spoofed_source => RxSpoofedSource: Drop,
    /// Uplink VXLAN frame carrying something other than IP of its outer header's family
    /// (IPv4 in VXLAN over IPv4, IPv6 in VXLAN over IPv6): dropped.
    rx_inner_other_family => RxInnerOtherFamily: Drop,
    /// Uplink VXLAN over IPv6 whose outer source is no current lease's PublicIPv6: dropped.
    rx_ipv6_non_member => RxIpv6NonMember: Drop,
    /// Uplink VXLAN over IPv6 whose inner IPv6 source lies outside the IPv6 subnet the
    /// sender leases: dropped.
    rx_ipv6_spoofed_inner => RxIpv6SpoofedInner: Drop,
    /// Uplink VXLAN frame whose outer header says congestion (ECN CE) for an inner packet
    /// that is not ECN-capable: dropped, as RFC 6040 and the kernel do.
    rx_ce_not_ect => RxCeNotEct: Drop,
    /// Uplink frame cut short, with inconsistent header fields, with VXLAN flags or reserved
    /// bits the kernel does not accept, or a first fragment whose own bytes (not the padding
    /// behind them) do not hold every header the checks read: dropped.
    rx_malformed => RxMalformed: Drop,
    /// Uplink VXLAN frame the kernel would not let us strip or pass on: dropped.
    rx_error => RxError: Drop,
    /// Packet a VXLAN device's own socket (flannel.<VNI>'s or flannel-v6.<VNI>'s)
    /// decapsulated that no uplink program checked: VXLAN that arrived on another interface,
    /// from a local sender or a container, behind IPv6 extension headers, or reassembled from
    /// fragments whose first one was not checked: dropped.
    rx_unchecked_vxlan => RxUncheckedVxlan: Drop,
    /// Packet the stack routed into a VXLAN device (flannel.<VNI>, or flannel-v6.<VNI> where
    /// the outer UDP checksum follows from its headers), encapsulated and sent out of the
    /// uplink.
    tx_encapsulated => TxEncapsulated: Redirect,
    /// Packet from a local container for a remote subnet, encapsulated at the container's
    /// veth and sent out of the uplink, past docker0, routing and the VXLAN device (with
    /// DirectRouting, to a host on our segment: sent there as it is, without VXLAN).
    tx_direct => TxDirect: Redirect,
    /// Packet from a local container for a remote subnet left to the routed path: its TTL
    /// (hop limit) runs out here, it is too big for the VXLAN device, its IPv4 header has
    /// options, or it is IPv6 whose outer UDP checksum the fast path cannot compute from its
    /// headers (extension headers, a protocol other than TCP, UDP and ICMPv6, UDP without a
    /// checksum, trailing bytes, a superpacket other than TCP).
    tx_slow_path => TxSlowPath: Pass,
    /// Packet from a local container for a remote subnet left to the routed path because
    /// conntrack must see it: its flow takes the routed path on this host (see
    /// `routed_flows`, `routed_flows6`), or it is an IPv4 fragment or an ICMP error.
    tx_routed_flow => TxRoutedFlow: Pass,
    /// TCP superpacket over IPv6 whose last segment would be shorter than the others: left to
    /// the routed path, as one outer UDP checksum, written before segmentation, is right for
    /// segments of one length only (see the README's "IPv6 fast path").
    tx_ipv6_partial_segment => TxIpv6PartialSegment: Pass,
    /// Packet to an address no remote lease covers: dropped.
    tx_no_route => TxNoRoute: Drop,
    /// IPv6 the stack routed into flannel-v6.<VNI> whose outer UDP checksum does not follow
    /// from its headers (extension headers, a protocol other than TCP, UDP and ICMPv6, UDP
    /// without a checksum, a superpacket other than TCP or with a short last segment), or
    /// that no IPv6 lease covers (the kernel's own neighbour discovery): passed on for the
    /// kernel's device to encapsulate, its flow remembered (see `routed_flows6`). The rest
    /// is encapsulated here (`tx_encapsulated`).
    tx_ipv6_routed => TxIpv6Routed: Pass,
    /// Packet through the VXLAN device that is neither IPv4 nor, on flannel-v6.<VNI>, IPv6:
    /// dropped.
    tx_not_ipv4 => TxNotIpv4: Drop,
    /// Packet through the VXLAN device cut short: dropped.
    tx_malformed => TxMalformed: Drop,
    /// Packet the kernel would not let us encapsulate or redirect: dropped.
    tx_error => TxError: Drop,
    /// Packet whose encapsulation would exceed IPv4's 65,535 bytes (a BIG TCP superpacket):
    /// dropped, never truncated.
    tx_too_big => TxTooBig: Drop,
    /// UDP (over IPv4 or IPv6) from a container to the VXLAN port: dropped, so that no
    /// workload can send VXLAN that masquerade would make look like this host's.
    tx_vxlan_from_container => TxVxlanFromContainer: Drop,
    /// Frame from a container whose IPv4 source or ARP sender address is outside this host's
    /// lease, is the host's own (the bridge's, the lease's network or broadcast address), or
    /// is bound to another container port: dropped.
    tx_spoofed_source => TxSpoofedSource: Drop,
    /// Frame from a container whose source MAC is bound to another container port, is the
    /// bridge's or a group address, or differs from its ARP sender's or from a link-layer
    /// address option of its neighbour discovery: dropped.
    tx_spoofed_mac => TxSpoofedMac: Drop,
    /// IPv6 from a container whose source, or the target of its Neighbour Advertisement, is
    /// bound to another container port or (in a network with IPv6) is neither in this host's
    /// IPv6 lease (and not the host's own: the bridge's or the lease's network address) nor
    /// link-local; the unspecified source (duplicate address detection) binds nothing:
    /// dropped.
    tx_ipv6_spoofed_source => TxIpv6SpoofedSource: Drop,
    /// Frame from a container with a VLAN tag, in the frame or taken off by the veth into the
    /// packet's metadata: dropped, as no check looks past the tag while the stack or a
    /// neighbour would.
    tx_vlan => TxVlan: Drop,
    /// Frame from a container that is neither IPv4, IPv6 nor ARP for IPv4 over Ethernet
    /// (hardware type 1 or 6, 6-byte and 4-byte addresses): dropped, as no check knows it.
    tx_unexpected_frame => TxUnexpectedFrame: Drop,
    /// IPv6 from a container whose headers the checks cannot follow to the upper layer: more
    /// extension headers than they walk, a header running past the payload, neighbour
    /// discovery in a fragment, or a fragment after the first whose first fragment did not
    /// pass the checks from the same port: dropped, as the host or a neighbour would read
    /// what no check saw.
    tx_ipv6_unchecked => TxIpv6Unchecked: Drop,
    /// Router Advertisement or Redirect from a container: dropped, as a neighbour would take
    /// it (its default route, its prefixes, its next hop) from what is not its router.
    tx_router_message => TxRouterMessage: Drop,
}

impl Counter {
    /// The counter whose `Counter as u32` is `index`.
    pub fn from_index(index: u32) -> Option<Counter> {
        Counter::ALL.get(usize::try_from(index).ok()?).copied()
    }

    /// Whether the counter counts packets a program threw away: a legitimate packet must
    /// never move one of these.
    pub const fn is_drop(self) -> bool {
        matches!(self.verdict(), Verdict::Drop)
    }
}

impl Counters {
    /// Adds `other` field by field, e.g. to sum the per-CPU copies.
    pub fn accumulate(&mut self, other: &Counters) {
        for &counter in Counter::ALL {
            *self.slot_mut(counter) += other.get(counter);
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): repr(C) structs of integers with no implicit padding, valid for every
    // bit pattern.
    unsafe impl aya::Pod for super::OverlayConfig {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::RemoteVtep {}
    unsafe impl aya::Pod for super::RemoteVtep6 {}
    unsafe impl aya::Pod for super::VtepSubnet {}
    unsafe impl aya::Pod for super::VtepSubnet6 {}
    unsafe impl aya::Pod for super::LocalEndpoint {}
    unsafe impl aya::Pod for super::EndpointSlot {}
    unsafe impl aya::Pod for super::CachedClaims {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::RoutedFlow {}
    unsafe impl aya::Pod for super::PeerTraffic {}
    unsafe impl aya::Pod for super::Trace {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_slot_and_name() {
        let mut counters = Counters::default();
        for (position, &counter) in Counter::ALL.iter().enumerate() {
            *counters.slot_mut(counter) = position as u64 + 1;
        }
        for (position, &counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(
                counters.get(counter),
                position as u64 + 1,
                "{}",
                counter.name()
            );
            assert!(
                Counter::ALL[..position]
                    .iter()
                    .all(|other| other.name() != counter.name())
            );
        }
        assert_eq!(size_of::<Counters>(), Counter::ALL.len() * size_of::<u64>());
    }

    #[test]
    fn a_counter_comes_back_from_its_index() {
        for &counter in Counter::ALL {
            assert_eq!(Counter::from_index(counter as u32), Some(counter));
        }
        assert_eq!(Counter::from_index(Counter::ALL.len() as u32), None);
    }

    #[test]
    fn an_ipv6_subnet_holds_exactly_its_addresses() {
        let subnet = VtepSubnet6 {
            subnet: [0xfd, 0, 0, 2, 0, 0, 0, 0x54, 0, 0, 0, 0, 0, 0, 0, 0],
            prefix_len: 64,
        };
        let mut inside = subnet.subnet;
        inside[15] = 2;
        let mut outside = subnet.subnet;
        outside[7] = 0x41;
        assert!(subnet.contains(&inside) && subnet.contains(&subnet.subnet));
        assert!(!subnet.contains(&outside));
        // Prefixes inside the second half: the last bit of the prefix counts, the host bits
        // after it do not.
        for (prefix_len, last_prefix_bit, host_bits) in [(120, (14, 1), 0xff), (127, (15, 2), 1)] {
            let narrow = VtepSubnet6 {
                prefix_len,
                ..subnet
            };
            let mut outside = subnet.subnet;
            outside[last_prefix_bit.0] = last_prefix_bit.1;
            let mut host = subnet.subnet;
            host[15] = host_bits;
            assert!(!narrow.contains(&outside), "/{prefix_len}");
            assert!(narrow.contains(&host), "/{prefix_len}");
        }
        assert_eq!(ipv6_netmask(0), [0; 16]);
        assert_eq!(ipv6_netmask(128), [0xff; 16]);
        assert_eq!(
            ipv6_netmask(65),
            [
                255, 255, 255, 255, 255, 255, 255, 255, 0x80, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(
            ipv6_netmask(10),
            [255, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_trace_holds_exactly_its_prefix_of_its_own_family() {
        let mut address = [0; 16];
        address[..4].copy_from_slice(&[10, 2, 54, 0]);
        let subnet = Trace {
            family: TRACE_IPV4,
            prefix_len: 24,
            address,
            ..Trace::default()
        };
        assert!(subnet.holds_ipv4(&[10, 2, 54, 2]));
        assert!(!subnet.holds_ipv4(&[10, 2, 41, 2]));
        assert!(!subnet.holds_ipv6(&address));
        let host = Trace {
            prefix_len: 32,
            ..subnet
        };
        assert!(!host.holds_ipv4(&[10, 2, 54, 2]));
        assert!(host.holds_ipv4(&[10, 2, 54, 0]));
        let v6 = Trace {
            family: TRACE_IPV6,
            prefix_len: 128,
            address: [0xfd, 0, 0, 2, 0, 0, 0, 0x54, 0, 0, 0, 0, 0, 0, 0, 2],
            ..Trace::default()
        };
        assert!(v6.holds_ipv6(&v6.address));
        assert!(!v6.holds_ipv4(&[0xfd, 0, 0, 2]));
        assert!(!Trace::default().holds_ipv4(&[10, 2, 54, 2]), "off");
    }

    #[test]
    fn accumulate_adds_field_by_field() {
        let mut total = Counters {
            rx_decapsulated: 2,
            rx_malformed: 1,
            ..Counters::default()
        };
        total.accumulate(&Counters {
            rx_decapsulated: 3,
            rx_not_udp: 4,
            ..Counters::default()
        });
        assert_eq!(
            total,
            Counters {
                rx_decapsulated: 5,
                rx_malformed: 1,
                rx_not_udp: 4,
                ..Counters::default()
            }
        );
    }
}
