//! The overlay node daemon, as a library: the binary is a thin wrapper around [`run`] and
//! [`teardown`].
//!
//! One module per concern, in the spirit of flannel's packages: `config` (the network config),
//! `subnet` (leases and the etcd registry), `node` (the host's network devices), `masquerade`,
//! `dataplane` (the eBPF programs and maps), `health`, and `options` (the command line).
pub mod config;
pub mod dataplane;
pub mod health;
pub mod mac;
pub mod masquerade;
pub mod node;
pub mod options;
pub mod status;
pub mod subnet;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, anyhow};
use ipnetwork::Ipv4Network;
use overlay_common::OverlayConfig;
use rtnetlink::Handle;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval, sleep},
};

use crate::{
    config::{NetworkConfig, VXLAN_OVERHEAD},
    dataplane::Dataplane,
    health::Readiness,
    masquerade::{Masquerade, Rules},
    node::{EbpfForwarding, NodeNetwork, NodeSettings, Scope, uplink::Uplink, vtep},
    options::{AgentOptions, Dataplane as DataplaneChoice},
    subnet::{
        Lease, LeaseEvent,
        file::{SubnetEnv, previous_subnet},
        manager::{LeaseManager, LeaseTiming},
        registry::{ConfigReadError, Registry},
        watch::LeaseWatcher,
    },
};

const CONFIG_RETRY: Duration = Duration::from_secs(1);
const EVENT_QUEUE: usize = 1024;
/// How often the node network is checked against the desired state: anything deleted by hand
/// comes back within this long.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the nftables table is checked, as flannel re-checks its rules.
const MASQUERADE_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the agent until a signal asks it to stop (returns `Ok`, keeping the lease and the
/// devices) or it can no longer do its job (returns the reason, e.g. a revoked lease).
pub async fn run(options: AgentOptions) -> Result<()> {
    let netlink = netlink_handle()?;
    let uplink = node::uplink::find(&netlink, &options.iface, &options.iface_regex).await?;
    let public_ip = options.public_ip.unwrap_or(uplink.address);
    log::info!(
        "uplink {} ({}), public IP {public_ip}",
        uplink.name,
        uplink.address
    );
    let readiness = Readiness::default();
    if options.healthz_port != 0 {
        health::serve(
            SocketAddr::from((options.healthz_ip, options.healthz_port)),
            readiness.clone(),
        )
        .await?;
    }

    let registry = Registry::connect(&options.etcd()).await?;
    let config = wait_for_network_config(&registry).await?;
    let manager = LeaseManager {
        registry: registry.clone(),
        config: config.clone(),
        public_ip,
        timing: LeaseTiming {
            ttl: options.subnet_lease_ttl,
            renew_margin: options.renew_margin(),
        },
    };
    // A VTEP MAC already on the device is kept, so peers never hold a stale one.
    let existing_mac = vtep::existing_mac(&netlink, &vtep::device_name(config.backend.vni)).await?;
    let lease = manager
        .acquire(existing_mac, previous_subnet(&options.subnet_file))
        .await?;

    let mut node = node_network(netlink, &options, &config, &uplink, &lease).await?;
    let mut watcher = LeaseWatcher::new(registry, config.clone(), lease.clone());
    for remote in watcher.initial_leases().await? {
        apply_logged(&mut node, LeaseEvent::Added(remote));
    }
    node.reconcile(Scope::Everything).await?;
    let mut masquerade = Masquerade::new(Rules {
        network: config.network,
        subnet: lease.subnet,
        masquerade: options.ip_masq,
        forward: options.iptables_forward_rules,
    });
    masquerade.ensure()?;
    SubnetEnv {
        network: config.network,
        subnet: lease.subnet,
        mtu: overlay_mtu(&config, &uplink)?,
        ip_masq: options.ip_masq,
    }
    .write_atomically(&options.subnet_file)?;
    readiness.set_ready();
    log::info!(
        "ready: subnet {} written to {}",
        lease.subnet,
        options.subnet_file.display()
    );

    let (events, received) = mpsc::channel(EVENT_QUEUE);
    tokio::select! {
        result = manager.keep_alive(lease.clone()) => result,
        result = watcher.run(events) => result.and(Err(anyhow!("the lease watch stopped"))),
        () = maintain(&mut node, &mut masquerade, received) => Err(anyhow!("the lease event stream ended")),
        signal = shutdown_signal() => {
            log::info!("{}; shutting down and keeping lease {}", signal?, lease.subnet);
            Ok(())
        }
    }
}

/// The node network for our `lease`, with the eBPF dataplane loaded in ebpf mode.
async fn node_network(
    netlink: Handle,
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    lease: &Lease,
) -> Result<NodeNetwork> {
    let public_ip = lease.attrs.public_ip;
    let vtep_mac = lease
        .attrs
        .vtep_mac()
        .context("our own lease has no VTEP MAC")?;
    let forwarding = match options.dataplane {
        DataplaneChoice::Kernel => None,
        DataplaneChoice::Ebpf => {
            Some(ebpf_forwarding(&netlink, options, config, uplink, public_ip, vtep_mac).await?)
        }
    };
    let settings = NodeSettings {
        bridge: options.bridge.clone(),
        vtep: vtep::VtepSpec {
            name: vtep::device_name(config.backend.vni),
            vni: config.backend.vni,
            local: public_ip,
            uplink_index: uplink.index,
            port: config.backend.port,
            mtu: overlay_mtu(config, uplink)?,
            mac: vtep_mac,
        },
        uplink: uplink.clone(),
        subnet: lease.subnet,
        network: config.network,
        direct_routing: config.backend.direct_routing,
    };
    Ok(NodeNetwork::new(netlink, settings, forwarding))
}

/// Loads the eBPF dataplane (adopting maps pinned by an earlier run) and writes its config.
async fn ebpf_forwarding(
    netlink: &Handle,
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    public_ip: std::net::Ipv4Addr,
    vtep_mac: mac::MacAddr,
) -> Result<EbpfForwarding> {
    let uplink_link = node::links::find(netlink, &uplink.name)
        .await?
        .with_context(|| format!("the uplink {} vanished", uplink.name))?;
    let uplink_mac =
        node::links::mac(&uplink_link).with_context(|| format!("{} has no MAC", uplink.name))?;
    let dataplane = Dataplane::load(Some(&options.bpf_pin_dir))?;
    Ok(EbpfForwarding {
        dataplane,
        config: OverlayConfig {
            vni: config.backend.vni,
            vxlan_port: config.backend.port,
            public_ip: public_ip.octets(),
            vtep_mac: vtep_mac.0,
            uplink_mac: uplink_mac.0,
            uplink_ifindex: uplink.index,
            ..OverlayConfig::default()
        },
        fast_path: options.fast_path,
        decap_hook: options.decap_hook,
        xdp_mode: options.xdp_mode,
        learner: Default::default(),
    })
}

/// Applies lease events as they come and repairs the node network and the nftables table on
/// their timers. Failures are logged and retried on the next round, never fatal.
async fn maintain(
    node: &mut NodeNetwork,
    masquerade: &mut Masquerade,
    mut received: mpsc::Receiver<LeaseEvent>,
) {
    let mut reconcile_timer = interval(RECONCILE_INTERVAL);
    let mut masquerade_timer = interval(MASQUERADE_INTERVAL);
    reconcile_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    masquerade_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let scope = tokio::select! {
            event = received.recv() => {
                let Some(event) = event else { return };
                apply_logged(node, event);
                // A burst (the initial listing, a re-list) is applied in one reconcile.
                while let Ok(event) = received.try_recv() {
                    apply_logged(node, event);
                }
                Scope::Leases
            }
            _ = reconcile_timer.tick() => Scope::Everything,
            _ = masquerade_timer.tick() => {
                if let Err(error) = masquerade.ensure() {
                    log::warn!("cannot restore the nftables rules: {error:#}");
                }
                continue;
            }
        };
        if let Err(error) = node.reconcile(scope).await {
            log::warn!("cannot bring the node network in line: {error:#}; retrying");
        }
    }
}

