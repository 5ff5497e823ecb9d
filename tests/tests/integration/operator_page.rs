//! The operator's page stays true: the README's flag table names exactly the flags the agent
//! takes, and its walkthrough for two hosts runs as written.
use std::{collections::BTreeSet, fs};

use anyhow::{Context, Result, ensure};
use overlay_tests::{
    agent::agent_binary,
    cluster::{Cluster, Host},
    netns::run,
    package::built_package,
    scratch::ScratchDir,
    seed::{HOST1, HOST2},
    walkthrough::{Block, WalkthroughHost, blocks},
};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
const FLAG_TABLE_HEADER: &str = "| flag | default | IPv6 | meaning |";
/// The walkthrough's etcd prefix: flannel's default, which the seed's tests do not use.
const SUBNETS: &str = "/coreos.com/network/subnets";

fn readme() -> Result<String> {
    fs::read_to_string(README).with_context(|| format!("cannot read {README}"))
}

/// The flags a `--help` text lists: the first word of each comma-separated name at the start
/// of an option's line (`-h, --help`, `--iface <IFACE>`).
fn flags_in_help(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .flat_map(|line| line.split(", ").take_while(|name| name.starts_with('-')))
        .filter_map(|name| name.split_whitespace().next())
        .filter(|name| name.len() > 1 && name != &"--")
        .map(str::to_string)
        .collect()
}

/// The flags the first column of the README's flag table names, in backticks.
fn flags_in_table(readme: &str) -> Result<BTreeSet<String>> {
    let table = readme
        .split_once(FLAG_TABLE_HEADER)
        .context("the README has no flag table")?
        .1;
    Ok(table
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .filter_map(|row| row.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .flat_map(str::split_whitespace)
        .filter(|word| word.starts_with('-'))
        .map(str::to_string)
        .collect())
}

fn agent_help(args: &[&str]) -> Result<String> {
    run(std::process::Command::new(agent_binary()?).args(args))
}

/// The commands a `--help` text lists under `Commands:`, but `help`.
fn commands_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| *line != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|command| *command != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn the_flag_table_names_every_flag_the_agent_takes() -> Result<()> {
    let help = agent_help(&["--help"])?;
    let mut taken = flags_in_help(&help);
    for command in commands_in_help(&help) {
        taken.extend(flags_in_help(&agent_help(&[&command, "--help"])?));
    }
    let documented = flags_in_table(&readme()?)?;
    let missing: Vec<_> = taken.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&taken).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "the README's flag table lacks {missing:?} and names {unknown:?}, which the agent does \
         not take"
    );
    Ok(())
}

/// The walkthrough's two hosts: the seed's host1 and host2 on an underlay with a real etcd.
struct Hosts {
    // Field order is drop order: the walkthrough hosts' processes before their namespaces.
    walkthrough: Vec<WalkthroughHost>,
    hosts: Vec<Host>,
    cluster: Cluster,
    _dir: ScratchDir,
}

impl Hosts {
    fn start() -> Result<Self> {
        let mut cluster = Cluster::new("walkthrough")?;
        let hosts = vec![
            cluster.add_host("host1", HOST1)?,
            cluster.add_host("host2", HOST2)?,
        ];
        let dir = ScratchDir::new("walkthrough")?;
        let agent = agent_binary()?;
        let package = built_package()?;
        let mut walkthrough = Vec::new();
        for host in &hosts {
            let host_dir = dir.path().join(&host.name);
            let walkthrough_host = WalkthroughHost::new(host, &host_dir, &agent)?;
            let file_name = package.file_name().context("the package has a file name")?;
            fs::copy(&package, host_dir.join(file_name)).context("cannot copy the package")?;
            walkthrough.push(walkthrough_host);
        }
        Ok(Self {
            walkthrough,
            hosts,
            cluster,
            _dir: dir,
        })
    }

