//! The network config flannel keeps at `<prefix>/config`, with flannel's defaults and rules.
//!
//! Keys match case-insensitively, as Go's JSON decoder matches them, so a config written for
//! flannel reads the same here. Every error names the field and the rule it broke.
use std::{fmt, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};

use overlay_common::DEFAULT_VXLAN_PORT;

/// Bytes VXLAN adds to every packet: outer Ethernet, IPv4, UDP and VXLAN headers.
pub const VXLAN_OVERHEAD: u32 = 50;
const DEFAULT_VNI: u32 = 1;
const MAX_VNI: u64 = (1 << 24) - 1;
/// The smallest underlay MTU that still leaves IPv4's minimum of 68 inside the tunnel.
const MIN_UNDERLAY_MTU: u64 = 68 + VXLAN_OVERHEAD as u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: VxlanBackend,
    /// `EnableNFTables`: the forward and masquerade rules go into nftables, not iptables.
    pub enable_nftables: bool,
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

        if !root.bool("EnableIPv4")?.unwrap_or(true) {
            return Err(invalid(
                "EnableIPv4",
                "overlay runs IPv4 networks only; it cannot be false",
            ));
        }
        if root.bool("EnableIPv6")?.unwrap_or(false) {
            return Err(invalid(
                "EnableIPv6",
                "overlay runs IPv4 networks only; IPv6 is not supported",
            ));
        }
        let network = root.string("Network")?.ok_or_else(|| {
            invalid(
                "Network",
                "missing; it names the cluster network, e.g. \"10.2.0.0/16\"",
            )
        })?;
        // ipnetwork reads a bare address as a /32; a config must spell its prefix out.
        let parsed = network
            .contains('/')
            .then(|| network.parse().ok())
            .flatten();
        let network: Ipv4Network = parsed.ok_or_else(|| {
            invalid(
                "Network",
                format!("{network:?} is not an IPv4 CIDR such as \"10.2.0.0/16\""),
            )
        })?;
        let network = Ipv4Network::new(network.network(), network.prefix())
            .map_err(|error| invalid("Network", error.to_string()))?;

        let subnet_len = subnet_len(network, root.integer("SubnetLen", 0, 32)?)?;
        let subnet_size = 1u32 << (32 - subnet_len);
        let subnet_min = root
            .address("SubnetMin")?
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(network.network()) + subnet_size));
        let subnet_max = root
            .address("SubnetMax")?
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(network.broadcast()) + 1 - subnet_size));
        for (field, address) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
            if !network.contains(address) {
                return Err(invalid(
                    field,
                    format!("{address} is not in the range of the Network {network}"),
                ));
            }
            if u32::from(address) % subnet_size != 0 {
                return Err(invalid(
                    field,
                    format!("{address} is not on a /{subnet_len} (SubnetLen) boundary"),
                ));
            }
        }
        if subnet_min > subnet_max {
            return Err(invalid(
                "SubnetMin",
                format!("{subnet_min} lies above SubnetMax {subnet_max}"),
            ));
        }

        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend: VxlanBackend::parse(root.object("Backend", "Backend.")?)?,
            enable_nftables: root.bool("EnableNFTables")?.unwrap_or(false),
        })
    }

    /// Whether `subnet` is one this config hands out: the right size, between SubnetMin and
    /// SubnetMax. A lease that does not fit is not reused.
    pub fn fits(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && (self.subnet_min..=self.subnet_max).contains(&subnet.network())
    }

    /// How many subnets lie between SubnetMin and SubnetMax: at most the 2^(SubnetLen −
    /// the Network's length) the Network holds.
    pub fn subnet_count(&self) -> u64 {
        let size = 1u64 << (32 - self.subnet_len);
        let span = u64::from(u32::from(self.subnet_max)) - u64::from(u32::from(self.subnet_min));
        span / size + 1
    }

    /// Every subnet between SubnetMin and SubnetMax, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        (u32::from(self.subnet_min)..=u32::from(self.subnet_max))
            .step_by(size as usize)
            .filter_map(|first| Ipv4Network::new(Ipv4Addr::from(first), self.subnet_len).ok())
    }
}

/// flannel's SubnetLen rules: default /24 for networks of /22 or larger, else network + 2;
/// never longer than /30, and always room for at least four subnets.
fn subnet_len(network: Ipv4Network, configured: Option<u64>) -> Result<u8, ConfigError> {
    let network_len = network.prefix();
    match configured {
        None | Some(0) if network_len > 28 => Err(invalid(
            "Network",
            format!("{network} is too small: the smallest useful network is a /28"),
        )),
        None | Some(0) if network_len <= 22 => Ok(24),
        None | Some(0) => Ok(network_len + 2),
        Some(len) if len > 30 => Err(invalid(
            "SubnetLen",
            format!("/{len} is too long: it must be /30 or shorter"),
        )),
        Some(len) if len < u64::from(network_len) + 2 => Err(invalid(
            "SubnetLen",
            format!(
                "/{len} leaves {network} room for fewer than four subnets: it must be /{} or longer",
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

    fn address(&self, key: &str) -> Result<Option<Ipv4Addr>, ConfigError> {
        self.string(key)?
            .map(|text| {
                text.parse().map_err(|_| {
                    invalid(self.name(key), format!("{text:?} is not an IPv4 address"))
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
                "EnableIPv6: overlay runs IPv4 networks only",
            ),
            (
                r#"{"Network": "10.2.0.0/16", "EnableIPv4": false, "Backend": {"Type": "vxlan"}}"#,
                "EnableIPv4: overlay runs IPv4 networks only",
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
