//! flannel's forward-accept and masquerade rules, made as flannel's traffic manager makes them,
//! for each address family the network has: by default the iptables (IPv4) and ip6tables
//! (IPv6) chains `FLANNEL-FWD` (jumped to from filter `FORWARD`) and `FLANNEL-POSTRTG` (from
//! nat `POSTROUTING`); with the network config's `EnableNFTables`, the nftables tables
//! `ip flannel-ipv4` and `ip6 flannel-ipv6`. Either way the rules are re-checked every
//! `--iptables-resync` seconds and restored when someone changed or removed them. A family the
//! network does not have (IPv4 in an IPv6-only network) gets no rules at all, and what an
//! earlier run left in it is removed.
//!
//! iptables rules go into the filter table's own `FORWARD` chain, the one Docker sets to policy
//! DROP (in ip6tables too, when its ip6tables support is on): an accept in a table of our own
//! would end only our own chain, and the packet would still meet Docker's drop. That is why,
//! unlike flannel, the nftables backend also keeps the iptables backend's forward chain and its
//! jump in a family's iptables while that family's FORWARD policy is DROP (and only then).
mod command;
mod iptables;
mod nftables;

use std::time::Duration;

use anyhow::{Context, Result};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use tokio::time::{Instant, MissedTickBehavior, interval_at};

/// The comment on every forward rule, as flannel writes it.
const FORWARD_COMMENT: &str = "flanneld forward";
/// The comment on every masquerade rule, as flannel writes it.
const MASQUERADE_COMMENT: &str = "flanneld masq";
/// Outside every masquerade: kube-proxy's mark for traffic it has already translated.
const KUBE_PROXY_MARK: &str = "0x4000";

/// One family's networks: the whole overlay and this host's lease in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Networks<N> {
    pub network: N,
    pub subnet: N,
}

/// Which of flannel's rules the host wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// `None` in an IPv6-only network.
    pub ipv4: Option<Networks<Ipv4Network>>,
    /// `Some` with `EnableIPv6`.
    pub ipv6: Option<Networks<Ipv6Network>>,
    /// `--ip-masq`: NAT for traffic leaving the overlay.
    pub masquerade: bool,
    /// `--iptables-forward-rules`: accept forwarding to and from the overlay.
    pub forward: bool,
    /// Masquerade with fully random source ports, unless `--ip-masq-fully-random-disable`;
    /// [`Masquerade::new`] turns it off for a family whose iptables cannot, as flannel does.
    pub fully_random: bool,
}

impl Rules {
    /// Each family the network has, with its share of the rules.
    fn families(&self) -> Vec<FamilyRules> {
        let ipv4 = self.ipv4.map(|networks| {
            self.for_family(Family::V4, networks.network.into(), networks.subnet.into())
        });
        let ipv6 = self.ipv6.map(|networks| {
            self.for_family(Family::V6, networks.network.into(), networks.subnet.into())
        });
        ipv4.into_iter().chain(ipv6).collect()
    }

    fn for_family(&self, family: Family, network: IpNetwork, subnet: IpNetwork) -> FamilyRules {
        FamilyRules {
            family,
            network,
            subnet,
            masquerade: self.masquerade,
            forward: self.forward,
            fully_random: self.fully_random,
        }
    }
}

/// The address family a set of rules is for: it picks the iptables command, the nftables
/// family and table, and what counts as multicast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// Never masqueraded.
    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

/// One family's share of [`Rules`], as the backends write it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FamilyRules {
    family: Family,
    network: IpNetwork,
    subnet: IpNetwork,
    masquerade: bool,
    forward: bool,
    fully_random: bool,
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
    backend: Backend,
    /// One entry per family the network has.
    families: Vec<FamilyState>,
    /// Whether what an earlier run left in the families the network lacks has been removed.
    absent_families_cleared: bool,
}

