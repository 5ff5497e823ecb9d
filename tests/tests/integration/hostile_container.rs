//! A hostile container against its neighbours, with real agents in namespaces (ebpf mode, the
//! dual-stack seed): bbox1 sends frames nobody here wrote by hand (a seeded generator of VLAN
//! stacks, every ARP hardware, protocol and length variant, odd ethertypes, IPv6 extension
//! chains, neighbour discovery of every kind, fragments and made-up source MACs), many of
//! them claiming its neighbour bbox3's addresses 10.2.41.3 and fd00:2:0:41::3. No neighbour
//! (IPv4 or IPv6), FDB or endpoint entry of bbox3 may move, no frame from bbox3's addresses
//! that bbox3 did not send may reach bbox2 on the other host, and every container still
//! reaches every other. The shapes of the fail-closed issue are tried first on their own: an
//! ARP reply with hardware type 6 (IEEE 802), frames behind two VLAN tags of VID 0, a
//! Neighbour Advertisement for bbox3's IPv6 address, an IPv6 ping from it, and UDP to the
//! VXLAN port behind a destination options header.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_agent::dataplane::pins::PinnedDataplane;
use overlay_common::Counter;
use overlay_tests::{
    cluster::Host,
    frames::*,
    inject::send_frame,
    ipv6::{BBOX1_V6, BBOX2_V6},
    netns::{Netns, run},
    random::Random,
    seed::{BBOX1, BBOX2, Container, Seed},
    wait::wait_for,
};

const EBPF: &[&str] = &["--dataplane=ebpf"];
const BBOX3: &str = "10.2.41.3";
const BBOX3_IP: [u8; 4] = [10, 2, 41, 3];
const BBOX3_V6: &str = "fd00:2:0:41::3";
const BBOX3_IPV6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 3];
const BRIDGE_IPV6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0x41, 0, 0, 0, 0, 0, 0, 0, 1];
/// The extension headers the fuzzer chains: hop-by-hop, routing, fragment, authentication,
/// destination options.
const EXTENSION_HEADERS: [u8; 5] = [
    IPPROTO_HOPOPTS,
    IPPROTO_ROUTING,
    IPPROTO_FRAGMENT,
    IPPROTO_AH,
    IPPROTO_DSTOPTS,
];
const VXLAN_PORT: u16 = 8472;
const BRIDGE_IP: [u8; 4] = [10, 2, 41, 1];
const ETH_P_ARP: u16 = 0x0806;
const VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const FUZZ_FRAMES: usize = 4_000;
/// Made-up source MACs each bind an entry of the claim map: a few hundred leave it room.
const MADE_UP_MACS: usize = 300;
const PING_COUNT: u32 = 3;

/// Where bbox3 stands on host1: its MAC in host1's neighbour tables (IPv4 and IPv6) and
/// docker0's FDB, and the port the endpoint maps deliver 10.2.41.3 and fd00:2:0:41::3 to.
#[derive(Debug, PartialEq, Eq)]
struct Bbox3Entries {
    neighbour: String,
    neighbour6: String,
    fdb_port: String,
    endpoint_ifindex: u64,
    endpoint6_ifindex: u64,
}

/// The dual-stack seed plus bbox3 beside bbox1 on host1, every container having talked to
/// every other over both families.
struct World {
    bbox3: Container,
    seed: Seed,
}

impl World {
    fn start(tag: &str) -> Result<Self> {
        let seed = Seed::start_dual_stack(tag, [EBPF, EBPF])?;
        let bbox3 = Container::attach_dual_stack(&seed.host1, "bbox3", BBOX3, BBOX3_V6)?;
        let world = Self { bbox3, seed };
        world.check_everyone_reaches_everyone()?;
        Ok(world)
    }

    fn check_everyone_reaches_everyone(&self) -> Result<()> {
        let seed = &self.seed;
        let pairs = [
            (&seed.bbox1, [BBOX2, BBOX2_V6]),
            (&seed.bbox1, [BBOX3, BBOX3_V6]),
            (&self.bbox3, [BBOX2, BBOX2_V6]),
            (&self.bbox3, [BBOX1, BBOX1_V6]),
            (&seed.bbox2, [BBOX1, BBOX1_V6]),
            (&seed.bbox2, [BBOX3, BBOX3_V6]),
        ];
        for (from, [address, address6]) in pairs {
            from.ping(address, 1)?;
            from.ping6(address6, 1)?;
        }
        Ok(())
    }

