//! `EnableNFTables`: the table `ip flannel-ipv4` as flannel's nftables manager writes it, with
//! a `forward` and a `postrtg` chain, replaced as one `nft -f` transaction so that readers
//! never see half a ruleset.
use std::{
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use super::{KUBE_PROXY_MARK, MULTICAST, Rules};

const TABLE: &str = "flannel-ipv4";
/// The table versions before flannel's backends made; removed wherever it is found.
const LEGACY_TABLE: &str = "overlay";

/// The table in nft syntax, rule for rule as flannel writes it. (flannel's fourth masquerade
/// rule differs from its iptables twin: it returns for any source outside our subnet, so the
/// last rule never matches. Kept, so that a host behaves as under flannel.)
fn ruleset(rules: &Rules) -> String {
    let (network, subnet) = (rules.network, rules.subnet);
    let mut table = format!("table ip {TABLE} {{\n\tcomment \"rules for {TABLE}\"\n");
    if rules.forward {
        table.push_str(&format!(
            "\tchain forward {{\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tip saddr {network} accept\n\
             \t\tip daddr {network} accept\n\
             \t}}\n"
        ));
    }
    if rules.masquerade {
        let masquerade = if rules.fully_random {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        table.push_str(&format!(
            "\tchain postrtg {{\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark {KUBE_PROXY_MARK} return\n\
             \t\tip saddr {subnet} ip daddr {network} return\n\
             \t\tip saddr {network} ip daddr {subnet} return\n\
             \t\tip saddr != {subnet} ip daddr {network} return\n\
             \t\tip saddr {network} ip daddr != {MULTICAST} {masquerade}\n\
             \t\tip saddr != {network} ip daddr {network} {masquerade}\n\
             \t}}\n"
        ));
    }
    table.push_str("}\n");
    table
}

/// Replaces the table with what `rules` call for.
pub fn write(rules: &Rules) -> Result<()> {
    // Adding a table first makes the delete succeed whether or not it existed.
    nft_script(&format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\n{}",
        ruleset(rules)
    ))
}

/// `nft list table ip flannel-ipv4`, or `None` when the table does not exist.
pub fn listing() -> Result<Option<String>> {
    let output = Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .output()
        .context("cannot run nft: is nftables installed?")?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// Removes our table and the one earlier versions made, if present.
pub fn remove() -> Result<()> {
    if Command::new("nft").arg("--version").output().is_err() {
        // No nft on this host: no table of ours either.
        return Ok(());
    }
    remove_legacy()?;
    nft_script(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// Removes `table ip overlay`, which versions before the iptables backend wrote.
pub fn remove_legacy() -> Result<()> {
    nft_script(&format!(
        "add table ip {LEGACY_TABLE}\ndelete table ip {LEGACY_TABLE}\n"
    ))
}

/// Deletes iptables-nft's `table ip <name>`, left empty once our chains are gone. On a host
/// with iptables-legacy there is no such table and nothing happens.
pub fn delete_iptables_table(name: &str) {
    let _ = Command::new("nft")
        .args(["delete", "table", "ip", name])
        .stderr(Stdio::null())
        .status();
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
    use super::{super::tests::seed, *};

    #[test]
    fn flannels_nftables_rules_for_the_seed() {
        let table = ruleset(&seed(true));
        let rules: Vec<&str> = table
            .lines()
            .map(str::trim)
            .filter(|line| line.starts_with("ip ") || line.starts_with("meta "))
            .collect();
        assert_eq!(
            rules,
            [
                "ip saddr 10.2.0.0/16 accept",
                "ip daddr 10.2.0.0/16 accept",
                "meta mark 0x4000 return",
                "ip saddr 10.2.41.0/24 ip daddr 10.2.0.0/16 return",
                "ip saddr 10.2.0.0/16 ip daddr 10.2.41.0/24 return",
                "ip saddr != 10.2.41.0/24 ip daddr 10.2.0.0/16 return",
                "ip saddr 10.2.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
                "ip saddr != 10.2.0.0/16 ip daddr 10.2.0.0/16 masquerade fully-random",
            ]
        );
        assert!(table.starts_with("table ip flannel-ipv4 {"));
        assert!(table.contains("chain forward {"));
        assert!(table.contains("chain postrtg {"));
    }

    #[test]
    fn without_fully_random_or_masquerade() {
        let plain = ruleset(&seed(false));
        assert!(plain.contains("ip daddr != 224.0.0.0/4 masquerade\n"));
        let forward_only = ruleset(&Rules {
            masquerade: false,
            ..seed(true)
        });
        assert!(!forward_only.contains("postrtg"));
        assert!(forward_only.contains("chain forward {"));
    }
}
