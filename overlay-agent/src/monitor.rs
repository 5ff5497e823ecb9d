//! `overlay-agent monitor`: one line per packet the programs drop, with the reason, the
//! interface, and the outer and inner addresses, ports and protocols, as `cilium monitor
//! --type drop` shows them; with `--trace`, one line per packet to or from a prefix, with
//! the path it took. The programs report only while a monitor runs: one that ends without
//! turning the reports off (SIGKILL) leaves its lock behind free, and the agent turns them off.
use std::{
    collections::HashMap,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use overlay_common::{Counter, DROP_HEAD_LEN, DropEvent};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{dataplane::pins::PinnedDataplane, node::links, options::AgentOptions};

const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HEADER_LEN: usize = 40;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const UDP_HEADER_LEN: usize = 8;
const VXLAN_HEADER_LEN: usize = 8;
/// How often the agent looks for reports left on by a monitor that is gone.
const GONE_MONITOR_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(options: &AgentOptions, trace: Option<IpNetwork>) -> Result<()> {
    let pin_dir = options.pin_dir()?;
    let pinned = PinnedDataplane::open(&pin_dir)?;
    let vxlan_port = pinned.config()?.vxlan_port;
    let names = links::names(&links::connect()?).await?;
    let trace =
        trace.map(|prefix| IpNetwork::new(prefix.network(), prefix.prefix()).unwrap_or(prefix));
    let (events, _reporting) = pinned.monitor(trace)?;
    // SAFETY: the ring buffer owns its map's fd and keeps it open, unchanged, for as long as
    // the AsyncFd holds it.
    let mut events = unsafe { AsyncFd::register(events) }
        .map_err(std::io::Error::from)
        .context("cannot poll the drop events")?;
    let mut shutdown = crate::ShutdownSignals::catch()?;
    match trace {
        Some(prefix) => println!(
            "tracing {prefix} through the dataplane under {}; Ctrl-C stops",
            pin_dir.display()
        ),
        None => println!(
            "monitoring drops of the dataplane under {}; Ctrl-C stops",
            pin_dir.display()
        ),
    }
    // A closed terminal or a dropped ssh session: SIGHUP would end the process without
    // turning the reports off.
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    loop {
        tokio::select! {
            signal = shutdown.received() => {
                log::info!("{signal}; no more reports");
                return Ok(());
            }
            _ = hangup.recv() => {
                log::info!("SIGHUP; no more reports");
                return Ok(());
            }
            ready = events.readable_mut() => {
                let mut ready = ready.context("cannot wait for drop events")?;
                let mut out = std::io::stdout().lock();
                while let Some(record) = ready.get_inner_mut().next() {
                    if let Some(event) = event_from(&record) {
                        let line = describe(&event, vxlan_port, &names);
                        match trace {
                            Some(_) => writeln!(out, "{}: {line}", path_of(event.reason))?,
                            None => writeln!(out, "{line}")?,
                        }
                    }
                }
                out.flush()?;
                ready.clear_ready();
            }
        }
    }
}

/// In the agent: turns off, every [`GONE_MONITOR_INTERVAL`], the reports of the dataplane
/// pinned in `pin_dir` that a monitor left on when it ended, for as long as it is polled.
pub async fn end_reports_of_gone_monitors(pin_dir: PathBuf) {
    let mut ticks = tokio::time::interval(GONE_MONITOR_INTERVAL);
    // Warned once until it changes: the same failure every 2 s says nothing new.
    let mut last_error = None;
    loop {
        ticks.tick().await;
        match PinnedDataplane::open(&pin_dir)
            .and_then(|pinned| pinned.end_reports_without_monitor())
        {
            Ok(Some(monitor)) => log::warn!(
                "{} ended without turning the dataplane's reports off; turned them off",
                monitor.map_or("a monitor".to_string(), |pid| format!(
                    "the monitor (pid {pid})"
                ))
            ),
            Ok(None) => {}
            Err(error) => {
                let error = format!("{error:#}");
                if last_error.as_ref() != Some(&error) {
                    log::warn!("cannot look for reports left on by a monitor: {error}");
                }
                last_error = Some(error);
                continue;
            }
        }
        last_error = None;
    }
}

/// The path a packet with the outcome `index` took, in words.
fn path_of(index: u32) -> &'static str {
    let Some(outcome) = Counter::from_index(index) else {
        return "unknown outcome";
    };
    match outcome {
        _ if outcome.is_drop() => "dropped",
        Counter::TxDirect | Counter::RxDelivered => "fast path",
        Counter::TxRoutedFlow | Counter::RxRoutedFlow => "translated flow",
        Counter::TxEncapsulated
        | Counter::TxSlowPath
        | Counter::TxIpv6PartialSegment
        | Counter::TxIpv6Routed
        | Counter::RxDecapsulated
        | Counter::RxChecked => "routed path",
        _ => "not overlay traffic",
    }
}

