//! Records any member of the cluster can write under `subnets/` cannot stop, hijack or blind a
//! node: with each of them in etcd before the agent starts and written again while it runs,
//! the agent becomes ready, stays up, routes a lease added afterwards within 2 s, and becomes
//! ready again after a restart.
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use overlay_tests::{
    agent::Agent,
    cluster::{Cluster, PREFIX},
    seed::{HOST1, SUBNET1},
};

/// Each a record of a host that holds no lease: our subnet under a dual-stack key and under a
/// key with garbage after it, half our subnet, the whole network, a key with host bits set.
const HOSTILE_KEYS: [&str; 5] = [
    "10.2.41.0-24&fc00::-64",
    "10.2.41.0-24&anything",
    "10.2.41.128-25",
    "10.2.0.0-16",
    "10.2.60.0-24&fc00::1-64",
];
const HOSTILE_VALUE: &str = r#"{"PublicIP":"172.20.62.66","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:66"}}"#;
const LATER_SUBNET: &str = "10.2.60.0/24";
const LATER_VALUE: &str = r#"{"PublicIP":"172.20.62.106","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"1a:4b:d7:f7:16:8a"}}"#;
const ROUTED_WITHIN: Duration = Duration::from_secs(2);

fn write_hostile_records(cluster: &Cluster) -> Result<()> {
    for name in HOSTILE_KEYS {
        cluster
            .etcd
            .put(&format!("{PREFIX}/subnets/{name}"), HOSTILE_VALUE)?;
    }
    Ok(())
}

#[test]
fn hostile_records_leave_the_agent_up_and_routing() -> Result<()> {
    let mut cluster = Cluster::new("hostile-records")?;
    cluster.reserve(SUBNET1, HOST1)?;
    let host1 = cluster.add_host("host1", HOST1)?;
    write_hostile_records(&cluster)?;
    let mut agent = Agent::start(&cluster, &host1, &[])?;
    ensure!(agent.wait_ready()? == SUBNET1, "host1 kept its reservation");

    write_hostile_records(&cluster)?;
    cluster
        .etcd
        .put(&cluster.subnet_key(LATER_SUBNET), LATER_VALUE)?;
    let written = Instant::now();
    host1.wait_for_peer(LATER_SUBNET, "172.20.62.106", "1a:4b:d7:f7:16:8a")?;
    ensure!(
        written.elapsed() <= ROUTED_WITHIN,
        "the later lease took {:?} to be routed",
        written.elapsed()
    );
    ensure!(
        agent.process.try_exit_status()?.is_none(),
        "the agent exited:\n{}",
        agent.log()
    );
    for name in HOSTILE_KEYS {
        ensure!(
            agent
                .log()
                .contains(&format!("skipping record {PREFIX}/subnets/{name}")),
            "no warning names {name}:\n{}",
            agent.log()
        );
    }
    let routes = host1.netns.ip(&["route"])?;
    ensure!(
        !routes.contains("10.2.41.128") && !routes.contains("10.2.0.0/16"),
        "a hostile record was routed:\n{routes}"
    );

    let status_flags = [
        "status".to_string(),
        format!("--etcd-endpoints={}", cluster.endpoints()),
        format!("--etcd-prefix={PREFIX}"),
        format!("--subnet-file={}", host1.subnet_file().display()),
        format!("--bpf-pin-dir={}", host1.pin_dir().display()),
    ];
    let mut status = Agent::start_with(&host1, &status_flags, &[])?;
    ensure!(
        status.process.wait_exit(Duration::from_secs(20))?.success(),
        "{}",
        status.log()
    );
    let report = status.log();
    ensure!(
        report.contains(&format!("skipped records ({}):", HOSTILE_KEYS.len())),
        "{report}"
    );
    for name in HOSTILE_KEYS {
        ensure!(
            report.contains(&format!("{PREFIX}/subnets/{name}: ")),
            "status names {name}:\n{report}"
        );
    }

    agent.process.terminate(Duration::from_secs(10))?;
    let mut restarted = Agent::start(&cluster, &host1, &[])?;
    ensure!(
        restarted.wait_ready()? == SUBNET1,
        "the restart kept the lease"
    );
    Ok(())
}