    fn bbox3_entries(&self) -> Result<Bbox3Entries> {
        let host1 = &self.seed.host1;
        let mac = mac_of(&self.bbox3)?;
        Ok(Bbox3Entries {
            neighbour: neighbour_mac(host1, BBOX3)?,
            neighbour6: neighbour_mac(host1, BBOX3_V6)?,
            fdb_port: fdb_port(host1, &mac)?,
            endpoint_ifindex: endpoint_ifindex(host1, "endpoints", &BBOX3_IP)?,
            endpoint6_ifindex: endpoint_ifindex(host1, "endpoints6", &BBOX3_IPV6)?,
        })
    }

    fn bbox1_mac(&self) -> Result<[u8; 6]> {
        parse_mac(&mac_of(&self.seed.bbox1)?)
    }

    fn bridge_mac(&self) -> Result<[u8; 6]> {
        parse_mac(&link_mac(&self.seed.host1.netns, "docker0")?)
    }

    /// Sends `frames` out of bbox1's eth0, as they are.
    fn send_from_bbox1(&self, frames: &[Vec<u8>]) -> Result<()> {
        self.seed.bbox1.netns.run_inside(|| {
            for frame in frames {
                send_frame("eth0", frame)?;
            }
            Ok(())
        })
    }

    /// Runs `attack` from bbox1 while bbox2 counts the echo requests from bbox3's addresses
    /// it takes in, then has bbox3 ping bbox2 itself over each family: bbox2 must count
    /// bbox3's own pings and nothing else, and bbox3's entries on host1 must be as they were.
    fn check_attack_changes_nothing(&self, attack: &[Vec<u8>]) -> Result<()> {
        let before = self.bbox3_entries()?;
        let bbox2 = &self.seed.bbox2.netns;
        for rule in [ECHO_FROM_BBOX3, ECHO6_FROM_BBOX3] {
            bbox2.exec(&[&rule[..1], &["-w", "-I", "INPUT"], &rule[1..]].concat())?;
        }
        self.send_from_bbox1(attack)?;
        // The positive control: bbox3's own pings arrive over the same path. The kernel
        // counts each request before it answers, so the count is final once ping returns.
        let entries_moved = || {
            let after = self.bbox3_entries();
            format!("bbox3's entries on host1 before the attack {before:?}, after {after:?}")
        };
        self.bbox3
            .ping(BBOX2, PING_COUNT)
            .with_context(entries_moved)?;
        self.bbox3
            .ping6(BBOX2_V6, PING_COUNT)
            .with_context(entries_moved)?;
        for (rule, address) in [(ECHO_FROM_BBOX3, BBOX3), (ECHO6_FROM_BBOX3, BBOX3_V6)] {
            let counted = first_rule_count(bbox2, rule[0])?;
            ensure!(
                counted == u64::from(PING_COUNT),
                "bbox2 took in {counted} echo requests from {address}; bbox3 sent {PING_COUNT}"
            );
        }
        let after = self.bbox3_entries()?;
        ensure!(
            before == after,
            "bbox3's entries moved: {before:?} -> {after:?}"
        );
        let port = self
            .seed
            .host1
            .netns
            .exec(&["cat", "/sys/class/net/veth-bbox3/ifindex"])?;
        ensure!(
            after.endpoint_ifindex.to_string() == port.trim() && after.fdb_port == "veth-bbox3",
            "bbox3's entries name another port than veth-bbox3 ({}): {after:?}",
            port.trim()
        );
        self.check_everyone_reaches_everyone()
    }
}

/// The rules in bbox2's INPUT chain that count echo requests from bbox3's addresses: the
/// command, then the match.
const ECHO_FROM_BBOX3: [&str; 7] = [
    "iptables",
    "-s",
    BBOX3,
    "-p",
    "icmp",
    "--icmp-type",
    "echo-request",
];
const ECHO6_FROM_BBOX3: [&str; 7] = [
    "ip6tables",
    "-s",
    BBOX3_V6,
    "-p",
    "ipv6-icmp",
    "--icmpv6-type",
    "echo-request",
];

