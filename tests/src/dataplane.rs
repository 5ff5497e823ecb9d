//! The dataplane loaded without pins, set up as one of the seed's hosts, for
//! BPF_PROG_TEST_RUN: hand-built frames in, exact bytes, verdicts and counters out.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Result, ensure};
use aya::programs::{TestRun, TestRunOptions};
use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_agent::{
    dataplane::{
        BRIDGE_PROGRAM, CONTAINER_PROGRAM, Dataplane, LeaseCapacity, UPLINK_TC_PROGRAM,
        VTEP_INGRESS_PROGRAM, VTEP_PROGRAM,
    },
    mac::MacAddr,
    model::Baseline,
    reconcile::desired::lease_entries,
    subnet::{Lease, LeaseAttrs, PublicAddresses, VtepMacs},
};
use overlay_common::{
    CONFIG_FAST_PATH, CONFIG_IPV6, Counter, Counters, DEFAULT_VXLAN_PORT, EndpointSlot,
    LocalEndpoint, OverlayConfig, endpoint_slot,
};

use crate::{frames::*, require_root};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// The interface the programs' config names as uplink and VXLAN device under
/// BPF_PROG_TEST_RUN: loopback, which every namespace has.
const LOOPBACK: u32 = 1;
/// Loopback's MTU, the VXLAN devices' in these tests.
const LOOPBACK_MTU: u32 = 65536;
/// Room for the 50 bytes encapsulation adds.
const OUTPUT_SLACK: usize = 256;

/// One of the seed's hosts as the programs see it.
pub struct SeedHost {
    pub public_ip: [u8; 4],
    pub vtep_mac: [u8; 6],
    pub uplink_mac: [u8; 6],
    pub bridge_mac: [u8; 6],
    pub subnet: &'static str,
    /// The IPv6 side of the dual-stack seed.
    pub public_ipv6: [u8; 16],
    pub vtep6_mac: [u8; 6],
    pub subnet6: &'static str,
}

pub const HOST1: SeedHost = SeedHost {
    public_ip: HOST1_IP,
    vtep_mac: HOST1_VTEP_MAC,
    uplink_mac: HOST1_MAC,
    bridge_mac: HOST1_BRIDGE_MAC,
    subnet: "10.2.41.0/24",
    public_ipv6: HOST1_IPV6,
    vtep6_mac: HOST1_VTEP6_MAC,
    subnet6: "fd00:2:0:41::/64",
};

pub const HOST2: SeedHost = SeedHost {
    public_ip: HOST2_IP,
    vtep_mac: HOST2_VTEP_MAC,
    uplink_mac: HOST2_MAC,
    bridge_mac: HOST2_BRIDGE_MAC,
    subnet: "10.2.54.0/24",
    public_ipv6: HOST2_IPV6,
    vtep6_mac: HOST2_VTEP6_MAC,
    subnet6: "fd00:2:0:54::/64",
};

impl SeedHost {
    /// The dual-stack seed's host: its IPv4 and IPv6 leases, the fast path on.
    pub fn config(&self, vni: u32, port: u16) -> OverlayConfig {
        let subnet: Ipv4Network = self.subnet.parse().expect("seed subnets parse");
        let subnet6 = self.ipv6_subnet();
        OverlayConfig {
            vni,
            vxlan_port: port,
            flags: CONFIG_FAST_PATH | CONFIG_IPV6,
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac,
            uplink_mac: self.uplink_mac,
            uplink_ifindex: LOOPBACK,
            vtep_ifindex: LOOPBACK,
            bridge_mac: self.bridge_mac,
            reserved2: 0,
            local_subnet: subnet.network().octets(),
            local_netmask: subnet.mask().octets(),
            bridge_ip: (Ipv4Addr::from(subnet.network().to_bits() + 1)).octets(),
            public_ipv6: self.public_ipv6,
            local_subnet6: subnet6.network().octets(),
            local_netmask6: subnet6.mask().octets(),
            bridge_ipv6: Ipv6Addr::from(subnet6.network().to_bits() + 1).octets(),
            vtep6_ifindex: LOOPBACK,
            vtep6_mac: self.vtep6_mac,
            reserved3: 0,
            vtep_mtu: LOOPBACK_MTU,
            vtep6_mtu: LOOPBACK_MTU,
        }
    }

    fn ipv6_subnet(&self) -> Ipv6Network {
        self.subnet6.parse().expect("seed subnets parse")
    }

