//! The overlay node daemon, as a library: the binary is a thin wrapper around [`run`] and
//! [`teardown`]. This file is the composition root: it finds the uplink, loads the dataplane,
//! takes the lease, derives the [`settings`] and wires the tasks together.
//!
//! One module per concern, in the spirit of flannel's packages: `config` (the network config),
//! `subnet` (leases and the etcd registry), `model` (the plain values the layers hand each
//! other), `sinks` (the traits the reconciler applies through), `reconcile` (from leases and
//! notifications to one desired state, applied in order), `node` (the host's network devices,
//! the netlink sink), `dataplane` (the eBPF programs and maps, the other sink), `masquerade`,
//! `health`, `metrics`, and `options` (the command line).
pub mod config;
pub mod dataplane;
pub mod health;
pub mod mac;
pub mod masquerade;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod node;
pub mod options;
pub mod reconcile;
pub mod settings;
pub mod sinks;
pub mod status;
pub mod subnet;

use std::{
    future::pending,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use rtnetlink::Handle;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
    time::sleep,
};

use crate::{
    config::NetworkConfig,
    dataplane::{
        Dataplane, LeaseCapacity, collector::DataplaneCollector, pins::PinDirLock,
        refusals::warn_about_refusals, strays::Keep,
    },
    health::{Duty, Health, Stage},
    masquerade::keep_restored,
    metrics::Metrics,
    node::{NodeNetwork, uplink::Uplink, vtep},
    options::{AgentOptions, Dataplane as DataplaneChoice},
    reconcile::Reconciler,
    settings::{Families, Settings, public_addresses},
    subnet::{
        Lease, LeaseSubnets, VtepMacs, config_change,
        etcd::EtcdRegistry,
        file::{previous_networks, previous_subnet},
        manager::{LeaseManager, LeaseRevoked, LeaseTiming},
        registry::{ConfigReadError, Registry, Release, own_subnets},
        watch::LeaseWatcher,
    },
};

const CONFIG_RETRY: Duration = Duration::from_secs(1);
const EVENT_QUEUE: usize = 1024;

/// Runs the agent until a signal asks it to stop (returns `Ok`, keeping the lease and the
/// devices) or it can no longer do its job (returns the reason, e.g. a revoked lease).
pub async fn run(options: AgentOptions) -> Result<()> {
    let netlink = node::links::connect()?;
    let uplink = find_uplink(&netlink, &options).await?;
    let health = Health::new(options.healthz_grace);
    let pin_dir = options.pin_dir()?;
    let _pin_lock = PinDirLock::take(&pin_dir)?;
    let ebpf_pins = (options.dataplane == DataplaneChoice::Ebpf).then(|| pin_dir.clone());
    let metrics = Metrics::new(ebpf_pins.clone().map(DataplaneCollector::boxed));
    serve_health(&options, &health, &metrics).await?;
    let registry = EtcdRegistry::connect(&options.etcd()).await?;
    let config = wait_for_network_config(&registry, &health).await?;
    refuse_what_the_dataplane_lacks(&config, options.dataplane)?;
    // Loaded before the lease is taken: a node that cannot load its dataplane (a pinned map
    // it cannot replace, a kernel that refuses the programs) never advertises a subnet.
    let dataplane = load_dataplane(&options, &config, &pin_dir, &netlink, &uplink).await?;
    health.reached(Stage::DataplaneLoaded);
    let manager = lease_manager(&options, &config, &uplink, &registry, &metrics, &health)?;
    let lease = acquire_lease(&manager, &netlink, &options, &config).await?;
    let uplink_mac = node::links::mac_of(&netlink, &uplink.name).await?;
    let settings = Settings::derive(&options, &config, &uplink, uplink_mac, &lease)?;

    let notifications = node::notifications::subscribe()?;
    let lease_metrics = metrics.leases.clone();
    let mut watcher = LeaseWatcher::new(
        registry.clone(),
        config.clone(),
        lease.clone(),
        lease_metrics,
        health.clone(),
    );
    let node = NodeNetwork::new(netlink.clone(), settings.node);
    let initial = watcher.initial_leases().await?;
    let rounds = metrics.reconcile.clone();
    let mut reconciler =
        Reconciler::start(node, dataplane, settings.intent, initial, rounds).await?;
    match reconciler.dataplane() {
        Some(dataplane) => remove_stray_programs(&netlink, &dataplane.kept()?).await?,
        // Only now: until the first round put the kernel's own path in place (the FDB entries
        // an ebpf run does without), an earlier ebpf run's programs carry the traffic.
        None => remove_ebpf_dataplane(&pin_dir, &netlink).await?,
    }
    let masquerade = masquerade::start(settings.masquerade);
    let mut shutdown = ShutdownSignals::catch()?;
    settings.subnet_env.write_atomically(&options.subnet_file)?;
    announce_ready(&health, &lease, &options.subnet_file);

    let (events, received) = mpsc::channel(EVENT_QUEUE);
    let resync = Duration::from_secs(options.iptables_resync);
    let outcome = tokio::select! {
        result = manager.keep_alive(lease.clone()) => result,
        result = watcher.run(events) => result.and(Err(anyhow!("the lease watch stopped"))),
        () = reconciler.run(received, notifications, &health) => Err(anyhow!("the lease event stream ended")),
        () = keep_restored(masquerade, resync) => Err(anyhow!("the masquerade check stopped")),
        () = watch_pinned_dataplane(ebpf_pins) => Err(anyhow!("the dataplane watch stopped")),
        change = config_change::stop_on_change(&registry, &config) => Err(change),
        signal = shutdown.received() => {
            log::info!("{signal}; shutting down and keeping lease {}", lease.subnets());
            Ok(())
        }
    };
    ending_cleanly_when_revoked(outcome)
}

