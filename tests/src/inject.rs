//! Sending hand-built packets from inside a namespace, as a hostile sender would: `send_udp`
//! enters the namespace itself; call the others within `Netns::run_inside`.
use std::{
    mem::size_of,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
};

use anyhow::{Result, bail};

use crate::netns::Netns;

/// Sends `payload` `count` times over UDP to `destination` ("address:port", "[v6]:port")
/// from inside `netns`.
pub fn send_udp(netns: &Netns, destination: &str, payload: &[u8], count: u64) -> Result<()> {
    let any = match destination.parse::<SocketAddr>()? {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    };
    netns.run_inside(|| {
        let socket = UdpSocket::bind(any)?;
        for _ in 0..count {
            socket.send_to(payload, destination)?;
        }
        Ok(())
    })
}

/// Sends the IPv4 `packet`, its header included, towards its destination. The kernel fills in
/// the header checksum and total length, and leaves fragment fields as they are.
pub fn send_ipv4(packet: &[u8], destination: Ipv4Addr) -> Result<()> {
    // SAFETY: plain socket call; the descriptor is closed below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if socket < 0 {
        bail!(
            "cannot open a raw socket: {}",
            std::io::Error::last_os_error()
        );
    }
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(destination.octets()),
        },
        sin_zero: [0; 8],
    };
    if let Err(error) = send_and_close(socket, packet, &address) {
        bail!("cannot send a raw IPv4 packet to {destination}: {error}");
    }
    Ok(())
}

/// Sends the Ethernet `frame` as it is out of `interface`.
pub fn send_frame(interface: &str, frame: &[u8]) -> Result<()> {
    let (socket, address) = packet_socket(interface, frame)?;
    if let Err(error) = send_and_close(socket, frame, &address) {
        bail!("cannot send a frame out of {interface}: {error}");
    }
    Ok(())
}

/// `struct virtio_net_hdr`: flags, GSO type (none), header length, GSO size, checksum start
/// and offset.
const VIRTIO_NET_HDR_LEN: usize = 10;

/// Sends the Ethernet `frame` out of `interface` as a socket buffer whose first `linear` bytes
/// lie in its linear area and the rest in pages, as a NIC's scatter-gather receive or GRO
/// leaves a packet: a program reads past `linear` only after pulling the bytes in. The kernel
/// splits only a frame of at least a page; below that it keeps the frame linear.
pub fn send_split_frame(interface: &str, frame: &[u8], linear: u16) -> Result<()> {
    let (socket, address) = packet_socket(interface, frame)?;
    let on: libc::c_int = 1;
    // Each packet sent then starts with a `virtio_net_hdr`, whose header length sets the
    // linear area's.
    // SAFETY: `on` is a valid int for the length given.
    let set = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        let error = std::io::Error::last_os_error();
        // SAFETY: the descriptor is ours and open.
        unsafe { libc::close(socket) };
        bail!("cannot ask for virtio-net headers on a packet socket: {error}");
    }
    // Only the header length is set, in the host's byte order (little-endian virtio).
    let mut packet = vec![0u8; VIRTIO_NET_HDR_LEN];
    packet[2..4].copy_from_slice(&linear.to_le_bytes());
    packet.extend_from_slice(frame);
    if let Err(error) = send_and_close(socket, &packet, &address) {
        bail!("cannot send a split frame out of {interface}: {error}");
    }
    Ok(())
}

/// A raw packet socket and the address that sends the Ethernet `frame` out of `interface`.
fn packet_socket(interface: &str, frame: &[u8]) -> Result<(i32, libc::sockaddr_ll)> {
    let Some(destination) = frame.get(..6) else {
        bail!("a frame of {} bytes has no Ethernet header", frame.len());
    };
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: `name` is a valid C string for the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {interface}");
    }
    // SAFETY: plain socket call; the caller closes the descriptor.
    let socket = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if socket < 0 {
        bail!(
            "cannot open a packet socket: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = ifindex as i32;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(destination);
    Ok((socket, address))
}

/// Sends `data` on the raw `socket` to `address` (a `sockaddr_*`), then closes the socket.
fn send_and_close<A>(socket: i32, data: &[u8], address: &A) -> std::io::Result<()> {
    // SAFETY: the buffer and the address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket,
            data.as_ptr().cast(),
            data.len(),
            0,
            (address as *const A).cast(),
            size_of::<A>() as libc::socklen_t,
        )
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: the descriptor is ours and open.
    unsafe { libc::close(socket) };
    if sent < 0 { Err(error) } else { Ok(()) }
}
