//! Encapsulation into flannel's VXLAN, for the two hooks that send into the overlay: the fast
//! path in `tc_container_ingress` (a container's packet for a remote subnet, routed here as
//! docker0 would and wrapped) and the routed path in `tc_vtep_egress` (what the kernel routed
//! into flannel.1 or flannel-v6.1, wrapped as it is). `v4` wraps in IPv4, `v6` in IPv6 with
//! the outer UDP checksum; both send the frame to the neighbour the kernel resolves on the
//! uplink.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
    },
    helpers::bpf_check_mtu,
    programs::TcContext,
};

use crate::{maps, parse::ETH_HEADER_LEN};

pub mod v4;
pub mod v6;

/// The inner MAC header length bpf_skb_adjust_room records. GSO takes everything between the
/// outer UDP header and the inner MAC header (the VXLAN header) as tunnel header, so this is
/// the inner Ethernet header alone; counting the VXLAN header too makes segmentation read it
/// as Ethernet and drop every large TCP packet.
const INNER_L2_LEN: u64 = ETH_HEADER_LEN as u64;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`, which the bindings lack: the length sits in the top byte.
const ENCAP_L2_FLAG: u64 = (INNER_L2_LEN & 0xff) << 56;
/// Marks the new headers as a UDP tunnel carrying Ethernet, so GSO can still segment large
/// TCP packets after encapsulation. The segment size stays: it is the inner packets', which
/// already fit the overlay's MTU (the kernel's vxlan device keeps it too).
const ADJUST_ROOM_TUNNEL_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_FLAG;

/// The hash the packet carries (a socket's, usually), else `computed`: asking the kernel for one
/// would dissect the packet.
#[inline(always)]
fn packet_hash(ctx: &TcContext, computed: impl FnOnce() -> u32) -> u32 {
    // SAFETY: the context's skb is valid for the whole program run.
    let carried = unsafe { (*ctx.skb.skb).hash };
    if carried != 0 { carried } else { computed() }
}

/// Whether the packet (each of its segments, for a GSO packet) fits the MTU of the VXLAN
/// device `ifindex`, `mtu`, the check the kernel makes when it forwards into it.
#[inline(always)]
fn fits_device(ctx: &TcContext, ifindex: u32, mtu: u32) -> bool {
    // SAFETY: the context's skb is valid for the whole program run.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return ctx.len() <= mtu + ETH_HEADER_LEN as u32;
    }
    // Only the kernel knows a superpacket's segments' lengths. Zero: measure the packet itself.
    let mut mtu_len = 0u32;
    // SAFETY: the context's skb is valid for the whole program run; mtu_len outlives the call.
    let verdict = unsafe {
        bpf_check_mtu(
            ctx.skb.skb.cast(),
            ifindex,
            &mut mtu_len,
            0,
            u64::from(BPF_MTU_CHK_SEGS),
        )
    };
    verdict == 0
}

/// Counts the packet, sent with `encap_len` bytes of outer headers, as sent to the lease in
/// `peer`'s slot: its inner IP packet's bytes.
#[inline(always)]
fn count_sent(ctx: &TcContext, peer: u32, encap_len: usize) {
    let bytes = ctx.len() - (ETH_HEADER_LEN + encap_len) as u32;
    maps::count_peer(peer, maps::Direction::Sent, bytes);
}