/// A revoked lease ends the agent with status 0, as it ends flanneld: a supervisor with
/// `Restart=on-failure` leaves it stopped rather than have it take a new subnet.
fn ending_cleanly_when_revoked(outcome: Result<()>) -> Result<()> {
    match outcome {
        Err(error) if error.chain().any(|cause| cause.is::<LeaseRevoked>()) => {
            log::error!("{error:#}: Lease has been revoked. Shutting down daemon.");
            Ok(())
        }
        other => other,
    }
}

/// In ebpf mode, names the refusals of the dataplane pinned in `pin_dir` in the log and turns
/// off the reports a monitor left on, for as long as it is polled; in kernel mode, nothing.
async fn watch_pinned_dataplane(pin_dir: Option<PathBuf>) {
    match pin_dir {
        Some(pin_dir) => {
            tokio::join!(
                warn_about_refusals(pin_dir.clone()),
                monitor::end_reports_of_gone_monitors(pin_dir)
            );
        }
        None => pending().await,
    }
}

/// The uplink the flags ask for, as flanneld picks it.
async fn find_uplink(netlink: &Handle, options: &AgentOptions) -> Result<Uplink> {
    let uplink = node::uplink::find(netlink, uplink_choice(options)).await?;
    let address = uplink
        .address
        .map_or("no IPv4 address".to_string(), |address| address.to_string());
    log::info!("uplink {} ({address})", uplink.name);
    Ok(uplink)
}

/// `/healthz` and `/metrics`, unless `--healthz-port 0`.
async fn serve_health(
    options: &AgentOptions,
    health: &Health,
    metrics: &Arc<Metrics>,
) -> Result<()> {
    if options.healthz_port == 0 {
        return Ok(());
    }
    let address = SocketAddr::from((options.healthz_ip, options.healthz_port));
    health::serve(address, health.clone(), metrics.clone()).await
}

/// The manager of our lease, whose record names the public addresses the flags and the
/// uplink give.
fn lease_manager(
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    registry: &EtcdRegistry,
    metrics: &Metrics,
    health: &Health,
) -> Result<LeaseManager<EtcdRegistry>> {
    let public = public_addresses(options, uplink, Families::of_config(config))?;
    log::info!("public IP {}", public.ipv4);
    if let Some(ipv6) = public.ipv6 {
        log::info!("public IPv6 {ipv6}");
    }
    Ok(LeaseManager {
        registry: registry.clone(),
        config: config.clone(),
        public,
        timing: LeaseTiming {
            ttl: options.subnet_lease_ttl,
            renew_margin: options.renew_margin(),
        },
        metrics: metrics.leases.clone(),
        health: health.clone(),
    })
}

