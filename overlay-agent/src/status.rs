//! `overlay-agent status`: this host's lease, every remote lease next to its map entry, the
//! attached programs, the container ports down for want of theirs, and the counters, read from
//! the subnet file, etcd, netlink and the pins.
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context, Result};
use ipnetwork::{Ipv4Network, Ipv6Network};
use overlay_common::{Counter, RemoteVtep, RemoteVtep6};

use crate::{
    dataplane::{SUBNETS_MAP, SUBNETS6_MAP, VTEPS_MAP, VTEPS6_MAP, filters, pins::PinnedDataplane},
    mac::MacAddr,
    node::{endpoints, links},
    options::AgentOptions,
    subnet::{
        Holders, Lease, LeaseAttrs, LeaseSubnets, PublicAddresses, Record, RecordError, VtepMacs,
        etcd::EtcdRegistry, file::previous_subnet, registry::Registry, select_remote, subnet_key,
    },
};

const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn report(options: &AgentOptions) -> Result<String> {
    let mut out = String::new();
    match previous_subnet(&options.subnet_file) {
        Some(subnet) => writeln!(
            out,
            "lease: {subnet} (from {})",
            options.subnet_file.display()
        )?,
        None => writeln!(
            out,
            "lease: none ({} is missing)",
            options.subnet_file.display()
        )?,
    }
    let pinned = PinnedDataplane::open(&options.pin_dir()?)?;
    let mut entries = pinned.subnet_entries()?;
    let ipv6_entries = Ipv6Entries {
        vteps: pinned.ipv6_vtep_entries()?,
        subnets: pinned.ipv6_subnet_entries()?,
    };
    let leases = write_remote_leases(&mut out, options, &mut entries, &ipv6_entries).await?;
    let mut stale: Vec<_> = entries.into_iter().collect();
    stale.sort_by_key(|(subnet, _)| *subnet);
    for (subnet, remote) in stale {
        writeln!(
            out,
            "  {subnet}: map entry {} with no lease",
            show_entry(&remote)
        )?;
    }
    if let Some(leases) = &leases {
        write_full_maps(&mut out, &pinned, leases, &ipv6_entries)?;
    }
    writeln!(out, "programs:")?;
    let handle = links::connect()?;
    let names = links::names(&handle).await?;
    for (program, ifindex) in pinned.links()? {
        let interface = names.get(&ifindex).map_or("gone", String::as_str);
        writeln!(out, "  {program} on {interface} (ifindex {ifindex})")?;
    }
    let ifindexes: Vec<u32> = names.keys().copied().collect();
    let mut filters = filters::filters_of_ours(&handle, &ifindexes).await?;
    filters.sort_by_key(|(program, ifindex)| (*program, names.get(ifindex).cloned()));
    for (program, ifindex) in filters {
        let interface = names.get(&ifindex).map_or("gone", String::as_str);
        writeln!(
            out,
            "  {program} on {interface} (ifindex {ifindex}, tc filter)"
        )?;
    }
    for port in endpoints::isolated_ports(&handle).await? {
        writeln!(out, "  none on {port}: refused its program, kept down")?;
    }
    write_peer_traffic(&mut out, &pinned)?;
    writeln!(out, "counters:")?;
    let counters = pinned.counters()?;
    for &counter in Counter::ALL {
        writeln!(out, "  {:<22} {}", counter.name(), counters.get(counter))?;
    }
    Ok(out)
}

/// What this host exchanged with each remote lease, one line each; pins without the
/// counters (an older version's) say so.
fn write_peer_traffic(out: &mut String, pinned: &PinnedDataplane) -> Result<()> {
    let records = match pinned.peer_traffic() {
        Ok(records) => records,
        Err(error) => {
            writeln!(out, "peers: unknown ({error:#})")?;
            return Ok(());
        }
    };
    writeln!(out, "peers:")?;
    for record in records {
        let traffic = record.traffic;
        writeln!(
            out,
            "  {} {}: sent {} packets ({} bytes), received {} packets ({} bytes)",
            record.peer,
            record.subnet,
            traffic.tx_packets,
            traffic.tx_bytes,
            traffic.rx_packets,
            traffic.rx_bytes
        )?;
    }
    Ok(())
}

