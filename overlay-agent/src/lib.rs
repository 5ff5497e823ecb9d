//! The overlay node daemon, as a library: the binary is a thin wrapper around [`run`] and
//! [`teardown`].
//!
//! One module per concern, in the spirit of flannel's packages: `config` (the network config),
//! `subnet` (leases and the etcd registry), `reconcile` (from leases and netlink notifications
//! to the desired state, applied through two sinks), `node` (the host's network devices, the
//! netlink sink), `dataplane` (the eBPF programs and maps, the other sink), `masquerade`,
//! `health`, and `options` (the command line).
pub mod config;
pub mod dataplane;
pub mod health;
pub mod mac;
pub mod masquerade;
pub mod metrics;
pub mod monitor;
pub mod node;
pub mod options;
pub mod reconcile;
pub mod status;
pub mod subnet;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use overlay_common::{CONFIG_DIRECT_ROUTING, OverlayConfig};
use rtnetlink::Handle;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::sleep,
};

use crate::{
    config::{NetworkConfig, VXLAN_IPV6_OVERHEAD, VXLAN_OVERHEAD},
    dataplane::{Dataplane, LeaseCapacity, pins::PinDirLock, refusals::RefusalWatch, strays::Keep},
    health::{Health, Stage},
    mac::MacAddr,
    masquerade::{Masquerade, Rules},
    metrics::Metrics,
    node::{FamilySettings, NodeNetwork, NodeSettings, uplink::Uplink, vtep},
    options::{AgentOptions, Dataplane as DataplaneChoice},
    reconcile::{EbpfSink, Reconciler, Scope, desired::RoutingRules},
    subnet::{
        Lease, LeaseSubnets, PublicAddresses, VtepMacs, config_change,
        etcd::EtcdRegistry,
        file::{SubnetEnv, previous_networks, previous_subnet},
        manager::{LeaseManager, LeaseTiming},
        registry::{ConfigReadError, Registry},
        watch::LeaseWatcher,
    },
};

const CONFIG_RETRY: Duration = Duration::from_secs(1);
const EVENT_QUEUE: usize = 1024;