/// Takes our lease: the one the subnet file names if it is still ours, with the VTEP MACs
/// already on the devices, so peers never hold a stale one.
async fn acquire_lease(
    manager: &LeaseManager<EtcdRegistry>,
    netlink: &Handle,
    options: &AgentOptions,
    config: &NetworkConfig,
) -> Result<Lease> {
    let vni = config.backend.vni;
    let existing_macs = VtepMacs {
        ipv4: vtep::existing_mac(netlink, &vtep::device_name(vni)).await?,
        ipv6: vtep::existing_mac(netlink, &vtep::ipv6_device_name(vni)).await?,
    };
    manager
        .acquire(existing_macs, previous_subnet(&options.subnet_file))
        .await
}

/// Says the node is ready: to `/healthz`, to systemd, and in the log.
fn announce_ready(health: &Health, lease: &Lease, subnet_file: &Path) {
    health.reached(Stage::Ready);
    notify_systemd_ready();
    log::info!(
        "ready: subnet {} written to {}",
        lease.subnets(),
        subnet_file.display()
    );
}

/// Refuses, before any lease is taken, a network config the chosen dataplane cannot carry.
fn refuse_what_the_dataplane_lacks(
    config: &NetworkConfig,
    dataplane: DataplaneChoice,
) -> Result<()> {
    if dataplane == DataplaneChoice::Ebpf && (config.backend.gbp || config.backend.learning) {
        bail!(
            "network config: Backend.GBP and Backend.Learning are not supported by the ebpf \
             dataplane, which encapsulates itself: run with --dataplane=kernel"
        );
    }
    Ok(())
}

fn uplink_choice(options: &AgentOptions) -> node::uplink::Choice<'_> {
    node::uplink::Choice {
        ifaces: &options.iface,
        regexes: &options.iface_regex,
        can_reach: options.iface_can_reach,
        public_ip: options.public_ip,
        public_ipv6: options.public_ipv6,
    }
}

/// Tells systemd, when it started us as a `Type=notify` unit, that the subnet file is written,
/// as flanneld does. Outside systemd there is no NOTIFY_SOCKET and nothing is sent.
fn notify_systemd_ready() {
    if let Err(error) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        log::warn!("cannot tell systemd we are ready: {error}");
    }
}

/// In ebpf mode, the eBPF object loaded into the kernel with its maps pinned in `pin_dir`
/// (adopting those an earlier run pinned), its programs not yet attached. In kernel mode,
/// none: what an earlier ebpf run left attached is removed once the kernel's path is in place.
async fn load_dataplane(
    options: &AgentOptions,
    config: &NetworkConfig,
    pin_dir: &Path,
    netlink: &Handle,
    uplink: &Uplink,
) -> Result<Option<Dataplane>> {
    if options.dataplane != DataplaneChoice::Ebpf {
        return Ok(None);
    }
    let lease_capacity = LeaseCapacity::for_subnets(config.subnet_count())
        .with_lease_addresses(config.lease_addresses());
    let dataplane = Dataplane::load(Some(pin_dir), options.bpf_log, lease_capacity)?;
    let link = node::links::find(netlink, &uplink.name).await?;
    let xdp_attached = link.as_ref().and_then(node::links::xdp_attach_mode);
    Ok(Some(
        dataplane
            .with_tc_attach(options.tc_attach.into())
            .with_xdp_attached(uplink.index, xdp_attached, options.xdp_mode.into()),
    ))
}

/// Unpins the dataplane pinned in `pin_dir` and detaches every program of ours in this
/// namespace.
async fn remove_ebpf_dataplane(pin_dir: &Path, netlink: &Handle) -> Result<()> {
    dataplane::pins::remove(pin_dir)?;
    remove_stray_programs(netlink, &Keep::default()).await
}

/// Detaches the programs of ours in this namespace that `keep` does not hold: left by an
/// earlier run in another mode, with another pin directory or through the other tc path.
async fn remove_stray_programs(netlink: &Handle, keep: &Keep) -> Result<()> {
    let interfaces = node::links::interfaces(netlink).await?;
    for removed in dataplane::strays::remove(&interfaces, keep)? {
        log::warn!("detached {removed}, left by an earlier run: these flags do not call for it");
    }
    Ok(())
}

