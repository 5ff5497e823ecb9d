//! flannel's default: the chains `FLANNEL-FWD` and `FLANNEL-POSTRTG`, each jumped to from the
//! built-in chain it belongs to, with flannel's exact rules and comments, in iptables for IPv4
//! and ip6tables for IPv6, each command run with a deadline ([`command::run`]) and told to
//! wait for the xtables lock for a few seconds at most.
use anyhow::{Context, Result, anyhow, bail};

use super::{
    FORWARD_COMMENT, Family, FamilyRules, KUBE_PROXY_MARK, MASQUERADE_COMMENT,
    command::{self, LOCK_WAIT_SECONDS},
};

const FORWARD_CHAIN: &str = "FLANNEL-FWD";
const MASQUERADE_CHAIN: &str = "FLANNEL-POSTRTG";
/// The first iptables release with `--random-fully`, the version flannel checks for.
const RANDOM_FULLY_SINCE: (u32, u32, u32) = (1, 6, 2);

/// One of our chains: where it lives and the comment on its rules.
struct Chain {
    table: &'static str,
    /// The built-in chain that jumps to ours.
    hook: &'static str,
    name: &'static str,
    comment: &'static str,
}

const FORWARD: Chain = Chain {
    table: "filter",
    hook: "FORWARD",
    name: FORWARD_CHAIN,
    comment: FORWARD_COMMENT,
};

const MASQUERADE: Chain = Chain {
    table: "nat",
    hook: "POSTROUTING",
    name: MASQUERADE_CHAIN,
    comment: MASQUERADE_COMMENT,
};

impl Chain {
    fn comment(&self) -> String {
        format!("-m comment --comment \"{}\"", self.comment)
    }

    /// The rule in the built-in chain that sends packets to ours.
    fn jump(&self) -> String {
        format!("{} -j {}", self.comment(), self.name)
    }

    /// The jump as `-S` lists it.
    fn jump_line(&self) -> String {
        format!("-A {} {}", self.hook, self.jump())
    }

    /// Whether `line` of `-S` is ours: the chain, a rule in it, or our jump into it. A jump
    /// of someone else's into it (with matches of its own) and a chain named after it are
    /// theirs: counting them would make every check find our rules changed.
    fn owns(&self, line: &str) -> bool {
        line.strip_prefix("-N ") == Some(self.name)
            || line
                .strip_prefix("-A ")
                .and_then(|rule| rule.strip_prefix(self.name))
                .is_some_and(|rest| rest.starts_with(' '))
            || line == self.jump_line()
    }

    /// The rules of others in `listed` (`-S` of the chain's table) that send packets to it.
    /// While there are any, the kernel refuses to delete the chain.
    fn jumps_of_others<'a>(&self, listed: &'a [String]) -> Vec<&'a str> {
        listed
            .iter()
            .filter(|line| line.starts_with("-A ") && !self.owns(line))
            .filter(|line| {
                split_rule(line)
                    .windows(2)
                    .any(|words| matches!(words[0].as_str(), "-j" | "-g") && words[1] == self.name)
            })
            .map(String::as_str)
            .collect()
    }
}

fn forward_rules(rules: &FamilyRules) -> Vec<String> {
    let (network, comment) = (rules.network, FORWARD.comment());
    vec![
        format!("-s {network} {comment} -j ACCEPT"),
        format!("-d {network} {comment} -j ACCEPT"),
    ]
}

fn masquerade_rules(rules: &FamilyRules) -> Vec<String> {
    let (network, subnet, comment) = (rules.network, rules.subnet, MASQUERADE.comment());
    let multicast = rules.family.multicast();
    let masquerade = if rules.fully_random {
        "MASQUERADE --random-fully"
    } else {
        "MASQUERADE"
    };
    vec![
        format!("-m mark --mark {KUBE_PROXY_MARK}/{KUBE_PROXY_MARK} {comment} -j RETURN"),
        format!("-s {subnet} -d {network} {comment} -j RETURN"),
        format!("-s {network} -d {subnet} {comment} -j RETURN"),
        format!("! -s {network} -d {subnet} {comment} -j RETURN"),
        format!("-s {network} ! -d {multicast} {comment} -j {masquerade}"),
        format!("! -s {network} -d {network} {comment} -j {masquerade}"),
    ]
}

