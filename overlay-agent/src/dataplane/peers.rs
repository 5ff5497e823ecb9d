//! Per-peer traffic: every remote lease (IPv4 and IPv6 apart) gets a slot of the per-CPU
//! array `peer_traffic`, written into its `subnets` or `subnets6` entry, where the programs
//! that look the entry up anyway count what they send to it and receive from it. A slot is
//! freed when its lease goes and zeroed when it is given to another.

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use ipnetwork::IpNetwork;
use overlay_common::PeerTraffic;

use super::LeaseCapacity;
use crate::model::{EntryMap, EntrySet};

/// The most slots `peer_traffic` is made with: 2 MiB per CPU at 32 bytes a slot. Leases beyond
/// it are carried but not counted.
const MAX_SLOTS: u32 = 1 << 16;

/// Slots of `peer_traffic` for a network of `capacity` leases: one per IPv4 and per IPv6
/// lease, and slot 0, which is no lease's (entries without a slot count into it).
pub fn slots_for(capacity: LeaseCapacity) -> u32 {
    capacity.entries().saturating_mul(2).min(MAX_SLOTS - 1) + 1
}

/// Which lease holds which slot.
#[derive(Debug)]
pub struct PeerSlots {
    /// Slots 1..end exist.
    end: u32,
    by_lease: EntryMap<IpNetwork, u32>,
    taken: EntrySet<u32>,
    /// Leases that asked for a slot when every one was taken: they ask again each round.
    unslotted: EntrySet<IpNetwork>,
    freed: Vec<u32>,
    /// No slot from here on was ever given.
    next: u32,
}

/// A lease's slot, and whether it is newly given (so its counts must be zeroed first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Held(u32),
    Fresh(u32),
}

impl Slot {
    pub fn index(self) -> u32 {
        match self {
            Slot::Held(index) | Slot::Fresh(index) => index,
        }
    }
}

impl PeerSlots {
    pub fn new(slots: u32) -> Self {
        Self {
            end: slots,
            by_lease: EntryMap::default(),
            taken: EntrySet::default(),
            unslotted: EntrySet::default(),
            freed: Vec::new(),
            next: 1,
        }
    }

    /// Whether `lease` holds a slot.
    pub fn holds(&self, lease: &IpNetwork) -> bool {
        self.by_lease.contains_key(lease)
    }

    /// Gives `lease` the slot its pinned entry names (an earlier run's), so its counts go on,
    /// unless another lease holds it or it does not exist.
    pub fn adopt(&mut self, lease: IpNetwork, pinned: u32) {
        if pinned != 0 && pinned < self.end && !self.holds(&lease) && self.taken.insert(pinned) {
            self.unslotted.remove(&lease);
            self.by_lease.insert(lease, pinned);
        }
    }

    /// `lease`'s slot, given now if it holds none; `None` when every slot is taken.
    pub fn slot_of(&mut self, lease: IpNetwork) -> Option<Slot> {
        if let Some(&held) = self.by_lease.get(&lease) {
            return Some(Slot::Held(held));
        }
        let Some(free) = self.take_free() else {
            self.unslotted.insert(lease);
            return None;
        };
        self.unslotted.remove(&lease);
        self.by_lease.insert(lease, free);
        Some(Slot::Fresh(free))
    }

    /// The leases that asked for a slot and got none, gone ones aside.
    pub fn unslotted(&self) -> impl Iterator<Item = IpNetwork> + '_ {
        self.unslotted.iter().copied()
    }

    fn take_free(&mut self) -> Option<u32> {
        while let Some(freed) = self.freed.pop() {
            if self.taken.insert(freed) {
                return Some(freed);
            }
        }
        while self.next < self.end {
            let candidate = self.next;
            self.next += 1;
            if self.taken.insert(candidate) {
                return Some(candidate);
            }
        }
        None
    }

    /// Frees the slots of the leases `keep` refuses.
    pub fn release_unless(&mut self, keep: impl Fn(&IpNetwork) -> bool) {
        self.unslotted.retain(|lease| keep(lease));
        let gone: Vec<IpNetwork> = self
            .by_lease
            .keys()
            .filter(|lease| !keep(lease))
            .copied()
            .collect();
        self.release(gone);
    }

    /// Frees the slots of `leases`, those that hold one; those waiting for one wait no more.
    pub fn release(&mut self, leases: impl IntoIterator<Item = IpNetwork>) {
        for lease in leases {
            self.unslotted.remove(&lease);
            if let Some(slot) = self.by_lease.remove(&lease) {
                self.taken.remove(&slot);
                self.freed.push(slot);
            }
        }
    }
}