/// The event a ring buffer record holds, read field by field as the programs laid it out.
fn event_from(record: &[u8]) -> Option<DropEvent> {
    let word = |offset: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(
            record.get(offset..offset + 4)?.try_into().ok()?,
        ))
    };
    Some(DropEvent {
        reason: word(0)?,
        ifindex: word(4)?,
        len: word(8)?,
        captured: word(12)?,
        head: record.get(16..16 + DROP_HEAD_LEN)?.try_into().ok()?,
    })
}

/// One line for a dropped packet: `reason on interface: outer [| inner] (N bytes)`.
fn describe(event: &DropEvent, vxlan_port: u16, names: &HashMap<u32, String>) -> String {
    let reason = Counter::from_index(event.reason).map_or("unknown outcome", Counter::name);
    let interface = names
        .get(&event.ifindex)
        .cloned()
        .unwrap_or_else(|| format!("ifindex {}", event.ifindex));
    let captured = &event.head[..(event.captured as usize).min(DROP_HEAD_LEN)];
    let packet = match Flow::of_frame(captured) {
        Some(outer) => match outer.vxlan_payload(captured, vxlan_port) {
            Some(inner) => match Flow::of_frame(inner) {
                Some(inner) => format!("{outer} | {inner}"),
                None => format!("{outer} | inner: no whole IP header"),
            },
            None => outer.to_string(),
        },
        None => "no whole IP header".to_string(),
    };
    format!("{reason} on {interface}: {packet} ({} bytes)", event.len)
}

/// An IP packet's addresses, protocol (IPv6: the next header) and, for TCP and UDP, ports.
struct Flow {
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    ports: Option<(u16, u16)>,
    /// Where the transport header starts in the frame.
    transport: usize,
}

impl Flow {
    /// The flow of an Ethernet frame carrying IPv4 or IPv6 (no extension headers), as far as
    /// `frame` holds it.
    fn of_frame(frame: &[u8]) -> Option<Flow> {
        let ether_type = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
        let ip = frame.get(ETH_HEADER_LEN..)?;
        let (header_len, protocol, source, destination) = match ether_type {
            ETH_P_IPV4 => (
                usize::from(ip.first()? & 0x0f) * 4,
                *ip.get(9)?,
                IpAddr::from(<[u8; 4]>::try_from(ip.get(12..16)?).ok()?),
                IpAddr::from(<[u8; 4]>::try_from(ip.get(16..20)?).ok()?),
            ),
            ETH_P_IPV6 => (
                IPV6_HEADER_LEN,
                *ip.get(6)?,
                IpAddr::from(<[u8; 16]>::try_from(ip.get(8..24)?).ok()?),
                IpAddr::from(<[u8; 16]>::try_from(ip.get(24..40)?).ok()?),
            ),
            _ => return None,
        };
        let transport = ETH_HEADER_LEN + header_len;
        let ports = matches!(protocol, IPPROTO_TCP | IPPROTO_UDP)
            .then(|| {
                let port = |offset: usize| -> Option<u16> {
                    Some(u16::from_be_bytes(
                        frame
                            .get(transport + offset..transport + offset + 2)?
                            .try_into()
                            .ok()?,
                    ))
                };
                Some((port(0)?, port(2)?))
            })
            .flatten();
        Some(Flow {
            source,
            destination,
            protocol,
            ports,
            transport,
        })
    }

