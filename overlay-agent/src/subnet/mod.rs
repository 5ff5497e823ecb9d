//! Subnet leases: flannel's records in etcd, the lease this host holds, and the leases of
//! every other host.
//!
//! A record lives at `<prefix>/subnets/<a.b.c.d>-<len>` and holds the JSON of
//! [`LeaseAttrs`], byte for byte as flannel writes it.
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

use ipnetwork::{IpNetwork, Ipv4Network};
use serde::{Deserialize, Serialize};

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
}

/// flannel's vxlan `BackendData`. Older writers omit `VNI`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanLeaseData {
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

impl LeaseAttrs {
    /// What this host writes: its public IP and VTEP, in the vxlan backend's shape.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: MacAddr) -> Self {
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: VXLAN_BACKEND.to_string(),
            backend_data: Some(VxlanLeaseData {
                vni: Some(vni),
                vtep_mac,
            }),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attributes always serialize")
    }

    pub fn vtep_mac(&self) -> Option<MacAddr> {
        self.backend_data.as_ref().map(|data| data.vtep_mac)
    }
}

/// A subnet held by some host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    pub attrs: LeaseAttrs,
    /// The etcd lease the record is attached to; 0 for a reservation, which never expires.
    pub etcd_lease: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
}

/// A change in another host's lease, for the node-network and dataplane layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    Added(Lease),
    Changed(Lease),
    Removed(Lease),
}

/// A record as etcd returns it, before it is trusted.
#[derive(Clone, Debug)]
pub struct Record {
    pub key: String,
    /// `None` when the value is too large to read (see [`RecordError::TooLarge`]).
    pub value: Option<Vec<u8>>,
    pub etcd_lease: i64,
}

/// Why a record from another writer cannot be used; the record is skipped.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    BadKey,
    /// The value does not fit in the largest response the agent reads from etcd.
    TooLarge,
    BadJson(String),
    NotVxlan(String),
    NoVtep,
    OutsideNetwork(Ipv4Network),
    /// The subnet's prefix length is not the network's SubnetLen.
    WrongLength(u8),
    /// The subnet overlaps this host's own lease, under another key.
    OverlapsOwn(Ipv4Network),
    /// The subnet is already leased under the key given (kept: it was there first).
    Taken(String),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKey => write!(f, "the key does not end in a subnet such as 10.2.54.0-24"),
            Self::TooLarge => write!(f, "the value is too large to read from etcd"),
            Self::BadJson(error) => write!(f, "the value is not a lease record: {error}"),
            Self::NotVxlan(backend) => write!(f, "BackendType {backend:?} is not \"vxlan\""),
            Self::NoVtep => write!(f, "the record has no BackendData with a VtepMAC yet"),
            Self::OutsideNetwork(network) => {
                write!(f, "the subnet lies outside the Network {network}")
            }
            Self::WrongLength(subnet_len) => {
                write!(
                    f,
                    "the subnet's length is not the network's SubnetLen /{subnet_len}"
                )
            }
            Self::OverlapsOwn(own) => write!(f, "the subnet overlaps this host's lease {own}"),
            Self::Taken(key) => write!(f, "the subnet is already leased by {key}"),
        }
    }
}

impl Record {
    /// Parses the record as any lease, checking only its key and JSON: enough to recognise
    /// this host's own record or a reservation, which may not carry backend data yet.
    pub fn parse(&self, prefix: &str) -> Result<Lease, RecordError> {
        let subnet = subnet_from_key(prefix, &self.key).ok_or(RecordError::BadKey)?;
        let value = self.value.as_deref().ok_or(RecordError::TooLarge)?;
        let attrs: LeaseAttrs = serde_json::from_slice(value)
            .map_err(|error| RecordError::BadJson(error.to_string()))?;
        Ok(Lease {
            subnet,
            attrs,
            etcd_lease: self.etcd_lease,
        })
    }

    /// Parses another host's record and checks that this host can route to it.
    pub fn parse_remote(&self, prefix: &str, config: &NetworkConfig) -> Result<Lease, RecordError> {
        let lease = self.parse(prefix)?;
        if !config.network.contains(lease.subnet.network())
            || lease.subnet.prefix() < config.network.prefix()
        {
            return Err(RecordError::OutsideNetwork(config.network));
        }
        // Every lease has the network's length, so two leases either are one subnet or do not
        // overlap: a longer record could steal part of a lease, a shorter one cover several.
        if lease.subnet.prefix() != config.subnet_len {
            return Err(RecordError::WrongLength(config.subnet_len));
        }
        if lease.attrs.backend_type.is_empty() {
            return Err(RecordError::NoVtep);
        }
        if lease.attrs.backend_type != VXLAN_BACKEND {
            return Err(RecordError::NotVxlan(lease.attrs.backend_type));
        }
        match lease.attrs.vtep_mac() {
            Some(mac) if mac.is_unicast() => Ok(lease),
            _ => Err(RecordError::NoVtep),
        }
    }
}

