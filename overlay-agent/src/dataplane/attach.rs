//! Attaching the programs through bpf_links pinned under the pin directory, so they keep
//! forwarding while the agent is stopped, restarted or upgraded. A restarted agent adopts a
//! pinned link and swaps its program in atomically (bpf_link_update): no packet sees a gap.
//! An XDP link in another mode than `--xdp-mode` asks is detached and made again instead.
//!
//! A link pin is named after the program and the interface index it is attached to, so a
//! link of a device that was since recreated is recognised as stale and replaced.
//!
//! Kernels before 6.6 have no tcx links: there the tc programs go in as netlink filters at
//! one priority and handle of ours. A filter outlives the agent as a pinned link does, and a
//! restarted agent swaps its program into the filter in place.
//!
//! The container ports take tcx links too where the kernel has them, although each tcx attach
//! waits out an RCU grace period under the RTNL lock (8-16 ms here, one port after another): a
//! filter needs a clsact qdisc, and adding a qdisc to a device that is up takes its transmit
//! queues away for an instant, dropping (as `tx_dropped`) whatever the port is handing its
//! container then. A port first met with traffic on it, a node taken over from flanneld say,
//! would lose a packet.
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    programs::{
        Link, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
    util::KernelVersion,
};

use super::{
    BRIDGE_PROGRAM, CONTAINER_PROGRAM, Dataplane, UPLINK_TC_PROGRAM, UPLINK_XDP_PROGRAM,
    VTEP_INGRESS_PROGRAM, VTEP_PROGRAM,
    filters::{FILTER_HANDLE, FILTER_PRIORITY},
    program_mut,
    strays::detach_link,
};
use crate::model::{DecapHook, Device, Placement, RefusedPorts, XdpAttachMode, XdpModeChoice};

/// How the tc programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttach {
    /// tcx where the kernel has it (6.6 and later), netlink filters before.
    Auto,
    /// tcx links, pinned.
    Tcx,
    /// netlink filters in the clsact qdisc.
    Netlink,
}

impl TcAttach {
    /// Whether the tc programs go in as netlink filters on this kernel.
    fn uses_netlink(self) -> bool {
        match self {
            TcAttach::Tcx => false,
            TcAttach::Netlink => true,
            TcAttach::Auto => {
                KernelVersion::current().is_ok_and(|version| version < KernelVersion::new(6, 6, 0))
            }
        }
    }
}

