//! Subnet leases: flannel's records in etcd, the lease this host holds, and the leases of
//! every other host.
//!
//! A record lives at `<prefix>/subnets/<a.b.c.d>-<len>`, in a dual-stack network at
//! `<prefix>/subnets/<a.b.c.d>-<len>&<v6 address>-<len>` and in an IPv6-only one at
//! `<prefix>/subnets/0.0.0.0-0&<v6 address>-<len>`, and holds the JSON of [`LeaseAttrs`],
//! byte for byte as flannel writes it.
pub mod config_change;
pub mod etcd;
pub mod file;
pub mod manager;
#[cfg(test)]
mod memory;
mod pages;
pub mod registry;
pub mod watch;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

pub use crate::model::LeaseSubnets;
use crate::{config::NetworkConfig, mac::MacAddr};

pub const VXLAN_BACKEND: &str = "vxlan";

/// The value of a subnet record, with flannel's field names and order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<VxlanLeaseData>,
    /// The IPv6 VTEP (flannel-v6.<VNI>), next to `PublicIPv6`.
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<VxlanLeaseData>,
}

/// flannel's vxlan `BackendData`. Older writers omit `VNI`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanLeaseData {
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// The addresses other hosts reach this one at: `PublicIP` (0.0.0.0 in an IPv6-only
/// network, as flannel writes it there) and `PublicIPv6` when the network has IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicAddresses {
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
}

impl PublicAddresses {
    /// Whether `attrs` name this host: by PublicIP as flannel matches, or by PublicIPv6 where
    /// every IPv6-only record's PublicIP is 0.0.0.0.
    pub fn named_in(&self, attrs: &LeaseAttrs) -> bool {
        if self.ipv4.is_unspecified() {
            self.ipv6.is_some() && attrs.public_ipv6 == self.ipv6
        } else {
            attrs.public_ip == self.ipv4
        }
    }
}

impl fmt::Display for PublicAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv6 {
            Some(ipv6) if self.ipv4.is_unspecified() => write!(f, "{ipv6}"),
            Some(ipv6) => write!(f, "{} and {ipv6}", self.ipv4),
            None => write!(f, "{}", self.ipv4),
        }
    }
}

/// The VTEP MACs this host publishes: flannel.<VNI>'s with IPv4, flannel-v6.<VNI>'s with IPv6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VtepMacs {
    pub ipv4: Option<MacAddr>,
    pub ipv6: Option<MacAddr>,
}

impl LeaseAttrs {
    /// What this host writes: its public addresses and VTEPs, in the vxlan backend's shape.
    /// Each family's data is written when its MAC is given.
    pub fn vxlan(public: PublicAddresses, vni: u32, macs: VtepMacs) -> Self {
        let data = |mac: Option<MacAddr>| {
            mac.map(|vtep_mac| VxlanLeaseData {
                vni: Some(vni),
                vtep_mac,
            })
        };
        Self {
            public_ip: public.ipv4,
            public_ipv6: macs.ipv6.and(public.ipv6),
            backend_type: VXLAN_BACKEND.to_string(),
            backend_data: data(macs.ipv4),
            backend_v6_data: data(macs.ipv6),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attributes always serialize")
    }

    pub fn vtep_mac(&self) -> Option<MacAddr> {
        self.backend_data.as_ref().map(|data| data.vtep_mac)
    }

    pub fn vtep_mac_v6(&self) -> Option<MacAddr> {
        self.backend_v6_data.as_ref().map(|data| data.vtep_mac)
    }

    pub fn public(&self) -> PublicAddresses {
        PublicAddresses {
            ipv4: self.public_ip,
            ipv6: self.public_ipv6,
        }
    }

    pub fn vtep_macs(&self) -> VtepMacs {
        VtepMacs {
            ipv4: self.vtep_mac(),
            ipv6: self.vtep_mac_v6(),
        }
    }
}

impl LeaseAttrs {
    /// An IPv4-only host's record.
    pub fn ipv4_only(public_ip: Ipv4Addr, vni: u32, mac: MacAddr) -> Self {
        let public = PublicAddresses {
            ipv4: public_ip,
            ipv6: None,
        };
        let macs = VtepMacs {
            ipv4: Some(mac),
            ipv6: None,
        };
        Self::vxlan(public, vni, macs)
    }
}

/// [`LeaseSubnets`], flannel's identity of a lease, is a plain value of `model`; what it
/// holds of a network config is a question of this module.
impl LeaseSubnets {
    /// The networks this lease holds in `config`'s families.
    pub fn networks(&self, config: &NetworkConfig) -> Vec<IpNetwork> {
        let ipv4 = config.enable_ipv4.then_some(IpNetwork::V4(self.ipv4));
        let ipv6 = self
            .ipv6
            .filter(|_| config.ipv6.is_some())
            .map(IpNetwork::V6);
        ipv4.into_iter().chain(ipv6).collect()
    }
}

/// A subnet held by some host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub ipv6_subnet: Option<Ipv6Network>,
    pub attrs: LeaseAttrs,
    /// The etcd lease the record is attached to; 0 for a reservation, which never expires.
    pub etcd_lease: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }

    pub fn subnets(&self) -> LeaseSubnets {
        LeaseSubnets {
            ipv4: self.subnet,
            ipv6: self.ipv6_subnet,
        }
    }

    /// The IPv6 subnet with the host's IPv6 VTEP, when the lease has both.
    pub fn ipv6_peer(&self) -> Option<(Ipv6Network, Ipv6Addr, MacAddr)> {
        Some((
            self.ipv6_subnet?,
            self.attrs.public_ipv6?,
            self.attrs.vtep_mac_v6()?,
        ))
    }
}

