//! `overlay-agent status`: this host's lease, every remote lease next to its map entry (in
//! kernel mode, with nothing pinned, next to flannel's route, neighbour and FDB entry), the
//! attached programs, the container ports down for want of theirs, and the counters, read from
//! the subnet file, etcd, netlink and the pins.
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use ipnetwork::{IpNetwork, Ipv6Network};
use overlay_common::{Counter, RemoteVtep, RemoteVtep6};
use rtnetlink::{Handle, packet_route::AddressFamily};

use crate::{
    dataplane::{SUBNETS_MAP, SUBNETS6_MAP, VTEPS_MAP, VTEPS6_MAP, filters, pins::PinnedDataplane},
    mac::MacAddr,
    model::{FdbEntry, PeerEntries, Route},
    node::{endpoints, links, peers, vtep},
    options::AgentOptions,
    subnet::{
        Holders, Lease, LeaseAttrs, LeaseSubnets, PublicAddresses, Record, RecordError, VtepMacs,
        etcd::EtcdRegistry, file::previous_subnet, registry::Registry, select_remote, subnet_key,
    },
};

const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn report(options: &AgentOptions) -> Result<String> {
    let mut out = String::new();
    write_own_lease(&mut out, options)?;
    let pin_dir = options.pin_dir()?;
    let handle = links::connect()?;
    let names = links::names(&handle).await?;
    let remote = remote_leases_within_timeout(options).await;
    if PinnedDataplane::is_pinned(&pin_dir) {
        let pinned = PinnedDataplane::open(&pin_dir)?;
        write_pinned_dataplane(&mut out, &pinned, &remote)?;
        write_programs(&mut out, &handle, &names, pinned.links()?).await?;
        write_peer_traffic(&mut out, &pinned)?;
        write_counters(&mut out, &pinned)?;
    } else {
        write_kernel_dataplane(&mut out, &pin_dir, &handle, &names, &remote).await?;
        write_programs(&mut out, &handle, &names, Vec::new()).await?;
    }
    Ok(out)
}

/// "lease:", from the subnet file.
fn write_own_lease(out: &mut String, options: &AgentOptions) -> Result<()> {
    let file = options.subnet_file.display();
    match previous_subnet(&options.subnet_file) {
        Some(subnet) => writeln!(out, "lease: {subnet} (from {file})")?,
        None => writeln!(out, "lease: none ({file} is missing)")?,
    }
    Ok(())
}

/// With nothing pinned under `pin_dir`: every remote lease next to flannel's kernel entries
/// for it.
async fn write_kernel_dataplane(
    out: &mut String,
    pin_dir: &Path,
    handle: &Handle,
    names: &HashMap<u32, String>,
    remote: &Result<Remote, String>,
) -> Result<()> {
    writeln!(
        out,
        "dataplane: nothing pinned under {} (kernel mode, or no agent ran in ebpf mode): each \
         remote lease against flannel's kernel entries",
        pin_dir.display()
    )?;
    match remote {
        Ok(remote) => {
            let kernel = KernelEntries::read(handle, remote.vni).await?;
            write_remote_leases(out, remote, |lease| kernel.describe(lease, names))
        }
        Err(why) => Ok(writeln!(out, "remote leases: unknown ({why})")?),
    }
}

fn write_counters(out: &mut String, pinned: &PinnedDataplane) -> Result<()> {
    writeln!(out, "counters:")?;
    let counters = pinned.counters()?;
    for &counter in Counter::ALL {
        writeln!(out, "  {:<22} {}", counter.name(), counters.get(counter))?;
    }
    Ok(())
}

