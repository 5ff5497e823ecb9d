//! rtnetlink notifications for the links, addresses, neighbours (ARP, NDP and FDB) and routes
//! of both families on the host, on a netlink socket of their own.
use anyhow::{Context, Result};
use futures::{StreamExt, channel::mpsc::UnboundedReceiver};
use rtnetlink::{
    MulticastGroup, packet_core::NetlinkMessage, packet_route::RouteNetlinkMessage, sys::SocketAddr,
};

use crate::sinks::NotificationSource;

pub type Notification = NetlinkMessage<RouteNetlinkMessage>;

pub struct Notifications {
    /// None once the stream has ended.
    receiver: Option<UnboundedReceiver<(Notification, SocketAddr)>>,
}

/// Subscribes to the notifications. Subscribe before listing anything, so no change falls
/// between the listing and the first notification.
pub fn subscribe() -> Result<Notifications> {
    let (connection, _, receiver) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])
    .context("cannot subscribe to netlink notifications")?;
    tokio::spawn(connection);
    Ok(Notifications {
        receiver: Some(receiver),
    })
}

impl NotificationSource for Notifications {
    type Notification = Notification;

    /// The next notification. Lost notifications come as an `Overrun` payload. Should the
    /// stream end, this says so once and then waits forever: the safety net takes over.
    async fn recv(&mut self) -> Notification {
        if let Some(receiver) = &mut self.receiver {
            if let Some((notification, _)) = receiver.next().await {
                return notification;
            }
            log::error!("the netlink notification stream ended; only the safety net is left");
            self.receiver = None;
        }
        std::future::pending().await
    }

    fn try_recv(&mut self) -> Option<Notification> {
        let (notification, _) = self.receiver.as_mut()?.try_recv().ok()?;
        Some(notification)
    }
}
