//! The seed's world in namespaces: an underlay bridge, etcd on it, and hosts hanging off it.
//!
//! ```text
//!   underlay ns: br0 172.20.62.1/24, etcd on 172.20.62.1:2379
//!      |-- host1 ns: eth0 172.20.62.104/24, default via 172.20.62.1
//!      |-- host2 ns: eth0 172.20.62.105/24, default via 172.20.62.1
//! ```
//! With IPv6 ([`Cluster::with_ipv6`]) the underlay carries fd00:ff::/64 as well: br0 holds
//! fd00:ff::1 and each host fd00:ff::<its IPv4 address's last number> (fd00:ff::104).
use std::{
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use ipnetwork::Ipv4Network;
use overlay_agent::dataplane::pins::PinnedDataplane;

use crate::{
    etcd::{ETCD_PORT, Etcd},
    frames::mac_text,
    netns::Netns,
    require_root,
    scratch::ScratchDir,
    tls,
    wait::wait_for,
};

pub const UNDERLAY_GATEWAY: &str = "172.20.62.1";
pub const UNDERLAY_GATEWAY6: &str = "fd00:ff::1";
pub const BPFFS: &str = "/sys/fs/bpf";
pub const PREFIX: &str = "/docker-test/network";
pub const SEED_NETWORK_CONFIG: &str = r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#;
/// The seed's network config with flannel's nftables rules instead of its iptables chains.
pub const NFTABLES_NETWORK_CONFIG: &str =
    r#"{"Network": "10.2.0.0/16", "EnableNFTables": true, "Backend": {"Type": "vxlan"}}"#;

pub struct Host {
    pub name: String,
    pub address: String,
    /// The host's IPv6 underlay address, on a cluster made with [`Cluster::with_ipv6`].
    pub address6: Option<String>,
    pub netns: Netns,
    /// Survives agent restarts on this host: the subnet file lives here.
    pub dir: PathBuf,
}

impl Host {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// The MAC of the host's flannel.1.
    pub fn vtep_mac(&self) -> Result<String> {
        self.device_mac("flannel.1")
    }

    /// The MAC of the host's flannel-v6.1.
    pub fn vtep6_mac(&self) -> Result<String> {
        self.device_mac("flannel-v6.1")
    }

    fn device_mac(&self, device: &str) -> Result<String> {
        let link = self.netns.ip(&["-o", "link", "show", device])?;
        word_after(&link, "link/ether").with_context(|| format!("{device} has no MAC"))
    }

    /// The host's IPv6 underlay address; fails on a cluster without IPv6.
    pub fn ipv6(&self) -> Result<&str> {
        self.address6
            .as_deref()
            .with_context(|| format!("{} has no IPv6 address: a cluster without IPv6", self.name))
    }

    /// Waits until the main table routes `destination` (a subnet of either family).
    pub fn wait_for_route(&self, destination: &str) -> Result<()> {
        wait_for(
            &format!("{}'s route to {destination}", self.name),
            PEER_TIMEOUT,
            || self.netns.has_route(destination),
        )
    }

    /// Where this host sends traffic for the overlay `subnet` ("10.2.54.0/24"): the remote
    /// PublicIP and VTEP MAC, once the route, the gateway's neighbour entry and the forwarding
    /// entry (the pinned `subnets` map in ebpf mode, flannel.1's FDB in kernel mode) all exist.
    pub fn overlay_peer(&self, subnet: &str) -> Result<Option<OverlayPeer>> {
        let network: Ipv4Network = subnet.parse().context("an overlay subnet")?;
        let gateway = network.network().to_string();
        if !self.netns.has_route(subnet)? {
            return Ok(None);
        }
        let neighbour = self
            .netns
            .ip(&["neigh", "show", &gateway, "dev", "flannel.1"])?;
        let Some(vtep_mac) = word_after(&neighbour, "lladdr") else {
            return Ok(None);
        };
        let public_ip = match PinnedDataplane::open(&self.pin_dir()) {
            Ok(pinned) => pinned
                .subnet_entries()?
                .get(&network)
                .map(|remote| Ipv4Addr::from(remote.public_ip).to_string()),
            Err(_) => {
                let fdb = self
                    .netns
                    .exec(&["bridge", "fdb", "show", "dev", "flannel.1"])?;
                fdb.lines()
                    .filter(|line| line.starts_with(&vtep_mac))
                    .find_map(|line| word_after(line, "dst"))
            }
        };
        Ok(public_ip.map(|public_ip| OverlayPeer {
            public_ip,
            vtep_mac,
        }))
    }

    /// Waits until this host sends `subnet` to `public_ip`'s VTEP `vtep_mac`.
    pub fn wait_for_peer(&self, subnet: &str, public_ip: &str, vtep_mac: &str) -> Result<()> {
        let expected = OverlayPeer {
            public_ip: public_ip.to_string(),
            vtep_mac: vtep_mac.to_string(),
        };
        let mut seen = None;
        wait_for(
            &format!("{} to send {subnet} to {expected:?}", self.name),
            PEER_TIMEOUT,
            || {
                seen = self.overlay_peer(subnet)?;
                Ok(seen.as_ref() == Some(&expected))
            },
        )
        .with_context(|| format!("last seen: {seen:?}"))
    }

    /// [`Self::wait_for_peer`], and fails unless the peer came within `limit` of `written`
    /// (when its record was written): how soon a new lease is routed.
    pub fn wait_for_peer_within(
        &self,
        subnet: &str,
        (public_ip, vtep_mac): (&str, &str),
        written: Instant,
        limit: Duration,
    ) -> Result<()> {
        self.wait_for_peer(subnet, public_ip, vtep_mac)?;
        let took = written.elapsed();
        ensure!(took <= limit, "{subnet} took {took:?} to be routed");
        Ok(())
    }

    /// Waits until this host holds no route, no gateway neighbour and (in ebpf mode) no map
    /// entry for `subnet`.
    pub fn wait_for_no_peer(&self, subnet: &str) -> Result<()> {
        wait_for(
            &format!("{} to forget {subnet}", self.name),
            PEER_TIMEOUT,
            || self.holds_no_peer(subnet),
        )
    }

    /// The host's neighbour entry for the container at `address`, on docker0, as `ip neigh`
    /// shows it.
    pub fn container_neighbour(&self, address: &str) -> Result<String> {
        self.netns.ip(&["neigh", "show", address, "dev", "docker0"])
    }

    /// Whether this host holds no route, no gateway neighbour and (in ebpf mode) no map entry
    /// for `subnet`.
    pub fn holds_no_peer(&self, subnet: &str) -> Result<bool> {
        Ok(!self.netns.has_route(subnet)? && self.sends_no_peer(subnet)?)
    }

    /// Whether nothing sends `subnet`'s traffic to a peer: no route into flannel.1, no gateway
    /// neighbour there and (in ebpf mode) no map entry. The host's own subnet, routed to its
    /// bridge, has none of these.
    pub fn sends_no_peer(&self, subnet: &str) -> Result<bool> {
        let network: Ipv4Network = subnet.parse().context("an overlay subnet")?;
        let gateway = network.network().to_string();
        let neighbour = self
            .netns
            .ip(&["neigh", "show", &gateway, "dev", "flannel.1"])?;
        let into_vtep = self
            .netns
            .ip(&["route", "show", subnet, "dev", "flannel.1"])?;
        let mapped = match PinnedDataplane::open(&self.pin_dir()) {
            Ok(pinned) => pinned.subnet_entries()?.contains_key(&network),
            Err(_) => false,
        };
        Ok(into_vtep.trim().is_empty() && neighbour.trim().is_empty() && !mapped)
    }

    /// `iptables args...` in the host's namespace; returns its output.
    pub fn iptables(&self, args: &[&str]) -> Result<String> {
        self.netns.exec(&[&["iptables"], args].concat())
    }

    /// A PATH whose `iptables` and `ip6tables` are iptables-legacy, for a process that is to
    /// run on an iptables-legacy host.
    pub fn legacy_iptables_path(&self) -> Result<String> {
        let dir = self.dir.join("legacy-bin");
        std::fs::create_dir_all(&dir)?;
        for command in ["iptables", "ip6tables"] {
            let link = dir.join(command);
            if !link.exists() {
                std::os::unix::fs::symlink(format!("/usr/sbin/{command}-legacy"), &link)?;
            }
        }
        Ok(format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            dir.display()
        ))
    }

    /// Cuts this host off from etcd until the returned guard is dropped: the connections it
    /// opens to etcd's client port are refused, and the open ones ended.
    pub fn cut_off_from_etcd(&self) -> Result<EtcdCutOff<'_>> {
        // Only connection attempts are refused: the reset `ss -K` sends still reaches etcd, which
        // then ends its side, and its watches, too.
        self.netns.exec(&[
            "nft",
            &format!(
                "add table inet {CUT_OFF_TABLE}; \
                 add chain inet {CUT_OFF_TABLE} out {{ type filter hook output priority 0; }}; \
                 add rule inet {CUT_OFF_TABLE} out tcp dport {ETCD_PORT} \
                 tcp flags & (syn | ack) == syn reject with tcp reset"
            ),
        ])?;
        let cut_off = EtcdCutOff { netns: &self.netns };
        let port = format!(":{ETCD_PORT}");
        self.netns.exec(&["ss", "-K", "dport", "=", &port])?;
        Ok(cut_off)
    }

    /// `ip6tables args...` in the host's namespace; returns its output.
    pub fn ip6tables(&self, args: &[&str]) -> Result<String> {
        self.netns.exec(&[&["ip6tables"], args].concat())
    }

    /// Waits until the filter table's FORWARD chain jumps to flannel's forward chain, as
    /// flannel writes the jump.
    pub fn wait_for_forward_jump(&self, timeout: Duration) -> Result<()> {
        wait_for(
            &format!("{}'s FORWARD chain to jump to FLANNEL-FWD", self.name),
            timeout,
            || Ok(self.iptables(&["-S", "FORWARD"])?.contains(FORWARD_JUMP)),
        )
    }

    /// Where this host's agent pins its maps and links: bpffs is shared by every namespace,
    /// so each host gets its own directory.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(self.netns.name())
    }

    /// Where an agent on this host pins without `--bpf-pin-dir`: outside the machine's
    /// network namespace, a directory named by the namespace's inode.
    pub fn default_pin_dir(&self) -> Result<PathBuf> {
        let namespace = Path::new("/run/netns").join(self.netns.name());
        let inode = std::fs::metadata(&namespace)
            .with_context(|| format!("cannot stat {}", namespace.display()))?
            .ino();
        Ok(Path::new(BPFFS).join(format!("overlay-netns-{inode}")))
    }
}

