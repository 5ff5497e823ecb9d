//! What is attached in a namespace, read from the kernel rather than from the agent: the
//! programs tcx runs, the netlink tc filters, and the links pinned in a directory.
use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::netns::{Netns, run};

const DIRECTIONS: [(TcAttachType, &str); 2] = [
    (TcAttachType::Ingress, "ingress"),
    (TcAttachType::Egress, "egress"),
];

/// The names of `netns`'s interfaces.
pub fn interfaces(netns: &Netns) -> Result<Vec<String>> {
    let listing: serde_json::Value = serde_json::from_str(&netns.ip(&["-j", "link", "show"])?)?;
    listing
        .as_array()
        .context("ip -j link printed no list")?
        .iter()
        .map(|link| {
            link["ifname"]
                .as_str()
                .map(str::to_string)
                .context("a link without a name")
        })
        .collect()
}

/// Every program tcx runs on `netns`'s interfaces, as "program on interface direction",
/// sorted.
pub fn tcx_programs(netns: &Netns) -> Result<Vec<String>> {
    let interfaces = interfaces(netns)?;
    let mut programs = netns.run_inside(|| {
        let mut programs = Vec::new();
        for interface in &interfaces {
            for (direction, name) in DIRECTIONS {
                let (_, attached) = SchedClassifier::query_tcx(interface, direction)
                    .with_context(|| format!("cannot query tcx on {interface}"))?;
                for program in attached {
                    let program = program.name_as_str().unwrap_or("?").to_string();
                    programs.push(format!("{program} on {interface} {name}"));
                }
            }
        }
        Ok(programs)
    })?;
    programs.sort();
    Ok(programs)
}

/// Every netlink bpf filter on `netns`'s interfaces, as "interface direction: program
/// (pref P handle H)", sorted.
pub fn tc_filters(netns: &Netns) -> Result<Vec<String>> {
    let mut filters = Vec::new();
    for interface in interfaces(netns)? {
        for (_, direction) in DIRECTIONS {
            let shown = netns.exec(&["tc", "filter", "show", "dev", &interface, direction])?;
            filters.extend(
                shown
                    .lines()
                    .filter_map(bpf_filter)
                    .map(|filter| format!("{interface} {direction}: {filter}")),
            );
        }
    }
    filters.sort();
    Ok(filters)
}

/// "program (pref P handle H)" from a `tc filter show` line of a bpf filter: "filter protocol
/// all pref 20310 bpf chain 0 handle 0x4f560001 tc_uplink_ingress direct-action ... id 7".
fn bpf_filter(line: &str) -> Option<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |label: &str| {
        let at = words.iter().position(|word| *word == label)?;
        words.get(at + 1).copied()
    };
    words.contains(&"bpf").then_some(())?;
    let handle = after("handle")?;
    let program = after(handle)?;
    Some(format!(
        "{program} (pref {} handle {handle})",
        after("pref")?
    ))
}

/// The name the agent pins `program`'s link on `device` of `netns` under:
/// `link_<program>_<ifindex>`.
pub fn link_pin_name(netns: &Netns, program: &str, device: &str) -> Result<String> {
    Ok(format!("link_{program}_{}", netns.ifindex(device)?))
}

/// The ids of the links pinned under `dir`, by pin name.
pub fn pinned_links(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !name.starts_with("link_") {
            continue;
        }
        let json = match run(Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(&path))
        {
            Ok(json) => json,
            // The agent unpinned it between the listing and the read: it is no longer pinned.
            Err(_) if !path.exists() => continue,
            Err(error) => return Err(error),
        };
        let link: serde_json::Value = serde_json::from_str(&json)?;
        links.push((name, link["id"].as_u64().context("a link without id")?));
    }
    Ok(links)
}

/// Fails unless each of `before` is still pinned under `dir` by its name and with its kernel
/// id: a restarted agent adopted the link rather than making another.
pub fn ensure_links_adopted(before: &[(String, u64)], dir: &Path) -> Result<()> {
    ensure!(
        !before.is_empty(),
        "no pinned link to adopt under {}",
        dir.display()
    );
    let now = pinned_links(dir)?;
    let replaced: Vec<_> = before.iter().filter(|link| !now.contains(link)).collect();
    ensure!(
        replaced.is_empty(),
        "not adopted (pin and id as before): {replaced:?}; pinned now: {now:?}"
    );
    Ok(())
}

/// Whether the link with kernel id `id` still exists, attached or not.
pub fn link_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|output| output.status.success())
}