    /// The inner frame, if this is VXLAN to `vxlan_port`.
    fn vxlan_payload<'a>(&self, frame: &'a [u8], vxlan_port: u16) -> Option<&'a [u8]> {
        let (_, destination_port) = self.ports?;
        (self.protocol == IPPROTO_UDP && destination_port == vxlan_port)
            .then(|| frame.get(self.transport + UDP_HEADER_LEN + VXLAN_HEADER_LEN..))
            .flatten()
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            IPPROTO_TCP => "tcp".to_string(),
            IPPROTO_UDP => "udp".to_string(),
            IPPROTO_ICMP => "icmp".to_string(),
            IPPROTO_ICMPV6 => "icmp6".to_string(),
            other => format!("proto {other}"),
        };
        match self.ports {
            Some((source_port, destination_port)) => write!(
                f,
                "{} -> {} {protocol}",
                SocketAddr::new(self.source, source_port),
                SocketAddr::new(self.destination, destination_port)
            ),
            None => write!(f, "{} -> {} {protocol}", self.source, self.destination),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    /// Ethernet + IPv4 (no options) + the first bytes of `transport`.
    fn frame(source: [u8; 4], destination: [u8; 4], protocol: u8, transport: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; 12];
        frame.extend(ETH_P_IPV4.to_be_bytes());
        frame.extend([0x45, 0, 0, 0, 0, 0, 0, 0, 64, protocol, 0, 0]);
        frame.extend(source);
        frame.extend(destination);
        frame.extend(transport);
        frame
    }

    fn event(reason: Counter, packet: &[u8]) -> DropEvent {
        let mut head = [0; DROP_HEAD_LEN];
        let captured = packet.len().min(DROP_HEAD_LEN);
        head[..captured].copy_from_slice(&packet[..captured]);
        DropEvent {
            reason: reason as u32,
            ifindex: 2,
            len: packet.len() as u32,
            captured: captured as u32,
            head,
        }
    }

    fn names() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_string())])
    }

    #[test]
    fn a_dropped_vxlan_frame_shows_its_outer_and_inner_flows() {
        let inner = frame(
            [10, 2, 41, 9],
            [10, 2, 54, 2],
            IPPROTO_UDP,
            &[0x8c, 0xa0, 0x14, 0x51],
        );
        let mut udp_and_vxlan = vec![0xa0, 0x00, 0x21, 0x18, 0, 0, 0, 0];
        udp_and_vxlan.extend([0x08, 0, 0, 0, 0, 0, 1, 0]);
        udp_and_vxlan.extend(&inner);
        let outer = frame(
            [172, 20, 62, 66],
            [172, 20, 62, 105],
            IPPROTO_UDP,
            &udp_and_vxlan,
        );
        assert_eq!(
            describe(&event(Counter::RxUnknownVtep, &outer), 8472, &names()),
            format!(
                "rx_unknown_vtep on eth0: 172.20.62.66:40960 -> 172.20.62.105:8472 udp | \
                 10.2.41.9:36000 -> 10.2.54.2:5201 udp ({} bytes)",
                outer.len()
            )
        );
    }

    #[test]
    fn a_plain_packet_a_short_head_and_an_unknown_interface_still_read() {
        let ping = frame([10, 2, 41, 2], [10, 9, 0, 1], 1, &[8, 0]);
        assert_eq!(
            describe(&event(Counter::TxNoRoute, &ping), 8472, &HashMap::new()),
            format!(
                "tx_no_route on ifindex 2: 10.2.41.2 -> 10.9.0.1 icmp ({} bytes)",
                ping.len()
            )
        );
        let cut = event(Counter::RxMalformed, &ping[..20]);
        assert_eq!(
            describe(&cut, 8472, &names()),
            "rx_malformed on eth0: no whole IP header (20 bytes)"
        );
    }

    /// Ethernet + IPv6 + the first bytes of `transport`.
    fn frame6(source: &str, destination: &str, next_header: u8, transport: &[u8]) -> Vec<u8> {
        let address = |text: &str| text.parse::<Ipv6Addr>().expect("address").octets();
        let mut frame = vec![0; 12];
        frame.extend(ETH_P_IPV6.to_be_bytes());
        frame.extend([0x60, 0, 0, 0, 0, 0, next_header, 64]);
        frame.extend(address(source));
        frame.extend(address(destination));
        frame.extend(transport);
        frame
    }

    #[test]
    fn a_dropped_frame_of_vxlan_over_ipv6_shows_both_flows() {
        let inner = frame6(
            "fd00:2:0:41::9",
            "fd00:2:0:54::2",
            IPPROTO_UDP,
            &[0x8c, 0xa0, 0x14, 0x51],
        );
        let mut udp_and_vxlan = vec![0xa0, 0x00, 0x21, 0x18, 0, 0, 0, 0];
        udp_and_vxlan.extend([0x08, 0, 0, 0, 0, 0, 1, 0]);
        udp_and_vxlan.extend(&inner);
        let outer = frame6("fd00:ff::66", "fd00:ff::105", IPPROTO_UDP, &udp_and_vxlan);
        assert_eq!(
            describe(&event(Counter::RxIpv6NonMember, &outer), 8472, &names()),
            format!(
                "rx_ipv6_non_member on eth0: [fd00:ff::66]:40960 -> [fd00:ff::105]:8472 udp | \
                 [fd00:2:0:41::9]:36000 -> [fd00:2:0:54::2]:5201 udp ({} bytes)",
                outer.len()
            )
        );
        let ping = frame6(
            "fd00:2:0:41::9",
            "fd00:2:0:54::2",
            IPPROTO_ICMPV6,
            &[128, 0],
        );
        assert!(
            describe(&event(Counter::TxIpv6SpoofedSource, &ping), 8472, &names())
                .contains("fd00:2:0:41::9 -> fd00:2:0:54::2 icmp6")
        );
    }

    #[test]
    fn records_are_read_field_by_field() {
        let original = event(Counter::RxSpoofedSource, &[1, 2, 3]);
        let mut record = Vec::new();
        for word in [
            original.reason,
            original.ifindex,
            original.len,
            original.captured,
        ] {
            record.extend(word.to_ne_bytes());
        }
        record.extend(original.head);
        assert_eq!(event_from(&record), Some(original));
        assert_eq!(event_from(&record[..20]), None);
    }
}
