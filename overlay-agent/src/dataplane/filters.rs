//! Our netlink tc filters, where they are and what each runs, as the kernel lists them: what
//! `status` shows of the programs no link pin names. A filter is ours by its priority and
//! handle (at most one program of ours sits on each device and direction), its program by the
//! name the filter carries.
use anyhow::Result;
use aya::programs::tc::TcHandle;
use futures::TryStreamExt;
use rtnetlink::{
    Handle,
    packet_route::tc::{TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
};

use super::PROGRAMS;

/// The priority and handle of every netlink filter of ours.
pub const FILTER_PRIORITY: u16 = 0x4f56;
const FILTER_HANDLE_MAJOR: u16 = 0x4f56;
const FILTER_HANDLE_MINOR: u16 = 1;
pub const FILTER_HANDLE: TcHandle = TcHandle::new(FILTER_HANDLE_MAJOR, FILTER_HANDLE_MINOR);

/// Our filters on the interfaces `ifindexes`, both directions, as (program, interface index).
pub async fn filters_of_ours(
    handle: &Handle,
    ifindexes: &[u32],
) -> Result<Vec<(&'static str, u32)>> {
    let mut found = Vec::new();
    for &ifindex in ifindexes {
        let Ok(index) = i32::try_from(ifindex) else {
            continue;
        };
        for ingress in [true, false] {
            let request = handle.traffic_filter(index).get();
            let request = if ingress {
                request.ingress()
            } else {
                request.egress()
            };
            // Without a clsact qdisc the kernel refuses the listing: there is no filter either.
            let Ok(filters) = request.execute().try_collect::<Vec<TcMessage>>().await else {
                continue;
            };
            found.extend(
                filters
                    .iter()
                    .filter_map(program_of_ours)
                    .map(|program| (program, ifindex)),
            );
        }
    }
    Ok(found)
}

/// The program of ours `filter` runs, if it is one of ours.
fn program_of_ours(filter: &TcMessage) -> Option<&'static str> {
    let header = &filter.header;
    let ours = header.handle.major == FILTER_HANDLE_MAJOR
        && header.handle.minor == FILTER_HANDLE_MINOR
        && header.info >> 16 == u32::from(FILTER_PRIORITY);
    if !ours {
        return None;
    }
    let name = filter
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            TcAttribute::Options(options) => options.iter().find_map(|option| match option {
                TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(name.as_str()),
                _ => None,
            }),
            _ => None,
        })?;
    PROGRAMS.into_iter().find(|program| name == *program)
}
