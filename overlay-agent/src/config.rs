//! The network config flannel keeps at `<prefix>/config`, with flannel's defaults and rules.
//!
//! Keys match case-insensitively, as Go's JSON decoder matches them, so a config written for
//! flannel reads the same here. Every error names the field and the rule it broke.
use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{Map, Value};

use overlay_common::DEFAULT_VXLAN_PORT;

/// Bytes VXLAN adds inside the underlay's MTU: the outer IPv4 (20), UDP (8) and VXLAN (8)
/// headers and the inner Ethernet header (14); the outer Ethernet header is outside the MTU.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes VXLAN over IPv6 adds: its outer IPv6 header is 20 bytes longer than IPv4's. flannel
/// gives flannel-v6.<VNI> the IPv4 device's MTU, which a full-size packet then exceeds.
pub const VXLAN_IPV6_OVERHEAD: u32 = 70;
const DEFAULT_VNI: u32 = 1;
const MAX_VNI: u64 = (1 << 24) - 1;
/// The smallest underlay MTU that still leaves IPv4's minimum of 68 inside the tunnel.
const MIN_UNDERLAY_MTU: u64 = 68 + VXLAN_OVERHEAD as u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `EnableIPv4` (default true). Without it the IPv4 fields below hold flannel's empty
    /// network, 0.0.0.0/0, the IPv4 half of an IPv6-only lease's key.
    pub enable_ipv4: bool,
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    /// `EnableIPv6` with its `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`, `IPv6SubnetMax`.
    pub ipv6: Option<Ipv6Range>,
    pub backend: VxlanBackend,
    /// `EnableNFTables`: the forward and masquerade rules go into nftables, not iptables.
    pub enable_nftables: bool,
}

/// The IPv6 half of a dual-stack or IPv6-only network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Range {
    pub network: Ipv6Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanBackend {
    pub vni: u32,
    pub port: u16,
    /// The underlay MTU to assume; `None` means the external interface's MTU.
    pub mtu: Option<u32>,
    pub gbp: bool,
    pub direct_routing: bool,
    pub learning: bool,
}

/// A config that cannot be used: `field` names the offending key as flannel spells it.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "network config: {}: {}", self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        problem: problem.into(),
    }
}

impl NetworkConfig {
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(json)
            .map_err(|error| invalid("(document)", format!("not valid JSON: {error}")))?;
        let root = Object::new("", &value)?;