/// Zeroes `slot` on every CPU.
pub fn zero(map: &mut PerCpuArray<&mut MapData, PeerTraffic>, slot: u32) -> Result<()> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, error)| error)
        .context("cannot count the CPUs")?;
    let zeros = PerCpuValues::try_from(vec![PeerTraffic::default(); cpus])
        .context("cannot size a peer_traffic slot")?;
    map.set(slot, zeros, 0)
        .with_context(|| format!("cannot zero slot {slot} of peer_traffic"))
}

/// `slot`'s counts summed over every CPU.
pub fn summed(map: &PerCpuArray<&MapData, PeerTraffic>, slot: u32) -> Result<PeerTraffic> {
    let copies = map
        .get(&slot, 0)
        .with_context(|| format!("cannot read slot {slot} of peer_traffic"))?;
    let mut total = PeerTraffic::default();
    for copy in copies.iter() {
        total.accumulate(copy);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(text: &str) -> IpNetwork {
        text.parse().expect("a test subnet")
    }

    #[test]
    fn a_lease_keeps_its_slot_and_a_gone_leases_slot_is_given_again_fresh() {
        let mut slots = PeerSlots::new(3);
        let (a, b, c) = (
            lease("10.2.54.0/24"),
            lease("fd00:2:0:54::/64"),
            lease("10.2.55.0/24"),
        );
        assert_eq!(slots.slot_of(a), Some(Slot::Fresh(1)));
        assert_eq!(slots.slot_of(b), Some(Slot::Fresh(2)));
        assert_eq!(slots.slot_of(a), Some(Slot::Held(1)));
        assert_eq!(slots.slot_of(c), None, "slots 1 and 2 only");
        slots.release_unless(|kept| *kept == b);
        assert_eq!(slots.slot_of(c), Some(Slot::Fresh(1)));
        assert_eq!(slots.slot_of(b), Some(Slot::Held(2)));
        slots.release([b, lease("10.2.99.0/24")]);
        assert_eq!(slots.slot_of(a), Some(Slot::Fresh(2)));
        assert_eq!(slots.slot_of(c), Some(Slot::Held(1)));
    }

    #[test]
    fn a_lease_refused_a_slot_is_named_until_it_gets_one_or_goes() {
        let mut slots = PeerSlots::new(2);
        let (a, b, c) = (
            lease("10.2.54.0/24"),
            lease("10.2.55.0/24"),
            lease("10.2.56.0/24"),
        );
        assert_eq!(slots.slot_of(a), Some(Slot::Fresh(1)));
        assert_eq!(slots.slot_of(b), None);
        assert_eq!(slots.slot_of(c), None);
        let mut unslotted: Vec<IpNetwork> = slots.unslotted().collect();
        unslotted.sort();
        assert_eq!(unslotted, [b, c]);
        slots.release([a, c]);
        assert_eq!(slots.unslotted().collect::<Vec<_>>(), [b], "c went");
        assert_eq!(slots.slot_of(b), Some(Slot::Fresh(1)));
        assert_eq!(slots.unslotted().count(), 0, "b holds slot 1");
        assert_eq!(slots.slot_of(c), None);
        slots.release_unless(|kept| *kept == b);
        assert_eq!(slots.unslotted().count(), 0, "c went in a listed round");
    }

    #[test]
    fn a_pinned_slot_is_adopted_once_and_never_given_to_another() {
        let mut slots = PeerSlots::new(4);
        let (a, b, c) = (
            lease("10.2.54.0/24"),
            lease("10.2.55.0/24"),
            lease("10.2.56.0/24"),
        );
        slots.adopt(a, 1);
        slots.adopt(b, 1);
        slots.adopt(c, 9);
        assert_eq!(slots.slot_of(a), Some(Slot::Held(1)));
        assert_eq!(slots.slot_of(b), Some(Slot::Fresh(2)));
        assert_eq!(slots.slot_of(c), Some(Slot::Fresh(3)));
    }
}