/// The IPv6 map entries: each PublicIPv6 holding a lease (`vteps6`), each IPv6 subnet's host
/// (`subnets6`).
struct Ipv6Entries {
    vteps: HashMap<Ipv6Addr, Ipv6Network>,
    subnets: HashMap<Ipv6Network, RemoteVtep6>,
}

/// Every remote lease next to its map entries (its subnet entry taken out of `entries`, its
/// IPv6 entries looked up in `ipv6_entries`), and every record skipped with why; returns the
/// leases, unless etcd could not tell them.
async fn write_remote_leases(
    out: &mut String,
    options: &AgentOptions,
    entries: &mut HashMap<Ipv4Network, RemoteVtep>,
    ipv6_entries: &Ipv6Entries,
) -> Result<Option<Vec<Lease>>> {
    let (leases, skipped) = match tokio::time::timeout(ETCD_TIMEOUT, remote_leases(options)).await {
        Ok(Ok(found)) => found,
        Ok(Err(error)) => {
            writeln!(out, "remote leases: unknown ({error:#})")?;
            return Ok(None);
        }
        Err(_) => {
            writeln!(
                out,
                "remote leases: unknown (etcd did not answer within {ETCD_TIMEOUT:?})"
            )?;
            return Ok(None);
        }
    };
    writeln!(out, "remote leases ({}):", leases.len())?;
    for lease in &leases {
        let entry = entries.remove(&lease.subnet);
        writeln!(out, "  {}", describe(lease, entry, ipv6_entries))?;
    }
    writeln!(out, "skipped records ({}):", skipped.len())?;
    for (key, error) in &skipped {
        writeln!(out, "  {key}: {error}")?;
    }
    Ok(Some(leases))
}

/// The other hosts' leases, as the agent selects them from etcd, and the records it skips.
async fn remote_leases(options: &AgentOptions) -> Result<(Vec<Lease>, Vec<(String, RecordError)>)> {
    let registry = EtcdRegistry::connect(&options.etcd()).await?;
    let config = registry.network_config().await?;
    let own = previous_subnet(&options.subnet_file)
        .context("no lease of our own to tell the others from")?;
    let listing = registry.list().await.context("cannot list the leases")?;
    let own = own_lease(&listing.records, registry.prefix(), own);
    let selection = select_remote(
        &listing.records,
        registry.prefix(),
        &own,
        &config,
        &Holders::default(),
    );
    let mut leases: Vec<Lease> = selection
        .leases
        .into_iter()
        .map(|(_, lease)| lease)
        .collect();
    leases.sort_by_key(|lease| lease.subnet);
    Ok((leases, selection.skipped))
}

/// This host's lease on `subnets` as its record in `records` says; without one, a lease that
/// names no public address or VTEP MAC of this host.
fn own_lease(records: &[Record], prefix: &str, subnets: LeaseSubnets) -> Lease {
    let key = subnet_key(prefix, subnets);
    let own = records
        .iter()
        .find(|record| record.key == key)
        .and_then(|record| record.parse(prefix).ok());
    own.unwrap_or_else(|| Lease {
        subnet: subnets.ipv4,
        ipv6_subnet: subnets.ipv6,
        attrs: LeaseAttrs::vxlan(
            PublicAddresses {
                ipv4: Ipv4Addr::UNSPECIFIED,
                ipv6: None,
            },
            0,
            VtepMacs::default(),
        ),
        etcd_lease: 0,
    })
}

