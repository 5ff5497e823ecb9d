//! The Debian package `cargo xtask package` builds (`cargo xtask test` builds it before the
//! tests): what it holds, lintian's verdict, its unit under `systemd-analyze verify`, its env
//! file as the agent reads it, and its agent running the seed.
use std::{collections::BTreeSet, process::Command};

use anyhow::{Context, Result};
use overlay_tests::{
    agent::{Agent, HEALTH_PORT},
    cluster::{Cluster, Host, PREFIX, UNDERLAY_GATEWAY},
    netns::run,
    package::{
        AGENT, ENV_FILE, UNIT, Unpacked, built_package, set_variables, with_every_variable_set,
    },
    require_root,
    scratch::ScratchDir,
};

#[test]
fn the_package_holds_the_agent_its_unit_and_its_env_file_and_no_maintainer_script() -> Result<()> {
    let deb = built_package()?;
    let listing = run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    // Regular files only: `-rw-r--r-- 0/0 1923 2026-12-02 00:00 ./etc/default/overlay-agent`.
    let files: BTreeSet<&str> = listing
        .lines()
        .filter(|line| line.starts_with('-'))
        .filter_map(|line| line.split_whitespace().last()?.strip_prefix('.'))
        .collect();
    let expected = BTreeSet::from([
        AGENT,
        UNIT,
        ENV_FILE,
        "/usr/share/doc/overlay-agent/copyright",
        "/usr/share/doc/overlay-agent/changelog.Debian.gz",
    ]);
    assert_eq!(files, expected, "dpkg-deb --contents:\n{listing}");

    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"))?;
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), [ENV_FILE]);

    // What the agent runs (iptables) and the nftables mode's tool, which not every node uses.
    let relations = run(Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .args(["Depends", "Suggests"]))?;
    let field = |name: &str| {
        relations
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
            .map(|packages| packages.split(", ").map(package_name).collect::<Vec<_>>())
    };
    let depends = field("Depends").unwrap_or_default();
    assert!(
        depends.contains(&"libc6") && depends.contains(&"iptables"),
        "Depends: {relations}"
    );
    assert_eq!(field("Suggests"), Some(vec!["nftables"]), "{relations}");

    // No preinst, postinst, prerm or postrm: installing enables and starts nothing.
    let control = ScratchDir::new("deb-control")?;
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(&deb)
        .arg(control.path()))?;
    let members: BTreeSet<String> = std::fs::read_dir(control.path())?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    assert_eq!(
        members,
        BTreeSet::from(["conffiles", "control"].map(String::from))
    );

    let unpacked = Unpacked::new(&deb)?;
    let unit = std::fs::read_to_string(unpacked.path(UNIT))?;
    for line in [
        "Type=notify",
        "Restart=always",
        "KillSignal=SIGTERM",
        "EnvironmentFile=-/etc/default/overlay-agent",
        "ExecStartPre=/bin/sh -c 'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf'",
        "ExecStart=/usr/bin/overlay-agent",
        "WantedBy=multi-user.target",
    ] {
        assert!(
            unit.lines().any(|held| held == line),
            "no {line:?} in\n{unit}"
        );
    }
    Ok(())
}

/// The README's copy of the unit is the shipped unit without its comments.
#[test]
fn the_readme_shows_the_unit_as_shipped() -> Result<()> {
    let unpacked = Unpacked::new(&built_package()?)?;
    let unit = std::fs::read_to_string(unpacked.path(UNIT))?;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let uncommented: Vec<&str> = unit.lines().filter(|line| !line.starts_with('#')).collect();
    let shown = readme
        .split("```ini\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.contains("ExecStart=/usr/bin/overlay-agent"))
        .context("the README shows no unit with ExecStart=/usr/bin/overlay-agent")?;
    assert_eq!(shown.lines().collect::<Vec<_>>(), uncommented);
    Ok(())
}

#[test]
fn lintian_finds_no_error_in_the_package() -> Result<()> {
    let deb = built_package()?;
    let output = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb)
        .output()
        .context("cannot run lintian: `cargo xtask setup` installs it")?;
    let report = String::from_utf8_lossy(&output.stdout);
    println!("lintian {}:\n{report}", deb.display());
    assert!(
        output.status.success() && !report.lines().any(|line| line.starts_with("E:")),
        "lintian failed ({}):\n{report}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `systemd-analyze verify` checks that ExecStart's binary exists on this machine, and with
/// `--root` it looks for every unit and command (sysinit.target, /bin/sh) under that root
/// alone. So the unit is verified as installed: in a mount namespace of its own where
/// /usr/bin is the package's usr/bin laid over the machine's (overlayfs), which leaves the
/// machine's /usr/bin alone.
#[test]
fn the_unit_passes_systemd_analyze_verify() -> Result<()> {
    require_root()?;
    let unpacked = Unpacked::new(&built_package()?)?;
    let lower = format!("lowerdir={}:/usr/bin", unpacked.path("/usr/bin").display());
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -t overlay overlay -o "$1" /usr/bin && exec systemd-analyze verify "$2""#)
        .args(["verify", &lower])
        .arg(unpacked.path(UNIT))
        .output()
        .context("cannot run unshare")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // verify exits 0 on some findings (an unknown key, say), which it only prints.
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        output.status
    );
    Ok(())
}

#[test]
fn the_packaged_agent_runs_the_seed() -> Result<()> {
    require_root()?;
    let unpacked = Unpacked::new(&built_package()?)?;
    let output = Command::new(env!("CARGO_BIN_EXE_overlay-demo"))
        .arg("--once")
        .env("OVERLAY_AGENT_BIN", unpacked.path(AGENT))
        .output()
        .context("cannot run the demo")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.contains("Done: every check held."),
        "the demo with {AGENT} from the package ({}):\n{said}",
        output.status
    );
    Ok(())
}