        let enable_ipv4 = root.bool("EnableIPv4")?.unwrap_or(true);
        let enable_ipv6 = root.bool("EnableIPv6")?.unwrap_or(false);
        if !enable_ipv4 && !enable_ipv6 {
            return Err(invalid(
                "EnableIPv4",
                "false, and EnableIPv6 is not true: the network would carry nothing",
            ));
        }
        let ipv4 = if enable_ipv4 {
            Some(parse_range(&root, &IPV4)?)
        } else {
            None
        };
        let ipv6 = if enable_ipv6 {
            let range = parse_range(&root, &IPV6)?;
            let network = Ipv6Network::new(Ipv6Addr::from(range.network), range.network_len)
                .map_err(|error| invalid("IPv6Network", error.to_string()))?;
            Some(Ipv6Range {
                network,
                subnet_len: range.subnet_len,
                subnet_min: Ipv6Addr::from(range.min),
                subnet_max: Ipv6Addr::from(range.max),
            })
        } else {
            None
        };
        let ipv4 = ipv4.unwrap_or(Range::EMPTY);
        let as_ipv4 = |address: u128| Ipv4Addr::from(address as u32);
        Ok(Self {
            enable_ipv4,
            network: Ipv4Network::new(as_ipv4(ipv4.network), ipv4.network_len)
                .map_err(|error| invalid("Network", error.to_string()))?,
            subnet_len: ipv4.subnet_len,
            subnet_min: as_ipv4(ipv4.min),
            subnet_max: as_ipv4(ipv4.max),
            ipv6,
            backend: VxlanBackend::parse(root.object("Backend", "Backend.")?)?,
            enable_nftables: root.bool("EnableNFTables")?.unwrap_or(false),
        })
    }

    /// Whether `subnet` is one this config hands out: the right size, between SubnetMin and
    /// SubnetMax. A lease that does not fit is not reused. Without IPv4 only flannel's empty
    /// network fits.
    pub fn fits(&self, subnet: Ipv4Network) -> bool {
        if !self.enable_ipv4 {
            return subnet == self.network;
        }
        subnet.prefix() == self.subnet_len
            && (self.subnet_min..=self.subnet_max).contains(&subnet.network())
    }

    /// How many subnets lie between SubnetMin and SubnetMax: at most the 2^(SubnetLen −
    /// the Network's length) the Network holds. The larger count of the two families.
    pub fn subnet_count(&self) -> u64 {
        let ipv4 = self.enable_ipv4.then(|| {
            span_count(
                u128::from(u32::from(self.subnet_min)),
                u128::from(u32::from(self.subnet_max)),
                32 - self.subnet_len,
            )
        });
        let ipv6 = self.ipv6.map(|range| range.subnet_count());
        ipv4.into_iter().chain(ipv6).max().unwrap_or(0)
    }

    /// How many addresses an IPv4 lease holds: 2^(32 − SubnetLen); none without IPv4.
    pub fn lease_addresses(&self) -> u64 {
        if self.enable_ipv4 {
            1 << (32 - self.subnet_len.min(32))
        } else {
            0
        }
    }

    /// Every IPv4 subnet between SubnetMin and SubnetMax, in order; none without IPv4.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        let size = 1u64 << (32 - self.subnet_len.max(1));
        let first = u64::from(u32::from(self.subnet_min));
        let last = u64::from(u32::from(self.subnet_max));
        (first..=last)
            .step_by(size as usize)
            .filter(|_| self.enable_ipv4)
            .filter_map(|first| {
                Ipv4Network::new(Ipv4Addr::from(first as u32), self.subnet_len).ok()
            })
    }
}

impl Ipv6Range {
    /// Whether `subnet` is one this range hands out, as [`NetworkConfig::fits`].
    pub fn fits(&self, subnet: Ipv6Network) -> bool {
        subnet.prefix() == self.subnet_len
            && (self.subnet_min..=self.subnet_max).contains(&subnet.network())
    }

    pub fn subnet_count(&self) -> u64 {
        span_count(
            u128::from(self.subnet_min),
            u128::from(self.subnet_max),
            128 - self.subnet_len,
        )
    }

    /// The subnets from SubnetMin on, in order (an IPv6 range may hold 2^64 of them).
    pub fn subnets(&self) -> impl Iterator<Item = Ipv6Network> + '_ {
        let size = 1u128 << (128 - self.subnet_len);
        let (first, last) = (u128::from(self.subnet_min), u128::from(self.subnet_max));
        (0..)
            .map_while(move |index: u128| {
                let address = first.checked_add(index.checked_mul(size)?)?;
                (address <= last).then_some(address)
            })
            .filter_map(|address| Ipv6Network::new(Ipv6Addr::from(address), self.subnet_len).ok())
    }
}

/// Subnets of 2^`host_bits` addresses from `min` to `max`, saturating at u64::MAX.
fn span_count(min: u128, max: u128, host_bits: u8) -> u64 {
    let count = (max.saturating_sub(min) >> host_bits).saturating_add(1);
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// How flannel checks one family's network: the same rules, with the family's widths and
/// field names.
struct FamilyRules {
    bits: u8,
    /// The subnet length a large network gets by default: /24, /64.
    default_len: u8,
    network: &'static str,
    subnet_len: &'static str,
    subnet_min: &'static str,
    subnet_max: &'static str,
    /// An example for error messages.
    example: &'static str,
}

const IPV4: FamilyRules = FamilyRules {
    bits: 32,
    default_len: 24,
    network: "Network",
    subnet_len: "SubnetLen",
    subnet_min: "SubnetMin",
    subnet_max: "SubnetMax",
    example: "10.2.0.0/16",
};

const IPV6: FamilyRules = FamilyRules {
    bits: 128,
    default_len: 64,
    network: "IPv6Network",
    subnet_len: "IPv6SubnetLen",
    subnet_min: "IPv6SubnetMin",
    subnet_max: "IPv6SubnetMax",
    example: "fd00:2::/48",
};

impl FamilyRules {
    fn is_ipv6(&self) -> bool {
        self.bits == 128
    }

    fn show(&self, address: u128) -> String {
        if self.is_ipv6() {
            Ipv6Addr::from(address).to_string()
        } else {
            Ipv4Addr::from(address as u32).to_string()
        }
    }

    fn family(&self) -> &'static str {
        if self.is_ipv6() { "IPv6" } else { "IPv4" }
    }
}