/// A change in another host's lease, for the node-network and dataplane layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    Changed(Lease),
    Removed(Lease),
}

/// The largest record value the agent reads, in bytes: flannel's records take about 200. A
/// larger value is skipped ([`RecordError::TooLarge`]) and its bytes dropped as it arrives, so
/// neither a listing nor the watch holds it.
pub const MAX_RECORD_VALUE: usize = 4096;

/// Whether a record may hold `value` (see [`MAX_RECORD_VALUE`]).
pub fn fits_a_record(value: &[u8]) -> bool {
    value.len() <= MAX_RECORD_VALUE
}

/// A record as etcd returns it, before it is trusted.
#[derive(Clone, Debug)]
pub struct Record {
    pub key: String,
    /// `None` when the value is larger than [`MAX_RECORD_VALUE`] (see
    /// [`RecordError::TooLarge`]).
    pub value: Option<Vec<u8>>,
    pub etcd_lease: i64,
    /// The etcd revision that created the key: of two records claiming one subnet or VTEP MAC
    /// in a listing, the one created first keeps it.
    pub create_revision: i64,
}

/// Why a record from another writer cannot be used; the record is skipped.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    BadKey,
    /// The value is larger than [`MAX_RECORD_VALUE`].
    TooLarge,
    BadJson(String),
    NotVxlan(String),
    NoVtep,
    OutsideNetwork(IpNetwork),
    /// The subnet's prefix length is not the network's SubnetLen (IPv6SubnetLen).
    WrongLength(u8),
    /// An IPv6-only network's record whose key names no IPv6 subnet.
    NoIpv6Subnet,
    /// The key names an IPv6 subnet, the value no PublicIPv6 with a BackendV6Data VtepMAC.
    NoIpv6Vtep,
    /// The subnet overlaps this host's own lease, under another key.
    OverlapsOwn(IpNetwork),
    /// The subnet is already leased under the key given (kept: it was there first).
    Taken(String),
    /// A public address no host can be reached at, or this host's own.
    BadAddress {
        field: &'static str,
        address: IpAddr,
        why: &'static str,
    },
    /// A VTEP MAC no VXLAN device can have.
    BadMac {
        field: &'static str,
        mac: MacAddr,
        why: &'static str,
    },
    /// The VTEP MAC is already used by the lease under the key given (kept: it was there
    /// first); two leases with one MAC would make the FDB entry flip between them.
    MacTaken {
        mac: MacAddr,
        holder: String,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey => write!(
                f,
                "the key does not end in a subnet such as 10.2.54.0-24 or \
                 10.2.54.0-24&fd00:2:0:54::-64"
            ),
            Self::TooLarge => write!(
                f,
                "the value is larger than the {MAX_RECORD_VALUE} bytes a record may take"
            ),
            Self::BadJson(error) => write!(f, "the value is not a lease record: {error}"),
            Self::NotVxlan(backend) => write!(f, "BackendType {backend:?} is not \"vxlan\""),
            Self::NoVtep => write!(f, "the record has no BackendData with a VtepMAC yet"),
            Self::OutsideNetwork(network) => {
                write!(f, "the subnet lies outside the Network {network}")
            }
            Self::WrongLength(subnet_len) => {
                write!(
                    f,
                    "the subnet's length is not the network's subnet length /{subnet_len}"
                )
            }
            Self::NoIpv6Subnet => write!(f, "the key names no IPv6 subnet"),
            Self::NoIpv6Vtep => write!(
                f,
                "the record has no PublicIPv6 with a BackendV6Data VtepMAC for its IPv6 subnet"
            ),
            Self::OverlapsOwn(own) => write!(f, "the subnet overlaps this host's lease {own}"),
            Self::Taken(key) => write!(f, "the subnet is already leased by {key}"),
            Self::BadAddress {
                field,
                address,
                why,
            } => write!(f, "{field} {address} is {why}"),
            Self::BadMac { field, mac, why } => write!(f, "{field} {mac} is {why}"),
            Self::MacTaken { mac, holder } => {
                write!(f, "the VtepMAC {mac} is already used by {holder}")
            }
        }
    }
}

impl Record {
    /// Parses the record as any lease, checking only its key and JSON: enough to recognise
    /// this host's own record or a reservation, which may not carry backend data yet.
    pub fn parse(&self, prefix: &str) -> Result<Lease, RecordError> {
        let subnets = subnet_from_key(prefix, &self.key).ok_or(RecordError::BadKey)?;
        let value = self.value.as_deref().ok_or(RecordError::TooLarge)?;
        let attrs: LeaseAttrs = serde_json::from_slice(value)
            .map_err(|error| RecordError::BadJson(error.to_string()))?;
        Ok(Lease {
            subnet: subnets.ipv4,
            ipv6_subnet: subnets.ipv6,
            attrs,
            etcd_lease: self.etcd_lease,
        })
    }