/// The rules of one family and what we know of them.
struct FamilyState {
    rules: FamilyRules,
    /// Whether we wrote the rules once: a later difference means someone else changed them.
    written: bool,
    /// nftables: what `nft list table` printed right after our last write.
    nft_listing: Option<String>,
    /// nftables: whether we also keep `FLANNEL-FWD` in iptables, for a FORWARD policy of DROP.
    iptables_forward: bool,
}

impl Masquerade {
    pub fn new(rules: Rules, backend: Backend) -> Self {
        let families = rules
            .families()
            .into_iter()
            .map(|mut rules| {
                if backend == Backend::Iptables && !iptables::supports_random_fully(rules.family) {
                    rules.fully_random = false;
                }
                FamilyState {
                    rules,
                    written: false,
                    nft_listing: None,
                    iptables_forward: false,
                }
            })
            .collect();
        Self {
            backend,
            families,
            absent_families_cleared: false,
        }
    }

    /// Writes the rules if they are missing or differ from what flannel would have. The first
    /// write also removes what the other backend, or an older version of the agent, left, and
    /// everything of ours in a family the network does not have. In nftables mode, follows
    /// each family's iptables FORWARD policy as well.
    pub fn ensure(&mut self) -> Result<()> {
        if !self.absent_families_cleared {
            for family in self.absent_families() {
                // Not fatal: a host whose network lacks a family may also lack its tables.
                if let Err(error) = remove_family(family) {
                    log::warn!(
                        "cannot look for {0} rules of ours (the network has no {0}): {error:#}",
                        family.name()
                    );
                }
            }
            self.absent_families_cleared = true;
        }
        for state in &mut self.families {
            state
                .ensure(self.backend)
                .with_context(|| format!("{} rules", state.rules.family.name()))?;
        }
        Ok(())
    }

    fn absent_families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|family| {
                !self
                    .families
                    .iter()
                    .any(|state| state.rules.family == *family)
            })
            .collect()
    }
}

impl FamilyState {
    fn ensure(&mut self, backend: Backend) -> Result<()> {
        self.ensure_backend(backend)?;
        if backend == Backend::Nftables && self.rules.forward {
            self.ensure_forward_behind_drop()?;
        }
        Ok(())
    }

    fn ensure_backend(&mut self, backend: Backend) -> Result<()> {
        let family = self.rules.family;
        if self.written && self.in_place(backend)? {
            return Ok(());
        }
        match backend {
            _ if self.written => {
                log::warn!(
                    "our {} {} rules were changed or removed; restoring them",
                    family.name(),
                    backend.name()
                );
            }
            Backend::Iptables => nftables::remove(family)?,
            Backend::Nftables => {
                iptables::remove(family)?;
                nftables::remove_legacy()?;
            }
        }
        match backend {
            Backend::Iptables => iptables::write(&self.rules)?,
            Backend::Nftables => {
                nftables::write(&self.rules)?;
                self.nft_listing = nftables::listing(family)?;
            }
        }
        self.written = true;
        Ok(())
    }

    /// nftables mode: the accept in our table ends only our own chain, so a FORWARD policy of
    /// DROP in the family's iptables filter table still drops the packet. While that policy is
    /// DROP, keep the iptables backend's forward chain and its jump as well; otherwise nothing
    /// in iptables.
    fn ensure_forward_behind_drop(&mut self) -> Result<()> {
        let command = iptables::command(self.rules.family);
        let drops = iptables::forward_policy_drops(self.rules.family)?;
        let wanted = FamilyRules {
            forward: drops,
            masquerade: false,
            ..self.rules.clone()
        };
        if drops == self.iptables_forward {
            if !drops || iptables::in_place(&wanted)? {
                return Ok(());
            }
            log::warn!("our {command} forward rules were changed or removed; restoring them");
        } else if drops {
            log::info!(
                "{command}' FORWARD policy is DROP, which the accept in our nftables table \
                 cannot override: also keeping flannel's FLANNEL-FWD chain, jumped to from \
                 {command}' FORWARD chain"
            );
        } else {
            log::info!("{command}' FORWARD policy is no longer DROP: removing FLANNEL-FWD");
        }
        iptables::write(&wanted)?;
        self.iptables_forward = drops;
        Ok(())
    }