/// The interface index each program is attached to, once it is.
#[derive(Debug, Default)]
pub struct Attachments {
    /// tc programs go in as netlink filters, not tcx links.
    netlink: bool,
    uplink: Option<(u32, DecapHook)>,
    /// flannel.<VNI> and flannel-v6.<VNI>, those there are.
    vteps: Option<(Option<u32>, Option<u32>)>,
    bridge: Option<u32>,
    containers: HashSet<u32>,
    /// Links made without a pin directory, by program and interface; dropping one detaches
    /// its program.
    unpinned: HashMap<(&'static str, u32), FdLink>,
    /// Netlink filters made or adopted, by program and interface index: the interface's name
    /// and the direction.
    filters: HashMap<(&'static str, u32), (String, TcAttachType)>,
    /// The interface whose XDP program an earlier run attached in another mode than the
    /// flags ask for, and that mode: its pinned link is replaced, not adopted.
    xdp_in_another_mode: Option<(u32, XdpAttachMode)>,
}

impl Dataplane {
    /// Attaches the tc programs as `choice` says from now on.
    pub fn with_tc_attach(mut self, choice: TcAttach) -> Self {
        self.attached.netlink = choice.uses_netlink();
        if self.attached.netlink {
            log::info!("tc programs attach as netlink filters");
        }
        self
    }

    /// Notes how the XDP program on the uplink (index `uplink`) runs, `attached`, so that a
    /// link an earlier run pinned in another mode than `wanted` is attached again in that mode
    /// rather than adopted.
    pub fn with_xdp_attached(
        mut self,
        uplink: u32,
        attached: Option<XdpAttachMode>,
        wanted: XdpModeChoice,
    ) -> Self {
        self.attached.xdp_in_another_mode = attached
            .filter(|&mode| !wanted.is_met_by(mode))
            .map(|mode| (uplink, mode));
        self
    }

    /// The netlink filters this dataplane made or adopted, by program and interface index.
    pub fn filters(&self) -> HashSet<(&'static str, u32)> {
        self.attached.filters.keys().copied().collect()
    }

    /// Writes the programs' settings and attaches each where `placement` says: the checks on
    /// the container ports, the uplink's decapsulator at its hook (in its XDP mode for XDP),
    /// the VXLAN device's encapsulator, the guards of both VXLAN devices' sockets, and the flow
    /// watcher on the bridge. Returns the container ports that refused their program.
    pub fn place(&mut self, placement: &Placement) -> Result<RefusedPorts> {
        self.set_config(&placement.config)?;
        // The container ports first: a device that fails to take its program must not leave
        // a new container sending unchecked.
        let refused = self.ensure_container_ports(&placement.containers)?;
        // The uplink's decapsulator before the guard of the VXLAN sockets, which refuses what
        // it did not check: on a node taken over from flanneld, the kernel decapsulates until
        // then.
        self.ensure_uplink_attached(
            &placement.uplink.name,
            placement.uplink.index,
            placement.decap_hook,
            placement.xdp_mode,
        )?;
        self.ensure_vteps_attached(placement.vtep.as_ref(), placement.vtep6.as_ref())?;
        self.ensure_bridge_attached(placement.bridge.as_ref())?;
        Ok(refused)
    }

    /// Makes sure the uplink's decapsulator is attached to `interface` (index `ifindex`), with
    /// the XDP filter in front of it if `hook` asks for it, and neither anywhere else.
    pub fn ensure_uplink_attached(
        &mut self,
        interface: &str,
        ifindex: u32,
        hook: DecapHook,
        xdp_mode: XdpModeChoice,
    ) -> Result<()> {
        if self.attached.uplink == Some((ifindex, hook)) {
            return Ok(());
        }
        let here = HashSet::from([ifindex]);
        let xdp_here = match hook {
            DecapHook::Tc => HashSet::new(),
            DecapHook::Xdp => here.clone(),
        };
        self.detach_all_but(UPLINK_XDP_PROGRAM, &xdp_here)?;
        self.detach_all_but(UPLINK_TC_PROGRAM, &here)?;
        self.attach_tc(UPLINK_TC_PROGRAM, interface, ifindex, TcAttachType::Ingress)?;
        log::info!("{UPLINK_TC_PROGRAM} attached to {interface}");
        if hook == DecapHook::Xdp {
            self.attach_xdp(interface, ifindex, xdp_mode)?;
            log::info!("{UPLINK_XDP_PROGRAM} attached to {interface}");
        }
        self.attached.uplink = Some((ifindex, hook));
        Ok(())
    }

    /// Makes sure the encapsulator sits on the egress of `vtep` (flannel.<VNI>) and `vtep6`
    /// (flannel-v6.<VNI>), those there are, and the guard of their sockets on their ingress,
    /// and nowhere else.
    fn ensure_vteps_attached(
        &mut self,
        vtep: Option<&Device>,
        vtep6: Option<&Device>,
    ) -> Result<()> {
        let wanted = (vtep.map(|vtep| vtep.index), vtep6.map(|vtep6| vtep6.index));
        if self.attached.vteps == Some(wanted) {
            return Ok(());
        }
        let both: Vec<&Device> = [vtep, vtep6].into_iter().flatten().collect();
        let places = [
            (VTEP_PROGRAM, TcAttachType::Egress, both.clone()),
            (VTEP_INGRESS_PROGRAM, TcAttachType::Ingress, both),
        ];
        for (program, direction, devices) in places {
            self.detach_all_but(
                program,
                &devices.iter().map(|device| device.index).collect(),
            )?;
            for device in devices {
                self.attach_tc(program, &device.name, device.index, direction)?;
                log::info!("{program} attached to {} {direction:?}", device.name);
            }
        }
        self.attached.vteps = Some(wanted);
        Ok(())
    }

    /// Makes sure the flow watcher sits on the egress of `bridge`, and nowhere without one.
    fn ensure_bridge_attached(&mut self, bridge: Option<&Device>) -> Result<()> {
        let wanted = bridge.map(|bridge| bridge.index);
        if self.attached.bridge == wanted {
            return Ok(());
        }
        self.detach_all_but(BRIDGE_PROGRAM, &wanted.into_iter().collect())?;
        if let Some(bridge) = bridge {
            self.attach_tc(
                BRIDGE_PROGRAM,
                &bridge.name,
                bridge.index,
                TcAttachType::Egress,
            )?;
            log::info!("{BRIDGE_PROGRAM} attached to {} egress", bridge.name);
        }
        self.attached.bridge = wanted;
        Ok(())
    }

    /// Makes sure the container program sits on the ingress of every container port in
    /// `ports`, and on no other interface; returns the ports that refused it, with why.
    fn ensure_container_ports(&mut self, ports: &[Device]) -> Result<RefusedPorts> {
        let current: HashSet<u32> = ports.iter().map(|port| port.index).collect();
        self.attached
            .containers
            .retain(|index| current.contains(index));
        self.detach_all_but(CONTAINER_PROGRAM, &current)?;
        let mut refused = RefusedPorts::new();
        for port in ports {
            if self.attached.containers.contains(&port.index) {
                continue;
            }
            match self.attach_tc(
                CONTAINER_PROGRAM,
                &port.name,
                port.index,
                TcAttachType::Ingress,
            ) {
                Ok(()) => {
                    log::info!("{CONTAINER_PROGRAM} attached to {}", port.name);
                    self.attached.containers.insert(port.index);
                }
                // The node warns, once, as it takes the port down.
                Err(error) => {
                    refused.insert(port.index, format!("{}: {error:#}", port.name));
                }
            }
        }
        Ok(refused)
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
        direction: TcAttachType,
    ) -> Result<()> {
        if self.attached.netlink {
            self.attach_filter(name, interface, ifindex, direction)
        } else {
            self.attach_tcx(name, interface, ifindex, direction)
        }
    }

    fn attach_tcx(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
        direction: TcAttachType,
    ) -> Result<()> {
        let pin = self.link_pin(name, ifindex);
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?.try_into()?;
        let adopted = adopt(&pin, |link| {
            program.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            Ok(())
        });
        if !adopted {
            let tcx = TcAttachOptions::TcxOrder(LinkOrder::default());
            let link_id = program
                .attach_with_options(interface, direction, tcx)
                .with_context(|| {
                    format!("cannot attach {name} to {interface} (tcx needs Linux 6.6)")
                })?;
            let link = FdLink::try_from(program.take_link(link_id)?)?;
            self.attached.keep(name, ifindex, link, &pin)?;
        }
        Ok(())
    }

    /// Swaps `name` into our netlink filter on `interface`, or makes the filter.
    fn attach_filter(
        &mut self,
        name: &'static str,
        interface: &str,
        ifindex: u32,
        direction: TcAttachType,
    ) -> Result<()> {
        let program: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?.try_into()?;
        let ours = SchedClassifierLink::attached(
            interface,
            direction,
            FILTER_PRIORITY,
            FILTER_HANDLE,
            None,
        )
        .with_context(|| format!("cannot find {interface}"))?;
        let link_id = match program.attach_to_link(ours) {
            Ok(link_id) => {
                log::info!("adopted the tc filter of {name} on {interface}");
                link_id
            }
            Err(error) => {
                log::debug!("no tc filter of ours on {interface} {direction:?}: {error}");
                if let Err(error) = tc::qdisc_add_clsact(interface) {
                    log::debug!("clsact on {interface}: {error}");
                }
                let options = NlOptions {
                    priority: FILTER_PRIORITY,
                    handle: FILTER_HANDLE,
                    classid: None,
                };
                program
                    .attach_with_options(interface, direction, TcAttachOptions::Netlink(options))
                    .with_context(|| format!("cannot attach {name} to {interface}"))?
            }
        };
        // aya deletes a filter when its handle drops; the filter must outlive the agent, as a
        // pinned link does (it holds the program in the kernel).
        std::mem::forget(program.take_link(link_id)?);
        self.attached
            .filters
            .insert((name, ifindex), (interface.to_string(), direction));
        self.unpin_tcx_link(name, ifindex)
    }

    /// Unpins the tcx link a run on the other tc path left for `name` on `ifindex`, which
    /// detaches it: the filter now does its work.
    fn unpin_tcx_link(&self, name: &str, ifindex: u32) -> Result<()> {
        match self.link_pin(name, ifindex).filter(|pin| pin.exists()) {
            Some(pin) => {
                log::info!("{name}: the tcx link pinned at {} goes", pin.display());
                std::fs::remove_file(&pin)
                    .with_context(|| format!("cannot unpin {}", pin.display()))
            }
            None => Ok(()),
        }
    }

    fn attach_xdp(&mut self, interface: &str, ifindex: u32, mode: XdpModeChoice) -> Result<()> {
        let pin = self.link_pin(UPLINK_XDP_PROGRAM, ifindex);
        if let Some((index, attached)) = self.attached.xdp_in_another_mode.take()
            && index == ifindex
            && let Some(pin) = pin.as_deref().filter(|pin| pin.exists())
        {
            // tc_uplink_ingress checks everything itself meanwhile.
            let [attached, mode] = [format!("{attached:?}"), format!("{mode:?}")];
            log::info!(
                "{UPLINK_XDP_PROGRAM} runs on {interface} in {} mode, not as --xdp-mode={} \
                 asks: attaching it again",
                attached.to_lowercase(),
                mode.to_lowercase()
            );
            detach_pinned_link(pin)?;
        }
        let program: &mut Xdp = program_mut(&mut self.ebpf, UPLINK_XDP_PROGRAM)?.try_into()?;
        let adopted = adopt(&pin, |link| {
            program.attach_to_link(XdpLink::try_from(link)?)?;
            Ok(())
        });
        if !adopted {
            let link_id = attach_xdp(program, interface, mode)?;
            let link = FdLink::try_from(program.take_link(link_id)?)?;
            self.attached
                .keep(UPLINK_XDP_PROGRAM, ifindex, link, &pin)?;
        }
        Ok(())
    }

    /// Where the link of `program` on interface `ifindex` is pinned, if links are pinned.
    fn link_pin(&self, program: &str, ifindex: u32) -> Option<PathBuf> {
        let dir = self.pin_dir.as_ref()?;
        Some(dir.join(format!("link_{program}_{ifindex}")))
    }

    /// Detaches `program` from every interface but those in `keep`.
    fn detach_all_but(&mut self, program: &'static str, keep: &HashSet<u32>) -> Result<()> {
        self.attached
            .unpinned
            .retain(|(name, ifindex), _| *name != program || keep.contains(ifindex));
        self.attached.remove_filters_but(program, keep);
        match &self.pin_dir {
            Some(dir) => remove_link_pins(dir, program, keep),
            None => Ok(()),
        }
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
    result.with_context(|| format!("cannot attach {UPLINK_XDP_PROGRAM} to {interface}"))
}

/// Unpins the link pinned at `pin` and detaches it at once: XDP takes one mode at a time, and
/// a link that is only unpinned goes when bpffs frees the pin, a grace period later.
fn detach_pinned_link(pin: &Path) -> Result<()> {
    let cannot = || format!("cannot detach the link pinned at {}", pin.display());
    let link = PinnedLink::from_pin(pin).with_context(cannot)?;
    let link = link.unpin().with_context(cannot)?;
    let id = link.info().with_context(cannot)?.id();
    detach_link(id).with_context(cannot)
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
    /// Deletes our netlink filters of `program` on every interface but those in `keep`; a
    /// filter whose device is gone went with it. (A device of the same name made since takes
    /// its filter again right after: only the uplink's role moves between devices.)
    fn remove_filters_but(&mut self, program: &str, keep: &HashSet<u32>) {
        self.filters
            .retain(|(name, ifindex), (interface, direction)| {
                if *name != program || keep.contains(ifindex) {
                    return true;
                }
                let removed = SchedClassifierLink::attached(
                    interface,
                    *direction,
                    FILTER_PRIORITY,
                    FILTER_HANDLE,
                    None,
                )
                .map_err(anyhow::Error::from)
                .and_then(|link| Ok(link.detach()?));
                match removed {
                    Ok(()) => log::info!("{name} detached from {interface}"),
                    Err(error) => {
                        log::debug!("the filter of {name} on {interface} went with it: {error:#}")
                    }
                }
                false
            });
    }

    /// Pins `link` at `pin`; without a pin directory the link lives as long as the dataplane,
    /// or until its program is detached from the interface.
    fn keep(
        &mut self,
        program: &'static str,
        ifindex: u32,
        link: FdLink,
        pin: &Option<PathBuf>,
    ) -> Result<()> {
        match pin {
            Some(pin) => {
                link.pin(pin)
                    .with_context(|| format!("cannot pin the link at {}", pin.display()))?;
            }
            None => {
                self.unpinned.insert((program, ifindex), link);
            }
        }
        Ok(())
    }
}

/// Removes the link pins of `program` under `dir` (which detaches their links), except those
/// for the interfaces in `keep`.
pub fn remove_link_pins(dir: &Path, program: &str, keep: &HashSet<u32>) -> Result<()> {
    let prefix = format!("link_{program}_");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(ifindex) = name.strip_prefix(&prefix) else {
            continue;
        };
        if ifindex
            .parse::<u32>()
            .is_ok_and(|ifindex| keep.contains(&ifindex))
        {
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
