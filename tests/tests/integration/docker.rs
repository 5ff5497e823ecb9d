//! The seed with real Docker: on each host a dockerd started from the agent's subnet file as
//! flannel's documentation says (`--bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU --ip-masq=false`,
//! agents with `--ip-masq`), containers run with the Docker CLI from a busybox image. Every
//! case runs the same checks, in both dataplanes, behind a FORWARD policy of ACCEPT and of DROP,
//! with flannel's iptables chains and with its nftables table (`EnableNFTables`).
use std::{
    io::{ErrorKind, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use overlay_tests::{
    cluster::{Cluster, Host, NFTABLES_NETWORK_CONFIG, SEED_NETWORK_CONFIG},
    docker::DockerSeed,
    netns::Netns,
    seed::{BBOX2, HOST1, HOST2, Probe, check_seed_path},
};

/// A host on the underlay outside the overlay: no agent, no lease.
const OUTSIDE: &str = "172.20.62.200";
const LATE_PORT: u16 = 5000;
const PUBLISHED: &str = "8080:80";
const NAT_PORT: u16 = 9000;
/// Past one `--iptables-resync` (5 s by default).
const RESYNC_TIMEOUT: Duration = Duration::from_secs(15);
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    Accept,
    Drop,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Accept => "ACCEPT",
            Policy::Drop => "DROP",
        }
    }
}

/// One case of the matrix: the seed's hosts with agents in `dataplane` and a dockerd each, the
/// FORWARD policy set to `policy` once dockerd runs, flannel's rules in nftables or iptables.
fn docker_case(tag: &str, dataplane: &str, policy: Policy, nftables: bool) -> Result<()> {
    let config = if nftables {
        NFTABLES_NETWORK_CONFIG
    } else {
        SEED_NETWORK_CONFIG
    };
    let cluster = Cluster::with_etcd(tag, false, Some(config))?;
    let dataplane = format!("--dataplane={dataplane}");
    let mut seed = DockerSeed::start_on(cluster, &[&dataplane, "--ip-masq"])?;
    let outside = seed.cluster.add_host("outside", OUTSIDE)?;
    for host in [&seed.host1, &seed.host2] {
        host.iptables(&["-P", "FORWARD", policy.name()])?;
    }
    if policy == Policy::Drop {
        wait_for_forward_chain(&seed)?;
    }

    check_seed_path(&seed.bbox1, BBOX2)?;
    check_late_container(&seed)?;
    check_published_port(&seed, &outside)?;
    check_nat_out(&seed, &outside)?;
    check_bridges(&seed)?;

    if nftables && policy == Policy::Accept {
        for host in [&seed.host1, &seed.host2] {
            let forward = host.iptables(&["-S", "FORWARD"])?;
            ensure!(
                !forward.contains("FLANNEL-FWD"),
                "nftables mode with a FORWARD policy of ACCEPT needs nothing in iptables:\n{forward}"
            );
        }
    }
    Ok(())
}

/// The agent made docker0 once and dockerd adopted it: after all the traffic, the bridge the
/// agent made, with one IPv4 address, the lease's gateway.
fn check_bridges(seed: &DockerSeed) -> Result<()> {
    let [made1, made2] = seed.docker0_made_by_agents;
    for (host, made, gateway) in [
        (&seed.host1, made1, "10.2.41.1/24"),
        (&seed.host2, made2, "10.2.54.1/24"),
    ] {
        let listing = host
            .netns
            .ip(&["-4", "-o", "addr", "show", "dev", "docker0"])?;
        let addresses: Vec<&str> = listing
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3))
            .collect();
        ensure!(
            addresses == [gateway],
            "{}'s docker0 holds {addresses:?}, not just {gateway}",
            host.name
        );
        let index = host.netns.ifindex("docker0")?;
        ensure!(
            index == made,
            "{}'s docker0 is another bridge (index {index}) than the agent made ({made})",
            host.name
        );
    }
    Ok(())
}

/// Behind a DROP policy flannel's forward chain must be jumped to from iptables' FORWARD, in
/// either mode: in nftables mode the agent adds it within one resync of the policy change.
fn wait_for_forward_chain(seed: &DockerSeed) -> Result<()> {
    for (host, agent) in [(&seed.host1, &seed.agent1), (&seed.host2, &seed.agent2)] {
        host.wait_for_forward_jump(RESYNC_TIMEOUT)
            .with_context(|| format!("agent log:\n{}", agent.log()))?;
    }
    Ok(())
}