/// The packets the first rule of `netns`'s INPUT chain counted, as `command` (`iptables`,
/// `ip6tables`) lists it.
fn first_rule_count(netns: &Netns, command: &str) -> Result<u64> {
    rule_count(netns, command, 1)
}

/// The packets rule number `rule` of `netns`'s INPUT chain counted.
fn rule_count(netns: &Netns, command: &str, rule: usize) -> Result<u64> {
    let rule = rule.to_string();
    let listing = netns.exec(&[command, "-w", "-n", "-v", "-x", "-L", "INPUT", &rule])?;
    listing
        .split_whitespace()
        .next()
        .and_then(|packets| packets.parse().ok())
        .with_context(|| format!("no packet count in {listing:?}"))
}

fn mac_of(container: &Container) -> Result<String> {
    link_mac(&container.netns, "eth0")
}

fn link_mac(netns: &Netns, device: &str) -> Result<String> {
    let text = netns.exec(&["cat", &format!("/sys/class/net/{device}/address")])?;
    Ok(text.trim().to_string())
}

/// The MAC host1's neighbour table (of `address`'s family) names for `address` on docker0.
fn neighbour_mac(host: &Host, address: &str) -> Result<String> {
    let family = if address.contains(':') { "-6" } else { "-4" };
    let line = host
        .netns
        .ip(&[family, "neigh", "show", address, "dev", "docker0"])?;
    let mac = line
        .split_whitespace()
        .skip_while(|word| *word != "lladdr")
        .nth(1)
        .with_context(|| format!("no neighbour entry for {address}: {line:?}"))?;
    Ok(mac.to_string())
}

/// The docker0 port `mac` was learned behind, or "none".
fn fdb_port(host: &Host, mac: &str) -> Result<String> {
    let fdb = host
        .netns
        .exec(&["bridge", "fdb", "show", "br", "docker0"])?;
    let ports: Vec<&str> = fdb
        .lines()
        .filter(|line| line.starts_with(mac) && !line.contains("permanent"))
        .filter_map(|line| line.split_whitespace().nth(2))
        .collect();
    Ok(match ports.as_slice() {
        [] => "none".to_string(),
        ports => ports.join(","),
    })
}

/// The interface the endpoint map `map` delivers `address` to, 0 without an entry: `endpoints`
/// is an array whose slots hold their address, `endpoints6` is keyed by the address.
fn endpoint_ifindex(host: &Host, map: &str, address: &[u8]) -> Result<u64> {
    let dump = run(std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(host.pin_dir().join(map)))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&dump)
        .with_context(|| format!("bpftool's endpoint dump is not JSON: {dump}"))?;
    let wanted: Vec<serde_json::Value> = address.iter().map(|&byte| byte.into()).collect();
    let wanted = serde_json::Value::Array(wanted);
    Ok(entries
        .iter()
        .filter_map(|entry| entry.get("formatted"))
        .find_map(|formatted| {
            let (held, endpoint) = match formatted.pointer("/value/address") {
                Some(slot_address) => (slot_address, formatted.pointer("/value/endpoint")?),
                None => (formatted.get("key")?, formatted.get("value")?),
            };
            (*held == wanted).then(|| endpoint.get("ifindex")?.as_u64())?
        })
        .unwrap_or(0))
}

/// An ARP reply to the bridge, claiming `sender_ip` for `sender_mac`, whose first six bytes
/// (hardware type, protocol, address lengths) are `shape`.
fn arp_reply(
    shape: [u8; 6],
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
    bridge_mac: [u8; 6],
) -> Vec<u8> {
    [
        &shape[..],
        &[0, 2],
        &sender_mac,
        &sender_ip,
        &bridge_mac,
        &BRIDGE_IP,
    ]
    .concat()
}