/// Makes our chains and jumps what `rules` call for, and removes the ones they do not, in the
/// iptables of `rules`' family.
pub fn write(rules: &FamilyRules) -> Result<()> {
    let command = command(rules.family);
    let iptables = open(rules.family)?;
    for (chain, wanted) in wanted_chains(rules) {
        match wanted {
            Some(wanted) => install(&iptables, &chain, &wanted),
            None => uninstall(&iptables, &chain),
        }
        .with_context(|| format!("cannot set up the {command} chain {}", chain.name))?;
    }
    Ok(())
}

/// Whether our chains, their rules in order and the jumps into them are exactly what `rules`
/// call for, as `iptables -S` lists them (our rule texts are written in that form).
pub fn in_place(rules: &FamilyRules) -> Result<bool> {
    let command = command(rules.family);
    let iptables = open(rules.family)?;
    for (chain, wanted) in wanted_chains(rules) {
        let listed = iptables
            .list_table(chain.table)
            .with_context(|| format!("cannot list the {command} {} table", chain.table))?;
        let expected: Vec<String> = match wanted {
            Some(chain_rules) => [format!("-N {}", chain.name), chain.jump_line()]
                .into_iter()
                .chain(
                    chain_rules
                        .iter()
                        .map(|rule| format!("-A {} {rule}", chain.name)),
                )
                .collect(),
            // Left empty while others jump to it (`uninstall`).
            None if !chain.jumps_of_others(&listed).is_empty() => {
                vec![format!("-N {}", chain.name)]
            }
            None => Vec::new(),
        };
        let ours: Vec<String> = listed.into_iter().filter(|line| chain.owns(line)).collect();
        if !same_lines(ours, expected) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The same lines, with the rules of our chain in the same order.
fn same_lines(mut listed: Vec<String>, mut expected: Vec<String>) -> bool {
    let in_order = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|line| line.starts_with("-A FLANNEL-"))
            .cloned()
            .collect()
    };
    if in_order(&listed) != in_order(&expected) {
        return false;
    }
    listed.sort_unstable();
    expected.sort_unstable();
    listed == expected
}

/// Each chain with its rules, or `None` where `rules` do not want it.
fn wanted_chains(rules: &FamilyRules) -> [(Chain, Option<Vec<String>>); 2] {
    [
        (FORWARD, rules.forward.then(|| forward_rules(rules))),
        (
            MASQUERADE,
            rules.masquerade.then(|| masquerade_rules(rules)),
        ),
    ]
}

/// Removes our chains and the jumps into them from `family`'s iptables, wherever they are.
pub fn remove(family: Family) -> Result<()> {
    let Ok(iptables) = open(family) else {
        // No iptables for this family on this host: nothing of ours can be there.
        return Ok(());
    };
    for chain in [FORWARD, MASQUERADE] {
        uninstall(&iptables, &chain).with_context(|| {
            format!("cannot remove the {} chain {}", command(family), chain.name)
        })?;
        if iptables.nf_tables && holds_nothing(&iptables, chain.table) {
            super::nftables::delete_iptables_table(family, chain.table)?;
        }
    }
    Ok(())
}

/// Whether `table` holds only built-in chains with no rules and policy ACCEPT: what iptables-nft
/// creates on first use, and what has no effect on any packet. Only with iptables-nft is the
/// table an nftables table; with iptables-legacy an nftables table of that name is another
/// program's (an administrator's) and never ours to delete.
fn holds_nothing(iptables: &Iptables, table: &str) -> bool {
    iptables.list_table(table).is_ok_and(|lines| {
        lines
            .iter()
            .all(|line| line.starts_with("-P ") && line.ends_with(" ACCEPT"))
    })
}

/// Whether `family`'s filter `FORWARD` chain has policy DROP, as Docker sets it (in ip6tables
/// only with its ip6tables support on). A host without iptables has no such chain.
pub fn forward_policy_drops(family: Family) -> Result<bool> {
    let Ok(iptables) = open(family) else {
        return Ok(false);
    };
    let listed = iptables
        .list(FORWARD.table, FORWARD.hook)
        .with_context(|| format!("cannot list {}' {} chain", command(family), FORWARD.hook))?;
    Ok(listed.contains(&format!("-P {} DROP", FORWARD.hook)))
}

