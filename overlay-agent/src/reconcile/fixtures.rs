//! Test fixtures shared by the reconciler's unit tests: host1 of the seed.
use crate::{
    mac::MacAddr,
    model::{Device, Devices},
};

/// flannel.1's MAC on the remote host of the tests.
pub const VTEP_MAC: MacAddr = MacAddr([0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x89]);

/// docker0 (3), flannel.1 (4) and eth0 (2), without flannel-v6.1.
pub fn devices() -> Devices {
    let device = |name: &str, index| Device {
        name: name.into(),
        index,
    };
    Devices {
        bridge: device("docker0", 3),
        bridge_mac: MacAddr([2, 0, 0, 0, 0, 3]),
        vtep: Some(device("flannel.1", 4)),
        vtep6: None,
        uplink: device("eth0", 2),
    }
}