/// `payload` of `ether_type` behind `tags` (outermost first), each with VLAN ID `vid`.
fn behind_tags(tags: &[u16], vid: u16, ether_type: u16, payload: &[u8]) -> (u16, Vec<u8>) {
    let mut inner = payload.to_vec();
    let mut inner_type = ether_type;
    for &tag in tags.iter().rev() {
        inner = [&vid.to_be_bytes()[..], &inner_type.to_be_bytes(), &inner].concat();
        inner_type = tag;
    }
    (inner_type, inner)
}

/// bbox1's echo request to bbox2 sent from bbox3's address.
fn spoofed_ping() -> Vec<u8> {
    let mut ping = bbox1_ping([10, 2, 54, 2], 64);
    ping[12..16].copy_from_slice(&BBOX3_IP);
    ping
}

/// bbox1's IPv6 echo request to bbox2 sent from bbox3's address.
fn spoofed_ping6() -> Vec<u8> {
    ipv6_ping(BBOX3_IPV6, BBOX2_IPV6, b"overlay!")
}

/// bbox1's unsolicited Neighbour Advertisement to all nodes, with the override flag, that
/// `target` is at bbox1's MAC.
fn neighbour_advertisement(target: [u8; 16], bbox1_mac: [u8; 6]) -> Vec<u8> {
    let advert = ndp_message(NEIGHBOUR_ADVERTISEMENT, OVERRIDE, target, bbox1_mac);
    let packet = Ipv6Chain {
        src: BBOX1_IPV6,
        dst: ALL_NODES,
        hop_limit: NDP_HOP_LIMIT,
        chain: &[],
    }
    .carrying(IPPROTO_ICMPV6, advert, 2);
    ethernet(ALL_NODES_MAC, bbox1_mac, ETH_P_IPV6, &packet)
}

/// bbox1's UDP datagram to bbox2's `port` behind a destination options header.
fn udp_behind_destination_options(port: u16, bbox1_mac: [u8; 6], bridge_mac: [u8; 6]) -> Vec<u8> {
    let packet = Ipv6Chain {
        src: BBOX1_IPV6,
        dst: BBOX2_IPV6,
        hop_limit: 64,
        chain: &[(IPPROTO_DSTOPTS, PADDING_OPTIONS)],
    }
    .carrying(IPPROTO_UDP, udp(40000, port, b"overlay!"), 6);
    ethernet(bridge_mac, bbox1_mac, ETH_P_IPV6, &packet)
}

fn counters(host: &Host) -> Result<overlay_common::Counters> {
    PinnedDataplane::open(&host.pin_dir())?.counters()
}

#[test]
fn a_container_cannot_send_from_a_neighbours_ipv6_address() -> Result<()> {
    let world = World::start("hc-src6")?;
    let (bbox1_mac, bridge_mac) = (world.bbox1_mac()?, world.bridge_mac()?);
    let frame = ethernet(bridge_mac, bbox1_mac, ETH_P_IPV6, &spoofed_ping6());
    world.check_attack_changes_nothing(&vec![frame; 5])
}

/// The binding goes with the port: once bbox3's veth is gone, a new container takes its IPv6
/// address and reaches bbox2 from it.
#[test]
fn a_gone_container_s_ipv6_address_is_free_for_the_next() -> Result<()> {
    let world = World::start("hc-free6")?;
    let (bbox1_mac, bridge_mac) = (world.bbox1_mac()?, world.bridge_mac()?);
    let frame = ethernet(bridge_mac, bbox1_mac, ETH_P_IPV6, &spoofed_ping6());
    world.check_attack_changes_nothing(&vec![frame; 5])?;
    let host1 = &world.seed.host1;
    host1.netns.ip(&["link", "del", "veth-bbox3"])?;
    let successor = Container::attach_dual_stack(host1, "bbox5", "10.2.41.5", BBOX3_V6)?;
    wait_for(
        "bbox3's successor to reach bbox2 from fd00:2:0:41::3",
        Duration::from_secs(15),
        || Ok(successor.ping6(BBOX2_V6, 1).is_ok()),
    )
}

#[test]
fn a_neighbour_advertisement_cannot_take_a_neighbours_ipv6_address() -> Result<()> {
    let world = World::start("hc-na")?;
    let frame = neighbour_advertisement(BBOX3_IPV6, world.bbox1_mac()?);
    world.check_attack_changes_nothing(&vec![frame; 5])
}

