//! `cargo xtask bench --profile`: where the BPF programs' time goes, by source line. Runs a
//! command (the benchmark, the microbench) under `perf record -a -g`, learns the line info of
//! every program loaded meanwhile, and attributes each sample whose call chain holds a
//! program to what the program was doing: its own instruction, by source line, or the kernel
//! function it called (a helper, a map's lookup), with the line that called it. Writes
//! `profile.md` (and perf's `perf.data`) to the output directory.
//!
//! A guest without a PMU samples on `cpu-clock`: a sample taken right after interrupts come
//! back on is charged to the instruction they come back at, and the time before it.
use std::{
    fmt::Write as _,
    fs::File,
    io::BufReader,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

mod lines;
mod samples;

use lines::{LineTable, SourceLine};
use samples::{Cost, Profile};

const USAGE: &str = "usage: overlay-profile [--frequency HZ] [--out DIR] -- COMMAND [ARG...]

  --frequency HZ samples per second and CPU (default 2999)
  --out DIR      where profile.md and perf.data go (default target/bench)";

const DEFAULT_FREQUENCY: u32 = 2999;
/// How often the loaded programs are looked at while the command runs: a program loaded and
/// gone in less is missed, and so are its samples.
const LOOK_EVERY: Duration = Duration::from_millis(200);
const PERF_START: Duration = Duration::from_secs(10);
/// Rows shown per program; the rest are summed in one.
const ROWS: usize = 30;

struct Options {
    frequency: u32,
    out: PathBuf,
    command: Vec<String>,
}

impl Options {
    /// The options, or None when `--help` asked for the usage alone.
    fn parse() -> Result<Option<Self>> {
        let mut options = Options {
            frequency: DEFAULT_FREQUENCY,
            out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
            command: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--frequency" => {
                    options.frequency = value()?.parse().context("--frequency takes a rate")?;
                    ensure!(options.frequency > 0, "--frequency must be at least 1");
                }
                "--out" => options.out = PathBuf::from(value()?),
                "--help" | "-h" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                "--" => {
                    options.command = args.collect();
                    break;
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        ensure!(
            !options.command.is_empty(),
            "no command to profile\n{USAGE}"
        );
        Ok(Some(options))
    }
}

fn main() -> Result<()> {
    let Some(options) = Options::parse()? else {
        return Ok(());
    };
    overlay_tests::require_root()?;
    let out = &options.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let data = out.join("perf.data");
    let mut recorder = Recorder::start(&data, options.frequency, &out.join("perf-record.log"))?;
    let run = run_learning_lines(&options.command);
    recorder.stop()?;
    let (status, table) = run?;
    ensure!(
        status.success(),
        "{} failed: {status}",
        options.command.join(" ")
    );
    let profile = attribute(&data, &out.join("perf-script.log"), &table)?;
    let report = report(&profile, &options);
    print!("{report}");
    let path = out.join("profile.md");
    std::fs::write(&path, report).with_context(|| format!("cannot write {}", path.display()))?;
    println!("written to {}", path.display());
    Ok(())
}

/// `perf record` of every CPU, with call chains, into a file.
struct Recorder {
    perf: Child,
    log: PathBuf,
}

impl Recorder {
    fn start(data: &Path, frequency: u32, log: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(data);
        let log_file =
            File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let perf = Command::new("perf")
            .args(["record", "-a", "-g", "-F", &frequency.to_string(), "-o"])
            .arg(data)
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("cannot start perf (`cargo xtask setup` installs linux-perf)")?;
        let mut recorder = Recorder {
            perf,
            log: log.to_path_buf(),
        };
        // perf writes its file's header once its events are open.
        let started = Instant::now();
        while !std::fs::metadata(data).is_ok_and(|data| data.len() > 0) {
            if let Some(status) = recorder.perf.try_wait()? {
                bail!(
                    "perf record ended at once: {status}\n{}",
                    recorder.log_text()
                );
            }
            if started.elapsed() > PERF_START {
                recorder.stop()?;
                bail!("perf record did not start in {PERF_START:?}");
            }
            sleep(Duration::from_millis(50));
        }
        Ok(recorder)
    }

    /// Stops perf as Ctrl-C would, so that it writes out what it has.
    fn stop(&mut self) -> Result<()> {
        if self.perf.try_wait()?.is_none() {
            // SAFETY: a signal to our own child, whose pid it still is (not yet waited for).
            unsafe { libc::kill(self.perf.id() as libc::pid_t, libc::SIGINT) };
        }
        let status = self.perf.wait()?;
        // perf ends a run cut short by SIGINT with that signal's status.
        ensure!(
            status.success() || status.code() == Some(130) || status.code().is_none(),
            "perf record failed: {status}\n{}",
            self.log_text()
        );
        Ok(())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Recorder {
    /// A perf left running by an error on the way would record the machine until killed.
    fn drop(&mut self) {
        if let Ok(None) = self.perf.try_wait() {
            let _ = self.perf.kill();
            let _ = self.perf.wait();
        }
    }
}

/// Runs `command` to its end, learning the lines of the programs loaded meanwhile. A
/// failure to learn them stops the learning, not the command (a benchmark cut short would
/// leave its namespaces behind), and is the outcome once the command has ended.
fn run_learning_lines(command: &[String]) -> Result<(ExitStatus, LineTable)> {
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .spawn()
        .with_context(|| format!("cannot start {}", command[0]))?;
    let mut table = LineTable::default();
    let mut failure = None;
    loop {
        if failure.is_none() {
            failure = table.learn_loaded().err();
        }
        if let Some(status) = child.try_wait()? {
            return match failure {
                Some(failure) => Err(failure),
                None => Ok((status, table)),
            };
        }
        sleep(LOOK_EVERY);
    }
}

/// The samples of `data`, attributed; what perf says besides them goes to `log`.
fn attribute(data: &Path, log: &Path, table: &LineTable) -> Result<Profile> {
    let log_file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut perf = Command::new("perf")
        .args(["script", "-F", "ip,sym,symoff", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .context("cannot start perf script")?;
    let script = perf.stdout.take().context("perf script's output")?;
    let profile = Profile::of(BufReader::new(script), table)?;
    let status = perf.wait()?;
    ensure!(
        status.success(),
        "perf script failed: {status}\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    Ok(profile)
}

fn report(profile: &Profile, options: &Options) -> String {
    let mut report = format!(
        "# Where the BPF programs' time went\n\n\
         `perf record -a -g -F {}` over `{}`. Each sample whose call chain holds a program, by \
         what the program was doing: its own instruction (by source line) or the kernel \
         function it called (with the line that called it).\n",
        options.frequency,
        options.command.join(" ")
    );
    if profile.programs.is_empty() {
        report.push_str("\nNo sample held a program with line info.\n");
    }
    for (program, costs) in &profile.programs {
        let total: u64 = costs.values().sum();
        let mut rows: Vec<(&Cost, u64)> = costs.iter().map(|(cost, &n)| (cost, n)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let _ = write!(
            report,
            "\n## {program}: {total} samples\n\n| share | what | line |\n|---|---|---|\n"
        );
        let share = |samples: u64| 100.0 * samples as f64 / total as f64;
        for (cost, samples) in rows.iter().take(ROWS) {
            let (what, line) = match cost {
                Cost::Own(line) => ("own instructions".to_string(), line),
                Cost::Call { callee, site } => (format!("calls `{callee}`"), site),
            };
            let _ = writeln!(
                report,
                "| {:.1} % | {what} | {} |",
                share(*samples),
                describe(line.as_ref())
            );
        }
        let rest: u64 = rows.iter().skip(ROWS).map(|(_, samples)| samples).sum();
        if rest > 0 {
            let _ = writeln!(report, "| {:.1} % | the rest | |", share(rest));
        }
    }
    report
}

fn describe(line: Option<&SourceLine>) -> String {
    let Some(line) = line else {
        return "?".to_string();
    };
    let text = line.text.replace('`', "'").replace('|', "\\|");
    let here = format!("{}:{} `{text}`", line.file, line.line);
    match &line.after {
        Some(ours) => format!("{here}, after {}", describe(Some(ours))),
        None => here,
    }
}
