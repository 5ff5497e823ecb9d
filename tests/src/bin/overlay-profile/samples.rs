//! perf's samples, attributed to what a BPF program did when each was taken: an instruction
//! of its own (by source line) or a kernel function it called (a helper, a map's lookup),
//! with the line that called it.
use std::{
    collections::{BTreeMap, HashMap},
    io::BufRead,
};

use anyhow::Result;

use crate::lines::{LineTable, SourceLine};

/// One frame of a sample's call chain, as `perf script -F ip,sym,symoff` prints it.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub symbol: String,
    pub offset: u64,
}

/// What a program was doing in a sample.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cost {
    /// Its own instruction, on this line (None: a line the table does not know).
    Own(Option<SourceLine>),
    /// The kernel function it called, and the line that called it.
    Call {
        callee: String,
        site: Option<SourceLine>,
    },
}

/// Each program's samples, by what it was doing.
#[derive(Default)]
pub struct Profile {
    pub programs: BTreeMap<String, HashMap<Cost, u64>>,
}

impl Profile {
    /// Attributes every sample of `script` (perf script's output) that holds a program of
    /// `table`; the others are left out.
    pub fn of(script: impl BufRead, table: &LineTable) -> Result<Self> {
        let mut profile = Profile::default();
        let mut chain = Vec::new();
        for line in script.lines() {
            let line = line?;
            match frame_of(&line) {
                Some(frame) => chain.push(frame),
                None if line.trim().is_empty() => {
                    profile.add(&chain, table);
                    chain.clear();
                }
                // A sample's header line (its event, when perf prints one).
                None => {}
            }
        }
        profile.add(&chain, table);
        Ok(profile)
    }

    fn add(&mut self, chain: &[Frame], table: &LineTable) {
        let Some((program, cost)) = attribute(chain, table) else {
            return;
        };
        *self
            .programs
            .entry(program.to_string())
            .or_default()
            .entry(cost)
            .or_default() += 1;
    }
}

/// The program in `chain` (leaf first; the outermost known program frame, the one the kernel
/// ran) and what it was doing: the innermost known program frame's own instruction if it is
/// the leaf, or else the function that frame called.
fn attribute<'a>(chain: &'a [Frame], table: &LineTable) -> Option<(&'a str, Cost)> {
    let mut known = chain.iter().enumerate().filter_map(|(index, frame)| {
        let (tag, name) = jit_function(&frame.symbol)?;
        table.knows(tag).then_some((index, tag, name))
    });
    let (index, tag, innermost) = known.next()?;
    let program = known.next_back().map_or(innermost, |(_, _, name)| name);
    let line_at = |offset| table.line_at(tag, offset).cloned();
    let cost = match index.checked_sub(1) {
        None => Cost::Own(line_at(chain[index].offset)),
        Some(callee) => Cost::Call {
            callee: chain[callee].symbol.clone(),
            // The frame holds the return address: the call is the instruction before it.
            site: line_at(chain[index].offset.saturating_sub(1)),
        },
    };
    Some((program, cost))
}

/// The tag and the name in a JIT-compiled BPF function's symbol, `bpf_prog_<tag>_<name>`.
fn jit_function(symbol: &str) -> Option<(&str, &str)> {
    let (tag, name) = symbol.strip_prefix("bpf_prog_")?.split_once('_')?;
    (tag.len() == 16 && tag.bytes().all(|byte| byte.is_ascii_hexdigit())).then_some((tag, name))
}

/// A frame line, `<ip> <symbol>+0x<offset>` with optional leading blanks; None for anything
/// else. A frame perf could not name (`[unknown]`) keeps its place with no offset.
fn frame_of(line: &str) -> Option<Frame> {
    let mut words = line.split_whitespace();
    let ip = words.next()?;
    u64::from_str_radix(ip, 16).ok()?;
    let place = words.next()?;
    let (symbol, offset) = match place.rsplit_once("+0x") {
        Some((symbol, offset)) => (symbol, u64::from_str_radix(offset, 16).ok()?),
        None => (place, 0),
    };
    Some(Frame {
        symbol: symbol.to_string(),
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_with_their_offsets_and_other_lines_are_not_frames() {
        assert_eq!(
            frame_of("\t    ffffffffc0401234 bpf_prog_0123456789abcdef_tc_uplink_ingress+0x1a2"),
            Some(Frame {
                symbol: "bpf_prog_0123456789abcdef_tc_uplink_ingress".into(),
                offset: 0x1a2,
            })
        );
        assert_eq!(
            frame_of("ffffffff8100 [unknown]"),
            Some(Frame {
                symbol: "[unknown]".into(),
                offset: 0,
            })
        );
        assert_eq!(frame_of("iperf3 1234 cpu-clock:"), None);
        assert_eq!(frame_of(""), None);
    }

    #[test]
    fn only_a_jit_function_s_symbol_has_a_tag_and_a_name() {
        assert_eq!(
            jit_function("bpf_prog_0123456789abcdef_tc_uplink_ingress"),
            Some(("0123456789abcdef", "tc_uplink_ingress"))
        );
        assert_eq!(jit_function("bpf_prog_run"), None);
        assert_eq!(jit_function("bpf_prog_run_generic_xdp"), None);
        assert_eq!(jit_function("bpf_skb_adjust_room"), None);
    }

    #[test]
    fn a_sample_counts_as_the_program_s_own_line_or_as_the_function_it_called() {
        let line = |number, text: &str| SourceLine {
            file: "overlay-ebpf/src/uplink.rs".into(),
            line: number,
            text: text.into(),
            after: None,
        };
        let table = LineTable::with_function(
            "0123456789abcdef",
            vec![
                (0, line(10, "let a = 1;")),
                (0x20, line(11, "ctx.adjust_room()")),
            ],
        );
        let script = "\
\tffffffffc0000000 bpf_prog_0123456789abcdef_tc_uplink_ingress+0x8
\tffffffff81000000 __netif_receive_skb+0x10

\tffffffff81000000 memmove+0x10
\tffffffff81000000 bpf_skb_adjust_room+0x10
\tffffffffc0000000 bpf_prog_0123456789abcdef_tc_uplink_ingress+0x25

\tffffffff81000000 memmove+0x14
\tffffffff81000000 bpf_skb_adjust_room+0x1c
\tffffffffc0000000 bpf_prog_0123456789abcdef_tc_uplink_ingress+0x25
";
        let profile = Profile::of(script.as_bytes(), &table).unwrap();
        let expected = HashMap::from([
            (Cost::Own(Some(line(10, "let a = 1;"))), 1),
            (
                Cost::Call {
                    callee: "bpf_skb_adjust_room".into(),
                    site: Some(line(11, "ctx.adjust_room()")),
                },
                2,
            ),
        ]);
        assert_eq!(profile.programs.get("tc_uplink_ingress"), Some(&expected));
    }

    #[test]
    fn samples_of_unknown_programs_and_without_programs_are_left_out() {
        let script = "\
\tffffffff81000000 bpf_skb_adjust_room+0x10
\tffffffffc0000000 bpf_prog_0123456789abcdef_tc_uplink_ingress+0x20

\tffffffff81000010 memcpy+0x4
\tffffffff81000020 udp_sendmsg+0x100
";
        let profile = Profile::of(script.as_bytes(), &LineTable::default()).unwrap();
        assert!(profile.programs.is_empty());
    }
}