#[test]
fn udp_to_the_vxlan_port_behind_a_destination_options_header_is_dropped() -> Result<()> {
    const FRAMES: u64 = 5;
    let world = World::start("hc-dstopt")?;
    let (bbox1_mac, bridge_mac) = (world.bbox1_mac()?, world.bridge_mac()?);
    let bbox2 = &world.seed.bbox2.netns;
    // Rule 1 counts datagrams to the VXLAN port, rule 2 the control's to the next port.
    for port in [VXLAN_PORT, VXLAN_PORT + 1] {
        let port = port.to_string();
        let rule = ["-s", BBOX1_V6, "-p", "udp", "--dport", &port];
        bbox2.exec(&[&["ip6tables", "-w", "-A", "INPUT"][..], &rule].concat())?;
    }
    let frames = [VXLAN_PORT, VXLAN_PORT + 1]
        .map(|port| udp_behind_destination_options(port, bbox1_mac, bridge_mac));
    world.send_from_bbox1(&vec![frames[0].clone(); FRAMES as usize])?;
    // The control takes the same path behind the same header; the kernel keeps the order.
    world.send_from_bbox1(&vec![frames[1].clone(); FRAMES as usize])?;
    wait_for(
        "bbox2 to take in the control datagrams",
        Duration::from_secs(10),
        || Ok(rule_count(bbox2, "ip6tables", 2)? == FRAMES),
    )?;
    let to_vxlan = rule_count(bbox2, "ip6tables", 1)?;
    ensure!(
        to_vxlan == 0,
        "bbox2 took in {to_vxlan} datagrams to port {VXLAN_PORT} behind a destination options \
         header"
    );
    let refused = counters(&world.seed.host1)?.get(Counter::TxVxlanFromContainer);
    ensure!(
        refused == FRAMES,
        "host1 counted {refused} tx_vxlan_from_container, not {FRAMES}"
    );
    world.check_everyone_reaches_everyone()
}

#[test]
fn an_arp_reply_with_hardware_type_6_cannot_take_a_neighbours_address() -> Result<()> {
    let world = World::start("hc-arp6")?;
    let (bbox1_mac, bridge_mac) = (world.bbox1_mac()?, world.bridge_mac()?);
    let reply = arp_reply([0, 6, 8, 0, 6, 4], bbox1_mac, BBOX3_IP, bridge_mac);
    let frame = ethernet(bridge_mac, bbox1_mac, ETH_P_ARP, &reply);
    // The kernel lets an ARP reply override a neighbour entry once the entry is a second old.
    std::thread::sleep(Duration::from_millis(1100));
    world.check_attack_changes_nothing(&vec![frame; 5])
}

#[test]
fn frames_behind_two_vlan_tags_of_vid_0_are_not_taken_as_the_payload() -> Result<()> {
    let world = World::start("hc-qinq")?;
    let (bbox1_mac, bridge_mac) = (world.bbox1_mac()?, world.bridge_mac()?);
    let reply = arp_reply([0, 1, 8, 0, 6, 4], bbox1_mac, BBOX3_IP, bridge_mac);
    let (arp_type, tagged_arp) = behind_tags(&[0x8100, 0x8100], 0, ETH_P_ARP, &reply);
    let (ping_type, tagged_ping) = behind_tags(&[0x8100, 0x8100], 0, ETH_P_IPV4, &spoofed_ping());
    std::thread::sleep(Duration::from_millis(1100));
    let frames = [
        ethernet(bridge_mac, bbox1_mac, arp_type, &tagged_arp),
        ethernet(bridge_mac, bbox1_mac, ping_type, &tagged_ping),
    ];
    world.check_attack_changes_nothing(&[&frames[..]; 5].concat())
}

