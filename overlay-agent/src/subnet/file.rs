//! The subnet file (`/run/flannel/subnet.env`): flannel's four variables, which flannel's CNI
//! plugin and `dockerd --bip=${FLANNEL_SUBNET} --mtu=${FLANNEL_MTU}` read unchanged.
use std::{
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Network,
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ip_masq: bool,
}

impl SubnetEnv {
    /// FLANNEL_SUBNET names the subnet's first host address, the bridge's, e.g. 10.2.41.1/24.
    pub fn render(&self) -> String {
        let gateway = Ipv4Addr::from(u32::from(self.subnet.network()) + 1);
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={gateway}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            self.subnet.prefix(),
            self.mtu,
            self.ip_masq
        )
    }

    /// Writes the file so that readers see the old contents or the new, never a torn file.
    pub fn write_atomically(&self, path: &Path) -> Result<()> {
        let directory = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(directory)
            .with_context(|| format!("cannot create {}", directory.display()))?;
        let temporary = temporary_path(path);
        let mut file = fs::File::create(&temporary)
            .with_context(|| format!("cannot create {}", temporary.display()))?;
        file.write_all(self.render().as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        fs::rename(&temporary, path)
            .with_context(|| format!("cannot move {} into place", path.display()))
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The subnet a previous run wrote into the file, if the file exists and names one.
pub fn previous_subnet(path: &Path) -> Option<Ipv4Network> {
    let contents = fs::read_to_string(path).ok()?;
    let value = contents
        .lines()
        .find_map(|line| line.trim().strip_prefix("FLANNEL_SUBNET="))?;
    let address: Ipv4Network = value.trim().parse().ok()?;
    Ipv4Network::new(address.network(), address.prefix()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_flannels_four_variables_and_reads_the_subnet_back() {
        let env = SubnetEnv {
            network: "10.2.0.0/16".parse().unwrap(),
            subnet: "10.2.41.0/24".parse().unwrap(),
            mtu: 1450,
            ip_masq: false,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.2.0.0/16\nFLANNEL_SUBNET=10.2.41.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("overlay-subnet-file-{}", std::process::id()));
        let path = dir.join("run/flannel/subnet.env");
        env.write_atomically(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env.render());
        assert_eq!(previous_subnet(&path), Some(env.subnet));
        assert!(!temporary_path(&path).exists());
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(previous_subnet(&path), None);
    }
}