/// The nftables table of [`Host::cut_off_from_etcd`].
const CUT_OFF_TABLE: &str = "etcd_cut_off";

/// Keeps a host cut off from etcd ([`Host::cut_off_from_etcd`]) while it lives.
pub struct EtcdCutOff<'a> {
    netns: &'a Netns,
}

impl Drop for EtcdCutOff<'_> {
    fn drop(&mut self) {
        let restored = self
            .netns
            .exec(&["nft", "delete", "table", "inet", CUT_OFF_TABLE]);
        if let Err(error) = restored {
            eprintln!(
                "warning: {} stays cut off from etcd: {error:#}",
                self.netns.name()
            );
        }
    }
}

/// A remote host as this host's forwarding state names it.
#[derive(Debug, PartialEq, Eq)]
pub struct OverlayPeer {
    pub public_ip: String,
    pub vtep_mac: String,
}

/// The jump into flannel's forward chain, as `iptables -S FORWARD` lists it.
const FORWARD_JUMP: &str = "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD";

/// How long a lease event may take to reach a host's forwarding state.
const PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// The word after `label` in `text` ("lladdr" in `ip neigh` output, say).
fn word_after(text: &str, label: &str) -> Option<String> {
    text.split_whitespace()
        .skip_while(|word| *word != label)
        .nth(1)
        .map(str::to_string)
}

