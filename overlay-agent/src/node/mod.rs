//! The host's network devices as the overlay sees them, through netlink.
pub mod uplink;
