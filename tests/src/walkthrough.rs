//! The README's walkthrough for two real hosts, run as written: its shell blocks, each marked
//! `<!-- walkthrough: host1 host2 -->` (the hosts it runs on, in that order; `reboot` to have
//! the test reboot them first), run in order with `sh -e` on test hosts whose /etc, /usr and
//! /var are overlays on the machine's (writes land in a scratch directory) and whose /run is
//! empty, with [`SYSTEMCTL`] in place of systemd's.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{cluster::Host, docker::busybox_image, netns::run, wait::wait_for};

/// The stand-in for systemctl, installed over /usr/bin/systemctl on every walkthrough host.
pub const SYSTEMCTL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/walkthrough/systemctl");
const MARKER: &str = "<!-- walkthrough:";
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One marked shell block: the hosts it runs on and its text.
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    pub hosts: Vec<String>,
    pub reboot_first: bool,
    pub script: String,
}

/// The marked blocks of `markdown`, in order. A marker must be followed by a ```sh block.
pub fn blocks(markdown: &str) -> Result<Vec<Block>> {
    let mut lines = markdown.lines();
    let mut found = Vec::new();
    while let Some(line) = lines.next() {
        let Some(marker) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let words: Vec<&str> = marker.trim_end_matches("-->").split_whitespace().collect();
        let hosts: Vec<String> = words
            .iter()
            .filter(|word| word.starts_with("host"))
            .map(|word| word.to_string())
            .collect();
        ensure!(!hosts.is_empty(), "{line:?} names no host");
        let fence = lines.by_ref().find(|line| !line.trim().is_empty());
        ensure!(
            fence.map(str::trim) == Some("```sh"),
            "{line:?} is not followed by a ```sh block"
        );
        let script: Vec<&str> = lines
            .by_ref()
            .take_while(|line| line.trim() != "```")
            .collect();
        found.push(Block {
            hosts,
            reboot_first: words.contains(&"reboot"),
            script: script.join("\n") + "\n",
        });
    }
    Ok(found)
}

/// A test host as the walkthrough sees it: a process holding a mount namespace of its own
/// inside the host's network namespace, where /etc, /usr and /var are overlays whose upper
/// layers live in `dir`, and /run a fresh tmpfs.
pub struct WalkthroughHost {
    pub name: String,
    holder: Child,
    dir: PathBuf,
    /// Where the agent pins without `--bpf-pin-dir`, on the machine's bpffs.
    pin_dir: PathBuf,
    /// The busybox image the `systemctl` stand-in gives dockerd.
    image: PathBuf,
}

impl WalkthroughHost {
    /// Prepares `host` with its files under `dir`, which also becomes the blocks' working
    /// directory; `agent` replaces the packaged agent whenever dpkg has installed it.
    pub fn new(host: &Host, dir: &Path, agent: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let image = busybox_image(dir)?;
        let ready = dir.join("ready");
        let setup = format!(
            r#"set -e
for layer in etc usr var; do
    mkdir -p "{dir}/$layer/upper" "{dir}/$layer/work"
    mount -t overlay overlay -o "lowerdir=/$layer,upperdir={dir}/$layer/upper,workdir={dir}/$layer/work" "/$layer"
done
mount -t tmpfs tmpfs /run
cp "{SYSTEMCTL}" /usr/bin/systemctl
mkdir -p /etc/dpkg/dpkg.cfg.d
echo 'post-invoke=test ! -e /usr/bin/overlay-agent || cp "{agent}" /usr/bin/overlay-agent' >/etc/dpkg/dpkg.cfg.d/walkthrough-agent
touch "{ready}"
exec sleep infinity
"#,
            dir = dir.display(),
            ready = ready.display(),
            agent = agent.display(),
        );
        let holder = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", host.netns.name()))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
            ])
            .arg(setup)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the walkthrough host's mount namespace")?;
        let mut walkthrough_host = Self {
            name: host.name.clone(),
            holder,
            dir: dir.to_path_buf(),
            pin_dir: host.default_pin_dir()?,
            image,
        };
        let holder = &mut walkthrough_host.holder;
        wait_for("the walkthrough host's overlays", SETUP_TIMEOUT, || {
            if let Some(status) = holder.try_wait()? {
                bail!("setting up the overlays failed ({status})");
            }
            Ok(ready.exists())
        })?;
        Ok(walkthrough_host)
    }

    /// A command that runs `args` in this host's network and mount namespaces, in its
    /// directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--target={}", self.holder.id()))
            .args(["--mount", "--net"])
            .arg(format!("--wd={}", self.dir.display()))
            .arg("--")
            .args(args)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("WALKTHROUGH_DOCKER_ROOT", self.dir.join("docker"))
            .env("WALKTHROUGH_IMAGE", &self.image)
            .stdin(Stdio::null());
        command
    }

    /// Runs `script` with `sh -e`; fails with its output unless it exits 0.
    pub fn run_script(&self, script: &str) -> Result<String> {
        let output = self
            .command(&["sh", "-ec", script])
            .output()
            .context("cannot run sh")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(
            output.status.success(),
            "on {}, this block failed ({}):\n{script}\nstdout:\n{stdout}\nstderr:\n{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(stdout.into_owned())
    }

    /// What a reboot takes from the walkthrough: every process of the host dies (dockerd
    /// stopping its containers first) and /run empties. The devices, rules and pins the agent
    /// leaves behind stay, which only makes teardown's job larger.
    pub fn reboot(&self) -> Result<()> {
        self.run_script("systemctl stop docker\n")?;
        self.kill_all_but_the_holder();
        self.run_script("umount --lazy /run\nmount -t tmpfs tmpfs /run\n")?;
        Ok(())
    }

    fn kill_all_but_the_holder(&self) {
        let holder = self.holder.id().to_string();
        for pid in processes_in_mount_namespace(self.holder.id()) {
            if pid != holder {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        }
    }

    /// The file at `path` as this host sees it.
    pub fn read(&self, path: &str) -> Result<String> {
        run(&mut self.command(&["cat", path]))
    }
}

impl Drop for WalkthroughHost {
    fn drop(&mut self) {
        // dockerd stops its containers; whatever else the walkthrough left running in the
        // mount namespace (the agent, dockerd if it would not stop) is killed.
        let _ = self.run_script("systemctl stop docker\n");
        self.kill_all_but_the_holder();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

/// The processes in the mount namespace of process `pid`, `pid` included.
fn processes_in_mount_namespace(pid: u32) -> Vec<String> {
    let namespace = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let Some(ours) = namespace(&pid.to_string()) else {
        return Vec::new();
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|byte| byte.is_ascii_digit()))
        .filter(|name| namespace(name).as_ref() == Some(&ours))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_blocks_are_found_in_order_with_their_hosts() -> Result<()> {
        let page = "text\n<!-- walkthrough: host1 host2 -->\n```sh\na\nb\n```\n\n```sh\nnot marked\n```\n<!-- walkthrough: host2 reboot -->\n\n```sh\nc\n```\n";
        assert_eq!(
            blocks(page)?,
            [
                Block {
                    hosts: vec!["host1".into(), "host2".into()],
                    reboot_first: false,
                    script: "a\nb\n".into()
                },
                Block {
                    hosts: vec!["host2".into()],
                    reboot_first: true,
                    script: "c\n".into()
                }
            ]
        );
        assert!(blocks("<!-- walkthrough: host1 -->\n```ini\nx\n```\n").is_err());
        Ok(())
    }
}