impl Drop for Host {
    fn drop(&mut self) {
        // Unpinning the links detaches the programs; the maps go with their last reference.
        let _ = std::fs::remove_dir_all(self.pin_dir());
    }
}

pub struct Cluster {
    pub etcd: Etcd,
    /// Further members, when etcd runs as a cluster.
    pub members: Vec<Etcd>,
    /// The further members' own namespaces, each plugged into the underlay bridge.
    pub member_namespaces: Vec<Netns>,
    pub underlay: Netns,
    hosts: u32,
    /// Whether the underlay and the hosts carry IPv6 too.
    ipv6: bool,
    pub scratch: ScratchDir,
}

impl Cluster {
    /// The underlay and a plain-HTTP etcd holding the seed's network config.
    pub fn new(tag: &str) -> Result<Self> {
        Self::with_etcd(tag, false, Some(SEED_NETWORK_CONFIG))
    }

    /// The underlay and an etcd that requires TLS client certificates.
    pub fn with_tls(tag: &str) -> Result<Self> {
        Self::with_etcd(tag, true, Some(SEED_NETWORK_CONFIG))
    }

    /// `config`: the network config to store, or none.
    pub fn with_etcd(tag: &str, tls: bool, config: Option<&str>) -> Result<Self> {
        Self::build(tag, tls, config, false)
    }