/// Whether `record`, beside this host's lease on `own` and the subnets other records already
/// hold (`holders`, subnet → key), gives a lease this host may route to. Its own key aside,
/// a record naming `own` overlaps it; a record naming a subnet another key holds comes later,
/// and the one there first keeps it.
pub fn check_remote(
    record: &Record,
    prefix: &str,
    config: &NetworkConfig,
    own: Ipv4Network,
    holders: &HashMap<Ipv4Network, String>,
) -> Result<Lease, RecordError> {
    let lease = record.parse_remote(prefix, config)?;
    if lease.subnet == own {
        return Err(RecordError::OverlapsOwn(own));
    }
    match holders.get(&lease.subnet) {
        Some(holder) if *holder != record.key => Err(RecordError::Taken(holder.clone())),
        _ => Ok(lease),
    }
}

/// The remote leases of a listing, by [`check_remote`], and every record skipped with why.
/// Records holding their subnet in `holders` go first, the others in the listing's order.
pub struct Selection {
    /// Each lease with the key of the record it came from.
    pub leases: Vec<(String, Lease)>,
    pub skipped: Vec<(String, RecordError)>,
}

pub fn select_remote<'a>(
    records: impl IntoIterator<Item = &'a Record>,
    prefix: &str,
    own: Ipv4Network,
    config: &NetworkConfig,
    holders: &HashMap<Ipv4Network, String>,
) -> Selection {
    let own_key = subnet_key(prefix, own);
    let holds = |record: &Record| {
        subnet_from_key(prefix, &record.key)
            .and_then(|subnet| holders.get(&subnet))
            .is_some_and(|holder| *holder == record.key)
    };
    let mut records: Vec<&Record> = records
        .into_iter()
        .filter(|record| record.key != own_key)
        .collect();
    records.sort_by_key(|record| !holds(record));
    let mut selection = Selection {
        leases: Vec::new(),
        skipped: Vec::new(),
    };
    let mut taken: HashMap<Ipv4Network, String> = HashMap::new();
    for record in records {
        match check_remote(record, prefix, config, own, &taken) {
            Ok(lease) => {
                taken.insert(lease.subnet, record.key.clone());
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

/// The record key of `subnet`, e.g. `/coreos.com/network/subnets/10.2.54.0-24`.
pub fn subnet_key(prefix: &str, subnet: Ipv4Network) -> String {
    format!(
        "{}{}-{}",
        subnets_prefix(prefix),
        subnet.network(),
        subnet.prefix()
    )
}

/// The IPv4 subnet a record key names; dual-stack keys (`10.5.52.0-24&fc00::-64`) give their
/// IPv4 half. The key must parse exactly: each half a network in flannel's form
/// (`address-length`, no host bits), IPv4 first, IPv6 after the `&`.
pub fn subnet_from_key(prefix: &str, key: &str) -> Option<Ipv4Network> {
    let name = key.strip_prefix(&subnets_prefix(prefix))?;
    let (ipv4, ipv6) = match name.split_once('&') {
        Some((ipv4, ipv6)) => (ipv4, Some(ipv6)),
        None => (name, None),
    };
    if ipv6.is_some_and(|ipv6| !matches!(network_of(ipv6), Some(IpNetwork::V6(_)))) {
        return None;
    }
    match network_of(ipv4)? {
        IpNetwork::V4(subnet) => Some(subnet),
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
        }
    }

    fn seed_config() -> NetworkConfig {
        NetworkConfig::parse(r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap()
    }

    #[test]
    fn writes_flannels_exact_bytes() {
        let attrs = LeaseAttrs::vxlan(
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
        assert_eq!(errors[6], RecordError::NoVtep);
        assert_eq!(errors[7], RecordError::OutsideNetwork(config.network));
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
        let key = subnet_key("/docker-test/network/", subnet);
        assert_eq!(key, "/docker-test/network/subnets/10.2.41.0-24");
        assert_eq!(subnet_from_key(PREFIX, &key), Some(subnet));
        assert_eq!(subnet_from_key("/other", &key), None);
    }
}
