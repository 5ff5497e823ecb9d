//! `EnableNFTables`: the tables `ip flannel-ipv4` and `ip6 flannel-ipv6` as flannel's nftables
//! manager writes them, each with a `forward` and a `postrtg` chain, replaced as one `nft -f`
//! transaction so that readers never see half a ruleset.
use anyhow::{Result, bail};

use super::{Family, FamilyRules, KUBE_PROXY_MARK, command};

/// The table versions before flannel's backends made; removed wherever it is found.
const LEGACY_TABLE: &str = "overlay";

/// The nftables family keyword, which is also the one of the address matches in its rules.
fn keyword(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Our table for `family`, as flannel names it.
fn table(family: Family) -> &'static str {
    match family {
        Family::V4 => "flannel-ipv4",
        Family::V6 => "flannel-ipv6",
    }
}

/// The table in nft syntax, rule for rule as flannel writes it. (flannel's fourth masquerade
/// rule differs from its iptables twin: it returns for any source outside our subnet, so the
/// last rule never matches. Kept, so that a host behaves as under flannel.)
fn ruleset(rules: &FamilyRules) -> String {
    let (network, subnet) = (rules.network, rules.subnet);
    let (ip, name) = (keyword(rules.family), table(rules.family));
    let mut table = format!("table {ip} {name} {{\n\tcomment \"rules for {name}\"\n");
    if rules.forward {
        table.push_str(&format!(
            "\tchain forward {{\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\t{ip} saddr {network} accept\n\
             \t\t{ip} daddr {network} accept\n\
             \t}}\n"
        ));
    }
    if rules.masquerade {
        let masquerade = if rules.fully_random {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        let multicast = rules.family.multicast();
        table.push_str(&format!(
            "\tchain postrtg {{\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark {KUBE_PROXY_MARK} return\n\
             \t\t{ip} saddr {subnet} {ip} daddr {network} return\n\
             \t\t{ip} saddr {network} {ip} daddr {subnet} return\n\
             \t\t{ip} saddr != {subnet} {ip} daddr {network} return\n\
             \t\t{ip} saddr {network} {ip} daddr != {multicast} {masquerade}\n\
             \t\t{ip} saddr != {network} {ip} daddr {network} {masquerade}\n\
             \t}}\n"
        ));
    }
    table.push_str("}\n");
    table
}

/// Replaces the table of `rules`' family with what they call for.
pub fn write(rules: &FamilyRules) -> Result<()> {
    nft_script(&format!(
        "{}{}",
        delete_script(rules.family, table(rules.family)),
        ruleset(rules)
    ))
}

/// `nft list table ip flannel-ipv4` (or `ip6 flannel-ipv6`), or `None` when the table does not
/// exist.
pub fn listing(family: Family) -> Result<Option<String>> {
    let output = command::run(
        "nft",
        &["list", "table", keyword(family), table(family)],
        None,
    )?;
    Ok(output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// Removes our table for `family`, and for IPv4 the one earlier versions made, if present.
pub fn remove(family: Family) -> Result<()> {
    if command::run("nft", &["--version"], None).is_err() {
        // No nft on this host: no table of ours either.
        return Ok(());
    }
    if family == Family::V4 {
        remove_legacy()?;
    }
    nft_script(&delete_script(family, table(family)))
}

/// Removes `table ip overlay`, which versions before the iptables backend wrote.
pub fn remove_legacy() -> Result<()> {
    nft_script(&delete_script(Family::V4, LEGACY_TABLE))
}

/// Deletes `table`; adding it first makes the delete succeed whether or not it existed.
fn delete_script(family: Family, table: &str) -> String {
    let ip = keyword(family);
    format!("add table {ip} {table}\ndelete table {ip} {table}\n")
}

/// Deletes iptables-nft's `table ip <name>` (`ip6` for IPv6), left empty once our chains are
/// gone; one already gone is no error. Only for iptables-nft: with iptables-legacy, an
/// nftables table of that name is somebody else's.
pub fn delete_iptables_table(family: Family, name: &str) -> Result<()> {
    command::run("nft", &["delete", "table", keyword(family), name], None).map(drop)
}

fn nft_script(script: &str) -> Result<()> {
    let output = command::run("nft", &["-f", "-"], Some(script))?;
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
    use super::{super::tests::seed_family, *};

    /// The rules of `table`, without the chains' heads.
    fn rule_lines(table: &str) -> Vec<&str> {
        table
            .lines()
            .map(str::trim)
            .filter(|line| {
                ["ip ", "ip6 ", "meta "]
                    .iter()
                    .any(|start| line.starts_with(start))
            })
            .collect()
    }

    #[test]
    fn flannels_nftables_rules_for_the_seed() {
        let table = ruleset(&seed_family(Family::V4, true));
        assert_eq!(
            rule_lines(&table),
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
        assert!(table.starts_with("table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\""));
        assert!(table.contains("chain forward {"));
        assert!(table.contains("chain postrtg {"));
    }

    #[test]
    fn flannels_ipv6_nftables_rules_for_the_seed() {
        let table = ruleset(&seed_family(Family::V6, true));
        assert_eq!(
            rule_lines(&table),
            [
                "ip6 saddr fc00::/48 accept",
                "ip6 daddr fc00::/48 accept",
                "meta mark 0x4000 return",
                "ip6 saddr fc00:0:0:41::/64 ip6 daddr fc00::/48 return",
                "ip6 saddr fc00::/48 ip6 daddr fc00:0:0:41::/64 return",
                "ip6 saddr != fc00:0:0:41::/64 ip6 daddr fc00::/48 return",
                "ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random",
                "ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade fully-random",
            ]
        );
        assert!(
            table.starts_with("table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"")
        );
    }

    #[test]
    fn without_fully_random_or_masquerade() {
        let plain = ruleset(&seed_family(Family::V4, false));
        assert!(plain.contains("ip daddr != 224.0.0.0/4 masquerade\n"));
        let plain = ruleset(&seed_family(Family::V6, false));
        assert!(plain.contains("ip6 daddr != ff00::/8 masquerade\n"));
        let forward_only = ruleset(&FamilyRules {
            masquerade: false,
            ..seed_family(Family::V6, true)
        });
        assert!(!forward_only.contains("postrtg"));
        assert!(forward_only.contains("chain forward {"));
    }

    #[test]
    fn each_family_deletes_its_own_table() {
        assert_eq!(
            delete_script(Family::V6, table(Family::V6)),
            "add table ip6 flannel-ipv6\ndelete table ip6 flannel-ipv6\n"
        );
        assert_eq!(
            delete_script(Family::V4, LEGACY_TABLE),
            "add table ip overlay\ndelete table ip overlay\n"
        );
    }
}