    /// Parses another host's record and checks that this host can route to it, in every
    /// family of the network. In a dual-stack network a record without an IPv6 subnet (a
    /// host of an IPv4-only past) is reached over IPv4 alone.
    pub fn parse_remote(&self, prefix: &str, config: &NetworkConfig) -> Result<Lease, RecordError> {
        let lease = self.parse(prefix)?;
        if config.enable_ipv4 {
            check_subnet(
                IpNetwork::V4(lease.subnet),
                IpNetwork::V4(config.network),
                config.subnet_len,
            )?;
        }
        if let Some(range) = config.ipv6 {
            match lease.ipv6_subnet {
                None if !config.enable_ipv4 => return Err(RecordError::NoIpv6Subnet),
                None => {}
                Some(subnet) => check_subnet(
                    IpNetwork::V6(subnet),
                    IpNetwork::V6(range.network),
                    range.subnet_len,
                )?,
            }
        }
        if lease.attrs.backend_type.is_empty() {
            return Err(RecordError::NoVtep);
        }
        if lease.attrs.backend_type != VXLAN_BACKEND {
            return Err(RecordError::NotVxlan(lease.attrs.backend_type));
        }
        if config.enable_ipv4 {
            let mac = lease.attrs.vtep_mac().ok_or(RecordError::NoVtep)?;
            check_vtep_mac("BackendData.VtepMAC", mac)?;
        }
        // flannel writes 0.0.0.0 in an IPv6-only network, where nobody sends to it.
        let ipv6_only_placeholder = !config.enable_ipv4 && lease.attrs.public_ip.is_unspecified();
        if !ipv6_only_placeholder {
            check_public_address("PublicIP", IpAddr::V4(lease.attrs.public_ip))?;
        }
        if config.ipv6.is_some() && lease.ipv6_subnet.is_some() {
            let (_, address, mac) = lease.ipv6_peer().ok_or(RecordError::NoIpv6Vtep)?;
            check_vtep_mac("BackendV6Data.VtepMAC", mac)?;
            check_public_address("PublicIPv6", IpAddr::V6(address))?;
        }
        Ok(lease)
    }
}

/// A public address other hosts can send VXLAN to: `Err` naming `field` unless it is.
fn check_public_address(field: &'static str, address: IpAddr) -> Result<(), RecordError> {
    let link_local = match address {
        IpAddr::V4(address) => address.is_link_local(),
        IpAddr::V6(address) => address.is_unicast_link_local(),
    };
    let why = if address.is_unspecified() {
        "unspecified"
    } else if address.is_loopback() {
        "a loopback address"
    } else if address == IpAddr::V4(Ipv4Addr::BROADCAST) {
        "the broadcast address"
    } else if address.is_multicast() {
        "a multicast address"
    } else if link_local {
        "a link-local address"
    } else {
        return Ok(());
    };
    Err(RecordError::BadAddress {
        field,
        address,
        why,
    })
}

/// A MAC a VXLAN device can have: neither zero nor a group address.
fn check_vtep_mac(field: &'static str, mac: MacAddr) -> Result<(), RecordError> {
    let why = if mac == MacAddr([0; 6]) {
        "all zeros"
    } else if mac == MacAddr([0xff; 6]) {
        "the broadcast address"
    } else if !mac.is_unicast() {
        "a multicast address"
    } else {
        return Ok(());
    };
    Err(RecordError::BadMac { field, mac, why })
}

/// A remote subnet must lie in the network, with the network's subnet length: two leases then
/// either are one subnet or do not overlap, where a longer record could steal part of a lease
/// and a shorter one cover several.
fn check_subnet(subnet: IpNetwork, network: IpNetwork, subnet_len: u8) -> Result<(), RecordError> {
    if !network.contains(subnet.network()) || subnet.prefix() < network.prefix() {
        return Err(RecordError::OutsideNetwork(network));
    }
    if subnet.prefix() != subnet_len {
        return Err(RecordError::WrongLength(subnet_len));
    }
    Ok(())
}

/// Which record holds each subnet (of either family) and each VTEP MAC the leases in use
/// have, with the public address the MAC's FDB entry sends to: a later record naming one of
/// those subnets, or one of those MACs at another address, is skipped while its holder
/// stands. (One host's several records share its MAC and address, and no entry moves.)
#[derive(Clone, Debug, Default)]
pub struct Holders {
    subnets: HashMap<IpNetwork, String>,
    macs: HashMap<MacAddr, (String, IpAddr)>,
    /// What each key was last noted to hold, so that releasing one key touches its own
    /// entries alone: a listing of thousands of records notes each once.
    held_by: HashMap<String, (Vec<IpNetwork>, Vec<MacAddr>)>,
}

