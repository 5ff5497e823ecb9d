//! Where a program sends a packet other than on its way: out of the uplink to a neighbour,
//! into a container, or into a device's receive path. Each returns whether the kernel took
//! the redirect; the program's verdict then says `TC_ACT_REDIRECT`.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
};
use core::mem::size_of;
use overlay_common::{Counter, LocalEndpoint, OverlayConfig};

/// `bpf_redir_neigh::nh_family` for an IPv4 next hop.
const AF_INET: u32 = 2;

/// Sends the packet out of the uplink to `next_hop`, or, without one, to the next hop the
/// routing table gives for its destination; the kernel fills the Ethernet header in.
#[inline(always)]
pub fn to_uplink(config: &OverlayConfig, next_hop: Option<[u8; 4]>) -> Result<(), Counter> {
    let verdict = match next_hop {
        Some(address) => {
            let mut neighbour = bpf_redir_neigh {
                nh_family: AF_INET,
                __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                    // Network order in memory, as the helper reads it.
                    ipv4_nh: u32::from_ne_bytes(address),
                },
            };
            // SAFETY: `neighbour` is a valid bpf_redir_neigh of the size given, alive for the call.
            unsafe {
                bpf_redirect_neigh(
                    config.uplink_ifindex,
                    &mut neighbour,
                    size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }
        }
        // SAFETY: a null neighbour parameter asks the kernel to resolve the next hop itself.
        None => unsafe { bpf_redirect_neigh(config.uplink_ifindex, core::ptr::null_mut(), 0, 0) },
    };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::TxError);
    }
    Ok(())
}

/// Puts the packet, readdressed already, into the container behind `endpoint`.
#[inline(always)]
pub fn into_container(endpoint: &LocalEndpoint) -> Result<Counter, Counter> {
    // SAFETY: a plain helper call; the kernel checks that the index is a veth.
    let verdict = unsafe { bpf_redirect_peer(endpoint.ifindex, 0) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::RxError);
    }
    Ok(Counter::RxDelivered)
}

/// Puts the packet into the receive path of the device `ifindex`, as if it arrived there.
#[inline(always)]
pub fn into_receive_path(ifindex: u32) -> Result<(), Counter> {
    // SAFETY: a plain helper call; the kernel checks the index when it redirects.
    let verdict = unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) };
    if verdict != i64::from(TC_ACT_REDIRECT) {
        return Err(Counter::RxError);
    }
    Ok(())
}
