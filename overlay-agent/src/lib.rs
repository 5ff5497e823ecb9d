//! The overlay node daemon, as a library: the binary is a thin wrapper around it.
pub mod dataplane;