/// The env file as shipped, with the test host's etcd, subnet file, pin directory and health
/// port as flags (which win over the file): the agent becomes ready with what the file sets.
#[test]
fn the_agent_starts_with_the_env_file_as_shipped() -> Result<()> {
    let unpacked = Unpacked::new(&built_package()?)?;
    let env_file = std::fs::read_to_string(unpacked.path(ENV_FILE))?;
    let variables = set_variables(&env_file)?;
    let mut cluster = Cluster::new("env-file")?;
    let host = cluster.add_host("host1", "172.20.62.104")?;
    let mut agent = Agent::start_with(
        &host,
        &Agent::flags(&cluster, &host, &[]),
        &pairs(&variables),
    )?;
    agent.wait_ready()?;
    let subnet_env = std::fs::read_to_string(&agent.subnet_file)?;
    assert!(
        subnet_env.contains("FLANNEL_IPMASQ=true"),
        "FLANNELD_IP_MASQ=true from the file:\n{subnet_env}"
    );
    Ok(())
}

/// Every variable the env file documents, set to its example value, except where the value
/// names this machine (etcd, its TLS files and user, addresses, files, the health port): there
/// the test host's own. The agent takes them all, from the environment alone, and becomes
/// ready against a TLS etcd with authentication. And the file documents every FLANNELD_*
/// variable the agent's --help names.
#[test]
fn the_agent_takes_every_variable_the_env_file_documents() -> Result<()> {
    let unpacked = Unpacked::new(&built_package()?)?;
    let env_file = std::fs::read_to_string(unpacked.path(ENV_FILE))?;
    let documented = set_variables(&with_every_variable_set(&env_file))?;
    let help = run(Command::new(unpacked.path(AGENT)).arg("--help"))?;
    assert_eq!(
        documented
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<BTreeSet<_>>(),
        variables_named_in(&help),
        "the env file documents exactly the variables of --help"
    );

    let mut cluster = Cluster::with_tls("env-file-all")?;
    cluster.etcd.enable_auth("s3cret")?;
    let host = cluster.add_host("host1", "172.20.62.104")?;
    let this_machine = this_machines_values(&cluster, &host);
    let variables: Vec<(String, String)> = documented
        .into_iter()
        .map(|(name, example)| {
            let value = this_machine
                .iter()
                .find(|(own, _)| *own == name)
                .map_or(example, |(_, value)| value.clone());
            (name, value)
        })
        .collect();
    let mut agent = Agent::start_with(&host, &[], &pairs(&variables))?;
    agent.wait_ready()?;
    Ok(())
}

/// The test host's values of the variables that name a machine's own settings.
fn this_machines_values(cluster: &Cluster, host: &Host) -> Vec<(String, String)> {
    let tls = |file: &str| cluster.scratch.path().join(file).display().to_string();
    [
        ("FLANNELD_ETCD_ENDPOINTS", cluster.endpoints()),
        ("FLANNELD_ETCD_PREFIX", PREFIX.to_string()),
        ("FLANNELD_ETCD_CAFILE", tls("ca.pem")),
        ("FLANNELD_ETCD_CERTFILE", tls("client.pem")),
        ("FLANNELD_ETCD_KEYFILE", tls("client-key.pem")),
        ("FLANNELD_ETCD_USERNAME", "root".to_string()),
        ("FLANNELD_ETCD_PASSWORD", "s3cret".to_string()),
        ("FLANNELD_IFACE_CAN_REACH", UNDERLAY_GATEWAY.to_string()),
        ("FLANNELD_PUBLIC_IP", host.address.clone()),
        (
            "FLANNELD_SUBNET_FILE",
            host.subnet_file().display().to_string(),
        ),
        ("FLANNELD_BPF_PIN_DIR", host.pin_dir().display().to_string()),
        ("FLANNELD_HEALTHZ_PORT", HEALTH_PORT.to_string()),
    ]
    .map(|(name, value)| (name.to_string(), value))
    .into()
}

/// The `FLANNELD_*` names in `[env: FLANNELD_X=...]` of the agent's --help.
fn variables_named_in(help: &str) -> BTreeSet<&str> {
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .collect()
}

fn pairs(variables: &[(String, String)]) -> Vec<(&str, &str)> {
    variables
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// The package a relation names: `libc6 (>= 2.34)` is libc6.
fn package_name(relation: &str) -> &str {
    relation.split_whitespace().next().unwrap_or(relation)
}
