//! `cargo xtask demo`: the seed document coming true in network namespaces on this machine.
//!
//! Two hosts run overlay-agent in ebpf mode against an etcd of their own, in a dual-stack
//! network; bbox1 and bbox3 sit on host1, bbox2 on host2, and an outside host sits on the
//! underlay. Each step of the seed is run and shown, over IPv4, then over IPv6. Then everything stays up until Ctrl-C (or, with `--once`, is torn down at
//! once, the exit status saying whether every check held). Nothing touches the machine's own
//! network namespace, and an interrupt at any point tears down what was built.
use std::{
    process::{Command, ExitCode},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use overlay_tests::{
    agent::agent_binary,
    cluster::{Host, PREFIX, underlay_ipv6},
    ipv6::{BBOX1_V6, BBOX2_V6},
    netns::{Netns, run},
    seed::{BBOX2, Container, Seed},
};

const OUTSIDE: &str = "172.20.62.200";
const BBOX3: &str = "10.2.41.3";
const BBOX3_V6: &str = "fd00:2:0:41::3";

/// What the demo leaves standing while the user looks around.
struct Demo {
    // Field order is drop order: the extras go before the seed's hosts and cluster.
    bbox3: Container,
    outside: Host,
    seed: Seed,
}

fn main() -> ExitCode {
    let once = std::env::args().any(|arg| arg == "--once");
    let interrupted = match watch_for_interrupt() {
        Ok(flag) => flag,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = build(&interrupted).and_then(|demo| {
        let checks = show(&demo);
        if !once {
            wait_for_interrupt(&demo, &interrupted);
        }
        println!("\nTearing everything down...");
        drop(demo);
        checks
    });
    match outcome {
        Ok(()) => {
            println!("Done: every check held.");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Catches Ctrl-C (and SIGTERM) from the start, so an interrupt during setup unwinds through
/// the harness's guards instead of killing the process with namespaces left behind.
fn watch_for_interrupt() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let raised = flag.clone();
    // Registering the handlers replaces the default action of dying on the spot.
    let mut interrupt = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    })?;
    let mut terminate = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    })?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        });
        raised.store(true, Ordering::SeqCst);
    });
    Ok(flag)
}

