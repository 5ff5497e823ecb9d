//! Attaching the programs through bpf_links pinned under the pin directory, so they keep
//! forwarding while the agent is stopped, restarted or upgraded. A restarted agent adopts a
//! pinned link and swaps its program in atomically (bpf_link_update): no packet sees a gap.
//!
//! A link pin is named after the program and the interface index it is attached to, so a
//! link of a device that was since recreated is recognised as stale and replaced.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::programs::{
    SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{self, SchedClassifierLink},
    xdp::XdpLink,
};

use super::{Dataplane, UPLINK_PROGRAM, VTEP_PROGRAM, program_mut};

/// How the uplink program attaches, as `--xdp-mode` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

/// The interface index each program is attached to, once it is.
#[derive(Debug, Default)]
pub struct Attachments {
    uplink: Option<u32>,
    vtep: Option<u32>,
    /// Links made without a pin directory; dropping them detaches the programs.
    unpinned: Vec<FdLink>,
}

impl Dataplane {
    /// Makes sure the uplink XDP program is attached to `interface` (index `ifindex`).
    pub fn ensure_uplink_attached(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: XdpModeChoice,
    ) -> Result<()> {
        if self.attached.uplink == Some(ifindex) {
            return Ok(());
        }
        let pin = self.link_pin(UPLINK_PROGRAM, ifindex)?;
        let program: &mut Xdp = program_mut(&mut self.ebpf, UPLINK_PROGRAM)?.try_into()?;
        let adopted = adopt(&pin, |link| {
            program.attach_to_link(XdpLink::try_from(link)?)?;
            Ok(())
        });
        if !adopted {
            let link_id = attach_xdp(program, interface, mode)?;
            let link = FdLink::try_from(program.take_link(link_id)?)?;
            self.attached.keep(link, &pin)?;
        }
        log::info!("{UPLINK_PROGRAM} attached to {interface}");
        self.attached.uplink = Some(ifindex);
        Ok(())
    }

    /// Makes sure the tc program is attached to the egress of `interface` (index `ifindex`).
    pub fn ensure_vtep_attached(&mut self, interface: &str, ifindex: u32) -> Result<()> {
        if self.attached.vtep == Some(ifindex) {
            return Ok(());
        }
        let pin = self.link_pin(VTEP_PROGRAM, ifindex)?;
        let program: &mut SchedClassifier =
            program_mut(&mut self.ebpf, VTEP_PROGRAM)?.try_into()?;
        let adopted = adopt(&pin, |link| {
            program.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            Ok(())
        });
        if !adopted {
            // Kernels before TCX (6.6) need the clsact qdisc; with TCX it is harmless.
            if let Err(error) = tc::qdisc_add_clsact(interface) {
                log::debug!("clsact on {interface}: {error}");
            }
            let link_id = program
                .attach(interface, TcAttachType::Egress)
                .with_context(|| format!("cannot attach {VTEP_PROGRAM} to {interface}"))?;
            let link = FdLink::try_from(program.take_link(link_id)?)?;
            self.attached.keep(link, &pin)?;
        }
        log::info!("{VTEP_PROGRAM} attached to {interface} egress");
        self.attached.vtep = Some(ifindex);
        Ok(())
    }

    /// Where the link of `program` on interface `ifindex` is pinned; stale pins of the same
    /// program (other interfaces) are removed, which detaches their links.
    fn link_pin(&self, program: &str, ifindex: u32) -> Result<Option<PathBuf>> {
        let Some(dir) = &self.pin_dir else {
            return Ok(None);
        };
        remove_link_pins(dir, program, Some(ifindex))?;
        Ok(Some(dir.join(format!("link_{program}_{ifindex}"))))
    }
}

fn attach_xdp(
    program: &mut Xdp,
    interface: &str,
    mode: XdpModeChoice,
) -> Result<aya::programs::xdp::XdpLinkId> {
    let result = match mode {
        XdpModeChoice::Native => program.attach(interface, XdpMode::Driver),
        XdpModeChoice::Generic => program.attach(interface, XdpMode::Skb),
        XdpModeChoice::Auto => match program.attach(interface, XdpMode::Driver) {
            Ok(link) => Ok(link),
            Err(error) => {
                log::info!("native XDP unavailable on {interface} ({error}); using generic mode");
                program.attach(interface, XdpMode::Skb)
            }
        },
    };
    result.with_context(|| format!("cannot attach {UPLINK_PROGRAM} to {interface}"))
}

/// Swaps our program into the link pinned at `pin`, if there is one. A link that cannot take
/// it (its device is gone) is unpinned, which detaches it. Returns whether it was adopted.
fn adopt(pin: &Option<PathBuf>, replace: impl FnOnce(FdLink) -> Result<()>) -> bool {
    let Some(pin) = pin.as_deref().filter(|pin| pin.exists()) else {
        return false;
    };
    let pinned = match PinnedLink::from_pin(pin) {
        Ok(pinned) => pinned,
        Err(error) => {
            log::warn!("cannot open the pinned link {}: {error}", pin.display());
            let _ = std::fs::remove_file(pin);
            return false;
        }
    };
    match replace(FdLink::from(pinned)) {
        Ok(()) => {
            log::info!("adopted the pinned link {}", pin.display());
            true
        }
        Err(error) => {
            log::info!(
                "replacing the stale pinned link {}: {error:#}",
                pin.display()
            );
            let _ = std::fs::remove_file(pin);
            false
        }
    }
}

impl Attachments {
    /// Pins `link` at `pin`; without a pin directory the link lives as long as the dataplane.
    fn keep(&mut self, link: FdLink, pin: &Option<PathBuf>) -> Result<()> {
        match pin {
            Some(pin) => {
                link.pin(pin)
                    .with_context(|| format!("cannot pin the link at {}", pin.display()))?;
            }
            None => self.unpinned.push(link),
        }
        Ok(())
    }
}

/// Removes the link pins of `program` under `dir`, except the one for `keep`.
pub fn remove_link_pins(dir: &Path, program: &str, keep: Option<u32>) -> Result<()> {
    let prefix = format!("link_{program}_");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(ifindex) = name.strip_prefix(&prefix) else {
            continue;
        };
        if keep.is_some_and(|keep| ifindex == keep.to_string()) {
            continue;
        }
        if let Err(error) = std::fs::remove_file(entry.path()) {
            bail!(
                "cannot remove the stale link pin {}: {error}",
                entry.path().display()
            );
        }
    }
    Ok(())
}
