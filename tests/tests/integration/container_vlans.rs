//! `--container-vlans`: the operator's opt-out of the VLAN drop. With it, a tagged frame from
//! one container reaches its neighbour over docker0 (the default drops it, as
//! `hostile_container` shows).
use anyhow::Result;
use overlay_tests::{
    capture::Sniffer,
    frames::ethernet,
    inject::send_frame,
    seed::{Container, Seed},
};

const VLAN_TAG: u16 = 0x8100;
const VID: u16 = 5;
/// IEEE 802's local experimental ethertype: nothing on the hosts takes it.
const ETH_P_LOCAL_EXPERIMENTAL: u16 = 0x88b5;

#[test]
fn with_container_vlans_a_tagged_frame_reaches_the_neighbour() -> Result<()> {
    let seed = Seed::start("cvlan", &["--dataplane=ebpf", "--container-vlans=true"])?;
    let bbox3 = Container::attach(&seed.host1, "bbox3", "10.2.41.3")?;
    let bbox1_mac = seed.bbox1.netns.mac("eth0")?;
    let tagged = [
        &VID.to_be_bytes()[..],
        &ETH_P_LOCAL_EXPERIMENTAL.to_be_bytes(),
        b"overlay container vlan test",
    ]
    .concat();
    let frame = ethernet([0xff; 6], bbox1_mac, VLAN_TAG, &tagged);
    let sniffer = Sniffer::start(&bbox3.netns, "eth0", &format!("vlan {VID}"))?;
    // The filter matches the tag; tcpdump prints the frame by its inner ethertype.
    sniffer.stop_once_seen("0x88b5", || {
        seed.bbox1.netns.run_inside(|| send_frame("eth0", &frame))
    })?;
    Ok(())
}