    /// This host's dual-stack lease as its peers hold it.
    pub fn lease(&self) -> Lease {
        let public = PublicAddresses {
            ipv4: Ipv4Addr::from(self.public_ip),
            ipv6: Some(Ipv6Addr::from(self.public_ipv6)),
        };
        let macs = VtepMacs {
            ipv4: Some(MacAddr(self.vtep_mac)),
            ipv6: Some(MacAddr(self.vtep6_mac)),
        };
        Lease {
            subnet: self.subnet.parse().expect("seed subnets parse"),
            ipv6_subnet: Some(self.ipv6_subnet()),
            attrs: LeaseAttrs::vxlan(public, 1, macs),
            etcd_lease: 0,
        }
    }
}

/// `host`'s dataplane with the seed's VNI and port, knowing `peers`.
pub fn dataplane_of(host: &SeedHost, peers: &[&SeedHost]) -> Result<Dataplane> {
    dataplane_with(host.config(1, DEFAULT_VXLAN_PORT), peers)
}

pub fn dataplane_with(config: OverlayConfig, peers: &[&SeedHost]) -> Result<Dataplane> {
    require_root()?;
    let mut dataplane = Dataplane::load(None, false, LeaseCapacity::MIN)?;
    dataplane.set_config(&config)?;
    let leases: Vec<Lease> = peers.iter().map(|peer| peer.lease()).collect();
    write_leases(&mut dataplane, &leases)?;
    Ok(dataplane)
}

/// Writes the map entries of `leases`, every one of which must fit.
pub fn write_leases(dataplane: &mut Dataplane, leases: &[Lease]) -> Result<()> {
    let unwritten = dataplane.write_lease_entries(
        &lease_entries(leases.iter(), &Default::default()),
        Baseline::Listed,
    )?;
    ensure!(unwritten.is_empty(), "leases left out: {unwritten:?}");
    Ok(())
}

/// host2's dataplane knowing host1 and bbox2 (see [`with_bbox2`]).
pub fn host2_with_bbox2() -> Result<Dataplane> {
    let mut dataplane = dataplane_of(&HOST2, &[&HOST1])?;
    with_bbox2(&mut dataplane)?;
    Ok(dataplane)
}

/// Makes bbox2 a local container of `dataplane`, by both its addresses, behind the veth with
/// index 42.
pub fn with_bbox2(dataplane: &mut Dataplane) -> Result<()> {
    let bbox2 = LocalEndpoint {
        ifindex: 42,
        mac: BBOX2_MAC,
        reserved: 0,
    };
    let slot = EndpointSlot {
        address: BBOX2_IP,
        endpoint: bbox2,
    };
    let netmask = HOST2.config(1, DEFAULT_VXLAN_PORT).local_netmask;
    dataplane.sync_endpoints(
        &[(endpoint_slot(BBOX2_IP, netmask), slot)].into(),
        &[(BBOX2_IPV6, bbox2)].into(),
    )
}

/// What one program run gave.
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
    /// How long the program ran, as BPF_PROG_TEST_RUN measured it.
    pub duration: std::time::Duration,
    pub counters: Counters,
    /// The packet's `skb->mark` afterwards (0 for XDP, which has none).
    pub mark: u32,
}

impl Outcome {
    /// Asserts no counter moved.
    pub fn assert_uncounted(&self) {
        assert_eq!(self.counters, Counters::default(), "no counter moves");
    }

    /// Asserts `expected` is the only counter that moved, by one.
    pub fn assert_only(&self, expected: Counter) {
        self.assert_only_since(&Counters::default(), expected);
    }

    /// Asserts `expected` is the only counter that moved since `before`, by one.
    pub fn assert_only_since(&self, before: &Counters, expected: Counter) {
        for &counter in Counter::ALL {
            assert_eq!(
                self.counters.get(counter) - before.get(counter),
                u64::from(counter == expected),
                "counter {} after a frame that should count as {}",
                counter.name(),
                expected.name()
            );
        }
    }
}

/// The uplink's two decapsulators, which must agree on everything but how they hand a
/// packet on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkHook {
    Tc,
    Xdp,
}

impl UplinkHook {
    pub const ALL: [UplinkHook; 2] = [UplinkHook::Tc, UplinkHook::Xdp];

