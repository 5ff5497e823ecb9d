//! Programs of ours that the flags no longer call for, left attached by an earlier run: in
//! the other dataplane mode, with another pin directory, or through the other tc path. Only
//! this network namespace's interfaces are searched, so agents in other namespaces keep
//! theirs. A program is ours by its name.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use aya::programs::{
    TcAttachType, loaded_links, loaded_programs,
    tc::{self, SchedClassifier, TcError},
};
use aya_obj::generated::{bpf_attr, bpf_cmd};

use super::{
    BRIDGE_PROGRAM, CONTAINER_PROGRAM, PROGRAMS, UPLINK_TC_PROGRAM, VTEP_INGRESS_PROGRAM,
    VTEP_PROGRAM,
};
use crate::model::Interface;

/// The kernel keeps 15 bytes of a program's name.
const KERNEL_NAME_LEN: usize = 15;

/// Where each tc program of ours sits.
const TC_HOOKS: [(&str, TcAttachType); 5] = [
    (UPLINK_TC_PROGRAM, TcAttachType::Ingress),
    (VTEP_PROGRAM, TcAttachType::Egress),
    (VTEP_INGRESS_PROGRAM, TcAttachType::Ingress),
    (CONTAINER_PROGRAM, TcAttachType::Ingress),
    (BRIDGE_PROGRAM, TcAttachType::Egress),
];

/// What of ours stays: the programs this run loaded, by kernel id, and the netlink filters
/// it made, by program and interface index.
#[derive(Default)]
pub struct Keep {
    pub programs: HashSet<u32>,
    pub filters: HashSet<(&'static str, u32)>,
}

/// Detaches every program of ours on `interfaces` that `keep` does not hold; returns one line
/// for each ("tc_container_ingress (tcx) on veth1, veth2").
pub fn remove(interfaces: &[Interface], keep: &Keep) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for interface in interfaces {
        for (program, direction) in TC_HOOKS {
            if !keep.filters.contains(&(program, interface.index))
                && remove_filter(&interface.name, direction, program)?
            {
                removed.push(format!("{program} (netlink filter) on {}", interface.name));
            }
        }
    }
    let links = links_by_program();
    for (id, stray) in stray_programs(interfaces, keep) {
        // A program is loaded by one agent, so all its links are in that agent's namespace.
        let mut detached = false;
        for link in links.get(&id).into_iter().flatten() {
            match detach_link(*link) {
                Ok(()) => detached = true,
                // Gone since the listing.
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("cannot detach {}", stray.describe()));
                }
            }
        }
        if detached {
            removed.push(stray.describe());
        }
    }
    Ok(removed)
}

/// A program of ours found where the flags do not call for it.
struct Stray {
    name: &'static str,
    hook: &'static str,
    interfaces: Vec<String>,
}

impl Stray {
    fn describe(&self) -> String {
        format!(
            "{} ({}) on {}",
            self.name,
            self.hook,
            self.interfaces.join(", ")
        )
    }
}

/// The programs of ours that tcx or XDP runs on `interfaces` and `keep` does not hold, by
/// kernel id.
fn stray_programs(interfaces: &[Interface], keep: &Keep) -> BTreeMap<u32, Stray> {
    let ours = programs_of_ours();
    let mut strays = BTreeMap::new();
    for interface in interfaces {
        let attached = tcx_programs(&interface.name)
            .into_iter()
            .map(|id| (id, "tcx"))
            .chain(interface.xdp_program.map(|id| (id, "xdp")));
        for (id, hook) in attached {
            let Some(name) = ours.get(&id).filter(|_| !keep.programs.contains(&id)) else {
                continue;
            };
            strays
                .entry(id)
                .or_insert_with(|| Stray {
                    name,
                    hook,
                    interfaces: Vec::new(),
                })
                .interfaces
                .push(interface.name.clone());
        }
    }
    strays
}

/// Kernel id → name of every loaded program named as one of ours. The listing walks every
/// program on the machine: one that another process loads or frees meanwhile cannot be
/// opened (ENOENT, or EAGAIN while it is set up) and is passed over.
fn programs_of_ours() -> HashMap<u32, &'static str> {
    let mut ours = HashMap::new();
    for info in loaded_programs() {
        let info = match info {
            Ok(info) => info,
            Err(error) => {
                log::debug!("a program passed over in the listing: {error}");
                continue;
            }
        };
        let name = info.name_as_str().unwrap_or_default();
        if let Some(program) = PROGRAMS
            .iter()
            .find(|program| program[..program.len().min(KERNEL_NAME_LEN)] == *name)
        {
            ours.insert(info.id(), *program);
        }
    }
    ours
}

/// Program id → the ids of the links that attach it; links in flux are passed over, as
/// programs are.
fn links_by_program() -> HashMap<u32, Vec<u32>> {
    let mut links: HashMap<u32, Vec<u32>> = HashMap::new();
    for link in loaded_links() {
        match link {
            Ok(link) => links.entry(link.program_id()).or_default().push(link.id()),
            Err(error) => log::debug!("a link passed over in the listing: {error}"),
        }
    }
    links
}

/// The programs tcx runs on `interface`, both directions; none on a kernel without tcx.
fn tcx_programs(interface: &str) -> Vec<u32> {
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .filter_map(|direction| SchedClassifier::query_tcx(interface, direction).ok())
        .flat_map(|(_, programs)| programs.into_iter().map(|program| program.id()))
        .collect()
}

/// Deletes the netlink filters named `program` on `interface`; returns whether there were any.
fn remove_filter(interface: &str, direction: TcAttachType, program: &str) -> Result<bool> {
    match tc::qdisc_detach_program(interface, direction, program) {
        Ok(()) => Ok(true),
        Err(TcError::IoError(error)) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        // Without a clsact qdisc the kernel refuses the listing: there is no filter either.
        Err(error) => {
            log::debug!("no tc filters listed on {interface} {direction:?}: {error}");
            Ok(false)
        }
    }
}

/// Detaches the link with kernel id `id` from its hook, wherever it is pinned; aya opens
/// links only from a pin or its own attach.
pub(super) fn detach_link(id: u32) -> io::Result<()> {
    // SAFETY: bpf_attr is plain old data; all zeroes is how the kernel wants unused fields.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    let fd = bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &attr)?;
    // SAFETY: BPF_LINK_GET_FD_BY_ID returns a new descriptor, ours to close.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_DETACH, &attr).map(drop)
}

/// The bpf(2) syscall.
fn bpf(command: bpf_cmd, attr: &bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr of the size passed; the kernel only reads it.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            attr as *const bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}