/// Runs the agent until a signal asks it to stop (returns `Ok`, keeping the lease and the
/// devices) or it can no longer do its job (returns the reason, e.g. a revoked lease).
pub async fn run(options: AgentOptions) -> Result<()> {
    let netlink = node::links::connect()?;
    let uplink = node::uplink::find(&netlink, uplink_choice(&options)).await?;
    log::info!(
        "uplink {} ({})",
        uplink.name,
        uplink
            .address
            .map_or("no IPv4 address".to_string(), |address| address.to_string())
    );
    let health = Health::new(options.healthz_grace);
    let pin_dir = options.pin_dir()?;
    let _pin_lock = PinDirLock::take(&pin_dir)?;
    let pinned = (options.dataplane == DataplaneChoice::Ebpf).then(|| pin_dir.clone());
    let metrics = Metrics::new(pinned);
    if options.healthz_port != 0 {
        health::serve(
            SocketAddr::from((options.healthz_ip, options.healthz_port)),
            health.clone(),
            metrics.clone(),
        )
        .await?;
    }

    let registry = EtcdRegistry::connect(&options.etcd()).await?;
    let config = wait_for_network_config(&registry).await?;
    refuse_what_the_dataplane_lacks(&config, options.dataplane)?;
    let public = PublicAddresses {
        ipv4: public_ipv4(&options, &config, &uplink)?,
        ipv6: public_ipv6(&options, &config, &uplink)?,
    };
    let manager = LeaseManager {
        registry: registry.clone(),
        config: config.clone(),
        public,
        timing: LeaseTiming {
            ttl: options.subnet_lease_ttl,
            renew_margin: options.renew_margin(),
        },
        metrics: metrics.leases.clone(),
        health: health.clone(),
    };
    // Loaded before the lease is taken: a node that cannot load its dataplane (a pinned map
    // it cannot replace, a kernel that refuses the programs) never advertises a subnet.
    let dataplane = load_dataplane(&options, &config, &pin_dir, &netlink).await?;
    health.reached(Stage::DataplaneLoaded);
    // A VTEP MAC already on a device is kept, so peers never hold a stale one.
    let vni = config.backend.vni;
    let existing_macs = VtepMacs {
        ipv4: vtep::existing_mac(&netlink, &vtep::device_name(vni)).await?,
        ipv6: vtep::existing_mac(&netlink, &vtep::ipv6_device_name(vni)).await?,
    };
    let lease = manager
        .acquire(existing_macs, previous_subnet(&options.subnet_file))
        .await?;

    let notifications = reconcile::subscribe()?;
    let mut reconciler = reconciler(
        dataplane,
        netlink.clone(),
        &options,
        &config,
        &uplink,
        &lease,
        &metrics,
    )
    .await?;
    let config_registry = registry.clone();
    let mut watcher = LeaseWatcher::new(
        registry,
        config.clone(),
        lease.clone(),
        metrics.leases.clone(),
        health.clone(),
    );
    reconciler.apply_initial(watcher.initial_leases().await?);
    reconciler.reconcile(Scope::Everything).await?;
    if let Some(dataplane) = reconciler.dataplane() {
        remove_stray_programs(&netlink, &dataplane.kept()?).await?;
    }
    let mut masquerade = masquerade_for(&options, &config, &lease);
    masquerade.ensure()?;
    SubnetEnv {
        ipv4: config.enable_ipv4.then_some((config.network, lease.subnet)),
        ipv6: config
            .ipv6
            .zip(lease.ipv6_subnet)
            .map(|(range, subnet)| (range.network, subnet)),
        mtu: if config.enable_ipv4 {
            overlay_mtu(&config, &uplink, VXLAN_OVERHEAD)?
        } else {
            overlay_mtu(&config, &uplink, VXLAN_IPV6_OVERHEAD)?
        },
        ip_masq: options.ip_masq,
    }
    .write_atomically(&options.subnet_file)?;
    health.reached(Stage::Ready);
    notify_systemd_ready();
    log::info!(
        "ready: subnet {} written to {}",
        lease.subnets(),
        options.subnet_file.display()
    );

    let (events, received) = mpsc::channel(EVENT_QUEUE);
    let resync = Duration::from_secs(options.iptables_resync);
    tokio::select! {
        result = manager.keep_alive(lease.clone()) => result,
        result = watcher.run(events) => result.and(Err(anyhow!("the lease watch stopped"))),
        () = reconciler.run(received, notifications, &mut masquerade, resync, &health) => Err(anyhow!("the lease event stream ended")),
        change = config_change::stop_on_change(&config_registry, &config) => Err(change),
        signal = shutdown_signal() => {
            log::info!("{}; shutting down and keeping lease {}", signal?, lease.subnets());
            Ok(())
        }
    }
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

/// The PublicIP of our record: `--public-ip`, else the uplink's IPv4 address; flannel's
/// 0.0.0.0 in an IPv6-only network.
fn public_ipv4(
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
) -> Result<Ipv4Addr> {
    if !config.enable_ipv4 {
        return Ok(Ipv4Addr::UNSPECIFIED);
    }
    let public_ip = options.public_ip.or(uplink.address).with_context(|| {
        format!(
            "the uplink {} has no IPv4 address for flannel.{}: give the uplink one, or name \
             another with --iface",
            uplink.name, config.backend.vni
        )
    })?;
    log::info!("public IP {public_ip}");
    Ok(public_ip)
}

/// With IPv6 in the network, the PublicIPv6 of our record: `--public-ipv6`, else the
/// uplink's IPv6 address, which the IPv6 tunnel leaves from either way.
fn public_ipv6(
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
) -> Result<Option<Ipv6Addr>> {
    if config.ipv6.is_none() {
        return Ok(None);
    }
    let local = uplink.ipv6.with_context(|| {
        format!(
            "network config: EnableIPv6 is true, but the uplink {} has no usable IPv6 address \
             for flannel-v6.{}",
            uplink.name, config.backend.vni
        )
    })?;
    let public_ipv6 = options.public_ipv6.unwrap_or(local);
    log::info!("uplink IPv6 {local}, public IPv6 {public_ipv6}");
    Ok(Some(public_ipv6))
}

/// flannel's forward and masquerade rules for our `subnet`, where `EnableNFTables` says.
fn masquerade_for(options: &AgentOptions, config: &NetworkConfig, lease: &Lease) -> Masquerade {
    let backend = if config.enable_nftables {
        masquerade::Backend::Nftables
    } else {
        masquerade::Backend::Iptables
    };
    let rules = Rules {
        ipv4: config.enable_ipv4.then_some(masquerade::Networks {
            network: config.network,
            subnet: lease.subnet,
        }),
        ipv6: config
            .ipv6
            .zip(lease.ipv6_subnet)
            .map(|(range, subnet)| masquerade::Networks {
                network: range.network,
                subnet,
            }),
        masquerade: options.ip_masq,
        forward: options.iptables_forward_rules,
        fully_random: !options.ip_masq_fully_random_disable,
    };
    Masquerade::new(rules, backend)
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

/// The reconciler for our `lease`, with the eBPF dataplane loaded in ebpf mode.
async fn reconciler(
    dataplane: Option<Dataplane>,
    netlink: Handle,
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    lease: &Lease,
    metrics: &Metrics,
) -> Result<Reconciler> {
    let ebpf = match dataplane {
        None => None,
        Some(dataplane) => {
            Some(ebpf_sink(dataplane, &netlink, options, config, uplink, lease).await?)
        }
    };
    let vtep_spec = |name: String, local: IpAddr, mtu: u32, mac: MacAddr| vtep::VtepSpec {
        name,
        vni: config.backend.vni,
        local,
        uplink_index: uplink.index,
        port: config.backend.port,
        mtu,
        mac,
        gbp: config.backend.gbp,
        learning: config.backend.learning,
    };
    let ipv4_vtep = lease.attrs.vtep_mac().zip(uplink.address);
    let ipv4 = match ipv4_vtep.filter(|_| config.enable_ipv4) {
        Some((mac, local)) => Some(FamilySettings {
            vtep: vtep_spec(
                vtep::device_name(config.backend.vni),
                // flannel's tunnel source: the uplink's address, whatever --public-ip says.
                IpAddr::V4(local),
                overlay_mtu(config, uplink, VXLAN_OVERHEAD)?,
                mac,
            ),
            subnet: lease.subnet,
            network: config.network,
        }),
        None => None,
    };
    let ipv6 = match (
        config.ipv6,
        lease.ipv6_subnet,
        lease.attrs.vtep_mac_v6(),
        uplink.ipv6,
    ) {
        (Some(range), Some(subnet), Some(mac), Some(local)) => Some(FamilySettings {
            vtep: vtep_spec(
                vtep::ipv6_device_name(config.backend.vni),
                IpAddr::V6(local),
                overlay_mtu(config, uplink, VXLAN_IPV6_OVERHEAD)?,
                mac,
            ),
            subnet,
            network: range.network,
        }),
        _ => None,
    };
    // The IPv6 lease counts where this host carries IPv6.
    let subnets = LeaseSubnets {
        ipv4: lease.subnet,
        ipv6: ipv6.as_ref().map(|family| family.subnet),
    };
    let settings = NodeSettings {
        bridge: options.bridge.clone(),
        ipv4,
        ipv6,
        uplink: uplink.clone(),
        blackhole_route: options.ip_blackhole_route,
    };
    let rules = RoutingRules {
        network: config.network,
        ipv6_network: config.ipv6.map(|range| range.network),
        install_fdb: ebpf.is_none(),
        direct_routing: config.backend.direct_routing,
    };
    Ok(Reconciler::new(
        NodeNetwork::new(netlink, settings),
        ebpf,
        rules,
        subnets,
        metrics.reconcile.clone(),
    ))
}

/// In ebpf mode, the eBPF object loaded into the kernel with its maps pinned in `pin_dir`
/// (adopting those an earlier run pinned), its programs not yet attached. In kernel mode,
/// none, and nothing of an earlier ebpf run left attached.
async fn load_dataplane(
    options: &AgentOptions,
    config: &NetworkConfig,
    pin_dir: &Path,
    netlink: &Handle,
) -> Result<Option<Dataplane>> {
    if options.dataplane != DataplaneChoice::Ebpf {
        remove_ebpf_dataplane(pin_dir, netlink).await?;
        return Ok(None);
    }
    let lease_capacity = LeaseCapacity::for_subnets(config.subnet_count());
    let dataplane = Dataplane::load(Some(pin_dir), options.bpf_log, lease_capacity)?;
    Ok(Some(dataplane.with_tc_attach(options.tc_attach)))
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

/// The eBPF dataplane as the reconciler's sink, with the settings of this node.
async fn ebpf_sink(
    dataplane: Dataplane,
    netlink: &Handle,
    options: &AgentOptions,
    config: &NetworkConfig,
    uplink: &Uplink,
    lease: &Lease,
) -> Result<EbpfSink> {
    let uplink_link = node::links::find(netlink, &uplink.name)
        .await?
        .with_context(|| format!("the uplink {} vanished", uplink.name))?;
    let uplink_mac =
        node::links::mac(&uplink_link).with_context(|| format!("{} has no MAC", uplink.name))?;
    Ok(EbpfSink {
        dataplane,
        config: OverlayConfig {
            vni: config.backend.vni,
            vxlan_port: config.backend.port,
            // The outer source, as the kernel's vxlan device would send it; an IPv6-only
            // network sends none.
            public_ip: if config.enable_ipv4 {
                uplink
                    .address
                    .with_context(|| format!("the uplink {} has no IPv4 address", uplink.name))?
                    .octets()
            } else {
                [0; 4]
            },
            // VXLAN over IPv6 comes to the tunnel's source, flannel-v6.<VNI>'s local address;
            // in a network without IPv6 none is ours, and all of it passes unchecked.
            public_ipv6: config
                .ipv6
                .and(uplink.ipv6)
                .map_or([0; 16], |address| address.octets()),
            // Without the family no packet reads it.
            vtep_mac: lease.attrs.vtep_mac().map_or([0; 6], |mac| mac.0),
            vtep6_mac: lease.attrs.vtep_mac_v6().map_or([0; 6], |mac| mac.0),
            uplink_mac: uplink_mac.0,
            uplink_ifindex: uplink.index,
            flags: if config.backend.direct_routing {
                CONFIG_DIRECT_ROUTING
            } else {
                0
            },
            ..OverlayConfig::default()
        },
        fast_path: options.fast_path,
        decap_hook: options.decap_hook,
        xdp_mode: options.xdp_mode,
        refusals: RefusalWatch::default(),
    })
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
        let subnets = previous.with_context(|| {
            format!(
                "--release-lease needs the subnet file {} to know the lease",
                options.subnet_file.display()
            )
        })?;
        let owner = lease_owner(&netlink, options, subnets).await?;
        let registry = EtcdRegistry::connect(&options.etcd()).await?;
        registry.delete_if_owned(subnets, owner).await?;
        log::info!("released lease {subnets}");
    }
    Ok(())
}

/// The public addresses this host's record of `subnets` names, found as `run` finds them.
async fn lease_owner(
    netlink: &Handle,
    options: &AgentOptions,
    subnets: LeaseSubnets,
) -> Result<PublicAddresses> {
    let uplink = node::uplink::find(netlink, uplink_choice(options)).await?;
    let ipv6 = subnets.ipv6.and(options.public_ipv6.or(uplink.ipv6));
    let ipv4 = if subnets.ipv4_subnet().is_none() {
        Ipv4Addr::UNSPECIFIED
    } else {
        options
            .public_ip
            .or(uplink.address)
            .with_context(|| format!("the uplink {} has no IPv4 address", uplink.name))?
    };
    Ok(PublicAddresses { ipv4, ipv6 })
}

/// Waits while the config is missing or etcd unreachable, as flanneld does; an invalid config
/// is an error the operator must fix.
async fn wait_for_network_config(registry: &impl Registry) -> Result<NetworkConfig> {
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
/// The MTU inside the tunnel: the underlay's less the `overhead` of VXLAN over its family.
fn overlay_mtu(config: &NetworkConfig, uplink: &Uplink, overhead: u32) -> Result<u32> {
    let underlay_mtu = config.backend.mtu.unwrap_or(uplink.mtu);
    underlay_mtu.checked_sub(overhead).with_context(|| {
        format!("the underlay MTU {underlay_mtu} leaves no room for VXLAN's {overhead} bytes")
    })
}

/// Waits for SIGTERM or SIGINT; returns its name.
pub(crate) async fn shutdown_signal() -> Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