/// One family's network and subnet range, as numbers.
#[derive(Clone, Copy)]
struct Range {
    network: u128,
    network_len: u8,
    subnet_len: u8,
    min: u128,
    max: u128,
}

impl Range {
    /// flannel's empty IPv4 network, 0.0.0.0/0, holding nothing.
    const EMPTY: Range = Range {
        network: 0,
        network_len: 0,
        subnet_len: 0,
        min: 0,
        max: 0,
    };
}

/// Reads and checks one family's network, SubnetLen, SubnetMin and SubnetMax by flannel's
/// rules: SubnetMin and SubnetMax default to the second and the last subnet and must lie in
/// the network on a SubnetLen boundary.
fn parse_range(root: &Object<'_>, rules: &FamilyRules) -> Result<Range, ConfigError> {
    let (network, network_len) = parse_network(root, rules)?;
    let subnet_len = subnet_len(
        rules,
        network,
        network_len,
        root.integer(rules.subnet_len, 0, u64::from(rules.bits))?,
    )?;
    let host_bits = rules.bits - subnet_len;
    let size = 1u128 << host_bits;
    let last = network | (u128::MAX >> (128 - u32::from(rules.bits)) >> network_len);
    let min = root.ip(rules.subnet_min, rules)?.unwrap_or(network + size);
    let max = root
        .ip(rules.subnet_max, rules)?
        .unwrap_or(last - (size - 1));
    for (field, address) in [(rules.subnet_min, min), (rules.subnet_max, max)] {
        if !(network..=last).contains(&address) {
            return Err(invalid(
                field,
                format!(
                    "{} is not in the range of the {} {}/{network_len}",
                    rules.show(address),
                    rules.network,
                    rules.show(network)
                ),
            ));
        }
        if address % size != 0 {
            return Err(invalid(
                field,
                format!(
                    "{} is not on a /{subnet_len} ({}) boundary",
                    rules.show(address),
                    rules.subnet_len
                ),
            ));
        }
    }
    if min > max {
        return Err(invalid(
            rules.subnet_min,
            format!(
                "{} lies above {} {}",
                rules.show(min),
                rules.subnet_max,
                rules.show(max)
            ),
        ));
    }
    Ok(Range {
        network,
        network_len,
        subnet_len,
        min,
        max,
    })
}

/// The family's network, reduced to its prefix; a config must spell the prefix out.
fn parse_network(root: &Object<'_>, rules: &FamilyRules) -> Result<(u128, u8), ConfigError> {
    let text = root.string(rules.network)?.ok_or_else(|| {
        invalid(
            rules.network,
            format!(
                "missing; it names the cluster's {} network, e.g. \"{}\"",
                rules.family(),
                rules.example
            ),
        )
    })?;
    let not_a_cidr = || {
        invalid(
            rules.network,
            format!(
                "{text:?} is not an {} CIDR such as \"{}\"",
                rules.family(),
                rules.example
            ),
        )
    };
    let (address, len) = text.split_once('/').ok_or_else(not_a_cidr)?;
    let len: u8 = len.parse().map_err(|_| not_a_cidr())?;
    let address = if rules.is_ipv6() {
        address.parse::<Ipv6Addr>().map(u128::from)
    } else {
        address
            .parse::<Ipv4Addr>()
            .map(|address| u128::from(u32::from(address)))
    };
    let address = address.map_err(|_| not_a_cidr())?;
    if len > rules.bits {
        return Err(not_a_cidr());
    }
    let mask = if len == 0 {
        0
    } else {
        (u128::MAX >> (128 - u32::from(rules.bits))) & !((1u128 << (rules.bits - len)) - 1)
    };
    Ok((address & mask, len))
}