/// A container started on host2 after the agents and bbox2: its first ping from bbox1 is
/// answered, and bbox1 reaches its TCP server.
fn check_late_container(seed: &DockerSeed) -> Result<()> {
    let port = LATE_PORT.to_string();
    let server = ["nc", "-ll", "-p", &port, "-e", "echo", "late"];
    let late = seed.docker2.run("late", &[], &server)?;
    let first = seed.bbox1.ping(&late.address, 1)?;
    ensure!(first.contains("ttl=62"), "{first}");
    late.wait_listening(LATE_PORT)?;
    let answer = seed.bbox1.exec(&["nc", "-w", "5", &late.address, &port])?;
    ensure!(answer.trim() == "late", "bbox1 got {answer:?} from late");
    Ok(())
}

/// `docker run -p 8080:80` on host2: a host outside the overlay reaches the container at
/// host2's address.
fn check_published_port(seed: &DockerSeed, outside: &Host) -> Result<()> {
    let server = ["nc", "-ll", "-p", "80", "-e", "echo", "web"];
    let web = seed
        .docker2
        .run("web", &["--publish", PUBLISHED], &server)?;
    web.wait_listening(80)?;
    let answer = outside
        .netns
        .exec(&["busybox", "nc", "-w", "5", HOST2, "8080"])
        .with_context(|| format!("dockerd log:\n{}", seed.docker2.log()))?;
    ensure!(answer.trim() == "web", "the outside host got {answer:?}");
    Ok(())
}

/// bbox1 reaches the outside host, which sees host1's address: the agent's masquerade, since
/// dockerd runs with `--ip-masq=false`.
fn check_nat_out(seed: &DockerSeed, outside: &Host) -> Result<()> {
    let port = NAT_PORT.to_string();
    let (peer, answer) = serve_one(&outside.netns, NAT_PORT, "outside", || {
        seed.bbox1.exec(&["nc", "-w", "5", OUTSIDE, &port])
    })?;
    ensure!(answer.trim() == "outside", "bbox1 got {answer:?}");
    ensure!(
        peer.ip() == HOST1.parse::<Ipv4Addr>()?,
        "the outside host saw bbox1's connection come from {peer}, not host1"
    );
    Ok(())
}

/// Listens on TCP `port` in `netns`, runs `client`, and answers the first connection with
/// `reply`; returns where that connection came from, as the listener saw it, and what the
/// client returned.
fn serve_one(
    netns: &Netns,
    port: u16,
    reply: &str,
    client: impl FnOnce() -> Result<String>,
) -> Result<(SocketAddr, String)> {
    // A socket stays in the namespace it was made in, whichever thread uses it later.
    let listener = netns.run_inside(|| {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })?;
    std::thread::scope(|scope| {
        let server = scope.spawn(|| accept_one(&listener, reply));
        let answer = client();
        let peer = server
            .join()
            .map_err(|_| anyhow::anyhow!("the listener thread panicked"))?;
        Ok((peer?, answer?))
    })
}

fn accept_one(listener: &TcpListener, reply: &str) -> Result<SocketAddr> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.write_all(format!("{reply}\n").as_bytes())?;
                return Ok(peer);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection within {ACCEPT_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(error) => return Err(error).context("accept failed"),
        }
    }
}

// Dataplane × FORWARD policy × where flannel's rules live.
test_matrix! { docker_case {
    docker_ebpf_forward_accept_iptables: ("dk-ebpf-acc-ipt", "ebpf", Policy::Accept, false),
    docker_ebpf_forward_drop_iptables: ("dk-ebpf-drop-ipt", "ebpf", Policy::Drop, false),
    docker_ebpf_forward_accept_nftables: ("dk-ebpf-acc-nft", "ebpf", Policy::Accept, true),
    docker_ebpf_forward_drop_nftables: ("dk-ebpf-drop-nft", "ebpf", Policy::Drop, true),
    docker_kernel_forward_accept_iptables: ("dk-kern-acc-ipt", "kernel", Policy::Accept, false),
    docker_kernel_forward_drop_iptables: ("dk-kern-drop-ipt", "kernel", Policy::Drop, false),
    docker_kernel_forward_accept_nftables: ("dk-kern-acc-nft", "kernel", Policy::Accept, true),
    docker_kernel_forward_drop_nftables: ("dk-kern-drop-nft", "kernel", Policy::Drop, true),
}}