/// The generator's frames from bbox1: each a hostile payload (an ARP of any shape claiming
/// bbox3's address or the bridge's, a ping from bbox3's addresses whole or as a fragment,
/// IPv6 behind extension chains, neighbour discovery of every kind claiming bbox3's IPv6
/// address or the bridge's, UDP to the VXLAN port, random bytes of an odd ethertype) behind
/// zero to three VLAN tags, from bbox1's MAC or, now and then, a made-up one.
fn hostile_frames(random: &mut Random, bbox1_mac: [u8; 6], bridge_mac: [u8; 6]) -> Vec<Vec<u8>> {
    let made_up_every = FUZZ_FRAMES / MADE_UP_MACS;
    (0..FUZZ_FRAMES)
        .map(|index| {
            let source = if index % made_up_every == 0 {
                // A unicast, locally administered address.
                let mut mac = random.array::<6>();
                mac[0] = (mac[0] & 0xfc) | 0x02;
                mac
            } else {
                bbox1_mac
            };
            let (ether_type, payload) = hostile_payload(random, bbox1_mac, bridge_mac);
            let tag_count = random.below(4);
            let tags: Vec<u16> = (0..tag_count).map(|_| random.pick(&VLAN_TAGS)).collect();
            let any_vid = random.below(4096) as u16;
            let vid = random.pick(&[0, 0, 1, any_vid]);
            let (outer_type, body) = behind_tags(&tags, vid, ether_type, &payload);
            ethernet(bridge_mac, source, outer_type, &body)
        })
        .collect()
}

fn hostile_payload(random: &mut Random, bbox1_mac: [u8; 6], bridge_mac: [u8; 6]) -> (u16, Vec<u8>) {
    match random.below(9) {
        0 => {
            let odd = random.next_u64() as u16;
            let hardware = random.pick(&[0u16, 1, 6, 6, 7, 0x0100, odd]);
            let odd = random.next_u64() as u16;
            let protocol = random.pick(&[ETH_P_IPV4, ETH_P_IPV4, ETH_P_IPV6, odd]);
            let odd = random.array::<2>();
            let lengths = random.pick(&[[6, 4], [6, 4], [6, 16], [8, 4], odd]);
            let [h0, h1] = hardware.to_be_bytes();
            let [p0, p1] = protocol.to_be_bytes();
            let shape = [h0, h1, p0, p1, lengths[0], lengths[1]];
            let made_up = random.array::<6>();
            let sender_mac = random.pick(&[bbox1_mac, made_up]);
            let sender_ip = random.pick(&[BBOX3_IP, BRIDGE_IP]);
            (
                ETH_P_ARP,
                arp_reply(shape, sender_mac, sender_ip, bridge_mac),
            )
        }
        1 => (ETH_P_IPV4, spoofed_ping()),
        2 => {
            let [first, _] = ipv4_fragments(&spoofed_ping(), 8, random.next_u64() as u16);
            (ETH_P_IPV4, first)
        }
        3..=6 => (ETH_P_IPV6, hostile_ipv6(random, bbox1_mac)),
        7 => {
            let ping = ipv6_ping([0xfe; 16], [0xfd; 16], &random.array::<16>());
            let framed = ethernet(bridge_mac, bbox1_mac, ETH_P_IPV6, &ping);
            let kind = random.pick(&[0u8, 43, 44, 60]);
            let chained = with_ipv6_extension(&framed, kind, random.array::<7>());
            (ETH_P_IPV6, chained[ETH_HEADER_LEN..].to_vec())
        }
        _ => {
            // LLDP, PPPoE discovery, MPLS, RARP, or anything.
            let odd = random.next_u64() as u16;
            let ether_type = random.pick(&[0x88cc, 0x8863, 0x8847, 0x8035, odd]);
            (ether_type, random.array::<46>().to_vec())
        }
    }
}