    /// The underlay with IPv6 next to IPv4 (fd00:ff::/64), hosts with an address of each, and
    /// a plain-HTTP etcd (on IPv4) holding `config`.
    pub fn with_ipv6(tag: &str, config: &str) -> Result<Self> {
        Self::build(tag, false, Some(config), true)
    }

    fn build(tag: &str, tls: bool, config: Option<&str>, ipv6: bool) -> Result<Self> {
        require_root()?;
        let scratch = ScratchDir::new(tag)?;
        let underlay = underlay(ipv6)?;
        let tls = if tls {
            Some(tls::generate(scratch.path(), UNDERLAY_GATEWAY)?)
        } else {
            None
        };
        let etcd = Etcd::start(underlay.name(), UNDERLAY_GATEWAY, scratch.path(), tls)?;
        if let Some(config) = config {
            etcd.put(&format!("{PREFIX}/config"), config)?;
        }
        Ok(Self {
            etcd,
            members: Vec::new(),
            member_namespaces: Vec::new(),
            underlay,
            hosts: 0,
            ipv6,
            scratch,
        })
    }

    /// The underlay and a three-member etcd cluster holding the seed's network config: the
    /// first member on the underlay's own address (172.20.62.1), the others (.2 and .3) each
    /// in a namespace of its own on the underlay bridge, so one can be cut off from its peers.
    pub fn with_etcd_cluster(tag: &str) -> Result<Self> {
        require_root()?;
        let scratch = ScratchDir::new(tag)?;
        let underlay = underlay(false)?;
        let mut member_namespaces = Vec::new();
        for (index, address) in ["172.20.62.2", "172.20.62.3"].iter().enumerate() {
            let netns = Netns::new(&format!("etcd{}", index + 2))?;
            underlay.plug(
                "br0",
                &format!("etcdport{}", index + 2),
                &netns,
                &format!("{address}/24"),
                UNDERLAY_GATEWAY,
            )?;
            member_namespaces.push(netns);
        }
        let placements = [
            (underlay.name(), UNDERLAY_GATEWAY),
            (member_namespaces[0].name(), "172.20.62.2"),
            (member_namespaces[1].name(), "172.20.62.3"),
        ];
        let mut members = Etcd::start_cluster(&placements, scratch.path())?;
        let etcd = members.remove(0);
        etcd.put(&format!("{PREFIX}/config"), SEED_NETWORK_CONFIG)?;
        Ok(Self {
            etcd,
            members,
            member_namespaces,
            underlay,
            hosts: 0,
            ipv6: false,
            scratch,
        })
    }