/// "full maps:", then each lease map with every entry taken and how many of `leases` it
/// lacks.
fn write_full_maps(
    out: &mut String,
    pinned: &PinnedDataplane,
    leases: &[Lease],
    ipv6_entries: &Ipv6Entries,
) -> Result<()> {
    let subnets = pinned.subnet_entries()?;
    let vteps = pinned.vtep_addresses()?;
    let full: Vec<_> = pinned
        .occupancy()?
        .into_iter()
        .filter(|map| map.entries >= map.capacity as usize)
        .filter_map(|map| {
            let has_ipv4 = |lease: &Lease| lease.attrs.vtep_mac().is_some();
            let lacks = |lease: &&Lease| match map.name {
                SUBNETS_MAP => has_ipv4(lease) && !subnets.contains_key(&lease.subnet),
                VTEPS_MAP => has_ipv4(lease) && !vteps.contains(&lease.attrs.public_ip),
                SUBNETS6_MAP => lease
                    .ipv6_subnet
                    .is_some_and(|subnet| !ipv6_entries.subnets.contains_key(&subnet)),
                VTEPS6_MAP => lease
                    .attrs
                    .public_ipv6
                    .is_some_and(|address| !ipv6_entries.vteps.contains_key(&address)),
                _ => false,
            };
            let missing = leases.iter().filter(lacks).count();
            (missing > 0).then_some((map, missing))
        })
        .collect();
    if full.is_empty() {
        writeln!(out, "full maps: none")?;
        return Ok(());
    }
    writeln!(out, "full maps:")?;
    for (map, missing) in full {
        writeln!(
            out,
            "  {}: all {} entries taken, {missing} leases missing",
            map.name, map.capacity
        )?;
    }
    Ok(())
}

/// One lease and its map entries: the IPv4 half, the IPv6 half, those it has.
fn describe(lease: &Lease, entry: Option<RemoteVtep>, ipv6_entries: &Ipv6Entries) -> String {
    let ipv4 = lease
        .attrs
        .vtep_mac()
        .map(|mac| describe_ipv4(lease, mac, entry));
    let ipv6 = lease
        .ipv6_peer()
        .map(|peer| describe_ipv6(peer, ipv6_entries));
    [ipv4, ipv6]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_ipv4(lease: &Lease, mac: MacAddr, entry: Option<RemoteVtep>) -> String {
    let state = match entry {
        None => "MISSING from the map".to_string(),
        Some(remote)
            if remote.public_ip == lease.attrs.public_ip.octets() && MacAddr(remote.mac) == mac =>
        {
            format!("map {}", show_entry(&remote))
        }
        Some(remote) => format!("map {} DIFFERS", show_entry(&remote)),
    };
    format!(
        "{} via {} (VTEP {mac}): {state}",
        lease.subnet, lease.attrs.public_ip
    )
}

fn describe_ipv6(
    (subnet, address, mac): (Ipv6Network, Ipv6Addr, MacAddr),
    ipv6_entries: &Ipv6Entries,
) -> String {
    // The IPv6 VTEP map says only that the host holds a lease: its value names one of the
    // host's subnets, which need not be this one.
    let state = if ipv6_entries.vteps.contains_key(&address) {
        "in the IPv6 VTEP map"
    } else {
        "MISSING from the IPv6 VTEP map"
    };
    let route = match ipv6_entries.subnets.get(&subnet) {
        None => "MISSING from the IPv6 subnet map".to_string(),
        Some(remote) if remote.public_ipv6 == address.octets() && MacAddr(remote.mac) == mac => {
            "in the IPv6 subnet map".to_string()
        }
        Some(remote) => format!(
            "IPv6 subnet map {} {} DIFFERS",
            Ipv6Addr::from(remote.public_ipv6),
            MacAddr(remote.mac)
        ),
    };
    format!("{subnet} via {address} (VTEP {mac}): {state}, {route}")
}

fn show_entry(remote: &RemoteVtep) -> String {
    format!(
        "{} {}",
        std::net::Ipv4Addr::from(remote.public_ip),
        MacAddr(remote.mac)
    )
}