impl Holders {
    /// Notes `key` as the holder of `lease`'s subnets in `config`'s families and of its VTEP
    /// MACs, in place of whatever it held before.
    pub fn hold(&mut self, lease: &Lease, key: &str, config: &NetworkConfig) {
        self.release(key);
        let networks = lease.subnets().networks(config);
        for network in &networks {
            self.subnets.insert(*network, key.to_string());
        }
        let vteps = vteps_in_use(lease, config);
        for (mac, address) in &vteps {
            self.macs.insert(*mac, (key.to_string(), *address));
        }
        let macs = vteps.into_iter().map(|(mac, _)| mac).collect();
        self.held_by.insert(key.to_string(), (networks, macs));
    }

    /// Forgets everything `key` holds.
    pub fn release(&mut self, key: &str) {
        let Some((networks, macs)) = self.held_by.remove(key) else {
            return;
        };
        for network in networks {
            if self
                .subnets
                .get(&network)
                .is_some_and(|holder| holder == key)
            {
                self.subnets.remove(&network);
            }
        }
        for mac in macs {
            if self.macs.get(&mac).is_some_and(|(holder, _)| holder == key) {
                self.macs.remove(&mac);
            }
        }
    }

    /// Whether one of the subnets `record`'s key names is held by `record` itself.
    pub fn hold_its_subnet(&self, record: &Record, prefix: &str, config: &NetworkConfig) -> bool {
        subnet_from_key(prefix, &record.key).is_some_and(|subnets| {
            subnets
                .networks(config)
                .iter()
                .any(|network| self.subnets.get(network) == Some(&record.key))
        })
    }
}

/// The VTEP MACs of `lease` that `config`'s families use, each with the public address its
/// FDB entry sends to.
fn vteps_in_use(lease: &Lease, config: &NetworkConfig) -> Vec<(MacAddr, IpAddr)> {
    let ipv4 = lease
        .attrs
        .vtep_mac()
        .filter(|_| config.enable_ipv4)
        .map(|mac| (mac, IpAddr::V4(lease.attrs.public_ip)));
    let ipv6 = lease
        .ipv6_peer()
        .filter(|_| config.ipv6.is_some())
        .map(|(_, address, mac)| (mac, IpAddr::V6(address)));
    ipv4.into_iter().chain(ipv6).collect()
}

/// Whether `record`, beside this host's lease `own` and what other records already hold,
/// gives a lease this host may route to. Its own key aside, a record naming one of `own`'s
/// subnets, its public address or its VTEP MAC would route this host's traffic to itself; a
/// record naming a subnet another key holds, or a VTEP MAC another key holds at another
/// public address, comes later, and the one there first keeps it.
pub fn check_remote(
    record: &Record,
    prefix: &str,
    config: &NetworkConfig,
    own: &Lease,
    holders: &Holders,
) -> Result<Lease, RecordError> {
    let lease = record.parse_remote(prefix, config)?;
    check_not_own(&lease, own, config)?;
    for network in lease.subnets().networks(config) {
        match holders.subnets.get(&network) {
            Some(holder) if *holder != record.key => {
                return Err(RecordError::Taken(holder.clone()));
            }
            _ => {}
        }
    }
    for (mac, address) in vteps_in_use(&lease, config) {
        match holders.macs.get(&mac) {
            Some((holder, held_at)) if *holder != record.key && *held_at != address => {
                let holder = holder.clone();
                return Err(RecordError::MacTaken { mac, holder });
            }
            _ => {}
        }
    }
    Ok(lease)
}

/// A remote lease must name none of this host's subnets, public addresses or VTEP MACs.
fn check_not_own(lease: &Lease, own: &Lease, config: &NetworkConfig) -> Result<(), RecordError> {
    let own_networks = own.subnets().networks(config);
    if let Some(network) = lease
        .subnets()
        .networks(config)
        .into_iter()
        .find(|network| own_networks.contains(network))
    {
        return Err(RecordError::OverlapsOwn(network));
    }
    if let Some((field, address)) = own_address_in(lease, own.attrs.public()) {
        let why = "this host's own";
        return Err(RecordError::BadAddress {
            field,
            address,
            why,
        });
    }
    let macs = |lease| vteps_in_use(lease, config).into_iter().map(|(mac, _)| mac);
    let own_macs: Vec<MacAddr> = macs(own).collect();
    match macs(lease).find(|mac| own_macs.contains(mac)) {
        Some(mac) => Err(RecordError::BadMac {
            field: "VtepMAC",
            mac,
            why: "this host's own",
        }),
        None => Ok(()),
    }
}

/// The field of `lease` that names one of `own` addresses, with the address.
fn own_address_in(lease: &Lease, own: PublicAddresses) -> Option<(&'static str, IpAddr)> {
    let ipv4 = Some(own.ipv4)
        .filter(|address| !address.is_unspecified() && *address == lease.attrs.public_ip)
        .map(|address| ("PublicIP", IpAddr::V4(address)));
    let ipv6 = own
        .ipv6
        .filter(|address| lease.attrs.public_ipv6 == Some(*address))
        .map(|address| ("PublicIPv6", IpAddr::V6(address)));
    ipv4.or(ipv6)
}

/// The remote leases of a listing, by [`check_remote`], and every record skipped with why.
/// Records holding their subnet in `holders` go first, the others in the order etcd created
/// them (by key where it created them together).
pub struct Selection {
    /// Each lease with the key of the record it came from.
    pub leases: Vec<(String, Lease)>,
    pub skipped: Vec<(String, RecordError)>,
    /// What the leases hold, for the watch to go on from.
    pub holders: Holders,
}

