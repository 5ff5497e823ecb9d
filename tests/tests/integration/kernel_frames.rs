//! Our programs against frames the kernel's own vxlan device makes, on real interfaces: host1
//! sends through flannel-style kernel VXLAN devices and plain sockets.
//! - The uplink XDP program on host2 accounts for every frame, and, knowing no peer, refuses
//!   host1's VXLAN while the rest passes.
//! - The frame our tc program builds is the kernel's, byte for byte, but for the outer UDP
//!   source port, IP ID and IP checksum; both our decapsulators turn it back into the inner
//!   packet.
use anyhow::Result;
use overlay_agent::dataplane::{DecapHook, XdpModeChoice};
use overlay_common::Counter;
use overlay_tests::{
    capture::capture_one,
    dataplane::{HOST1, HOST2, TC_ACT_REDIRECT, UplinkHook, dataplane_of, run_uplink, run_vtep},
    frames::*,
    netns::Netns,
    require_root,
    stock_flannel::{Peer, add_peer, add_vtep_zero_checksum},
};

/// Two hosts joined by a veth pair, with the seed's underlay addresses.
struct TwoHosts {
    host1: Netns,
    host2: Netns,
}

impl TwoHosts {
    fn new() -> Result<Self> {
        let hosts = Self {
            host1: Netns::new("host1")?,
            host2: Netns::new("host2")?,
        };
        hosts.host1.add_veth("eth0", &hosts.host2, "eth0")?;
        for (host, address) in [
            (&hosts.host1, "172.20.62.104/24"),
            (&hosts.host2, "172.20.62.105/24"),
        ] {
            host.ip(&["addr", "add", address, "dev", "eth0"])?;
            host.ip(&["link", "set", "eth0", "up"])?;
        }
        Ok(hosts)
    }

    /// A flannel-style VXLAN device on host1 whose `remote_subnet` lies behind host2.
    fn add_vxlan_route(&self, vni: u32, remote_subnet: &str) -> Result<()> {
        let device = format!("vx{vni}");
        add_vtep_zero_checksum(
            &self.host1,
            &device,
            vni,
            "172.20.62.104",
            &mac_text(HOST1_VTEP_MAC),
        )?;
        let peer = Peer {
            subnet: remote_subnet,
            public_ip: "172.20.62.105",
            vtep_mac: &mac_text(HOST2_VTEP_MAC),
        };
        add_peer(&self.host1, &device, &peer)
    }

    /// Sends `count` pings from host1 to `destination`; replies do not matter here.
    fn ping(&self, destination: &str, count: u32) -> Result<()> {
        self.host1.exec_unchecked(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            destination,
        ])?;
        Ok(())
    }
}

#[test]
fn real_traffic_is_classified_on_the_uplink() -> Result<()> {
    require_root()?;
    let hosts = TwoHosts::new()?;
    hosts.add_vxlan_route(1, "10.2.54.0/24")?;
    hosts.add_vxlan_route(7, "10.7.54.0/24")?;

    // host2 knows no peer: VXLAN for our VNI from host1 is an unknown VTEP's.
    let mut dataplane = dataplane_of(&HOST2, &[])?;
    let ifindex: u32 = hosts
        .host2
        .exec(&["cat", "/sys/class/net/eth0/ifindex"])?
        .trim()
        .parse()?;
    hosts.host2.run_inside(|| {
        dataplane.ensure_uplink_attached("eth0", ifindex, DecapHook::Xdp, XdpModeChoice::Auto)
    })?;

    hosts.ping("172.20.62.105", 2)?;
    hosts.ping("10.2.54.2", 3)?;
    hosts.ping("10.7.54.2", 4)?;
    hosts
        .host1
        .exec(&["bash", "-c", "echo overlay > /dev/udp/172.20.62.105/9999"])?;

    let counters = dataplane.counters()?;
    // What the XDP filter passes, the tc decapsulator behind it classifies again; what XDP
    // drops, tc never sees.
    let passes = |frames: u64| 2 * frames;
    assert!(
        counters.get(Counter::RxNotIp) >= 1,
        "host1's ARP for host2 crossed the uplink: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxNotUdp),
        passes(2),
        "direct pings: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxUnknownVtep),
        3,
        "pings through VNI 1, from a host with no lease: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxVxlanForeignVni),
        passes(4),
        "pings through VNI 7: {counters:?}"
    );
    assert_eq!(
        counters.get(Counter::RxOtherPort),
        passes(1),
        "one UDP datagram to port 9999: {counters:?}"
    );
    assert_eq!(counters.get(Counter::RxMalformed), 0, "{counters:?}");
    assert_eq!(counters.get(Counter::RxIpv4Fragment), 0, "{counters:?}");

    let replies =
        hosts
            .host1
            .exec_unchecked(&["ping", "-n", "-c", "1", "-W", "1", "172.20.62.105"])?;
    assert!(
        replies.status.success(),
        "XDP_PASS must leave host2 reachable"
    );
    Ok(())
}

#[test]
fn our_frames_are_the_kernel_s_frames() -> Result<()> {
    require_root()?;
    let hosts = TwoHosts::new()?;
    hosts.add_vxlan_route(1, "10.2.54.0/24")?;
    hosts
        .host1
        .ip(&["addr", "add", "10.2.41.0/32", "dev", "vx1"])?;
    let kernel = capture_one(&hosts.host2, "eth0", "udp port 8472", || {
        hosts.host1.exec_unchecked(&[
            "ping",
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            "-p",
            "6f7665726c6179",
            "10.2.54.2",
        ])?;
        Ok(())
    })?;
    let inner = &kernel[50..];
    assert_eq!(
        inner[..12],
        [HOST2_VTEP_MAC, HOST1_VTEP_MAC].concat(),
        "the kernel's inner Ethernet header"
    );

    let ours = run_vtep(&dataplane_of(&HOST1, &[&HOST2])?, inner)?;
    assert_eq!(ours.verdict, TC_ACT_REDIRECT);
    assert_eq!(ours.frame.len(), kernel.len());
    // IP ID (18..20), IP checksum (24..26), UDP source port (34..36) may differ; the outer
    // Ethernet header (0..14) is filled by bpf_redirect_neigh when the packet leaves.
    let masked = |frame: &[u8]| {
        let mut frame = frame[14..].to_vec();
        for byte in [4, 5, 10, 11, 20, 21] {
            frame[byte] = 0;
        }
        frame
    };
    assert_eq!(
        masked(&ours.frame),
        masked(&kernel),
        "\nours:   {:02x?}\nkernel: {:02x?}",
        &ours.frame[14..50],
        &kernel[14..50]
    );

    for hook in UplinkHook::ALL {
        let delivered = run_uplink(hook, &dataplane_of(&HOST2, &[&HOST1])?, &kernel)?;
        assert_eq!(delivered.verdict, hook.to_vtep(), "{hook:?}");
        assert_eq!(
            delivered.frame,
            hook.handed_to_vtep(&kernel, 50, HOST2_VTEP_MAC),
            "{hook:?}: flannel.1 gets the frame, tc's decapsulated and addressed to it"
        );
    }
    Ok(())
}
