//! Decapsulation of checked VXLAN at the uplink, for `tc_uplink_ingress`. `v4` strips VXLAN
//! over IPv4 and puts the packet into a known local container (`bpf_redirect_peer`) or into
//! flannel.1's receive path for the stack; `v6` puts VXLAN over IPv6 for a known local
//! container straight into it, its outer checksum verified from the headers, and leaves the
//! rest to flannel-v6.1's socket. Either family's checks against the leases come first.
//!
//! What goes on to a VXLAN device, decapsulated or for its socket, carries `CHECKED_MARK`:
//! `tc_vtep_ingress` on the device lets nothing else through.
use aya_ebpf::{bindings::BPF_CSUM_LEVEL_DEC, helpers::bpf_csum_level, programs::TcContext};
use overlay_common::CHECKED_MARK;

pub mod v4;
pub mod v6;

/// Marks a checked packet for `tc_vtep_ingress`: the mark survives decapsulation, a redirect
/// within the namespace, and reassembly (the datagram keeps its first fragment's).
#[inline(always)]
fn mark_checked(ctx: &TcContext) {
    // SAFETY: the context's skb is valid for the whole program run, and tc programs may
    // write its mark.
    unsafe { (*ctx.skb.skb).mark |= CHECKED_MARK };
}

/// Spends the outer UDP header's level of a device's "checksum verified"
/// (CHECKSUM_UNNECESSARY) once the header is stripped, as the kernel's UDP does before it
/// decapsulates: what was verified inside stays verified, an inner checksum nobody verified
/// is left to the receiver's stack. (`adjust_room` without `BPF_F_ADJ_ROOM_NO_CSUM_RESET`
/// has already reset the state, and this leaves it so.)
#[inline(always)]
fn spend_outer_checksum_level(ctx: &TcContext) {
    // SAFETY: a plain helper call on the context's skb; a state other than "verified" is left.
    unsafe { bpf_csum_level(ctx.skb.skb, u64::from(BPF_CSUM_LEVEL_DEC)) };
}
