//! flannel's masquerade and forward-accept rules, as one nftables table of our own
//! (`table ip overlay`), replaced atomically and re-checked periodically.
//!
//! nftables has no rtnetlink counterpart, so the table goes through `nft -f -` as one
//! transaction: readers never see half a ruleset.
use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use ipnetwork::Ipv4Network;

pub const TABLE: &str = "overlay";

/// Which of flannel's rule sets the host wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub network: Ipv4Network,
    pub subnet: Ipv4Network,
    /// `--ip-masq`: NAT for traffic leaving the overlay.
    pub masquerade: bool,
    /// `--iptables-forward-rules`: accept forwarding to and from the overlay.
    pub forward: bool,
}

impl Rules {
    /// The table in nft syntax, or `None` when no rule is wanted.
    pub fn ruleset(&self) -> Option<String> {
        let (network, subnet) = (self.network, self.subnet);
        let mut chains = String::new();
        if self.masquerade {
            chains.push_str(&format!(
                "\tchain postrouting {{\n\
                 \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                 \t\tmeta mark & 0x00004000 == 0x00004000 return comment \"flanneld masq\"\n\
                 \t\tip saddr {subnet} ip daddr {network} return comment \"flanneld masq\"\n\
                 \t\tip saddr {network} ip daddr {subnet} return comment \"flanneld masq\"\n\
                 \t\tip saddr != {network} ip daddr {subnet} return comment \"flanneld masq\"\n\
                 \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random comment \"flanneld masq\"\n\
                 \t\tip saddr != {network} ip daddr {network} masquerade fully-random comment \"flanneld masq\"\n\
                 \t}}\n"
            ));
        }
        if self.forward {
            chains.push_str(&format!(
                "\tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy accept;\n\
                 \t\tip saddr {network} accept comment \"flanneld forward\"\n\
                 \t\tip daddr {network} accept comment \"flanneld forward\"\n\
                 \t}}\n"
            ));
        }
        (!chains.is_empty()).then(|| format!("table ip {TABLE} {{\n{chains}}}\n"))
    }
}

/// Keeps the table as [`Rules`] describe it.
pub struct Masquerade {
    rules: Rules,
    /// What `nft list table` printed right after our last write; any difference means someone
    /// changed or removed the table.
    last_listing: Option<String>,
}

impl Masquerade {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            last_listing: None,
        }
    }

    /// Rewrites the table if it is missing or differs from what we wrote.
    pub fn ensure(&mut self) -> Result<()> {
        let Some(ruleset) = self.rules.ruleset() else {
            return remove();
        };
        let listing = list()?;
        if listing.is_some() && listing == self.last_listing {
            return Ok(());
        }
        if self.last_listing.is_some() {
            log::warn!("nftables table {TABLE} was changed or removed; restoring it");
        }
        // Creating the table first makes the delete succeed whether or not it existed.
        nft_script(&format!(
            "add table ip {TABLE}\ndelete table ip {TABLE}\n{ruleset}"
        ))?;
        self.last_listing = list()?;
        Ok(())
    }
}

/// Removes the table, if present.
pub fn remove() -> Result<()> {
    nft_script(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// `nft list table ip overlay`, or `None` when the table does not exist.
fn list() -> Result<Option<String>> {
    let output = Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .output()
        .context("cannot run nft: is nftables installed?")?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

fn nft_script(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft: is nftables installed?")?;
    child
        .stdin
        .take()
        .context("nft has no stdin")?
        .write_all(script.as_bytes())
        .context("cannot send the ruleset to nft")?;
    let output = child.wait_with_output().context("nft did not finish")?;
    if !output.status.success() {
        bail!(
            "nft rejected the ruleset: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flannels_rules_for_the_seed() {
        let rules = Rules {
            network: "10.2.0.0/16".parse().unwrap(),
            subnet: "10.2.41.0/24".parse().unwrap(),
            masquerade: true,
            forward: true,
        };
        let ruleset = rules.ruleset().unwrap();
        for line in [
            "ip saddr 10.2.41.0/24 ip daddr 10.2.0.0/16 return",
            "ip saddr 10.2.0.0/16 ip daddr 10.2.41.0/24 return",
            "ip saddr != 10.2.0.0/16 ip daddr 10.2.41.0/24 return",
            "ip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
            "ip saddr != 10.2.0.0/16 ip daddr 10.2.0.0/16 masquerade fully-random",
            "ip saddr 10.2.0.0/16 accept",
            "ip daddr 10.2.0.0/16 accept",
        ] {
            assert!(ruleset.contains(line), "missing {line:?} in\n{ruleset}");
        }
        let none = Rules {
            masquerade: false,
            forward: false,
            ..rules
        };
        assert_eq!(none.ruleset(), None);
    }
}
