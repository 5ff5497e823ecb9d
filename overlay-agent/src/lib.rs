//! The overlay node daemon, as a library: the binary is a thin wrapper around [`run`].
//!
//! One module per concern, in the spirit of flannel's packages: `config` (the network config),
//! `subnet` (leases and the etcd registry), `node` (the host's network devices), `dataplane`
//! (the eBPF programs and maps), `health`, and `options` (the command line).
pub mod config;
pub mod dataplane;
pub mod health;
pub mod mac;
pub mod node;
pub mod options;
pub mod subnet;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, anyhow};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::sleep,
};

use crate::{
    config::{NetworkConfig, VXLAN_OVERHEAD},
    health::Readiness,
    node::uplink::Uplink,
    options::AgentOptions,
    subnet::{
        LeaseEvent,
        file::{SubnetEnv, previous_subnet},
        manager::{LeaseManager, LeaseTiming},
        registry::{ConfigReadError, Registry},
        watch::LeaseWatcher,
    },
};

const CONFIG_RETRY: Duration = Duration::from_secs(1);
const EVENT_QUEUE: usize = 1024;

/// Runs the agent until a signal asks it to stop (returns `Ok`, keeping the lease) or it can
/// no longer do its job (returns the reason, e.g. a revoked lease).
pub async fn run(options: AgentOptions) -> Result<()> {
    let (connection, netlink, _) =
        rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(connection);
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
    let lease = manager
        .acquire(None, previous_subnet(&options.subnet_file))
        .await?;
    subnet_env(&config, &uplink, &options, lease.subnet)?.write_atomically(&options.subnet_file)?;
    readiness.set_ready();
    log::info!(
        "ready: subnet {} written to {}",
        lease.subnet,
        options.subnet_file.display()
    );

    let (events, received) = mpsc::channel(EVENT_QUEUE);
    let watcher = LeaseWatcher::new(registry, config, lease.clone());
    tokio::select! {
        result = manager.keep_alive(lease.clone()) => result,
        result = watcher.run(events) => result.and(Err(anyhow!("the lease watch stopped"))),
        () = log_events(received) => Err(anyhow!("the lease event stream ended")),
        signal = shutdown_signal() => {
            log::info!("{}; shutting down and keeping lease {}", signal?, lease.subnet);
            Ok(())
        }
    }
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

fn subnet_env(
    config: &NetworkConfig,
    uplink: &Uplink,
    options: &AgentOptions,
    subnet: ipnetwork::Ipv4Network,
) -> Result<SubnetEnv> {
    let underlay_mtu = config.backend.mtu.unwrap_or(uplink.mtu);
    let mtu = underlay_mtu.checked_sub(VXLAN_OVERHEAD).with_context(|| {
        format!("the underlay MTU {underlay_mtu} leaves no room for VXLAN's {VXLAN_OVERHEAD} bytes")
    })?;
    Ok(SubnetEnv {
        network: config.network,
        subnet,
        mtu,
        ip_masq: options.ip_masq,
    })
}

async fn log_events(mut received: mpsc::Receiver<LeaseEvent>) {
    while let Some(event) = received.recv().await {
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
    }
}

async fn shutdown_signal() -> Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