/// Removes what the agent created on this host; with `release_lease`, also this host's
/// record in etcd.
pub async fn teardown(options: &AgentOptions, release_lease: bool) -> Result<()> {
    let netlink = node::links::connect()?;
    let previous = previous_subnet(&options.subnet_file);
    let networks = previous_networks(&options.subnet_file);
    let pin_dir = options.pin_dir()?;
    let _pin_lock = PinDirLock::take(&pin_dir)?;
    remove_ebpf_dataplane(&pin_dir, &netlink).await?;
    node::teardown(&netlink, &options.bridge, networks).await?;
    masquerade::remove()?;
    log::info!(
        "removed the eBPF programs and pins, the overlay devices and routes, and the forward and masquerade rules"
    );
    if release_lease {
        release_own_lease(options, &netlink, previous).await?;
    }
    Ok(())
}

/// Deletes this host's record from etcd: the lease the subnet file names or, without the file
/// (gone with /run at a reboot), the record naming this host's public addresses, the one
/// flanneld would take back when it starts.
async fn release_own_lease(
    options: &AgentOptions,
    netlink: &Handle,
    from_file: Option<LeaseSubnets>,
) -> Result<()> {
    let uplink = node::uplink::find(netlink, uplink_choice(options)).await?;
    let registry = EtcdRegistry::connect(&options.etcd()).await?;
    let (subnets, owner) = match from_file {
        Some(subnets) => (
            subnets,
            public_addresses(options, &uplink, Families::of_lease(subnets))?,
        ),
        None => {
            let config = registry.network_config().await.with_context(|| {
                format!(
                    "without the subnet file {}, the lease is found by the network config",
                    options.subnet_file.display()
                )
            })?;
            let owner = public_addresses(options, &uplink, Families::of_config(&config))?;
            let Some(subnets) = own_subnets(&registry, owner).await? else {
                log::info!("no record names {owner}: there is no lease to release");
                return Ok(());
            };
            (subnets, owner)
        }
    };
    match registry.release_if_owned(subnets, owner).await? {
        Release::Deleted => log::info!("released lease {subnets} of {owner}"),
        Release::NotOwned => log::warn!("{subnets} is not held by {owner}; leaving it"),
        Release::Reserved => log::info!(
            "{subnets} is reserved for {owner} (a record without etcd lease): kept; an operator \
             deletes a reservation with etcdctl"
        ),
    }
    Ok(())
}

/// Waits while the config is missing, invalid or etcd unreachable, retrying every second as
/// flanneld does (its `getConfig`), and says why in the log and through `health`.
async fn wait_for_network_config(
    registry: &impl Registry,
    health: &Health,
) -> Result<NetworkConfig> {
    let mut last_invalid = None;
    loop {
        let attempted = tokio::time::Instant::now();
        let error = match registry.network_config().await {
            Ok(config) => {
                health.succeeded(Duty::NetworkConfig);
                log::info!("found the network config");
                return Ok(config);
            }
            Err(ConfigReadError::Invalid(error)) => {
                let error = error.to_string();
                // flanneld logs it every second; once per distinct error says as much.
                if last_invalid.as_ref() != Some(&error) {
                    log::error!(
                        "the network config is invalid: {error}; retrying every {CONFIG_RETRY:?} \
                         until it is fixed"
                    );
                }
                last_invalid = Some(error.clone());
                anyhow!("the network config is invalid: {error}")
            }
            Err(error) => {
                log::warn!("{error}; retrying in {CONFIG_RETRY:?}");
                last_invalid = None;
                anyhow!("{error}")
            }
        };
        health.failed(Duty::NetworkConfig, attempted, &error);
        sleep(CONFIG_RETRY).await;
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made: made inside the main loop, one
/// that came between readiness and the loop's first poll would end the process uncleanly.
pub(crate) struct ShutdownSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignals {
    pub(crate) fn catch() -> Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        })
    }

    /// Waits for either signal; returns its name.
    pub(crate) async fn received(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