fn apply_logged(node: &mut NodeNetwork, event: LeaseEvent) {
    let (what, lease) = match &event {
        LeaseEvent::Added(lease) => ("added", lease),
        LeaseEvent::Changed(lease) => ("changed", lease),
        LeaseEvent::Removed(lease) => ("removed", lease),
    };
    let vtep = lease
        .attrs
        .vtep_mac()
        .map(|mac| mac.to_string())
        .unwrap_or_default();
    log::info!(
        "lease {what}: {} via {} (VTEP {vtep})",
        lease.subnet,
        lease.attrs.public_ip
    );
    node.apply(event);
}

/// Removes what the agent created on this host; with `release_lease`, also this host's
/// record in etcd.
pub async fn teardown(options: &AgentOptions, release_lease: bool) -> Result<()> {
    let netlink = netlink_handle()?;
    let previous = previous_subnet(&options.subnet_file);
    let network = subnet_file_network(&options.subnet_file);
    dataplane::pins::remove(&options.bpf_pin_dir)?;
    node::teardown(&netlink, &options.bridge, network).await?;
    masquerade::remove()?;
    log::info!(
        "removed the eBPF programs and pins, the overlay devices, routes and nftables table"
    );
    if release_lease {
        let subnet = previous.with_context(|| {
            format!(
                "--release-lease needs the subnet file {} to know the lease",
                options.subnet_file.display()
            )
        })?;
        let uplink = node::uplink::find(&netlink, &options.iface, &options.iface_regex).await?;
        let public_ip = options.public_ip.unwrap_or(uplink.address);
        let registry = Registry::connect(&options.etcd()).await?;
        registry.delete_if_owned(subnet, public_ip).await?;
        log::info!("released lease {subnet}");
    }
    Ok(())
}

fn subnet_file_network(path: &std::path::Path) -> Option<Ipv4Network> {
    let contents = std::fs::read_to_string(path).ok()?;
    contents
        .lines()
        .find_map(|line| line.strip_prefix("FLANNEL_NETWORK="))?
        .trim()
        .parse()
        .ok()
}

fn netlink_handle() -> Result<Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Waits while the config is missing or etcd unreachable, as flanneld does; an invalid config
/// is an error the operator must fix.
async fn wait_for_network_config(registry: &Registry) -> Result<NetworkConfig> {
    loop {
        match registry.network_config().await {
            Ok(config) => return Ok(config),
            Err(ConfigReadError::Invalid(error)) => return Err(error.into()),
            Err(error) => {
                log::warn!("{error}; retrying in {CONFIG_RETRY:?}");
                sleep(CONFIG_RETRY).await;
            }
        }
    }
}

/// The MTU inside the overlay: the underlay's (Backend MTU, else the uplink's) less VXLAN's
/// overhead.
fn overlay_mtu(config: &NetworkConfig, uplink: &Uplink) -> Result<u32> {
    let underlay_mtu = config.backend.mtu.unwrap_or(uplink.mtu);
    underlay_mtu.checked_sub(VXLAN_OVERHEAD).with_context(|| {
        format!("the underlay MTU {underlay_mtu} leaves no room for VXLAN's {VXLAN_OVERHEAD} bytes")
    })
}

async fn shutdown_signal() -> Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
