//! Which source line each JIT-compiled instruction of a loaded program comes from: the
//! kernel keeps, per program, the JIT address where each line's code starts
//! (`jited_line_info`), the line's record (`line_info`: file, line and its text, as offsets
//! into the program's BTF strings) and its functions' start addresses and tags
//! (`jited_ksyms`, `prog_tags`). perf names a sample's JIT function `bpf_prog_<tag>_<name>`
//! (the program's tag for its first function, each other function's own), and a tag is a hash
//! of instructions, the same in every load of the same code: lines learned from one load serve
//! every other.
use std::{
    collections::{HashMap, HashSet},
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use aya_obj::generated::{bpf_attr, bpf_btf_info, bpf_cmd, bpf_line_info, bpf_prog_info};

/// A line of the programs' source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceLine {
    /// The file, from the crate's directory on (`overlay-ebpf/src/decap/v4.rs`).
    pub file: String,
    pub line: u32,
    /// The line's text, trimmed.
    pub text: String,
    /// For a line of a dependency (aya-ebpf, core) inlined into the program: the last line of
    /// the program's own crates before it in the code, most often the one that called it.
    pub after: Option<Arc<SourceLine>>,
}

/// Where the lines of one JIT-compiled function start: (offset from the function's start,
/// line), by offset.
type Function = Vec<(u64, Arc<SourceLine>)>;

/// The functions of every program seen loaded, by tag (16 hex digits, as perf prints it).
#[derive(Default)]
pub struct LineTable {
    functions: HashMap<String, Function>,
    /// The ids of the programs whose functions are in. Not their tags: a program loaded again
    /// with maps of other sizes keeps its tag, but its other functions' change (seen with the
    /// IPv6 encapsulation's, for 2 and for 10,000 leases; the tags of the functions are taken
    /// after the verifier's rewrites, which write map sizes into inlined lookups).
    programs: HashSet<u32>,
}

impl LineTable {
    /// Learns the lines of every loaded program with line info whose functions are not
    /// known yet.
    pub fn learn_loaded(&mut self) -> Result<()> {
        for program in aya::programs::loaded_programs() {
            // A program unloaded between listing and opening is simply gone.
            let Ok(program) = program else { continue };
            if self.programs.contains(&program.id()) {
                continue;
            }
            let Ok(fd) = program.fd() else { continue };
            self.learn(fd.as_fd(), program.tag())
                .with_context(|| format!("the line info of program {}", program.id()))?;
            self.programs.insert(program.id());
        }
        Ok(())
    }

    /// Learns the lines of the program `fd`, tagged `tag`.
    fn learn(&mut self, fd: BorrowedFd<'_>, tag: u64) -> Result<()> {
        let info = JitLines::of(fd)?;
        let Some(info) = info else { return Ok(()) };
        let strings = btf_strings(info.btf_id)?;
        let mut functions = vec![Vec::new(); info.starts.len()];
        for (record, &address) in info.records.iter().zip(&info.addresses) {
            let Some(index) = info.function_at(address) else {
                continue;
            };
            let path = string_at(&strings, record.file_name_off);
            let line = SourceLine {
                file: crate_relative(path),
                line: record.line_col >> 10,
                text: string_at(&strings, record.line_off).trim().to_string(),
                after: None,
            };
            functions[index].push((address - info.starts[index], line, is_dependency(path)));
        }
        // The kernel names the first function after the program's tag, the others after
        // their own.
        let tags = std::iter::once(tag.to_be_bytes()).chain(info.tags.iter().skip(1).copied());
        for (function, tag) in functions.into_iter().zip(tags) {
            self.functions.insert(hex(&tag), in_code_order(function));
        }
        Ok(())
    }

    /// A table of one function, `tag`, whose lines start at the offsets given.
    #[cfg(test)]
    pub fn with_function(tag: &str, lines: Vec<(u64, SourceLine)>) -> Self {
        let function = lines
            .into_iter()
            .map(|(offset, line)| (offset, Arc::new(line)))
            .collect();
        Self {
            functions: HashMap::from([(tag.to_string(), function)]),
            programs: HashSet::new(),
        }
    }

    /// Whether the lines of the function `tag` are known.
    pub fn knows(&self, tag: &str) -> bool {
        self.functions.contains_key(tag)
    }