    /// The verdict that lets a frame that is not ours go on to the stack.
    pub fn pass(self) -> u32 {
        match self {
            UplinkHook::Tc => TC_ACT_OK,
            UplinkHook::Xdp => XDP_PASS,
        }
    }

    pub fn drop(self) -> u32 {
        match self {
            UplinkHook::Tc => TC_ACT_SHOT,
            UplinkHook::Xdp => XDP_DROP,
        }
    }

    /// The verdict that hands a frame from a peer to flannel.1 for the stack: tc redirects it
    /// into flannel.1's receive path, XDP passes it on to flannel.1's socket.
    pub fn to_vtep(self) -> u32 {
        match self {
            UplinkHook::Tc => TC_ACT_REDIRECT,
            UplinkHook::Xdp => XDP_PASS,
        }
    }

    /// The counter of a frame from a peer handed to flannel.1, where tc would count `tc_reason`.
    pub fn to_vtep_counter(self, tc_reason: Counter) -> Counter {
        match self {
            UplinkHook::Tc => tc_reason,
            UplinkHook::Xdp => Counter::RxChecked,
        }
    }

    /// The frame flannel.1 gets for `vxlan_frame`, whose inner Ethernet header starts at
    /// `inner_offset`: tc decapsulates it and keeps the outer Ethernet header, readdressed to
    /// the VXLAN device (`vtep_mac`); XDP leaves it whole, for flannel.1's socket.
    pub fn handed_to_vtep(
        self,
        vxlan_frame: &[u8],
        inner_offset: usize,
        vtep_mac: [u8; 6],
    ) -> Vec<u8> {
        match self {
            UplinkHook::Tc => [
                &vtep_mac[..],
                &vxlan_frame[6..ETH_HEADER_LEN],
                &vxlan_frame[inner_offset + ETH_HEADER_LEN..],
            ]
            .concat(),
            UplinkHook::Xdp => vxlan_frame.to_vec(),
        }
    }
}

/// host2 receiving `frame` from host1, its only peer, at `hook`.
pub fn host2_receives(hook: UplinkHook, frame: &[u8]) -> Result<Outcome> {
    run_uplink(hook, &dataplane_of(&HOST2, &[&HOST1])?, frame)
}

/// Asserts both hooks of host2 pass `frame` on to the stack as it is, counted as `expected`,
/// tc with `mark` on it: `CHECKED_MARK` for what goes on to a VXLAN device's socket, checked,
/// none for what is not ours.
pub fn assert_host2_passes(frame: &[u8], expected: Counter, mark: u32) -> Result<()> {
    for hook in UplinkHook::ALL {
        let outcome = host2_receives(hook, frame)?;
        let what = format!("{hook:?}: {}", expected.name());
        assert_eq!(outcome.verdict, hook.pass(), "{what}");
        assert_eq!(outcome.frame, frame, "{what}: passes unchanged");
        outcome.assert_only(expected);
        if hook == UplinkHook::Tc {
            assert_eq!(outcome.mark, mark, "{what}");
        }
    }
    Ok(())
}

/// The kernel refuses tc test frames that claim IPv4 but are shorter than its header.
const TC_MIN_FRAME: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN;

/// Asserts both hooks of host2 drop `frame`, counted as `expected`, unmarked (tc only when
/// the kernel takes the frame).
pub fn assert_host2_drops(frame: &[u8], expected: Counter) -> Result<()> {
    for hook in UplinkHook::ALL {
        if hook == UplinkHook::Tc && frame.len() < TC_MIN_FRAME {
            continue;
        }
        let outcome = host2_receives(hook, frame)?;
        assert_eq!(
            outcome.verdict,
            hook.drop(),
            "{hook:?}: {}",
            expected.name()
        );
        outcome.assert_only(expected);
        assert_eq!(outcome.mark, 0, "{hook:?}: {}", expected.name());
    }
    Ok(())
}

/// The uplink's program at `hook` on `frame`.
pub fn run_uplink(hook: UplinkHook, dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    match hook {
        UplinkHook::Tc => run_tc(UPLINK_TC_PROGRAM, dataplane, frame, 0),
        UplinkHook::Xdp => run_xdp(dataplane, frame),
    }
}

/// flannel.1's (and flannel-v6.1's) egress program on `frame`.
pub fn run_vtep(dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    run_tc(VTEP_PROGRAM, dataplane, frame, 0)
}