    fn named(&self, name: &str) -> Result<(&Host, &WalkthroughHost)> {
        let index = self
            .hosts
            .iter()
            .position(|host| host.name == name)
            .with_context(|| format!("the walkthrough names {name}, which the test lacks"))?;
        Ok((&self.hosts[index], &self.walkthrough[index]))
    }

    /// Runs `block` on each of its hosts; returns each host's output.
    fn run(&self, block: &Block) -> Result<Vec<(String, String)>> {
        let mut outputs = Vec::new();
        for name in &block.hosts {
            let (_, host) = self.named(name)?;
            if block.reboot_first {
                host.reboot()?;
            }
            outputs.push((name.clone(), host.run_script(&block.script)?));
        }
        Ok(outputs)
    }
}

/// docker0 as Docker left it on a host where it ran before: a bridge holding Docker's
/// default address.
fn leave_dockers_default_bridge(host: &Host) -> Result<()> {
    host.netns
        .ip(&["link", "add", "docker0", "type", "bridge"])?;
    host.netns
        .ip(&["addr", "add", "172.17.0.1/16", "dev", "docker0"])?;
    host.netns.ip(&["link", "set", "docker0", "up"])?;
    Ok(())
}

/// The Docker step's output starts with Docker's `bridge` network and gateway, which must be
/// the lease's (and not Docker's default 172.17.0.0/16 left on docker0).
fn ensure_docker_took_the_lease(host: &WalkthroughHost, output: &str) -> Result<()> {
    let subnet_env = host.read("/run/flannel/subnet.env")?;
    let gateway = subnet_env
        .lines()
        .find_map(|line| line.strip_prefix("FLANNEL_SUBNET="))
        .context("the subnet file has no FLANNEL_SUBNET")?;
    let address = gateway.split('/').next().unwrap_or_default();
    let network = output.lines().next().unwrap_or_default();
    ensure!(
        network.ends_with(&format!(" {address}")),
        "on {}, Docker's bridge network is {network:?}, not the lease {gateway}",
        host.name
    );
    Ok(())
}

#[test]
fn the_walkthrough_runs_as_written() -> Result<()> {
    let readme = readme()?;
    let blocks = blocks(&readme)?;
    ensure!(!blocks.is_empty(), "the README marks no walkthrough block");
    let hosts = Hosts::start()?;
    let (host1, _) = hosts.named("host1")?;
    leave_dockers_default_bridge(host1)?;
    for block in &blocks {
        for (name, output) in hosts.run(block)? {
            let (_, host) = hosts.named(&name)?;
            if block.script.contains("systemctl restart docker") {
                ensure_docker_took_the_lease(host, &output)?;
            }
            if block.script.contains("ping") {
                // The loop runs once per lease, so an empty listing would ping nobody.
                let pinged = output.matches(" packets received").count();
                ensure!(
                    pinged == hosts.hosts.len(),
                    "on {}, the check pinged {pinged} hosts' docker0, not every host's:\n{output}",
                    host.name
                );
            }
        }
    }

    let remaining = hosts
        .cluster
        .etcd
        .etcdctl(&["get", "--prefix", "--keys-only", SUBNETS])?;
    assert!(
        remaining.trim().is_empty(),
        "the walkthrough's removal leaves leases: {remaining}"
    );
    for host in &hosts.hosts {
        let links = host.netns.ip(&["-o", "link", "show"])?;
        assert!(
            !links.contains("flannel.1"),
            "{} keeps flannel.1 after the walkthrough's removal:\n{links}",
            host.name
        );
    }
    for walkthrough_host in &hosts.walkthrough {
        let installed = walkthrough_host.run_script(
            "test ! -e /usr/bin/overlay-agent && test ! -e /etc/default/overlay-agent\n",
        );
        assert!(
            installed.is_ok(),
            "{} keeps the package's files after dpkg --purge",
            walkthrough_host.name
        );
    }
    Ok(())
}