    /// Every etcd member's client URL, comma separated, as `--etcd-endpoints` takes them.
    pub fn endpoints(&self) -> String {
        std::iter::once(&self.etcd)
            .chain(&self.members)
            .map(Etcd::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A host namespace whose eth0 hangs off the underlay bridge with `address`/24 and a
    /// default route through the underlay.
    /// On a cluster with IPv6, eth0 also holds [`underlay_ipv6`]`(address)`/64 and a default
    /// route through fd00:ff::1.
    pub fn add_host(&mut self, name: &str, address: &str) -> Result<Host> {
        let netns = Netns::with_ipv6_if(name, self.ipv6)?;
        let address6 = self.ipv6.then(|| underlay_ipv6(address));
        let dir = self.scratch.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let host = Host {
            name: name.to_string(),
            address: address.to_string(),
            address6,
            netns,
            dir,
        };
        self.plug_uplink(&host)?;
        Ok(host)
    }

    /// Plugs `host`'s eth0 into the underlay bridge with its addresses and default routes.
    fn plug_uplink(&mut self, host: &Host) -> Result<()> {
        self.hosts += 1;
        self.underlay.plug(
            "br0",
            &format!("port{}", self.hosts),
            &host.netns,
            &format!("{}/24", host.address),
            UNDERLAY_GATEWAY,
        )?;
        if let Some(address6) = &host.address6 {
            host.netns.add_address_and_default_route(
                "eth0",
                &format!("{address6}/64"),
                UNDERLAY_GATEWAY6,
            )?;
        }
        Ok(())
    }

    /// Deletes `host`'s eth0 and makes it again, as a driver reload does: another index, the
    /// same name, address and MAC.
    pub fn recreate_uplink(&mut self, host: &Host) -> Result<()> {
        let mac = mac_text(host.netns.mac("eth0")?);
        host.netns.ip(&["link", "del", "eth0"])?;
        self.plug_uplink(host)?;
        host.netns.ip(&["link", "set", "eth0", "address", &mac])?;
        Ok(())
    }

    /// Reserves `subnet` for the host at `public_ip`: a record with no etcd lease, as an
    /// operator writes it.
    pub fn reserve(&self, subnet: &str, public_ip: &str) -> Result<()> {
        self.reserve_key(&self.subnet_key(subnet), public_ip)
    }

    /// Reserves the IPv4 `subnet` and the IPv6 `subnet6` together for the host at
    /// `public_ip`, under flannel's dual-stack key.
    pub fn reserve_dual_stack(&self, subnet: &str, subnet6: &str, public_ip: &str) -> Result<()> {
        self.reserve_key(&self.subnet_key6(Some(subnet), subnet6), public_ip)
    }

    fn reserve_key(&self, key: &str, public_ip: &str) -> Result<()> {
        self.etcd
            .put(key, &format!(r#"{{"PublicIP":"{public_ip}"}}"#))
    }

    /// Every key under `<prefix>/subnets/`.
    pub fn subnet_keys(&self) -> Result<Vec<String>> {
        let keys = self.etcd.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/subnets/"),
        ])?;
        Ok(keys
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_string)
            .collect())
    }

    pub fn subnet_key(&self, subnet: &str) -> String {
        format!("{PREFIX}/subnets/{}", subnet.replace('/', "-"))
    }

    /// flannel's key for a lease with an IPv6 subnet (MakeSubnetKey):
    /// `10.2.41.0-24&fd00:2:0:41::-64`, or `0.0.0.0-0&fd00:2:0:41::-64` with no IPv4 subnet
    /// (an IPv6-only network).
    pub fn subnet_key6(&self, subnet: Option<&str>, subnet6: &str) -> String {
        let ipv4 = self.subnet_key(subnet.unwrap_or("0.0.0.0/0"));
        format!("{ipv4}&{}", subnet6.replace('/', "-"))
    }
}

/// The IPv6 underlay address of the host at IPv4 `address`: fd00:ff:: and the address's last
/// number, written alike (172.20.62.104 is fd00:ff::104).
pub fn underlay_ipv6(address: &str) -> String {
    let last = address.rsplit('.').next().unwrap_or(address);
    format!("fd00:ff::{last}")
}

/// The underlay namespace: a bridge carrying the underlay's gateway address (of each family,
/// with `ipv6`).
fn underlay(ipv6: bool) -> Result<Netns> {
    let underlay = Netns::with_ipv6_if("underlay", ipv6)?;
    underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
    let mut addresses = vec![format!("{UNDERLAY_GATEWAY}/24")];
    if ipv6 {
        addresses.push(format!("{UNDERLAY_GATEWAY6}/64"));
    }
    for address in &addresses {
        underlay.ip(&["addr", "add", address, "dev", "br0"])?;
    }
    underlay.ip(&["link", "set", "br0", "up"])?;
    Ok(underlay)
}