/// flannel's SubnetLen rules: by default /24 (IPv6: /64) where the network holds four of
/// them, else the network's length + 2; never longer than /30 (/126), and always room for at
/// least four subnets.
fn subnet_len(
    rules: &FamilyRules,
    network: u128,
    network_len: u8,
    configured: Option<u64>,
) -> Result<u8, ConfigError> {
    let longest = rules.bits - 2;
    let shown = || format!("{}/{network_len}", rules.show(network));
    match configured {
        None | Some(0) if network_len > rules.bits - 4 => Err(invalid(
            rules.network,
            format!(
                "{} is too small: the smallest useful network is a /{}",
                shown(),
                rules.bits - 4
            ),
        )),
        None | Some(0) if network_len <= rules.default_len - 2 => Ok(rules.default_len),
        None | Some(0) => Ok(network_len + 2),
        Some(len) if len > u64::from(longest) => Err(invalid(
            rules.subnet_len,
            format!("/{len} is too long: it must be /{longest} or shorter"),
        )),
        Some(len) if len < u64::from(network_len) + 2 => Err(invalid(
            rules.subnet_len,
            format!(
                "/{len} leaves {} room for fewer than four subnets: it must be /{} or longer",
                shown(),
                network_len + 2
            ),
        )),
        Some(len) => Ok(len as u8),
    }
}

impl VxlanBackend {
    fn parse(backend: Option<Object<'_>>) -> Result<Self, ConfigError> {
        let backend = backend
            .ok_or_else(|| invalid("Backend", "missing; overlay needs {\"Type\": \"vxlan\"}"))?;
        let backend_type = backend
            .string("Type")?
            .ok_or_else(|| invalid("Backend.Type", "missing; overlay supports \"vxlan\""))?;
        if !backend_type.eq_ignore_ascii_case("vxlan") {
            return Err(invalid(
                "Backend.Type",
                format!("{backend_type:?} is not supported; overlay supports \"vxlan\" only"),
            ));
        }
        let port = match backend.integer("Port", 0, u64::from(u16::MAX))? {
            None | Some(0) => DEFAULT_VXLAN_PORT,
            Some(port) => port as u16,
        };
        let mtu = match backend.integer("MTU", 0, u64::from(u16::MAX))? {
            None | Some(0) => None,
            Some(mtu) if mtu < MIN_UNDERLAY_MTU => {
                return Err(invalid(
                    "Backend.MTU",
                    format!("{mtu} is too small: the tunnel needs {MIN_UNDERLAY_MTU} or more"),
                ));
            }
            Some(mtu) => Some(mtu as u32),
        };
        Ok(Self {
            vni: backend
                .integer("VNI", 0, MAX_VNI)?
                .map_or(DEFAULT_VNI, |vni| vni as u32),
            port,
            mtu,
            gbp: backend.bool("GBP")?.unwrap_or(false),
            direct_routing: backend.bool("DirectRouting")?.unwrap_or(false),
            learning: backend.bool("Learning")?.unwrap_or(false),
        })
    }
}

/// A JSON object read the way Go's decoder reads it: an exact key first, else any key that
/// matches ignoring case.
struct Object<'a> {
    prefix: &'static str,
    map: &'a Map<String, Value>,
}

impl<'a> Object<'a> {
    /// `prefix` is what error messages put before this object's keys: "" or "Backend.".
    fn new(prefix: &'static str, value: &'a Value) -> Result<Self, ConfigError> {
        let map = value.as_object().ok_or_else(|| {
            let field = prefix.strip_suffix('.').unwrap_or("(document)");
            invalid(field, format!("expected a JSON object, got {value}"))
        })?;
        Ok(Self { prefix, map })
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map
            .get(key)
            .or_else(|| {
                self.map
                    .iter()
                    .find(|(candidate, _)| candidate.eq_ignore_ascii_case(key))
                    .map(|(_, value)| value)
            })
            .filter(|value| !value.is_null())
    }

