//! Types that cross the boundary between the overlay eBPF programs and the agent.
//!
//! Every map key, map value and config record is defined here once, `#[repr(C)]`, so both
//! sides agree on the layout and the object's BTF names the fields (`bpftool map dump` prints
//! them). The `user` feature adds the `aya::Pod` impls the agent needs to read and write maps.
#![no_std]

/// UDP port of VXLAN when the network config leaves `Port` at 0: the Linux default, which
/// flannel uses too (not IANA's 4789).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// Runtime settings of the dataplane, written by the agent into the one-entry config map.
///
/// Numbers are in host byte order; the programs convert packet fields before comparing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayConfig {
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    /// UDP destination port of VXLAN traffic.
    pub vxlan_port: u16,
    /// Keeps the layout free of implicit padding.
    pub reserved: u16,
}

macro_rules! define_counters {
    ($($(#[doc = $doc:literal])+ $field:ident => $variant:ident,)+) => {
        /// The dataplane's named counters, one `u64` per outcome.
        ///
        /// The stats map is a per-CPU array holding one `Counters`, so `bpftool map dump`
        /// shows every counter by name for every CPU.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $($(#[doc = $doc])+ pub $field: u64,)+
        }

        /// Names one field of [`Counters`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[doc = $doc])+ $variant,)+
        }

        impl Counter {
            /// Every counter, in field order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// The counter's field name, as bpftool prints it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => stringify!($field),)+
                }
            }
        }

        impl Counters {
            /// The slot of one counter; with a constant `counter` this folds to a field access.
            #[inline(always)]
            pub fn slot_mut(&mut self, counter: Counter) -> &mut u64 {
                match counter {
                    $(Counter::$variant => &mut self.$field,)+
                }
            }

            /// The value of one counter.
            pub fn get(&self, counter: Counter) -> u64 {
                match counter {
                    $(Counter::$variant => self.$field,)+
                }
            }
        }
    };
}

define_counters! {
    /// Uplink frame that is not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    rx_not_ipv4 => RxNotIpv4,
    /// Uplink IPv4 packet that is not UDP.
    rx_not_udp => RxNotUdp,
    /// Uplink IPv4 fragment: only the stack can reassemble it.
    rx_ipv4_fragment => RxIpv4Fragment,
    /// Uplink UDP datagram to a port other than the VXLAN port.
    rx_other_port => RxOtherPort,
    /// Uplink VXLAN frame carrying our VNI.
    rx_vxlan => RxVxlan,
    /// Uplink VXLAN frame carrying another VNI.
    rx_vxlan_foreign_vni => RxVxlanForeignVni,
    /// Uplink frame cut short or with inconsistent header fields.
    rx_malformed => RxMalformed,
}

impl Counters {
    /// Adds `other` field by field, e.g. to sum the per-CPU copies.
    pub fn accumulate(&mut self, other: &Counters) {
        for &counter in Counter::ALL {
            *self.slot_mut(counter) += other.get(counter);
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): repr(C) structs of integers with no implicit padding, valid for every
    // bit pattern.
    unsafe impl aya::Pod for super::OverlayConfig {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_its_own_slot_and_name() {
        let mut counters = Counters::default();
        for (position, &counter) in Counter::ALL.iter().enumerate() {
            *counters.slot_mut(counter) = position as u64 + 1;
        }
        for (position, &counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(
                counters.get(counter),
                position as u64 + 1,
                "{}",
                counter.name()
            );
            assert!(
                Counter::ALL[..position]
                    .iter()
                    .all(|other| other.name() != counter.name())
            );
        }
        assert_eq!(size_of::<Counters>(), Counter::ALL.len() * size_of::<u64>());
    }

    #[test]
    fn accumulate_adds_field_by_field() {
        let mut total = Counters {
            rx_vxlan: 2,
            rx_malformed: 1,
            ..Counters::default()
        };
        total.accumulate(&Counters {
            rx_vxlan: 3,
            rx_not_udp: 4,
            ..Counters::default()
        });
        assert_eq!(
            total,
            Counters {
                rx_vxlan: 5,
                rx_malformed: 1,
                rx_not_udp: 4,
                ..Counters::default()
            }
        );
    }
}