    /// The line whose code holds the instruction `offset` bytes into the function `tag`.
    pub fn line_at(&self, tag: &str, offset: u64) -> Option<&SourceLine> {
        let lines = self.functions.get(tag)?;
        let after = lines.partition_point(|(start, _)| *start <= offset);
        after.checked_sub(1).map(|index| lines[index].1.as_ref())
    }
}

/// What BPF_OBJ_GET_INFO_BY_FD tells of a program's JIT image and lines.
struct JitLines {
    btf_id: u32,
    records: Vec<bpf_line_info>,
    /// The JIT address of each record's first instruction.
    addresses: Vec<u64>,
    /// Each function's start address, length and tag.
    starts: Vec<u64>,
    lengths: Vec<u32>,
    tags: Vec<[u8; 8]>,
}

impl JitLines {
    /// The program's JIT lines, or None when it has none (no BTF, or not JIT-compiled).
    fn of(fd: BorrowedFd<'_>) -> Result<Option<Self>> {
        let mut counts: bpf_prog_info = zeroed();
        object_info(fd, &mut counts).context("BPF_OBJ_GET_INFO_BY_FD")?;
        if counts.btf_id == 0 || counts.nr_jited_line_info == 0 || counts.nr_jited_ksyms == 0 {
            return Ok(None);
        }
        let mut lines = JitLines {
            btf_id: counts.btf_id,
            records: vec![zeroed(); counts.nr_line_info as usize],
            addresses: vec![0; counts.nr_jited_line_info as usize],
            starts: vec![0; counts.nr_jited_ksyms as usize],
            lengths: vec![0; counts.nr_jited_func_lens as usize],
            tags: vec![[0; 8]; counts.nr_prog_tags as usize],
        };
        let mut info: bpf_prog_info = zeroed();
        info.nr_line_info = counts.nr_line_info;
        info.line_info_rec_size = size_of::<bpf_line_info>() as u32;
        info.line_info = lines.records.as_mut_ptr() as u64;
        info.nr_jited_line_info = counts.nr_jited_line_info;
        info.jited_line_info_rec_size = size_of::<u64>() as u32;
        info.jited_line_info = lines.addresses.as_mut_ptr() as u64;
        info.nr_jited_ksyms = counts.nr_jited_ksyms;
        info.jited_ksyms = lines.starts.as_mut_ptr() as u64;
        info.nr_jited_func_lens = counts.nr_jited_func_lens;
        info.jited_func_lens = lines.lengths.as_mut_ptr() as u64;
        info.nr_prog_tags = counts.nr_prog_tags;
        info.prog_tags = lines.tags.as_mut_ptr() as u64;
        object_info(fd, &mut info).context("BPF_OBJ_GET_INFO_BY_FD with buffers")?;
        if lines.starts.iter().all(|&start| start == 0) {
            bail!("the kernel hides JIT addresses from this process (kernel.kptr_restrict)");
        }
        Ok(Some(lines))
    }

    /// The function whose code holds `address`.
    fn function_at(&self, address: u64) -> Option<usize> {
        self.starts
            .iter()
            .zip(&self.lengths)
            .position(|(&start, &length)| (start..start + u64::from(length)).contains(&address))
    }
}

/// The string section of the BTF object `id`.
fn btf_strings(id: u32) -> Result<Vec<u8>> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
    let fd = bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr).context("BPF_BTF_GET_FD_BY_ID")?;
    // SAFETY: BPF_BTF_GET_FD_BY_ID returns a new descriptor, ours to close.
    let btf = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info: bpf_btf_info = zeroed();
    object_info(btf.as_fd(), &mut info).context("the BTF's size")?;
    let mut data = vec![0u8; info.btf_size as usize];
    let mut info: bpf_btf_info = zeroed();
    info.btf = data.as_mut_ptr() as u64;
    info.btf_size = data.len() as u32;
    object_info(btf.as_fd(), &mut info).context("the BTF")?;
    strings_of(&data)
}

/// The string section of raw BTF: after the header (`hdr_len` at byte 4) at `str_off` (byte
/// 16), `str_len` (byte 20) long, in the machine's byte order.
fn strings_of(btf: &[u8]) -> Result<Vec<u8>> {
    let word = |at: usize| -> Result<usize> {
        let bytes = btf.get(at..at + 4).context("BTF shorter than its header")?;
        Ok(u32::from_ne_bytes(bytes.try_into()?) as usize)
    };
    let start = word(4)? + word(16)?;
    let strings = btf
        .get(start..start + word(20)?)
        .context("BTF strings past the end")?;
    Ok(strings.to_vec())
}