pub fn select_remote<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    prefix: &str,
    own: &Lease,
    config: &NetworkConfig,
    holders: &Holders,
) -> Selection {
    let own_key = subnet_key(prefix, own.subnets());
    let mut records: Vec<&Record> = records
        .into_iter()
        .filter(|record| record.key != own_key)
        .collect();
    records.sort_by_cached_key(|record| {
        let held = holders.hold_its_subnet(record, prefix, config);
        (!held, record.create_revision, record.key.clone())
    });
    let mut selection = Selection {
        leases: Vec::new(),
        skipped: Vec::new(),
        holders: Holders::default(),
    };
    for record in records {
        match check_remote(record, prefix, config, own, &selection.holders) {
            Ok(lease) => {
                selection.holders.hold(&lease, &record.key, config);
                selection.leases.push((record.key.clone(), lease));
            }
            Err(error) => selection.skipped.push((record.key.clone(), error)),
        }
    }
    selection
}

/// `<prefix>/subnets/`: where every record lives.
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

/// The record key of `subnets`, e.g. `/coreos.com/network/subnets/10.2.54.0-24`, or with
/// IPv6 `.../10.2.54.0-24&fd00:2:0:54::-64`.
pub fn subnet_key(prefix: &str, subnets: LeaseSubnets) -> String {
    let ipv4 = format!(
        "{}{}-{}",
        subnets_prefix(prefix),
        subnets.ipv4.network(),
        subnets.ipv4.prefix()
    );
    match subnets.ipv6 {
        Some(ipv6) => format!("{ipv4}&{}-{}", ipv6.network(), ipv6.prefix()),
        None => ipv4,
    }
}

/// The subnets a record key names. The key must parse exactly: each half a network in
/// flannel's form (`address-length`, no host bits), IPv4 first, IPv6 after the `&`.
pub fn subnet_from_key(prefix: &str, key: &str) -> Option<LeaseSubnets> {
    let name = key.strip_prefix(&subnets_prefix(prefix))?;
    let (ipv4, ipv6) = match name.split_once('&') {
        Some((ipv4, ipv6)) => (ipv4, Some(ipv6)),
        None => (name, None),
    };
    let ipv6 = match ipv6.map(network_of) {
        None => None,
        Some(Some(IpNetwork::V6(ipv6))) => Some(ipv6),
        Some(_) => return None,
    };
    match network_of(ipv4)? {
        IpNetwork::V4(ipv4) => Some(LeaseSubnets { ipv4, ipv6 }),
        IpNetwork::V6(_) => None,
    }
}

