//! A hostile container against its neighbours, with real agents in namespaces (ebpf mode):
//! bbox1 sends frames nobody here wrote by hand (a seeded generator of VLAN stacks, every ARP
//! hardware, protocol and length variant, odd ethertypes, IPv6 extension chains, fragments and
//! made-up source MACs), many of them claiming its neighbour bbox3's address 10.2.41.3. No
//! neighbour, FDB or endpoint entry of bbox3 may move, no frame from bbox3's address that bbox3
//! did not send may reach bbox2 on the other host, and every container still reaches every
//! other. The two shapes of the fail-closed issue are tried first on their own: an ARP reply
//! with hardware type 6 (IEEE 802) and frames behind two VLAN tags of VID 0.
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    cluster::Host,
    frames::*,
    inject::send_frame,
    netns::{Netns, run},
    random::Random,
    seed::{BBOX1, BBOX2, Container, Seed},
};

const EBPF: &[&str] = &["--dataplane=ebpf"];
const BBOX3: &str = "10.2.41.3";
const BBOX3_IP: [u8; 4] = [10, 2, 41, 3];
const BRIDGE_IP: [u8; 4] = [10, 2, 41, 1];
const ETH_P_ARP: u16 = 0x0806;
const VLAN_TAGS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const FUZZ_FRAMES: usize = 4_000;
/// Made-up source MACs each bind an entry of the claim map: a few hundred leave it room.
const MADE_UP_MACS: usize = 300;
const PING_COUNT: u32 = 3;

/// Where bbox3 stands on host1: its MAC in host1's neighbour table and docker0's FDB, and
/// the port the endpoint map delivers 10.2.41.3 to.
#[derive(Debug, PartialEq, Eq)]
struct Bbox3Entries {
    neighbour: String,
    fdb_port: String,
    endpoint_ifindex: u64,
}

/// The seed plus bbox3 beside bbox1 on host1, every container having talked to every other.
struct World {
    bbox3: Container,
    seed: Seed,
}

impl World {
    fn start(tag: &str) -> Result<Self> {
        let seed = Seed::start(tag, EBPF)?;
        let bbox3 = Container::attach(&seed.host1, "bbox3", BBOX3)?;
        let world = Self { bbox3, seed };
        world.check_everyone_reaches_everyone()?;
        Ok(world)
    }

    fn check_everyone_reaches_everyone(&self) -> Result<()> {
        let seed = &self.seed;
        seed.bbox1.ping(BBOX2, 1)?;
        seed.bbox1.ping(BBOX3, 1)?;
        self.bbox3.ping(BBOX2, 1)?;
        self.bbox3.ping(BBOX1, 1)?;
        seed.bbox2.ping(BBOX1, 1)?;
        seed.bbox2.ping(BBOX3, 1)?;
        Ok(())
    }

    fn bbox3_entries(&self) -> Result<Bbox3Entries> {
        let host1 = &self.seed.host1;
        let mac = mac_of(&self.bbox3)?;
        Ok(Bbox3Entries {
            neighbour: neighbour_mac(host1, BBOX3)?,
            fdb_port: fdb_port(host1, &mac)?,
            endpoint_ifindex: endpoint_ifindex(host1, BBOX3_IP)?,
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

    /// Runs `attack` from bbox1 while bbox2 counts the echo requests from bbox3's address it
    /// takes in, then has bbox3 ping bbox2 itself: bbox2 must count bbox3's own pings and
    /// nothing else, and bbox3's entries on host1 must be as they were.
    fn check_attack_changes_nothing(&self, attack: &[Vec<u8>]) -> Result<()> {
        let before = self.bbox3_entries()?;
        let bbox2 = &self.seed.bbox2.netns;
        let insert: Vec<&str> = ["iptables", "-w", "-I", "INPUT"]
            .into_iter()
            .chain(ECHO_FROM_BBOX3)
            .collect();
        bbox2.exec(&insert)?;
        self.send_from_bbox1(attack)?;
        // The positive control: bbox3's own pings arrive over the same path. The kernel
        // counts each request before it answers, so the count is final once ping returns.
        self.bbox3.ping(BBOX2, PING_COUNT).with_context(|| {
            let after = self.bbox3_entries();
            format!("bbox3's entries on host1 before the attack {before:?}, after {after:?}")
        })?;
        let counted = echo_requests_from_bbox3(bbox2)?;
        ensure!(
            counted == u64::from(PING_COUNT),
            "bbox2 took in {counted} echo requests from {BBOX3}; bbox3 sent {PING_COUNT}"
        );
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

/// The match of the rule in bbox2's INPUT chain that counts echo requests from bbox3's address.
const ECHO_FROM_BBOX3: [&str; 6] = ["-s", BBOX3, "-p", "icmp", "--icmp-type", "echo-request"];

/// The packets the first rule of `netns`'s INPUT chain counted.
fn echo_requests_from_bbox3(netns: &Netns) -> Result<u64> {
    let listing = netns.exec(&["iptables", "-w", "-n", "-v", "-x", "-L", "INPUT", "1"])?;
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

/// The MAC host1's neighbour table names for `address` on docker0.
fn neighbour_mac(host: &Host, address: &str) -> Result<String> {
    let line = host
        .netns
        .ip(&["neigh", "show", address, "dev", "docker0"])?;
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

/// The interface the endpoint map delivers `address` to, 0 without an entry.
fn endpoint_ifindex(host: &Host, address: [u8; 4]) -> Result<u64> {
    let dump = run(std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(host.pin_dir().join("endpoints")))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&dump)
        .with_context(|| format!("bpftool's endpoint dump is not JSON: {dump}"))?;
    let wanted: Vec<serde_json::Value> = address.iter().map(|&byte| byte.into()).collect();
    Ok(entries
        .iter()
        .filter_map(|entry| entry.get("formatted"))
        .find(|formatted| formatted.get("key") == Some(&serde_json::Value::Array(wanted.clone())))
        .and_then(|formatted| formatted.pointer("/value/ifindex"))
        .and_then(serde_json::Value::as_u64)
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
/// bbox3's address or the bridge's, a ping from bbox3's address whole or as a first fragment,
/// IPv6 behind extension headers, random bytes of an odd ethertype) behind zero to three VLAN
/// tags, from bbox1's MAC or, now and then, a made-up one.
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
    match random.below(5) {
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
        3 => {
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