/// An IPv6 packet from bbox1: a ping from bbox3's address (or its own) to bbox2, neighbour
/// discovery of any kind about bbox3's address, the bridge's or bbox1's own, naming bbox1's
/// MAC or a made-up one, or UDP to the VXLAN port; behind up to ten extension headers, well
/// formed or not, first fragments among them, or as a later fragment.
fn hostile_ipv6(random: &mut Random, bbox1_mac: [u8; 6]) -> Vec<u8> {
    let chain: Vec<(u8, [u8; 7])> = (0..random.pick(&[0, 0, 1, 2, 3, 8, 9, 10]))
        .map(|_| {
            let kind = random.pick(&EXTENSION_HEADERS);
            let body = match random.below(4) {
                0 => random.array::<7>(),
                1 if kind == IPPROTO_FRAGMENT => ipv6_fragment(1 + random.below(100) as u16),
                _ => well_formed_extension(kind),
            };
            (kind, body)
        })
        .collect();
    let source = random.pick(&[BBOX1_IPV6, BBOX3_IPV6, BBOX3_IPV6, [0; 16]]);
    match random.below(3) {
        0 => Ipv6Chain {
            src: source,
            dst: BBOX2_IPV6,
            hop_limit: 64,
            chain: &chain,
        }
        .carrying(
            IPPROTO_ICMPV6,
            [&[128, 0, 0, 0, 0, 1, 0, 1][..], b"overlay!"].concat(),
            2,
        ),
        1 => {
            let kind = random.pick(&[
                ROUTER_SOLICITATION,
                ROUTER_ADVERTISEMENT,
                NEIGHBOUR_SOLICITATION,
                NEIGHBOUR_ADVERTISEMENT,
                NEIGHBOUR_ADVERTISEMENT,
                NEIGHBOUR_ADVERTISEMENT,
                REDIRECT,
            ]);
            let target = random.pick(&[BBOX3_IPV6, BBOX3_IPV6, BRIDGE_IPV6, BBOX1_IPV6]);
            let made_up = random.array::<6>();
            let mac = random.pick(&[bbox1_mac, bbox1_mac, made_up]);
            let flags = random.pick(&[OVERRIDE, OVERRIDE | SOLICITED, ROUTER | OVERRIDE, 0]);
            let message = ndp_message(kind, flags, target, mac);
            Ipv6Chain {
                src: random.pick(&[source, BBOX1_IPV6]),
                dst: random.pick(&[ALL_NODES, BRIDGE_IPV6]),
                hop_limit: random.pick(&[NDP_HOP_LIMIT, NDP_HOP_LIMIT, 64]),
                chain: &chain,
            }
            .carrying(IPPROTO_ICMPV6, message, 2)
        }
        _ => Ipv6Chain {
            src: BBOX1_IPV6,
            dst: random.pick(&[BBOX2_IPV6, HOST2_IPV6]),
            hop_limit: 64,
            chain: &chain,
        }
        .carrying(
            IPPROTO_UDP,
            udp(40000, VXLAN_PORT, &random.array::<24>()),
            6,
        ),
    }
}

#[test]
fn a_hostile_container_fuzzer_moves_no_neighbours_entries() -> Result<()> {
    let world = World::start("hc-fuzz")?;
    let (bbox1_mac, bridge_mac) = (world.bbox1_mac()?, world.bridge_mac()?);
    let mut random = Random(0x5eed_c0ff_ee00_0001);
    let frames = hostile_frames(&mut random, bbox1_mac, bridge_mac);
    // Old enough neighbour entries for an ARP reply to override, were one let through.
    std::thread::sleep(Duration::from_millis(1100));
    world.check_attack_changes_nothing(&frames)
}

#[test]
fn one_container_cannot_use_up_the_claims_of_the_containers_after_it() -> Result<()> {
    let world = World::start("hc-quota")?;
    let bridge_mac = world.bridge_mac()?;
    // More made-up MACs than the binding map holds (16,384), each in an address probe.
    let probes: Vec<Vec<u8>> = (0..20_000u32)
        .map(|index| {
            let [_, high, middle, low] = index.to_be_bytes();
            let mac = [0x02, 0x66, 0, high, middle, low];
            let probe = arp_reply([0, 1, 8, 0, 6, 4], mac, [0; 4], bridge_mac);
            ethernet([0xff; 6], mac, ETH_P_ARP, &probe)
        })
        .collect();
    world.send_from_bbox1(&probes)?;
    let bbox4 = Container::attach(&world.seed.host1, "bbox4", "10.2.41.4")?;
    bbox4.ping(BBOX2, 1)?;
    world.seed.bbox2.ping("10.2.41.4", 1)?;
    world.check_everyone_reaches_everyone()
}
