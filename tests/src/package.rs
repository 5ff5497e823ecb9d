//! The Debian package `cargo xtask package` leaves in target/debian, unpacked with dpkg-deb
//! for the tests, and its env file read as systemd reads it.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{netns::run, scratch::ScratchDir};

pub const AGENT: &str = "/usr/bin/overlay-agent";
pub const UNIT: &str = "/lib/systemd/system/overlay-agent.service";
pub const ENV_FILE: &str = "/etc/default/overlay-agent";

/// The package of this version in target/debian, which `cargo xtask test` builds before the
/// tests (the workspace gives the agent and the tests one version).
pub fn built_package() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let name_start = format!("overlay-agent_{}-", env!("CARGO_PKG_VERSION"));
    let packages: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .filter(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with(&name_start) && name.ends_with(".deb"))
                })
                .collect()
        })
        .unwrap_or_default();
    match packages.as_slice() {
        [package] => Ok(package.clone()),
        [] => bail!(
            "no {name_start}*.deb in {}: run the tests with `cargo xtask test`, which runs \
             `cargo xtask package` first",
            dir.display()
        ),
        _ => bail!(
            "more than one {name_start}*.deb in {} ({packages:?}): remove the stale ones",
            dir.display()
        ),
    }
}

/// The package's files under a scratch directory, as `dpkg-deb -x` lays them out.
pub struct Unpacked {
    root: ScratchDir,
}

impl Unpacked {
    pub fn new(deb: &Path) -> Result<Self> {
        let root = ScratchDir::new("deb")?;
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()))?;
        Ok(Self { root })
    }

    /// Where the file the package installs at `installed` (absolute) lies here.
    pub fn path(&self, installed: &str) -> PathBuf {
        self.root.path().join(installed.trim_start_matches('/'))
    }
}

/// The variables an env file sets, in order, as systemd's `EnvironmentFile=` reads them.
/// Quotes, backslashes and `$` are refused: systemd would not take them literally.
pub fn set_variables(env_file: &str) -> Result<Vec<(String, String)>> {
    env_file
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line
                .split_once('=')
                .with_context(|| format!("{line:?} is not NAME=value"))?;
            ensure!(
                !value.contains(['"', '\'', '\\', '$']),
                "{line:?}: systemd would not take its value literally"
            );
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

/// The env file with every documented variable (`#FLANNELD_...=example`) set.
pub fn with_every_variable_set(env_file: &str) -> String {
    env_file
        .lines()
        .map(|line| {
            line.strip_prefix("#FLANNELD_")
                .map_or(line.to_string(), |rest| format!("FLANNELD_{rest}"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_env_file_is_read_as_systemd_reads_it() -> Result<()> {
        let file = "# comment\n\nFLANNELD_IP_MASQ=true\n#FLANNELD_V=1\n  FLANNELD_BRIDGE=cni0\n";
        assert_eq!(
            set_variables(file)?,
            [
                ("FLANNELD_IP_MASQ".to_string(), "true".to_string()),
                ("FLANNELD_BRIDGE".to_string(), "cni0".to_string())
            ]
        );
        assert_eq!(
            set_variables(&with_every_variable_set(file))?.len(),
            3,
            "the documented FLANNELD_V is set too"
        );
        assert!(set_variables("FLANNELD_IFACE_REGEX='^10\\.'\n").is_err());
        assert!(set_variables("FLANNELD_IP_MASQ\n").is_err());
        Ok(())
    }
}