/// Whether the host's iptables for `family` knows `--random-fully`.
pub fn supports_random_fully(family: Family) -> bool {
    command::run(command(family), &["--version"], None)
        .ok()
        .and_then(|output| version(&String::from_utf8_lossy(&output.stdout)))
        .is_some_and(|version| version >= RANDOM_FULLY_SINCE)
}

/// The version in `iptables --version` output, "iptables v1.8.9 (nf_tables)" (ip6tables
/// prints the same with its own name).
fn version(output: &str) -> Option<(u32, u32, u32)> {
    let version = output
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))?;
    let mut numbers = version.split('.').map(|number| number.parse().ok());
    Some((numbers.next()??, numbers.next()??, numbers.next()??))
}

/// The command that holds `family`'s rules.
pub fn command(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// The host's iptables for `family`; an error when it cannot run.
fn open(family: Family) -> Result<Iptables> {
    let program = command(family);
    let version = command::run(program, &["--version"], None)
        .ok()
        .filter(|output| output.status.success())
        .ok_or_else(|| {
            anyhow!(
                "cannot run {program}: install iptables, or set EnableNFTables in the network \
                 config to use nftables"
            )
        })?;
    let version = String::from_utf8_lossy(&version.stdout);
    Ok(Iptables {
        program,
        nf_tables: version.contains("nf_tables"),
        restore: restore_command(program, &version),
    })
}

/// The `iptables-restore` of the same kind as `program`, from its `--version` output:
/// iptables-nft and iptables-legacy each ship theirs under their own name, and which one a
/// plain `iptables-restore` is need not follow which one `iptables` is (a PATH, a
/// distribution's alternatives); iptables before 1.8 has only the one.
fn restore_command(program: &str, version: &str) -> String {
    let kind = if version.contains("(nf_tables)") {
        "-nft"
    } else if version.contains("(legacy)") {
        "-legacy"
    } else {
        ""
    };
    format!("{program}{kind}-restore")
}

/// `iptables` or `ip6tables`: each call one command with a deadline, waiting for the xtables
/// lock for [`LOCK_WAIT_SECONDS`] at most.
struct Iptables {
    program: &'static str,
    /// iptables-nft, whose tables are nftables tables, rather than iptables-legacy.
    nf_tables: bool,
    /// The matching `iptables-restore`.
    restore: String,
}

impl Iptables {
    /// Runs `-t table args...`; the exit status and output are the caller's to judge.
    fn run(&self, table: &str, args: &[&str]) -> Result<std::process::Output> {
        let args = [&["-w", LOCK_WAIT_SECONDS, "-t", table], args].concat();
        command::run(self.program, &args, None)
    }

    /// Runs `-t table args...`; its output, or an error naming the command and what it said.
    fn checked(&self, table: &str, args: &[&str]) -> Result<String> {
        let output = succeeded(self.run(table, args)?, || {
            format!("{} -t {table} {}", self.program, args.join(" "))
        })?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `<program>-restore --noflush`, fed `input`: one transaction, which leaves the chains
    /// `input` does not declare as they are.
    fn restore(&self, input: &str) -> Result<()> {
        let args = ["-w", LOCK_WAIT_SECONDS, "--noflush"];
        let output = command::run(&self.restore, &args, Some(input))?;
        succeeded(output, || format!("{} {}", self.restore, args.join(" ")))
            .with_context(|| format!("{} was given:\n{input}", self.restore))
            .map(drop)
    }

    /// `-S`: the table's chains and rules, as `iptables-save` writes them (`-L` would look
    /// every address up in DNS: seconds per rule where no resolver answers).
    fn list_table(&self, table: &str) -> Result<Vec<String>> {
        Ok(lines(&self.checked(table, &["-S"])?))
    }

    fn list(&self, table: &str, chain: &str) -> Result<Vec<String>> {
        Ok(lines(&self.checked(table, &["-S", chain])?))
    }

    fn chain_command(&self, table: &str, option: &str, chain: &str) -> Result<()> {
        self.checked(table, &[option, chain]).map(drop)
    }

    fn rule_command(&self, table: &str, option: &str, chain: &str, rule: &str) -> Result<()> {
        let words = split_rule(rule);
        let args: Vec<&str> = [option, chain]
            .into_iter()
            .chain(words.iter().map(String::as_str))
            .collect();
        self.checked(table, &args).map(drop)
    }

    /// `-C`: whether `chain` holds `rule`.
    fn exists(&self, table: &str, chain: &str, rule: &str) -> Result<bool> {
        let words = split_rule(rule);
        let args: Vec<&str> = ["-C", chain]
            .into_iter()
            .chain(words.iter().map(String::as_str))
            .collect();
        let output = self.run(table, &args)?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!(
                "`{} -t {table} {}` failed: {}",
                self.program,
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }
    }

    fn delete_all(&self, table: &str, chain: &str, rule: &str) -> Result<()> {
        while self.exists(table, chain, rule)? {
            self.rule_command(table, "-D", chain, rule)?;
        }
        Ok(())
    }
}

/// `output`, or an error naming the command `line` and what it said.
fn succeeded(
    output: std::process::Output,
    line: impl FnOnce() -> String,
) -> Result<std::process::Output> {
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            line(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

fn lines(output: &str) -> Vec<String> {
    output.lines().map(str::to_string).collect()
}

/// A rule's words as iptables takes them: split at spaces, a double-quoted part one word
/// without its quotes (`--comment "flanneld masq"`).
fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for character in rule.chars() {
        match character {
            '"' => quoted = !quoted,
            ' ' if !quoted => words.extend((!word.is_empty()).then(|| std::mem::take(&mut word))),
            _ => word.push(character),
        }
    }
    words.extend((!word.is_empty()).then_some(word));
    words
}

/// Writes the chain's whole content, and exactly one jump into it, in one
/// `iptables-restore --noflush` transaction: declaring the chain creates it or empties it, and
/// the kernel swaps the old content for the new at once (as flanneld writes its rules), so no
/// packet ever meets a node without them, as it would between a flush and the appends.
fn install(iptables: &Iptables, chain: &Chain, rules: &[String]) -> Result<()> {
    let jump = chain.jump_line();
    let jumps = iptables
        .list(chain.table, chain.hook)?
        .iter()
        .filter(|line| **line == jump)
        .count();
    iptables.restore(&restore_input(chain, rules, jumps))
}

/// `iptables-restore` input that fills `chain` with `rules` and leaves one jump into it in its
/// built-in chain, which holds `jumps` now: appended where there is none, the others deleted
/// where there are more (a copy left by hand or by another tool would otherwise never match
/// what we expect, and be rewritten at every check).
fn restore_input(chain: &Chain, rules: &[String], jumps: usize) -> String {
    let mut lines = vec![
        format!("*{}", chain.table),
        format!(":{} - [0:0]", chain.name),
    ];
    lines.extend(rules.iter().map(|rule| format!("-A {} {rule}", chain.name)));
    if jumps == 0 {
        lines.push(chain.jump_line());
    }
    lines.extend((1..jumps).map(|_| format!("-D {} {}", chain.hook, chain.jump())));
    lines.push("COMMIT\n".to_string());
    lines.join("\n")
}

/// Removes our jumps into `chain`, its rules, and the chain itself, unless rules of others
/// still jump to it: then it stays, empty, which sends their packets straight back.
fn uninstall(iptables: &Iptables, chain: &Chain) -> Result<()> {
    let listed = iptables.list_table(chain.table)?;
    if !listed
        .iter()
        .any(|line| line.strip_prefix("-N ") == Some(chain.name))
    {
        return Ok(());
    }
    iptables.delete_all(chain.table, chain.hook, &chain.jump())?;
    iptables.chain_command(chain.table, "-F", chain.name)?;
    let others = chain.jumps_of_others(&listed);
    if !others.is_empty() {
        log::warn!(
            "{} chain {} is no longer wanted, but rules we did not write jump to it ({}): \
             left empty, and removed once they are gone",
            iptables.program,
            chain.name,
            others.join("; ")
        );
        return Ok(());
    }
    iptables.chain_command(chain.table, "-X", chain.name)
}

#[cfg(test)]
mod tests {
    use super::{super::tests::seed_family, *};

    const MASQ: &str = "-m comment --comment \"flanneld masq\"";
    const FORWARDED: &str = "-m comment --comment \"flanneld forward\"";

    #[test]
    fn flannels_forward_chain() {
        assert_eq!((FORWARD.table, FORWARD.hook), ("filter", "FORWARD"));
        assert_eq!(FORWARD.jump(), format!("{FORWARDED} -j FLANNEL-FWD"));
        assert_eq!(
            forward_rules(&seed_family(Family::V4, true)),
            [
                format!("-s 10.2.0.0/16 {FORWARDED} -j ACCEPT"),
                format!("-d 10.2.0.0/16 {FORWARDED} -j ACCEPT"),
            ]
        );
        assert_eq!(
            forward_rules(&seed_family(Family::V6, true)),
            [
                format!("-s fc00::/48 {FORWARDED} -j ACCEPT"),
                format!("-d fc00::/48 {FORWARDED} -j ACCEPT"),
            ]
        );
    }

    #[test]
    fn flannels_masquerade_chain() {
        assert_eq!((MASQUERADE.table, MASQUERADE.hook), ("nat", "POSTROUTING"));
        assert_eq!(MASQUERADE.jump(), format!("{MASQ} -j FLANNEL-POSTRTG"));
        assert_eq!(
            masquerade_rules(&seed_family(Family::V4, true)),
            [
                format!("-m mark --mark 0x4000/0x4000 {MASQ} -j RETURN"),
                format!("-s 10.2.41.0/24 -d 10.2.0.0/16 {MASQ} -j RETURN"),
                format!("-s 10.2.0.0/16 -d 10.2.41.0/24 {MASQ} -j RETURN"),
                format!("! -s 10.2.0.0/16 -d 10.2.41.0/24 {MASQ} -j RETURN"),
                format!("-s 10.2.0.0/16 ! -d 224.0.0.0/4 {MASQ} -j MASQUERADE --random-fully"),
                format!("! -s 10.2.0.0/16 -d 10.2.0.0/16 {MASQ} -j MASQUERADE --random-fully"),
            ]
        );
        assert!(masquerade_rules(&seed_family(Family::V4, false))[4].ends_with("-j MASQUERADE"));
    }

    /// flannel's masqIP6Rules: the IPv4 rules with IPv6 networks, and IPv6 multicast left alone.
    #[test]
    fn flannels_ipv6_masquerade_chain() {
        assert_eq!(
            masquerade_rules(&seed_family(Family::V6, true)),
            [
                format!("-m mark --mark 0x4000/0x4000 {MASQ} -j RETURN"),
                format!("-s fc00:0:0:41::/64 -d fc00::/48 {MASQ} -j RETURN"),
                format!("-s fc00::/48 -d fc00:0:0:41::/64 {MASQ} -j RETURN"),
                format!("! -s fc00::/48 -d fc00:0:0:41::/64 {MASQ} -j RETURN"),
                format!("-s fc00::/48 ! -d ff00::/8 {MASQ} -j MASQUERADE --random-fully"),
                format!("! -s fc00::/48 -d fc00::/48 {MASQ} -j MASQUERADE --random-fully"),
            ]
        );
        let plain = masquerade_rules(&seed_family(Family::V6, false));
        assert_eq!(
            plain[4..],
            [
                format!("-s fc00::/48 ! -d ff00::/8 {MASQ} -j MASQUERADE"),
                format!("! -s fc00::/48 -d fc00::/48 {MASQ} -j MASQUERADE"),
            ]
        );
    }

    #[test]
    fn a_chain_is_written_in_one_restore_transaction() {
        let rules = forward_rules(&seed_family(Family::V4, true));
        assert_eq!(
            restore_input(&FORWARD, &rules, 0),
            format!(
                "*filter\n:FLANNEL-FWD - [0:0]\n-A FLANNEL-FWD {}\n-A FLANNEL-FWD {}\n\
                 -A FORWARD {FORWARDED} -j FLANNEL-FWD\nCOMMIT\n",
                rules[0], rules[1]
            )
        );
        assert!(!restore_input(&FORWARD, &rules, 1).contains(" FORWARD "));
        let extra = format!("-D FORWARD {FORWARDED} -j FLANNEL-FWD");
        assert_eq!(
            restore_input(&FORWARD, &rules, 3).matches(&extra).count(),
            2,
            "a jump listed three times is deleted twice"
        );
    }

    #[test]
    fn only_our_chain_its_rules_and_our_jump_are_ours() {
        let jump = MASQUERADE.jump_line();
        for line in [
            "-N FLANNEL-POSTRTG",
            "-A FLANNEL-POSTRTG -s 10.2.0.0/16 -j RETURN",
            jump.as_str(),
        ] {
            assert!(MASQUERADE.owns(line), "{line}");
        }
        for line in [
            "-A POSTROUTING -o eth0 -j FLANNEL-POSTRTG",
            "-N FLANNEL-POSTRTG-LOCAL",
            "-A FLANNEL-POSTRTG-LOCAL -j RETURN",
            "-A POSTROUTING -j FLANNEL-POSTRTG-LOCAL",
            "-P POSTROUTING ACCEPT",
        ] {
            assert!(!MASQUERADE.owns(line), "{line}");
        }
    }

    #[test]
    fn others_jumping_to_our_chain_are_found_by_their_target() {
        let listed: Vec<String> = [
            "-N FLANNEL-POSTRTG",
            "-A FLANNEL-POSTRTG -s 10.2.0.0/16 -j RETURN",
            &MASQUERADE.jump_line(),
            "-A POSTROUTING -o eth0 -j FLANNEL-POSTRTG",
            "-A KUBE-POSTROUTING -m comment --comment \"-j FLANNEL-POSTRTG\" -g FLANNEL-POSTRTG",
            "-A POSTROUTING -j FLANNEL-POSTRTG-LOCAL",
            "-A POSTROUTING -m comment --comment \"-j FLANNEL-POSTRTG\" -j MASQUERADE",
        ]
        .map(str::to_string)
        .to_vec();
        assert_eq!(
            MASQUERADE.jumps_of_others(&listed),
            [
                "-A POSTROUTING -o eth0 -j FLANNEL-POSTRTG",
                "-A KUBE-POSTROUTING -m comment --comment \"-j FLANNEL-POSTRTG\" -g FLANNEL-POSTRTG",
            ]
        );
    }

    #[test]
    fn iptables_restore_of_the_same_kind() {
        assert_eq!(
            restore_command("iptables", "iptables v1.8.9 (nf_tables)\n"),
            "iptables-nft-restore"
        );
        assert_eq!(
            restore_command("ip6tables", "ip6tables v1.8.9 (legacy)\n"),
            "ip6tables-legacy-restore"
        );
        assert_eq!(
            restore_command("iptables", "iptables v1.6.1\n"),
            "iptables-restore"
        );
    }

    #[test]
    fn a_quoted_comment_is_one_word() {
        assert_eq!(
            split_rule(&MASQUERADE.jump()),
            [
                "-m",
                "comment",
                "--comment",
                "flanneld masq",
                "-j",
                "FLANNEL-POSTRTG"
            ]
        );
    }

    #[test]
    fn each_family_has_its_own_command() {
        assert_eq!(command(Family::V4), "iptables");
        assert_eq!(command(Family::V6), "ip6tables");
    }

    #[test]
    fn random_fully_from_the_version() {
        assert_eq!(version("iptables v1.8.9 (nf_tables)\n"), Some((1, 8, 9)));
        assert_eq!(version("ip6tables v1.8.9 (legacy)\n"), Some((1, 8, 9)));
        assert_eq!(version("iptables v1.6.1\n"), Some((1, 6, 1)));
        assert_eq!(version("command not found"), None);
        assert!(version("iptables v1.6.2").unwrap() >= RANDOM_FULLY_SINCE);
        assert!(version("iptables v1.4.21").unwrap() < RANDOM_FULLY_SINCE);
    }
}