fn check_interrupt(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn build(interrupted: &AtomicBool) -> Result<Demo> {
    println!(
        "Building the seed's world in network namespaces: an underlay with etcd, host1 (172.20.62.104,"
    );
    println!(
        "fd00:ff::104) and host2 (172.20.62.105, fd00:ff::105) running overlay-agent in ebpf mode in a"
    );
    println!(
        "dual-stack network, bbox1 and bbox3 on host1, bbox2 on host2, and an outside host (172.20.62.200,"
    );
    println!("fd00:ff::200). The subnets come from reservations.");
    let masquerade: &[&str] = &["--ip-masq"];
    let mut seed = Seed::start_dual_stack("demo", [masquerade, masquerade])?;
    check_interrupt(interrupted)?;
    let bbox3 = Container::attach_dual_stack(&seed.host1, "bbox3", BBOX3, BBOX3_V6)?;
    let outside = seed.cluster.add_host("outside", OUTSIDE)?;
    check_interrupt(interrupted)?;
    Ok(Demo {
        bbox3,
        outside,
        seed,
    })
}

/// Runs and prints each step of the seed; fails if any check does not hold, after showing all.
fn show(demo: &Demo) -> Result<()> {
    let seed = &demo.seed;
    let mut failures = Vec::new();
    let mut check = |what: &str, held: bool| {
        println!("  -> {what}: {}", if held { "yes" } else { "NO" });
        if !held {
            failures.push(what.to_string());
        }
    };

    step(
        "The leases in etcd, in flannel's records (etcdctl get --prefix /docker-test/network/subnets):",
    );
    let records = seed
        .cluster
        .etcd
        .etcdctl(&["get", "--prefix", &format!("{PREFIX}/subnets")])?;
    print!("{records}");
    check(
        "both hosts hold a vxlan lease of each family",
        records.matches("\"BackendType\":\"vxlan\"").count() == 2
            && records.matches("\"BackendV6Data\"").count() == 2,
    );

    step("host1's routes (ip r): its own subnet on docker0, host2's via flannel.1:");
    print!("{}", seed.host1.netns.ip(&["route"])?);
    step("host2's routes (ip r):");
    print!("{}", seed.host2.netns.ip(&["route"])?);

    step("bbox1 (10.2.41.2) pings bbox2 (10.2.54.2) on the other host: ping -c 2 10.2.54.2");
    let ping = shown(&seed.bbox1.netns, &["ping", "-n", "-c", "2", BBOX2])?;
    check(
        "two replies with ttl=62 (two routers: host1 and host2)",
        ping.matches("ttl=62").count() == 2,
    );

    step("The path: traceroute -n 10.2.54.2 (docker0 on host1, flannel.1 on host2, bbox2):");
    let trace = shown(
        &seed.bbox1.netns,
        &["traceroute", "-n", "-q", "1", "-w", "2", BBOX2],
    )?;
    check(
        "hops 10.2.41.1, 10.2.54.0, 10.2.54.2",
        hops_of(&trace) == ["10.2.41.1", "10.2.54.0", "10.2.54.2"],
    );

    step("bbox1 pings bbox3 (10.2.41.3) on the same host, straight through docker0:");
    let local = shown(&seed.bbox1.netns, &["ping", "-n", "-c", "2", BBOX3])?;
    check(
        "two replies with ttl=64 (no router in between)",
        local.matches("ttl=64").count() == 2,
    );

    step(
        "bbox1 reaches the outside host 172.20.62.200, which has no route to 10.2.0.0/16, through NAT:",
    );
    let outside = shown(&seed.bbox1.netns, &["ping", "-n", "-c", "2", OUTSIDE])?;
    check(
        "the outside host answers",
        outside.contains(" 0% packet loss"),
    );

    step("Now over IPv6. host1's IPv6 routes (ip -6 r): host2's subnet via flannel-v6.1:");
    print!("{}", seed.host1.netns.ip(&["-6", "route"])?);
    step(&format!(
        "bbox1 ({BBOX1_V6}) pings bbox2 ({BBOX2_V6}): ping -6 -c 2 {BBOX2_V6}"
    ));
    let ping6 = shown(
        &seed.bbox1.netns,
        &["ping", "-6", "-n", "-c", "2", BBOX2_V6],
    )?;
    check(
        "two replies with hop limit 62",
        ping6.matches("ttl=62").count() == 2,
    );
    step(&format!(
        "The path: traceroute -6 -n {BBOX2_V6} (docker0 on host1, flannel-v6.1 on host2, bbox2):"
    ));
    let trace6 = shown(
        &seed.bbox1.netns,
        &["traceroute", "-6", "-n", "-q", "1", "-w", "2", BBOX2_V6],
    )?;
    check(
        "hops fd00:2:0:41::1, fd00:2:0:54::, fd00:2:0:54::2",
        hops_of(&trace6) == ["fd00:2:0:41::1", "fd00:2:0:54::", BBOX2_V6],
    );
    step(&format!("bbox1 pings bbox3 ({BBOX3_V6}) through docker0:"));
    let local6 = shown(
        &seed.bbox1.netns,
        &["ping", "-6", "-n", "-c", "2", BBOX3_V6],
    )?;
    check(
        "two replies with hop limit 64",
        local6.matches("ttl=64").count() == 2,
    );
    let outside6 = underlay_ipv6(OUTSIDE);
    step(&format!(
        "bbox1 reaches the outside host {outside6} through NAT:"
    ));
    let nat6 = shown(
        &seed.bbox1.netns,
        &["ping", "-6", "-n", "-c", "2", &outside6],
    )?;
    check("the outside host answers", nat6.contains(" 0% packet loss"));

    step(
        "host1's subnet map, which the tc programs read to encapsulate (bpftool map dump pinned .../subnets):",
    );
    let subnets = seed.host1.pin_dir().join("subnets");
    print!(
        "{}",
        run(Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&subnets))?
    );

    step("host1's dataplane: lease, map entries, programs and counters (overlay-agent status):");
    let status = agent_status(seed)?;
    print!("{status}");
    check(
        "host1's fast path encapsulated the pings at bbox1's veth and put the replies straight into bbox1",
        counter(&status, "tx_direct") > 0 && counter(&status, "rx_delivered") > 0,
    );

    if failures.is_empty() {
        Ok(())
    } else {
        bail!("checks that did not hold: {}", failures.join("; "))
    }
}

fn wait_for_interrupt(demo: &Demo, interrupted: &AtomicBool) {
    let seed = &demo.seed;
    step("Everything stays up. Step into a container or a host, for example:");
    for (what, netns) in [
        ("bbox1", &seed.bbox1.netns),
        ("bbox2", &seed.bbox2.netns),
        ("bbox3", &demo.bbox3.netns),
        ("host1", &seed.host1.netns),
        ("host2", &seed.host2.netns),
        ("outside", &demo.outside.netns),
    ] {
        println!("  {what:<8} sudo ip netns exec {} bash", netns.name());
    }
    println!("Press Ctrl-C to tear it all down.");
    while !interrupted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The address of each hop traceroute printed.
fn hops_of(trace: &str) -> Vec<&str> {
    trace
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect()
}

fn step(text: &str) {
    println!("\n### {text}");
}

/// Runs `args` in `netns`, prints what it printed, and returns it, whatever its exit status.
fn shown(netns: &Netns, args: &[&str]) -> Result<String> {
    let output = netns.exec_unchecked(args)?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    print!("{text}{}", String::from_utf8_lossy(&output.stderr));
    Ok(text)
}

fn agent_status(seed: &Seed) -> Result<String> {
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", seed.host1.netns.name()))
        .arg(agent_binary()?)
        .arg("status")
        .arg(format!("--etcd-endpoints={}", seed.cluster.etcd.endpoint()))
        .arg(format!("--etcd-prefix={PREFIX}"))
        .arg(format!(
            "--subnet-file={}",
            seed.host1.subnet_file().display()
        ))
        .arg(format!("--bpf-pin-dir={}", seed.host1.pin_dir().display())))
}

fn counter(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.trim().strip_prefix(name))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}