    fn in_place(&self, backend: Backend) -> Result<bool> {
        match backend {
            Backend::Iptables => iptables::in_place(&self.rules),
            Backend::Nftables => Ok(nftables::listing(self.rules.family)? == self.nft_listing),
        }
    }
}

/// Removes the rules of both backends in both families, and the table earlier versions of the
/// agent made. A family that fails does not keep the other's rules in place.
pub fn remove() -> Result<()> {
    let results = Family::ALL
        .map(|family| remove_family(family).with_context(|| format!("{} rules", family.name())));
    results.into_iter().collect()
}

fn remove_family(family: Family) -> Result<()> {
    iptables::remove(family)?;
    nftables::remove(family)
}

/// The rules `rules` asks for in `backend`, tried once now. A failure (a held xtables lock, a
/// hung command) is logged and left to [`keep_restored`]'s next check, as flanneld leaves it
/// ("Failed to bootstrap IPTables"): these rules let traffic through and out, so a node
/// without them yet lets nothing through that it should not.
pub fn start((rules, backend): (Rules, Backend)) -> Masquerade {
    let mut masquerade = Masquerade::new(rules, backend);
    if let Err(error) = masquerade.ensure() {
        log::warn!(
            "cannot write the forward and masquerade rules yet (the next check tries again): \
             {error:#}"
        );
    }
    masquerade
}

/// Restores `masquerade`'s rules every `interval` (`--iptables-resync`), for as long as it is
/// polled. iptables and nft are programs, and `iptables -w` may wait for the xtables lock: they
/// run on a blocking thread, never on the workers that renew the lease and handle signals.
pub async fn keep_restored(mut masquerade: Masquerade, interval: Duration) {
    let mut ticks = interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let checked = tokio::task::spawn_blocking(move || {
            let outcome = masquerade.ensure();
            (masquerade, outcome)
        })
        .await;
        match checked {
            Ok((checked, outcome)) => {
                masquerade = checked;
                if let Err(error) = outcome {
                    log::warn!("cannot restore the forward and masquerade rules: {error:#}");
                }
            }
            Err(error) => {
                log::error!("the forward and masquerade check crashed: {error}; no longer checked");
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's host1 in a dual-stack network, with every rule wanted.
    pub fn seed(fully_random: bool) -> Rules {
        Rules {
            ipv4: Some(Networks {
                network: "10.2.0.0/16".parse().unwrap(),
                subnet: "10.2.41.0/24".parse().unwrap(),
            }),
            ipv6: Some(Networks {
                network: "fc00::/48".parse().unwrap(),
                subnet: "fc00:0:0:41::/64".parse().unwrap(),
            }),
            masquerade: true,
            forward: true,
            fully_random,
        }
    }

    /// The seed's rules for `family` alone.
    pub fn seed_family(family: Family, fully_random: bool) -> FamilyRules {
        seed(fully_random)
            .families()
            .into_iter()
            .find(|rules| rules.family == family)
            .unwrap()
    }

    #[test]
    fn each_family_the_network_has() {
        let families = |rules: &Rules| -> Vec<Family> {
            rules.families().iter().map(|rules| rules.family).collect()
        };
        assert_eq!(families(&seed(true)), [Family::V4, Family::V6]);
        let ipv6_only = Rules {
            ipv4: None,
            ..seed(true)
        };
        assert_eq!(families(&ipv6_only), [Family::V6]);
        let ipv4_only = Rules {
            ipv6: None,
            ..seed(true)
        };
        assert_eq!(families(&ipv4_only), [Family::V4]);
        let ipv6 = seed_family(Family::V6, false);
        assert_eq!(ipv6.network.to_string(), "fc00::/48");
        assert_eq!(ipv6.subnet.to_string(), "fc00:0:0:41::/64");
        assert!(ipv6.masquerade && ipv6.forward && !ipv6.fully_random);
    }
}