    /// The field's name for error messages, e.g. "Backend.Port".
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        self.get(key)
            .map(|value| {
                value.as_str().ok_or_else(|| {
                    invalid(self.name(key), format!("expected a string, got {value}"))
                })
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|value| {
                value.as_bool().ok_or_else(|| {
                    invalid(
                        self.name(key),
                        format!("expected true or false, got {value}"),
                    )
                })
            })
            .transpose()
    }

    fn integer(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|value| match value.as_u64() {
                Some(number) if (min..=max).contains(&number) => Ok(number),
                _ => Err(invalid(
                    self.name(key),
                    format!("expected a whole number from {min} to {max}, got {value}"),
                )),
            })
            .transpose()
    }

    /// An address of the family `rules` names, as a number.
    fn ip(&self, key: &str, rules: &FamilyRules) -> Result<Option<u128>, ConfigError> {
        self.string(key)?
            .map(|text| {
                let address = if rules.is_ipv6() {
                    text.parse::<Ipv6Addr>().map(u128::from)
                } else {
                    text.parse::<Ipv4Addr>()
                        .map(|address| u128::from(u32::from(address)))
                };
                address.map_err(|_| {
                    invalid(
                        self.name(key),
                        format!("{text:?} is not an {} address", rules.family()),
                    )
                })
            })
            .transpose()
    }

    /// The nested object `key`, whose fields errors will call `prefix<field>`.
    fn object(&self, key: &str, prefix: &'static str) -> Result<Option<Object<'a>>, ConfigError> {
        self.get(key)
            .map(|value| Object::new(prefix, value))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<NetworkConfig, String> {
        NetworkConfig::parse(json).map_err(|error| error.to_string())
    }

    #[test]
    fn the_seed_config_gets_flannels_defaults() {
        let config = parse(r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(config.network, "10.2.0.0/16".parse().unwrap());
        assert_eq!(config.subnet_len, 24);
        assert_eq!(config.subnet_min, Ipv4Addr::new(10, 2, 1, 0));
        assert_eq!(config.subnet_max, Ipv4Addr::new(10, 2, 255, 0));
        let backend = VxlanBackend {
            vni: 1,
            port: 8472,
            mtu: None,
            gbp: false,
            direct_routing: false,
            learning: false,
        };
        assert_eq!(config.backend, backend);
        assert_eq!(config.subnets().count(), 255);
        assert_eq!(config.subnet_count(), 255);
        assert_eq!(config.lease_addresses(), 256);
        assert!(config.fits("10.2.41.0/24".parse().unwrap()));
        assert!(
            !config.fits("10.2.0.0/24".parse().unwrap()),
            "the first subnet is skipped"
        );
        assert!(!config.fits("10.2.41.0/25".parse().unwrap()));
    }

    #[test]
    fn keys_match_ignoring_case_and_every_backend_field_is_read() {
        let config = parse(
            r#"{"network": "10.5.0.0/16", "SUBNETLEN": 26, "subnetmin": "10.5.0.64", "SubnetMax": "10.5.1.0",
                "backend": {"type": "VXLAN", "vni": 42, "port": 4789, "mtu": 9000, "gbp": true,
                            "directrouting": true, "LEARNING": true}}"#,
        )
        .unwrap();
        assert_eq!(config.subnet_len, 26);
        assert_eq!(config.subnet_min, Ipv4Addr::new(10, 5, 0, 64));
        assert_eq!(config.subnet_max, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(
            config.subnet_count(),
            4,
            "SubnetMin and SubnetMax narrow the network"
        );
        let backend = VxlanBackend {
            vni: 42,
            port: 4789,
            mtu: Some(9000),
            gbp: true,
            direct_routing: true,
            learning: true,
        };
        assert_eq!(config.backend, backend);
        assert_eq!(config.subnets().count(), 4);
    }

    #[test]
    fn subnet_len_defaults_follow_the_network_size() {
        for (network, expected) in [
            ("10.0.0.0/8", 24),
            ("10.2.0.0/22", 24),
            ("10.2.0.0/23", 25),
            ("10.2.0.0/28", 30),
        ] {
            let json = format!(r#"{{"Network": "{network}", "Backend": {{"Type": "vxlan"}}}}"#);
            assert_eq!(parse(&json).unwrap().subnet_len, expected, "{network}");
        }
    }

    #[test]
    fn a_network_with_host_bits_is_reduced_to_its_prefix() {
        let config = parse(r#"{"Network": "10.2.3.4/16", "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(config.network, "10.2.0.0/16".parse().unwrap());
    }

    #[test]
    fn a_dual_stack_config_gets_flannels_ipv6_defaults() {
        let config = parse(
            r#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:2::/48",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert!(config.enable_ipv4);
        let ipv6 = config.ipv6.expect("IPv6 is enabled");
        assert_eq!(ipv6.network, "fd00:2::/48".parse().unwrap());
        assert_eq!(ipv6.subnet_len, 64);
        assert_eq!(ipv6.subnet_min, "fd00:2:0:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            ipv6.subnet_max,
            "fd00:2:0:ffff::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(ipv6.subnet_count(), 65535);
        assert_eq!(config.subnet_count(), 65535, "the larger family counts");
        assert!(ipv6.fits("fd00:2:0:41::/64".parse().unwrap()));
        assert!(
            !ipv6.fits("fd00:2::/64".parse().unwrap()),
            "the first is skipped"
        );
        assert_eq!(
            ipv6.subnets().nth(1),
            Some("fd00:2:0:2::/64".parse().unwrap())
        );
    }

    #[test]
    fn ipv6_subnet_len_defaults_follow_the_network_size() {
        for (network, expected) in [
            ("fd00::/8", 64),
            ("fd00::/62", 64),
            ("fd00::/63", 65),
            ("fd00::/124", 126),
        ] {
            let json = format!(
                r#"{{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "{network}", "Backend": {{"Type": "vxlan"}}}}"#
            );
            let config = parse(&json).unwrap();
            assert_eq!(config.ipv6.unwrap().subnet_len, expected, "{network}");
        }
    }

    #[test]
    fn an_ipv6_only_config_has_flannels_empty_ipv4_network() {
        let config = parse(
            r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:2::/48",
                "IPv6SubnetLen": 80, "IPv6SubnetMin": "fd00:2:0:1::", "IPv6SubnetMax": "fd00:2:0:1:3::",
                "Backend": {"Type": "vxlan"}}"#,
        )
        .unwrap();
        assert!(!config.enable_ipv4);
        assert_eq!(config.network, "0.0.0.0/0".parse().unwrap());
        assert!(config.fits("0.0.0.0/0".parse().unwrap()));
        assert!(!config.fits("10.2.41.0/24".parse().unwrap()));
        assert_eq!(config.subnets().count(), 0);
        let ipv6 = config.ipv6.unwrap();
        assert_eq!(ipv6.subnet_count(), 4);
        assert_eq!(ipv6.subnets().count(), 4);
        assert_eq!(config.subnet_count(), 4);
        assert_eq!(config.lease_addresses(), 0, "no IPv4 lease");
    }

    #[test]
    fn invalid_configs_name_the_field_and_the_rule() {
        let cases = [
            ("{", "(document): not valid JSON"),
            ("[1]", "(document): expected a JSON object"),
            (r#"{"Backend": {"Type": "vxlan"}}"#, "Network: missing"),
            (
                r#"{"Network": 10, "Backend": {"Type": "vxlan"}}"#,
                "Network: expected a string, got 10",
            ),
            (
                r#"{"Network": "10.2.0.0", "Backend": {"Type": "vxlan"}}"#,
                "Network: \"10.2.0.0\" is not an IPv4 CIDR",
            ),
            (
                r#"{"Network": "fc00::/64", "Backend": {"Type": "vxlan"}}"#,
                "Network: \"fc00::/64\" is not an IPv4 CIDR",
            ),
            (
                r#"{"Network": "10.2.0.0/29", "Backend": {"Type": "vxlan"}}"#,
                "Network: 10.2.0.0/29 is too small",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}}"#,
                "SubnetLen: /31 is too long",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetLen": 17, "Backend": {"Type": "vxlan"}}"#,
                "SubnetLen: /17 leaves 10.2.0.0/16 room for fewer than four subnets",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetLen": 40, "Backend": {"Type": "vxlan"}}"#,
                "SubnetLen: expected a whole number from 0 to 32, got 40",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetLen": "24", "Backend": {"Type": "vxlan"}}"#,
                "SubnetLen: expected a whole number",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetMin": "10.3.0.0", "Backend": {"Type": "vxlan"}}"#,
                "SubnetMin: 10.3.0.0 is not in the range of the Network 10.2.0.0/16",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetMax": "10.2.3.128", "Backend": {"Type": "vxlan"}}"#,
                "SubnetMax: 10.2.3.128 is not on a /24 (SubnetLen) boundary",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetMin": "10.2.9.0", "SubnetMax": "10.2.3.0", "Backend": {"Type": "vxlan"}}"#,
                "SubnetMin: 10.2.9.0 lies above SubnetMax 10.2.3.0",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "SubnetMin": "ten", "Backend": {"Type": "vxlan"}}"#,
                "SubnetMin: \"ten\" is not an IPv4 address",
            ),
            (r#"{"Network": "10.2.0.0/16"}"#, "Backend: missing"),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": "vxlan"}"#,
                "Backend: expected a JSON object",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": {}}"#,
                "Backend.Type: missing",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "udp"}}"#,
                "Backend.Type: \"udp\" is not supported",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#,
                "Backend.VNI: expected a whole number from 0 to 16777215",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}"#,
                "Backend.Port: expected a whole number from 0 to 65535",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "MTU": 100}}"#,
                "Backend.MTU: 100 is too small",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": "yes"}}"#,
                "Backend.DirectRouting: expected true or false",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "EnableIPv6": true, "Backend": {"Type": "vxlan"}}"#,
                "IPv6Network: missing",
            ),
            (
                r#"{"EnableIPv4": false, "Backend": {"Type": "vxlan"}}"#,
                "EnableIPv4: false, and EnableIPv6 is not true",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "10.2.0.0/16", "Backend": {"Type": "vxlan"}}"#,
                "IPv6Network: \"10.2.0.0/16\" is not an IPv6 CIDR",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/125", "Backend": {"Type": "vxlan"}}"#,
                "IPv6Network: fd00::/125 is too small: the smallest useful network is a /124",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 127, "Backend": {"Type": "vxlan"}}"#,
                "IPv6SubnetLen: /127 is too long: it must be /126 or shorter",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetLen": 49, "Backend": {"Type": "vxlan"}}"#,
                "IPv6SubnetLen: /49 leaves fd00::/48 room for fewer than four subnets",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd01::", "Backend": {"Type": "vxlan"}}"#,
                "IPv6SubnetMin: fd01:: is not in the range of the IPv6Network fd00::/48",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd00:0:0:5::1", "Backend": {"Type": "vxlan"}}"#,
                "IPv6SubnetMax: fd00:0:0:5::1 is not on a /64 (IPv6SubnetLen) boundary",
            ),
            (
                r#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00::/48", "IPv6SubnetMin": "10.2.0.0", "Backend": {"Type": "vxlan"}}"#,
                "IPv6SubnetMin: \"10.2.0.0\" is not an IPv6 address",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "EnableIPv6": "yes", "Backend": {"Type": "vxlan"}}"#,
                "EnableIPv6: expected true or false",
            ),
        ];
        for (json, expected) in cases {
            let error = parse(json).expect_err(json);
            assert!(
                error.starts_with(&format!("network config: {expected}")),
                "{json}\n  gave: {error}\n  want: network config: {expected}..."
            );
        }
    }
}
