//! Pods attached the way a Kubernetes node running flannel attaches them: Debian's
//! containernetworking-plugins (`bridge` with `host-local` IPAM, then `portmap`), configured
//! from the subnet file exactly as flannel's CNI plugin builds its delegate configuration.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{cluster::Host, netns::Netns};

/// Where Debian's containernetworking-plugins installs the plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";
/// The bridge flannel's CNI configuration uses.
pub const CNI_BRIDGE: &str = "cni0";
/// The network name in kube-flannel's conflist.
const NETWORK_NAME: &str = "cbr0";
const CNI_VERSION: &str = "0.3.1";

/// A pod: a namespace whose eth0 the bridge plugin made.
pub struct Pod {
    pub netns: Netns,
    pub address: String,
}

/// What flannel's CNI plugin reads from the subnet file.
struct SubnetEnv {
    network: String,
    subnet: String,
    mtu: u64,
    ip_masq: bool,
}

impl SubnetEnv {
    fn read(path: &Path) -> Result<Self> {
        let contents = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let value = |key: &str| {
            contents
                .lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .with_context(|| format!("{} has no {key}", path.display()))
        };
        let subnet: ipnetwork::Ipv4Network = value("FLANNEL_SUBNET")?.parse()?;
        Ok(Self {
            network: value("FLANNEL_NETWORK")?.to_string(),
            // flannel's plugin parses FLANNEL_SUBNET as a CIDR: the network, not the gateway.
            subnet: format!("{}/{}", subnet.network(), subnet.prefix()),
            mtu: value("FLANNEL_MTU")?.parse()?,
            ip_masq: value("FLANNEL_IPMASQ")? == "true",
        })
    }

    /// The configuration flannel's plugin hands to the bridge plugin, from kube-flannel's
    /// delegate (`hairpinMode`, `isDefaultGateway`) and the subnet file; host-local keeps its
    /// state in `data_dir`.
    fn bridge_config(&self, data_dir: &Path) -> Value {
        json!({
            "cniVersion": CNI_VERSION,
            "name": NETWORK_NAME,
            "type": "bridge",
            "bridge": CNI_BRIDGE,
            "hairpinMode": true,
            "isDefaultGateway": true,
            "isGateway": true,
            "ipMasq": !self.ip_masq,
            "mtu": self.mtu,
            "ipam": {
                "type": "host-local",
                "dataDir": data_dir,
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": self.network}],
            },
        })
    }
}

impl Pod {
    /// Attaches a pod called `name` to `host` through the bridge plugin, then `portmap` with
    /// `port_mappings` (`[{"hostPort": .., "containerPort": .., "protocol": "tcp"}]`) as the
    /// chained plugin, as kube-flannel's conflist runs them.
    pub fn attach(host: &Host, name: &str, port_mappings: Value) -> Result<Self> {
        let netns = Netns::new(name)?;
        let env = SubnetEnv::read(&host.subnet_file())?;
        let data_dir = host.dir.join("cni");
        let bridge = env.bridge_config(&data_dir);
        let result = run_plugin(host, &netns, "bridge", &bridge)?;
        let address = result["ips"][0]["address"]
            .as_str()
            .and_then(|cidr| cidr.split('/').next())
            .with_context(|| format!("the bridge plugin gave no address: {result}"))?
            .to_string();
        let portmap = json!({
            "cniVersion": CNI_VERSION,
            "name": NETWORK_NAME,
            "type": "portmap",
            "capabilities": {"portMappings": true},
            "runtimeConfig": {"portMappings": port_mappings},
            "prevResult": result,
        });
        run_plugin(host, &netns, "portmap", &portmap)?;
        Ok(Self { netns, address })
    }
}

/// Runs `plugin` with CNI_COMMAND=ADD in `host`'s namespace for the pod `pod`; returns the
/// plugin's result.
fn run_plugin(host: &Host, pod: &Netns, plugin: &str, config: &Value) -> Result<Value> {
    let binary: PathBuf = Path::new(CNI_PATH).join(plugin);
    if !binary.exists() {
        bail!(
            "{} does not exist: `cargo xtask setup` installs containernetworking-plugins",
            binary.display()
        );
    }
    let binary = binary.display().to_string();
    let mut child = host
        .netns
        .command(&[&binary])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", format!("/run/netns/{}", pod.name()))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {binary}"))?;
    child
        .stdin
        .take()
        .context("the plugin has no stdin")?
        .write_all(config.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "{plugin} ADD failed ({}): {stdout} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_str(&stdout).with_context(|| format!("{plugin} printed no result: {stdout}"))
}