/// flannel.1's ingress program on `frame`, arriving with `mark`.
pub fn run_vtep_ingress(dataplane: &Dataplane, frame: &[u8], mark: u32) -> Result<Outcome> {
    run_tc(VTEP_INGRESS_PROGRAM, dataplane, frame, mark)
}

/// A container veth's ingress program on `frame`.
pub fn run_container(dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    run_tc(CONTAINER_PROGRAM, dataplane, frame, 0)
}

/// A container veth's ingress program on `frame` as a GSO superpacket of `gso_size`-byte
/// segments.
pub fn run_container_gso(dataplane: &Dataplane, frame: &[u8], gso_size: u32) -> Result<Outcome> {
    run_tc_gso(CONTAINER_PROGRAM, dataplane, frame, gso_size)
}

/// flannel.1's (and flannel-v6.1's) egress program on `frame` as a GSO superpacket of
/// `gso_size`-byte segments.
pub fn run_vtep_gso(dataplane: &Dataplane, frame: &[u8], gso_size: u32) -> Result<Outcome> {
    run_tc_gso(VTEP_PROGRAM, dataplane, frame, gso_size)
}

fn run_tc_gso(name: &str, dataplane: &Dataplane, frame: &[u8], gso_size: u32) -> Result<Outcome> {
    let mut ctx_in = [0u8; SKB_GSO_CTX_LEN];
    let segments = u32::try_from(frame.len())?.div_ceil(gso_size);
    ctx_in[SKB_GSO_SEGS_OFFSET..][..4].copy_from_slice(&segments.to_ne_bytes());
    ctx_in[SKB_GSO_SIZE_OFFSET..][..4].copy_from_slice(&gso_size.to_ne_bytes());
    run_tc_with(name, dataplane, frame, &ctx_in)
}

/// The container bridge's egress program on `frame`.
pub fn run_bridge(dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    run_tc(BRIDGE_PROGRAM, dataplane, frame, 0)
}

/// The tc program `name` on `frame`, whose skb starts out with `mark`.
fn run_tc(name: &str, dataplane: &Dataplane, frame: &[u8], mark: u32) -> Result<Outcome> {
    // The start of a `struct __sk_buff`: len and pkt_type, which must be zero, then mark.
    let mut ctx_in = [0u8; SKB_CTX_LEN];
    ctx_in[SKB_MARK_OFFSET..].copy_from_slice(&mark.to_ne_bytes());
    run_tc_with(name, dataplane, frame, &ctx_in)
}

/// The tc program `name` on `frame`, whose skb starts out as the `struct __sk_buff` start
/// `ctx_in` says.
fn run_tc_with(name: &str, dataplane: &Dataplane, frame: &[u8], ctx_in: &[u8]) -> Result<Outcome> {
    let mut ctx_out = [0u8; SKB_CTX_OUT_LEN];
    let mut out = vec![0; frame.len() + OUTPUT_SLACK];
    let result = dataplane.tc_program(name)?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx_in),
        ctx_out: Some(&mut ctx_out),
        ..TestRunOptions::new()
    })?;
    out.truncate(result.data_size_out as usize);
    let mut mark = [0u8; 4];
    mark.copy_from_slice(&ctx_out[SKB_MARK_OFFSET..SKB_CTX_LEN]);
    Ok(Outcome {
        verdict: result.return_value,
        frame: out,
        duration: result.duration,
        counters: dataplane.counters()?,
        mark: u32::from_ne_bytes(mark),
    })
}

const SKB_MARK_OFFSET: usize = 8;
const SKB_CTX_LEN: usize = SKB_MARK_OFFSET + 4;
/// `struct __sk_buff`'s gso_segs and gso_size, the latter its last field the test run takes.
const SKB_GSO_SEGS_OFFSET: usize = 164;
const SKB_GSO_SIZE_OFFSET: usize = 176;
const SKB_GSO_CTX_LEN: usize = SKB_GSO_SIZE_OFFSET + 4;
/// Room for the whole `struct __sk_buff` the kernel hands back (it refuses less).
const SKB_CTX_OUT_LEN: usize = 256;

fn run_xdp(dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    let mut out = vec![0; frame.len() + OUTPUT_SLACK];
    let result = dataplane.uplink_xdp_program()?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(Outcome {
        verdict: result.return_value,
        frame: out,
        duration: result.duration,
        counters: dataplane.counters()?,
        mark: 0,
    })
}
