//! Ethernet addresses as flannel writes them in lease records ("1a:4b:d7:f7:16:89").
use std::{
    fmt,
    hash::{BuildHasher, RandomState},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address, as flannel gives its VTEP.
    pub fn random_local() -> Self {
        let random = random_u64().to_be_bytes();
        let mut octets = [0; 6];
        octets.copy_from_slice(&random[..6]);
        octets[0] = (octets[0] & 0xfe) | 0x02;
        Self(octets)
    }

    pub fn is_unicast(self) -> bool {
        self.0[0] & 0x01 == 0 && self.0 != [0; 6]
    }
}

/// A random number from the OS-seeded hasher keys std keeps: enough to pick MACs and subnets.
pub fn random_u64() -> u64 {
    RandomState::new().hash_one(std::time::Instant::now())
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct MacParseError(String);

impl fmt::Display for MacParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a MAC address such as \"1a:4b:d7:f7:16:89\"",
            self.0
        )
    }
}

impl std::error::Error for MacParseError {}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || MacParseError(text.to_string());
        let mut octets = [0; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts
                .next()
                .filter(|part| part.len() == 2)
                .ok_or_else(error)?;
            *octet = u8::from_str_radix(part, 16).map_err(|_| error())?;
        }
        if parts.next().is_some() {
            return Err(error());
        }
        Ok(Self(octets))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_flannels_form() {
        let mac: MacAddr = "1a:4B:d7:f7:16:89".parse().unwrap();
        assert_eq!(mac.0, [0x1a, 0x4b, 0xd7, 0xf7, 0x16, 0x89]);
        assert_eq!(mac.to_string(), "1a:4b:d7:f7:16:89");
        for bad in [
            "",
            "1a:4b:d7:f7:16",
            "1a:4b:d7:f7:16:89:00",
            "1a-4b-d7-f7-16-89",
            "1a:4b:d7:f7:16:8g",
            "1:4b:d7:f7:16:89",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let first = MacAddr::random_local();
        let second = MacAddr::random_local();
        assert_ne!(first, second);
        for mac in [first, second] {
            assert!(mac.is_unicast(), "{mac}");
            assert_eq!(mac.0[0] & 0x02, 0x02, "{mac} is locally administered");
        }
    }
}