fn string_at(strings: &[u8], offset: u32) -> &str {
    let tail = strings.get(offset as usize..).unwrap_or_default();
    let end = tail
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(tail.len());
    std::str::from_utf8(&tail[..end]).unwrap_or("?")
}

/// The lines of a function, (offset, line, whether it is a dependency's), in the order of
/// their code, each dependency's line with the last of ours before it.
fn in_code_order(mut lines: Vec<(u64, SourceLine, bool)>) -> Function {
    lines.sort_by_key(|(offset, _, _)| *offset);
    let mut ours: Option<Arc<SourceLine>> = None;
    lines
        .into_iter()
        .map(|(offset, mut line, dependency)| {
            if dependency {
                line.after = ours.clone();
                (offset, Arc::new(line))
            } else {
                let line = Arc::new(line);
                ours = Some(line.clone());
                (offset, line)
            }
        })
        .collect()
}

/// Whether `path` (as the compiler recorded it) is a dependency's source: cargo's registry,
/// or the Rust standard library's.
fn is_dependency(path: &str) -> bool {
    ["/registry/src/", "/rustc/", "/rustlib/"]
        .iter()
        .any(|place| path.contains(place))
}

/// `path` from its crate's directory on, or as it is outside any crate's `src`.
fn crate_relative(path: &str) -> String {
    match path.rfind("/src/") {
        Some(src) => {
            let crate_start = path[..src].rfind('/').map_or(0, |slash| slash + 1);
            path[crate_start..].to_string()
        }
        None => path.to_string(),
    }
}

fn hex(tag: &[u8; 8]) -> String {
    tag.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn zeroed<T: Copy>() -> T {
    // SAFETY: only the kernel's plain-old-data structs come here; all zeroes is how the
    // kernel wants their unused fields.
    unsafe { std::mem::zeroed() }
}

/// BPF_OBJ_GET_INFO_BY_FD of `fd` into `info`.
fn object_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = info as *mut T as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The bpf(2) syscall.
fn bpf(command: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr of the size passed, and every pointer in it points
    // to a buffer of the length it states.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_shown_from_its_crate_on() {
        assert_eq!(
            crate_relative("/work/main/overlay-ebpf/src/decap/v4.rs"),
            "overlay-ebpf/src/decap/v4.rs"
        );
        assert_eq!(
            crate_relative("overlay-ebpf/src/lib.rs"),
            "overlay-ebpf/src/lib.rs"
        );
        assert_eq!(crate_relative("<unknown>"), "<unknown>");
    }

    #[test]
    fn a_dependency_s_line_names_the_last_of_ours_before_it_in_the_code() {
        let line = |file: &str, number| SourceLine {
            file: file.into(),
            line: number,
            text: String::new(),
            after: None,
        };
        let lines = vec![
            (16, line("helpers.rs", 10), true),
            (0, line("maps.rs", 183), false),
            (24, line("decap.rs", 7), false),
            (8, line("helpers.rs", 10), true),
        ];
        let function = in_code_order(lines);
        let after: Vec<_> = function
            .iter()
            .map(|(offset, line)| (*offset, line.after.as_ref().map(|ours| ours.line)))
            .collect();
        assert_eq!(
            after,
            [(0, None), (8, Some(183)), (16, Some(183)), (24, None)]
        );
        assert!(is_dependency(
            "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-0.2.1/src/lib.rs"
        ));
        assert!(is_dependency("/rustc/abc123/library/core/src/cmp.rs"));
        assert!(!is_dependency("/work/main/overlay-ebpf/src/maps.rs"));
    }

    #[test]
    fn a_line_is_found_by_the_last_start_at_or_before_the_offset() {
        let line = |number| SourceLine {
            file: "f.rs".into(),
            line: number,
            text: String::new(),
            after: None,
        };
        let table = LineTable::with_function("00", vec![(0, line(1)), (8, line(2)), (20, line(3))]);
        let at = |offset| table.line_at("00", offset).map(|line| line.line);
        assert_eq!(
            [at(0), at(7), at(8), at(19), at(20), at(500)],
            [Some(1), Some(1), Some(2), Some(2), Some(3), Some(3)]
        );
        assert_eq!(table.line_at("ff", 0), None);
    }
}
