//! The dataplane loaded without pins, set up as one of the seed's hosts, for
//! BPF_PROG_TEST_RUN: hand-built frames in, exact bytes, verdicts and counters out.
use std::net::Ipv4Addr;

use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions, TestRunResult};
use overlay_agent::{
    dataplane::Dataplane,
    mac::MacAddr,
    subnet::{Lease, LeaseAttrs},
};
use overlay_common::{Counter, Counters, DEFAULT_VXLAN_PORT, OverlayConfig};

use crate::{frames::*, require_root};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// Room for the 50 bytes encapsulation adds.
const OUTPUT_SLACK: usize = 256;

/// One of the seed's hosts as the programs see it.
pub struct SeedHost {
    pub public_ip: [u8; 4],
    pub vtep_mac: [u8; 6],
    pub uplink_mac: [u8; 6],
    pub subnet: &'static str,
}

pub const HOST1: SeedHost = SeedHost {
    public_ip: HOST1_IP,
    vtep_mac: HOST1_VTEP_MAC,
    uplink_mac: HOST1_MAC,
    subnet: "10.2.41.0/24",
};

pub const HOST2: SeedHost = SeedHost {
    public_ip: HOST2_IP,
    vtep_mac: HOST2_VTEP_MAC,
    uplink_mac: HOST2_MAC,
    subnet: "10.2.54.0/24",
};

impl SeedHost {
    pub fn config(&self, vni: u32, port: u16) -> OverlayConfig {
        OverlayConfig {
            vni,
            vxlan_port: port,
            reserved: 0,
            public_ip: self.public_ip,
            vtep_mac: self.vtep_mac,
            uplink_mac: self.uplink_mac,
            uplink_ifindex: 1,
        }
    }

    /// This host's lease as its peers hold it.
    pub fn lease(&self) -> Lease {
        Lease {
            subnet: self.subnet.parse().expect("seed subnets parse"),
            attrs: LeaseAttrs::vxlan(Ipv4Addr::from(self.public_ip), 1, MacAddr(self.vtep_mac)),
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
    let mut dataplane = Dataplane::load(None)?;
    dataplane.set_config(&config)?;
    let leases: Vec<Lease> = peers.iter().map(|peer| peer.lease()).collect();
    dataplane.upsert_leases(leases.iter())?;
    Ok(dataplane)
}

/// What one program run gave.
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
    pub counters: Counters,
}

impl Outcome {
    /// Asserts `expected` is the only counter that moved, by one.
    pub fn assert_only(&self, expected: Counter) {
        for &counter in Counter::ALL {
            assert_eq!(
                self.counters.get(counter),
                u64::from(counter == expected),
                "counter {} after a frame that should count as {}",
                counter.name(),
                expected.name()
            );
        }
    }
}

pub fn run_xdp(dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    run(dataplane.uplink_program()?, dataplane, frame)
}

pub fn run_tc(dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome> {
    run(dataplane.vtep_program()?, dataplane, frame)
}

fn run<P>(program: &P, dataplane: &Dataplane, frame: &[u8]) -> Result<Outcome>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (result, frame) = test_run(program, frame, 1)?;
    Ok(Outcome {
        verdict: result.return_value,
        frame,
        counters: dataplane.counters()?,
    })
}

/// The kernel's average run time of `program` on `frame` over `repeat` runs, in nanoseconds.
pub fn nanoseconds_per_packet<P>(program: &P, frame: &[u8], repeat: u32) -> Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let (result, _) = test_run(program, frame, repeat)?;
    Ok(result.duration.as_secs_f64() * 1e9)
}

/// BPF_PROG_TEST_RUN of `program` on `frame`, `repeat` times; the result and the frame out.
fn test_run<P>(program: &P, frame: &[u8], repeat: u32) -> Result<(TestRunResult, Vec<u8>)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0; frame.len() + OUTPUT_SLACK];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::new()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result, out))
}