/// Every remote lease next to its map entries, the map entries no lease explains, and the
/// maps that are full.
fn write_pinned_dataplane(
    out: &mut String,
    pinned: &PinnedDataplane,
    remote: &Result<Remote, String>,
) -> Result<()> {
    let mut entries = pinned.subnet_entries()?;
    let ipv6_entries = Ipv6Entries {
        vteps: pinned.ipv6_vtep_entries()?,
        subnets: pinned.ipv6_subnet_entries()?,
    };
    match remote {
        Ok(remote) => write_remote_leases(out, remote, |lease| {
            describe(lease, entries.remove(&lease.subnet), &ipv6_entries)
        })?,
        Err(why) => writeln!(out, "remote leases: unknown ({why})")?,
    }
    let mut stale: Vec<_> = entries.into_iter().collect();
    stale.sort_by_key(|(subnet, _)| *subnet);
    for (subnet, remote) in stale {
        writeln!(
            out,
            "  {subnet}: map entry {} with no lease",
            show_entry(&remote)
        )?;
    }
    if let Ok(remote) = remote {
        write_full_maps(out, pinned, &remote.leases, &ipv6_entries)?;
    }
    Ok(())
}

/// "programs:", the `pinned` links, the tc filters of ours, and the container ports kept
/// down for want of their program.
async fn write_programs(
    out: &mut String,
    handle: &Handle,
    names: &HashMap<u32, String>,
    pinned: Vec<(&'static str, u32)>,
) -> Result<()> {
    writeln!(out, "programs:")?;
    let interface = |ifindex: &u32| names.get(ifindex).map_or("gone", String::as_str);
    for (program, ifindex) in pinned {
        writeln!(
            out,
            "  {program} on {} (ifindex {ifindex})",
            interface(&ifindex)
        )?;
    }
    let ifindexes: Vec<u32> = names.keys().copied().collect();
    let mut filters = filters::filters_of_ours(handle, &ifindexes).await?;
    filters.sort_by_key(|(program, ifindex)| (*program, names.get(ifindex).cloned()));
    for (program, ifindex) in filters {
        writeln!(
            out,
            "  {program} on {} (ifindex {ifindex}, tc filter)",
            interface(&ifindex)
        )?;
    }
    for port in endpoints::isolated_ports(handle).await? {
        writeln!(out, "  none on {port}: refused its program, kept down")?;
    }
    Ok(())
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

/// What etcd tells of the other hosts: their leases as the agent selects them, the records
/// it skips, and the network's VNI.
struct Remote {
    leases: Vec<Lease>,
    skipped: Vec<(String, RecordError)>,
    vni: u32,
}

/// [`remote_leases`], or why etcd did not tell them within [`ETCD_TIMEOUT`].
async fn remote_leases_within_timeout(options: &AgentOptions) -> Result<Remote, String> {
    match tokio::time::timeout(ETCD_TIMEOUT, remote_leases(options)).await {
        Ok(Ok(remote)) => Ok(remote),
        Ok(Err(error)) => Err(format!("{error:#}")),
        Err(_) => Err(format!("etcd did not answer within {ETCD_TIMEOUT:?}")),
    }
}

/// "remote leases (N):", each lease as `describe` tells its state, then every record
/// skipped with why.
fn write_remote_leases(
    out: &mut String,
    remote: &Remote,
    mut describe: impl FnMut(&Lease) -> String,
) -> Result<()> {
    writeln!(out, "remote leases ({}):", remote.leases.len())?;
    for lease in &remote.leases {
        writeln!(out, "  {}", describe(lease))?;
    }
    writeln!(out, "skipped records ({}):", remote.skipped.len())?;
    for (key, error) in &remote.skipped {
        writeln!(out, "  {key}: {error}")?;
    }
    Ok(())
}

/// The other hosts' leases, as the agent selects them from etcd, and the records it skips.
async fn remote_leases(options: &AgentOptions) -> Result<Remote> {
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
    Ok(Remote {
        leases,
        skipped: selection.skipped,
        vni: config.backend.vni,
    })
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
    join_halves(ipv4, ipv6)
}

/// A lease's line from its IPv4 and IPv6 halves, those it has.
fn join_halves(ipv4: Option<String>, ipv6: Option<String>) -> String {
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

/// flannel's kernel entries for the remote leases, per family, as the kernel holds them.
struct KernelEntries {
    ipv4: FamilyKernelEntries,
    ipv6: FamilyKernelEntries,
}

/// One family's VXLAN device (`flannel.<VNI>` or `flannel-v6.<VNI>`), its neighbours and FDB
/// entries (`entries`, whose routes are moved to `routes`), and the main table's routes via a
/// gateway by destination.
struct FamilyKernelEntries {
    device: String,
    index: Option<u32>,
    entries: PeerEntries,
    routes: HashMap<IpNetwork, Route>,
}

impl FamilyKernelEntries {
    async fn read(handle: &Handle, family: AddressFamily, device: String) -> Result<Self> {
        let index = links::find(handle, &device)
            .await?
            .map(|link| link.header.index);
        let mut entries = peers::kernel_entries(handle, family, index).await?;
        let routes = std::mem::take(&mut entries.routes)
            .into_iter()
            .map(|route| (route.destination, route))
            .collect();
        Ok(Self {
            device,
            index,
            entries,
            routes,
        })
    }

    /// The state of a remote `subnet` behind the VTEP `mac` at `public`: its route, and for a
    /// route into the VXLAN device, the gateway's neighbour and the VTEP's FDB entry.
    fn describe(
        &self,
        (subnet, public, mac): (IpNetwork, IpAddr, MacAddr),
        names: &HashMap<u32, String>,
    ) -> String {
        let head = format!("{subnet} via {public} (VTEP {mac})");
        let Some(route) = self.routes.get(&subnet) else {
            return format!("{head}: route MISSING");
        };
        let device = names.get(&route.interface).map_or("gone", String::as_str);
        let via = format!("route via {} dev {device}", route.gateway);
        if Some(route.interface) != self.index {
            // DirectRouting's: straight to the host, on the segment both share.
            let state = if route.gateway == public {
                "direct"
            } else {
                "DIFFERS"
            };
            return format!("{head}: {via} ({state})");
        }
        if route.gateway != subnet.network() {
            return format!("{head}: {via} DIFFERS");
        }
        let neighbour = match self.entries.neighbours.get(&route.gateway) {
            Some(listed) if *listed == mac => "neighbour".to_string(),
            Some(listed) => format!("neighbour {listed} DIFFERS"),
            None => format!("neighbour MISSING from {}", self.device),
        };
        let fdb = if self.entries.fdb.contains(&FdbEntry {
            mac,
            destination: public,
        }) {
            "FDB entry".to_string()
        } else {
            format!("FDB entry MISSING from {}", self.device)
        };
        format!("{head}: {via}, {neighbour}, {fdb}")
    }
}

impl KernelEntries {
    async fn read(handle: &Handle, vni: u32) -> Result<Self> {
        Ok(Self {
            ipv4: FamilyKernelEntries::read(handle, AddressFamily::Inet, vtep::device_name(vni))
                .await?,
            ipv6: FamilyKernelEntries::read(
                handle,
                AddressFamily::Inet6,
                vtep::ipv6_device_name(vni),
            )
            .await?,
        })
    }

    /// One lease against its kernel entries: the IPv4 half, the IPv6 half, those it has.
    fn describe(&self, lease: &Lease, names: &HashMap<u32, String>) -> String {
        let ipv4 = lease.attrs.vtep_mac().map(|mac| {
            let peer = (
                IpNetwork::V4(lease.subnet),
                IpAddr::V4(lease.attrs.public_ip),
                mac,
            );
            self.ipv4.describe(peer, names)
        });
        let ipv6 = lease.ipv6_peer().map(|(subnet, public, mac)| {
            let peer = (IpNetwork::V6(subnet), IpAddr::V6(public), mac);
            self.ipv6.describe(peer, names)
        });
        join_halves(ipv4, ipv6)
    }
}
