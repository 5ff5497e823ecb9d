//! flannel's forward-accept and masquerade rules, made as flannel's traffic manager makes them:
//! by default iptables chains `FLANNEL-FWD` (jumped to from filter `FORWARD`) and
//! `FLANNEL-POSTRTG` (from nat `POSTROUTING`); with the network config's `EnableNFTables`, the
//! nftables table `ip flannel-ipv4`. Either way the rules are re-checked every
//! `--iptables-resync` seconds and restored when someone changed or removed them.
//!
//! iptables rules go into the filter table's own `FORWARD` chain, the one Docker sets to policy
//! DROP: an accept in a table of our own would end only our own chain, and the packet would
//! still meet Docker's drop. That is why, unlike flannel, the nftables backend also keeps the
//! iptables backend's forward chain and its jump while that policy is DROP (and only then).
mod iptables;
mod nftables;

use anyhow::Result;
use ipnetwork::Ipv4Network;

/// The comment on every forward rule, as flannel writes it.
const FORWARD_COMMENT: &str = "flanneld forward";
/// The comment on every masquerade rule, as flannel writes it.
const MASQUERADE_COMMENT: &str = "flanneld masq";
/// Outside every masquerade: kube-proxy's mark for traffic it has already translated.
const KUBE_PROXY_MARK: &str = "0x4000";
/// Multicast is never masqueraded.
const MULTICAST: &str = "224.0.0.0/4";

/// Which of flannel's rules the host wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub network: Ipv4Network,
    pub subnet: Ipv4Network,
    /// `--ip-masq`: NAT for traffic leaving the overlay.
    pub masquerade: bool,
    /// `--iptables-forward-rules`: accept forwarding to and from the overlay.
    pub forward: bool,
    /// Masquerade with fully random source ports, unless `--ip-masq-fully-random-disable`;
    /// [`Masquerade::new`] turns it off where the host's iptables cannot, as flannel does.
    pub fully_random: bool,
}

/// Where the rules live: the network config's `EnableNFTables` picks, as in flannel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Iptables,
    Nftables,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Iptables => "iptables",
            Backend::Nftables => "nftables",
        }
    }
}

/// Keeps the rules as [`Rules`] describe them, in the chosen backend.
pub struct Masquerade {
    rules: Rules,
    backend: Backend,
    /// Whether we wrote the rules once: a later difference means someone else changed them.
    written: bool,
    /// nftables: what `nft list table` printed right after our last write.
    nft_listing: Option<String>,
    /// nftables: whether we also keep `FLANNEL-FWD` in iptables, for a FORWARD policy of DROP.
    iptables_forward: bool,
}

impl Masquerade {
    pub fn new(mut rules: Rules, backend: Backend) -> Self {
        if backend == Backend::Iptables && !iptables::supports_random_fully() {
            rules.fully_random = false;
        }
        Self {
            rules,
            backend,
            written: false,
            nft_listing: None,
            iptables_forward: false,
        }
    }

    /// Writes the rules if they are missing or differ from what flannel would have. The first
    /// write also removes what the other backend, or an older version of the agent, left. In
    /// nftables mode, follows iptables' FORWARD policy as well.
    pub fn ensure(&mut self) -> Result<()> {
        self.ensure_backend()?;
        if self.backend == Backend::Nftables && self.rules.forward {
            self.ensure_forward_behind_drop()?;
        }
        Ok(())
    }

    fn ensure_backend(&mut self) -> Result<()> {
        if self.written && self.in_place()? {
            return Ok(());
        }
        match self.backend {
            _ if self.written => {
                log::warn!(
                    "our {} rules were changed or removed; restoring them",
                    self.backend.name()
                );
            }
            Backend::Iptables => nftables::remove()?,
            Backend::Nftables => {
                iptables::remove()?;
                nftables::remove_legacy()?;
            }
        }
        match self.backend {
            Backend::Iptables => iptables::write(&self.rules)?,
            Backend::Nftables => {
                nftables::write(&self.rules)?;
                self.nft_listing = nftables::listing()?;
            }
        }
        self.written = true;
        Ok(())
    }

    /// nftables mode: the accept in our table ends only our own chain, so a FORWARD policy of
    /// DROP in iptables' filter table still drops the packet. While that policy is DROP, keep
    /// the iptables backend's forward chain and its jump as well; otherwise nothing in iptables.
    fn ensure_forward_behind_drop(&mut self) -> Result<()> {
        let drops = iptables::forward_policy_drops()?;
        let wanted = Rules {
            forward: drops,
            masquerade: false,
            ..self.rules.clone()
        };
        if drops == self.iptables_forward {
            if !drops || iptables::in_place(&wanted)? {
                return Ok(());
            }
            log::warn!("our iptables forward rules were changed or removed; restoring them");
        } else if drops {
            log::info!(
                "iptables' FORWARD policy is DROP, which the accept in our nftables table cannot \
                 override: also keeping flannel's FLANNEL-FWD chain, jumped to from iptables' \
                 FORWARD chain"
            );
        } else {
            log::info!("iptables' FORWARD policy is no longer DROP: removing FLANNEL-FWD");
        }
        iptables::write(&wanted)?;
        self.iptables_forward = drops;
        Ok(())
    }

    fn in_place(&self) -> Result<bool> {
        match self.backend {
            Backend::Iptables => iptables::in_place(&self.rules),
            Backend::Nftables => Ok(nftables::listing()? == self.nft_listing),
        }
    }
}

/// Removes the rules of both backends, and the table earlier versions of the agent made.
pub fn remove() -> Result<()> {
    iptables::remove()?;
    nftables::remove()
}

#[cfg(test)]
mod tests {
    use super::Rules;

    /// The seed's host1, with every rule wanted.
    pub fn seed(fully_random: bool) -> Rules {
        Rules {
            network: "10.2.0.0/16".parse().unwrap(),
            subnet: "10.2.41.0/24".parse().unwrap(),
            masquerade: true,
            forward: true,
            fully_random,
        }
    }
}