/// `address-length` as flannel writes a network in a key, with no host bits set.
fn network_of(text: &str) -> Option<IpNetwork> {
    let (address, len) = text.split_once('-')?;
    let address: IpAddr = address.parse().ok()?;
    let network = IpNetwork::new(address, len.parse().ok()?).ok()?;
    (network.network() == address).then_some(network)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "/docker-test/network";

    fn record(key: &str, value: &str) -> Record {
        Record {
            key: format!("{PREFIX}/subnets/{key}"),
            value: Some(value.as_bytes().to_vec()),
            etcd_lease: 7,
            create_revision: 0,
        }
    }

    fn seed_config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap()
    }

    #[test]
    fn writes_flannels_exact_bytes() {
        let attrs = LeaseAttrs::ipv4_only(
            Ipv4Addr::new(172, 20, 62, 105),
            1,
            "1a:4b:d7:f7:16:89".parse().unwrap(),
        );
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}"#
        );
    }

    #[test]
    fn reads_stock_flannel_records_of_every_vintage() {
        let config = seed_config();
        for value in [
            r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VtepMAC":"1a:4b:d7:f7:16:89"}}"#,
            r#"{"PublicIP":"172.20.62.105","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}"#,
            r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"},"BackendV6Data":null}"#,
        ] {
            let lease = record("10.2.54.0-24", value)
                .parse_remote(PREFIX, &config)
                .unwrap();
            assert_eq!(lease.subnet, "10.2.54.0/24".parse().unwrap());
            assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(172, 20, 62, 105));
            assert_eq!(
                lease.attrs.vtep_mac(),
                Some("1a:4b:d7:f7:16:89".parse().unwrap())
            );
        }
        let dual_stack = record(
            "10.2.52.0-24&fc00::-64",
            r#"{"PublicIP":"172.20.62.106","PublicIPv6":"fc00::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:8a"}}"#,
        );
        assert_eq!(
            dual_stack.parse_remote(PREFIX, &config).unwrap().subnet,
            "10.2.52.0/24".parse().unwrap()
        );
    }

    #[test]
    fn malformed_records_say_what_is_wrong() {
        let config = seed_config();
        let good = r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}"#;
        let cases = [
            record("10.2.54.0", good),
            record("10.2.54.1-24", good),
            record("10.2.54.0-33", good),
            record("10.2.54.0-24", "{not json"),
            record(
                "10.2.54.0-24",
                r#"{"PublicIP":"172.20.62.105","BackendType":"udp"}"#,
            ),
            record(
                "10.2.54.0-24",
                r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VtepMAC":"zz"}}"#,
            ),
            record(
                "10.2.54.0-24",
                r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VtepMAC":"01:00:5e:00:00:01"}}"#,
            ),
            record("10.9.54.0-24", good),
        ];
        let errors: Vec<_> = cases
            .iter()
            .map(|record| record.parse_remote(PREFIX, &config).unwrap_err())
            .collect();
        assert_eq!(
            errors[..3],
            [
                RecordError::BadKey,
                RecordError::BadKey,
                RecordError::BadKey
            ]
        );
        assert!(matches!(errors[3], RecordError::BadJson(_)));
        assert_eq!(errors[4], RecordError::NotVxlan("udp".into()));
        assert!(
            matches!(&errors[5], RecordError::BadJson(error) if error.contains("\"zz\" is not a MAC address"))
        );
        assert_eq!(
            errors[6],
            RecordError::BadMac {
                field: "BackendData.VtepMAC",
                mac: "01:00:5e:00:00:01".parse().unwrap(),
                why: "a multicast address"
            }
        );
        assert_eq!(
            errors[7],
            RecordError::OutsideNetwork(IpNetwork::V4(config.network))
        );
    }

    #[test]
    fn keys_parse_exactly_and_leases_have_the_networks_length() {
        let config = seed_config();
        let good = r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}"#;
        for name in [
            "10.2.41.0-24&anything",
            "10.2.41.0-24&",
            "10.2.41.0-24&fc00::1-64",
            "10.2.41.0-24&10.2.41.0-24",
            "10.2.41.0-24-24",
        ] {
            assert_eq!(
                record(name, good).parse_remote(PREFIX, &config),
                Err(RecordError::BadKey),
                "{name}"
            );
        }
        for name in ["10.2.41.128-25", "10.2.0.0-16", "10.2.40.0-23"] {
            assert_eq!(
                record(name, good).parse_remote(PREFIX, &config),
                Err(RecordError::WrongLength(24)),
                "{name}"
            );
        }
    }

    const DUAL_STACK: &str = r#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:2::/48", "Backend": {"Type": "vxlan"}}"#;
    const IPV6_ONLY: &str = r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:2::/48", "Backend": {"Type": "vxlan"}}"#;
    const FLANNEL_DUAL: &str = r#"{"PublicIP":"172.20.62.105","PublicIPv6":"fd00:ff::105","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"},"BackendV6Data":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:8a"}}"#;
    const FLANNEL_V6_ONLY: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:ff::105","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:8a"}}"#;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    #[test]
    fn writes_flannels_exact_bytes_for_both_families_and_ipv6_only() {
        let macs = VtepMacs {
            ipv4: Some("1a:4b:d7:f7:16:89".parse().unwrap()),
            ipv6: Some("1a:4b:d7:f7:16:8a".parse().unwrap()),
        };
        let public = PublicAddresses {
            ipv4: Ipv4Addr::new(172, 20, 62, 105),
            ipv6: Some("fd00:ff::105".parse().unwrap()),
        };
        assert_eq!(LeaseAttrs::vxlan(public, 1, macs).to_json(), FLANNEL_DUAL);
        let ipv6_only = PublicAddresses {
            ipv4: Ipv4Addr::UNSPECIFIED,
            ..public
        };
        let v6_macs = VtepMacs { ipv4: None, ..macs };
        assert_eq!(
            LeaseAttrs::vxlan(ipv6_only, 1, v6_macs).to_json(),
            FLANNEL_V6_ONLY
        );
    }

    #[test]
    fn reads_flannels_dual_stack_and_ipv6_only_records() {
        let lease = record("10.2.54.0-24&fd00:2:0:54::-64", FLANNEL_DUAL)
            .parse_remote(PREFIX, &config(DUAL_STACK))
            .unwrap();
        assert_eq!(lease.subnet, "10.2.54.0/24".parse().unwrap());
        assert_eq!(
            lease.ipv6_peer(),
            Some((
                "fd00:2:0:54::/64".parse().unwrap(),
                "fd00:ff::105".parse().unwrap(),
                "1a:4b:d7:f7:16:8a".parse().unwrap()
            ))
        );
        let lease = record("0.0.0.0-0&fd00:2:0:54::-64", FLANNEL_V6_ONLY)
            .parse_remote(PREFIX, &config(IPV6_ONLY))
            .unwrap();
        assert_eq!(lease.ipv6_subnet, Some("fd00:2:0:54::/64".parse().unwrap()));
        // A host of an IPv4-only past still routes by IPv4 in a dual-stack network.
        let old = r#"{"PublicIP":"172.20.62.106","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:8b"}}"#;
        let lease = record("10.2.55.0-24", old)
            .parse_remote(PREFIX, &config(DUAL_STACK))
            .unwrap();
        assert_eq!(lease.ipv6_peer(), None);
    }

    #[test]
    fn ipv6_halves_that_cannot_be_routed_say_why() {
        let dual = config(DUAL_STACK);
        let only = config(IPV6_ONLY);
        let cases = [
            (
                record("10.2.55.0-24", FLANNEL_V6_ONLY),
                &only,
                RecordError::NoIpv6Subnet,
            ),
            (
                record("0.0.0.0-0&fd00:3:0:54::-64", FLANNEL_V6_ONLY),
                &only,
                RecordError::OutsideNetwork("fd00:2::/48".parse().unwrap()),
            ),
            (
                record("0.0.0.0-0&fd00:2:0:54::-80", FLANNEL_V6_ONLY),
                &only,
                RecordError::WrongLength(64),
            ),
            (
                record("0.0.0.0-0&fd00:2::-47", FLANNEL_V6_ONLY),
                &only,
                RecordError::OutsideNetwork("fd00:2::/48".parse().unwrap()),
            ),
            (
                record(
                    "10.2.54.0-24&fd00:2:0:54::-64",
                    r#"{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}"#,
                ),
                &dual,
                RecordError::NoIpv6Vtep,
            ),
            (
                record(
                    "0.0.0.0-0&fd00:2:0:54::-64",
                    r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:ff::105","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#,
                ),
                &only,
                RecordError::BadMac {
                    field: "BackendV6Data.VtepMAC",
                    mac: MacAddr([0xff; 6]),
                    why: "the broadcast address",
                },
            ),
            (
                record("0.0.0.0-0&fd00:2:0:54::-64", FLANNEL_V6_ONLY),
                &dual,
                RecordError::OutsideNetwork("10.2.0.0/16".parse().unwrap()),
            ),
        ];
        for (record, config, expected) in cases {
            assert_eq!(
                record.parse_remote(PREFIX, config),
                Err(expected),
                "{}",
                record.key
            );
        }
    }

    #[test]
    fn an_ipv6_subnet_is_ours_or_held_as_an_ipv4_one_is() {
        let dual = config(DUAL_STACK);
        let own = LeaseSubnets {
            ipv4: "10.2.41.0/24".parse().unwrap(),
            ipv6: Some("fd00:2:0:41::/64".parse().unwrap()),
        };
        let own = own_lease(own);
        let stealing = record("10.2.54.0-24&fd00:2:0:41::-64", FLANNEL_DUAL);
        assert_eq!(
            check_remote(&stealing, PREFIX, &dual, &own, &Holders::default()),
            Err(RecordError::OverlapsOwn(
                "fd00:2:0:41::/64".parse().unwrap()
            ))
        );
        let first = record("10.2.54.0-24&fd00:2:0:54::-64", FLANNEL_DUAL);
        let second = record("10.2.55.0-24&fd00:2:0:54::-64", FLANNEL_DUAL);
        let selection = select_remote([&first, &second], PREFIX, &own, &dual, &Holders::default());
        assert_eq!(selection.leases.len(), 1);
        assert_eq!(
            selection.skipped,
            vec![(second.key.clone(), RecordError::Taken(first.key.clone()))]
        );
    }

    /// This host's lease on `subnets`: 172.20.62.104 and fd00:ff::104, with VTEP MACs of its
    /// own.
    fn own_lease(subnets: LeaseSubnets) -> Lease {
        let public = PublicAddresses {
            ipv4: Ipv4Addr::new(172, 20, 62, 104),
            ipv6: Some("fd00:ff::104".parse().unwrap()),
        };
        let macs = VtepMacs {
            ipv4: Some("1a:4b:d7:f7:16:41".parse().unwrap()),
            ipv6: Some("1a:4b:d7:f7:16:42".parse().unwrap()),
        };
        Lease {
            subnet: subnets.ipv4,
            ipv6_subnet: subnets.ipv6,
            attrs: LeaseAttrs::vxlan(public, 1, macs),
            etcd_lease: 1,
        }
    }

    fn with_public_ip(address: &str) -> String {
        format!(
            r#"{{"PublicIP":"{address}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:89"}}}}"#
        )
    }

    fn with_vtep_mac(mac: &str) -> String {
        format!(
            r#"{{"PublicIP":"172.20.62.105","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    }

    #[test]
    fn public_addresses_no_host_has_are_skipped_naming_the_field() {
        let seed = seed_config();
        for (address, why) in [
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "a loopback address"),
            ("224.0.0.1", "a multicast address"),
            ("255.255.255.255", "the broadcast address"),
            ("169.254.1.1", "a link-local address"),
        ] {
            let error = record("10.2.54.0-24", &with_public_ip(address))
                .parse_remote(PREFIX, &seed)
                .unwrap_err();
            assert_eq!(error.to_string(), format!("PublicIP {address} is {why}"));
        }
        let dual = config(DUAL_STACK);
        for (address, why) in [
            ("::", "unspecified"),
            ("::1", "a loopback address"),
            ("ff02::1", "a multicast address"),
            ("fe80::1", "a link-local address"),
        ] {
            let value = FLANNEL_DUAL.replace("fd00:ff::105", address);
            let error = record("10.2.54.0-24&fd00:2:0:54::-64", &value)
                .parse_remote(PREFIX, &dual)
                .unwrap_err();
            assert_eq!(error.to_string(), format!("PublicIPv6 {address} is {why}"));
        }
    }

    #[test]
    fn vtep_macs_no_device_has_are_skipped_naming_the_field() {
        for (mac, why) in [
            ("00:00:00:00:00:00", "all zeros"),
            ("ff:ff:ff:ff:ff:ff", "the broadcast address"),
            ("33:33:00:00:00:01", "a multicast address"),
        ] {
            let error = record("10.2.54.0-24", &with_vtep_mac(mac))
                .parse_remote(PREFIX, &seed_config())
                .unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("BackendData.VtepMAC {mac} is {why}")
            );
        }
    }

    #[test]
    fn a_record_with_this_hosts_public_address_or_vtep_mac_is_skipped() {
        let seed = seed_config();
        let own = own_lease(LeaseSubnets::ipv4("10.2.41.0/24".parse().unwrap()));
        let holders = Holders::default();
        let check = |value: &str| {
            check_remote(
                &record("10.2.54.0-24", value),
                PREFIX,
                &seed,
                &own,
                &holders,
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(
            check(&with_public_ip("172.20.62.104")),
            "PublicIP 172.20.62.104 is this host's own"
        );
        assert_eq!(
            check(&with_vtep_mac("1a:4b:d7:f7:16:41")),
            "VtepMAC 1a:4b:d7:f7:16:41 is this host's own"
        );
    }

    #[test]
    fn a_copied_vtep_mac_is_skipped_in_the_record_etcd_created_later() {
        let seed = seed_config();
        let own = own_lease(LeaseSubnets::ipv4("10.2.41.0/24".parse().unwrap()));
        let value = |host: u8| {
            with_vtep_mac("1a:4b:d7:f7:16:89")
                .replace("172.20.62.105", &format!("172.20.62.{host}"))
        };
        // The copy sorts first by key, but etcd created the original first.
        let original = Record {
            create_revision: 5,
            ..record("10.2.54.0-24", &value(105))
        };
        let copy = Record {
            create_revision: 9,
            ..record("10.2.3.0-24", &value(66))
        };
        let selection = select_remote([&copy, &original], PREFIX, &own, &seed, &Holders::default());
        let used: Vec<_> = selection.leases.iter().map(|(key, _)| key).collect();
        assert_eq!(used, [&original.key]);
        assert_eq!(
            selection.skipped,
            [(
                copy.key.clone(),
                RecordError::MacTaken {
                    mac: "1a:4b:d7:f7:16:89".parse().unwrap(),
                    holder: original.key.clone()
                }
            )]
        );
        // One host's second record shares its MAC and its address: no FDB entry moves.
        let second_of_the_host = Record {
            create_revision: 7,
            ..record("10.2.55.0-24", &value(105))
        };
        let both = select_remote(
            [&original, &second_of_the_host],
            PREFIX,
            &own,
            &seed,
            &Holders::default(),
        );
        assert_eq!((both.leases.len(), both.skipped.len()), (2, 0));
        // A holder keeps its MAC in a later listing, whatever the revisions say.
        let mut holders = Holders::default();
        let copy_lease = copy.parse_remote(PREFIX, &seed).unwrap();
        holders.hold(&copy_lease, &copy.key, &seed);
        let relisted = select_remote([&copy, &original], PREFIX, &own, &seed, &holders);
        let used: Vec<_> = relisted.leases.iter().map(|(key, _)| key).collect();
        assert_eq!(used, [&copy.key]);
    }

    #[test]
    fn a_record_takes_values_up_to_its_limit() {
        assert!(fits_a_record(&[b' '; MAX_RECORD_VALUE]));
        assert!(!fits_a_record(&[b' '; MAX_RECORD_VALUE + 1]));
    }

    #[test]
    fn a_value_too_large_to_read_is_skipped_as_such() {
        let too_large = Record {
            value: None,
            ..record("10.2.54.0-24", "")
        };
        assert_eq!(
            too_large.parse_remote(PREFIX, &seed_config()),
            Err(RecordError::TooLarge)
        );
    }

    #[test]
    fn keys_round_trip() {
        let subnet: Ipv4Network = "10.2.41.0/24".parse().unwrap();
        let key = subnet_key("/docker-test/network/", LeaseSubnets::ipv4(subnet));
        assert_eq!(key, "/docker-test/network/subnets/10.2.41.0-24");
        assert_eq!(
            subnet_from_key(PREFIX, &key),
            Some(LeaseSubnets::ipv4(subnet))
        );
        assert_eq!(subnet_from_key("/other", &key), None);
        for (subnets, name) in [
            (
                LeaseSubnets {
                    ipv4: subnet,
                    ipv6: Some("fd00:2:0:41::/64".parse().unwrap()),
                },
                "10.2.41.0-24&fd00:2:0:41::-64",
            ),
            (
                LeaseSubnets {
                    ipv4: "0.0.0.0/0".parse().unwrap(),
                    ipv6: Some("fd00:2:0:41::/64".parse().unwrap()),
                },
                "0.0.0.0-0&fd00:2:0:41::-64",
            ),
        ] {
            let key = subnet_key(PREFIX, subnets);
            assert_eq!(key, format!("{PREFIX}/subnets/{name}"));
            assert_eq!(subnet_from_key(PREFIX, &key), Some(subnets));
        }
    }
}
