//! What the benchmark binaries (`src/bin/bench-filter.rs`,
//! `src/bin/bench-broker.rs`) share: their command line, `wrk` runs read
//! through a Lua `done` hook, rounds of cases in an ABBA schedule, and the
//! medians, ratios and machine facts they print.
//!
//! Each binary keeps what it measures (its cases, their baselines and
//! targets); this module only runs loads and prints figures, so both print
//! in the same layout.

use std::fmt::Write as _;
use std::path::PathBuf;

/// One `wrk` thread: one client core. With `--workers 1` (the default) the
/// server being measured takes the other core of a 2-core machine; more
/// client threads would only steal cycles from it. Checked with `top` for
/// bench-filter on such a machine: Envoy's worker at ~100% of a core in
/// every case, wrk at 11-35%, the bench process (the upstream) at ~20% in
/// the passthrough cases, so the figures are Envoy's.
pub const WRK_THREADS: u32 = 1;
/// Unmeasured load per case before the rounds: lets the server warm up (V8
/// tiers the filter up, Envoy fills its upstream connection pool).
pub const WARM_UP_SECS: u32 = 1;
/// Marks the line our `done` hook prints among wrk's own output.
const WRK_MARK: &str = "imds-mesh-bench";
/// wrk's `--latency` table rounds to two decimals in changing units, so a
/// `done` hook prints the same histogram's figures in exact microseconds.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("imds-mesh-bench %d %d %d %d %d %d %d %.0f\n",
    summary.duration, summary.requests, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(99.0)))
end
"#;

/// What the command line may change.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Worker threads of the server being measured (Envoy `--concurrency`,
    /// or the broker's tokio runtime). 1 by default: on a 2-core machine one
    /// worker and one wrk thread each get a core; a second worker would
    /// share a core with wrk and measure the scheduler as much as the server.
    /// bench-broker's runtime also carries the harness's Kubernetes API and
    /// STS, idle during the load; its driver waits for wrk on the main thread.
    pub workers: u32,
    /// Rounds of all cases. 6 short rounds rather than 3 long ones: the
    /// neighbours' load drifts over seconds, and finer interleaving spreads
    /// a slow spell over every case instead of one.
    pub rounds: u32,
    /// Seconds per case per round: 3 s is ~10^4 requests or more, plenty
    /// for a p99.
    pub duration_secs: u32,
    /// Keep-alive connections. 16 keeps the single worker busy (it always
    /// has requests queued, so loopback round trips do not idle it) while
    /// the p99 stays a queue of 16 rather than of hundreds.
    pub connections: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self { workers: 1, rounds: 6, duration_secs: 3, connections: 16 }
    }
}

impl Options {
    /// Parses `--flag N` and `--flag=N` for the binary `name`; `Err`
    /// carries what to print, and is [`usage`] itself for `-h`/`--help`.
    pub fn parse(mut args: impl Iterator<Item = String>, name: &str) -> Result<Self, String> {
        let usage = usage(name);
        let mut options = Self::default();
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                return Err(usage);
            }
            let (flag, value) = match arg.split_once('=') {
                Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
                None => (arg, None),
            };
            let value = value.or_else(|| args.next()).ok_or_else(|| format!("{flag} needs a value\n{usage}"))?;
            let n = value
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag}: {value:?} is not a positive integer"))?;
            match flag.as_str() {
                "--workers" => options.workers = n,
                "--rounds" => options.rounds = n,
                "--duration" => options.duration_secs = n,
                "--connections" => options.connections = n,
                _ => return Err(format!("unknown argument {flag}\n{usage}")),
            }
        }
        Ok(options)
    }

    /// [`Options::parse`] on this process's arguments. On `Err` the usage
    /// (exit 0) or the problem (exit 2) has been printed; exit with it.
    pub fn from_args(name: &str) -> Result<Self, std::process::ExitCode> {
        let usage = usage(name);
        match Self::parse(std::env::args().skip(1), name) {
            Ok(options) => Ok(options),
            Err(help) if help == usage => {
                println!("{usage}");
                Err(std::process::ExitCode::SUCCESS)
            }
            Err(problem) => {
                eprintln!("{problem}");
                Err(std::process::ExitCode::from(2))
            }
        }
    }

    /// The load of one measured run.
    pub fn load(&self) -> Load {
        Load { connections: self.connections, secs: self.duration_secs }
    }
}

/// The usage line of the benchmark binary `name`.
pub fn usage(name: &str) -> String {
    format!("usage: {name} [--workers N] [--rounds N] [--duration SECS] [--connections N]")
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub requests: u64,
    pub rps: f64,
    pub p99_us: f64,
    /// Socket errors, timeouts and non-2xx/3xx answers: any makes the
    /// sample suspect.
    pub errors: u64,
}

/// How long and how wide one wrk run is.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub connections: u32,
    pub secs: u32,
}

/// `wrk` with our `done` hook, written once to a temporary directory that
/// lives as long as this.
pub struct Wrk {
    script: PathBuf,
    _dir: tempfile::TempDir,
}

impl Wrk {
    /// Writes the `done` hook script.
    pub fn new() -> Result<Self, String> {
        let dir = tempfile::Builder::new().prefix("imds-mesh-bench-").tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let script = dir.path().join("report.lua");
        std::fs::write(&script, WRK_SCRIPT).map_err(|e| format!("write the wrk script: {e}"))?;
        Ok(Self { script, _dir: dir })
    }

    /// Runs wrk once against `url`, each of `headers` sent as `-H`, and reads
    /// what the `done` hook printed.
    pub async fn run(&self, url: &str, headers: &[String], load: Load) -> Result<Sample, String> {
        let mut command = tokio::process::Command::new("wrk");
        command
            .arg(format!("-t{WRK_THREADS}"))
            .arg(format!("-c{}", load.connections))
            .arg(format!("-d{}s", load.secs))
            .arg("--latency")
            .arg("-s")
            .arg(&self.script);
        for header in headers {
            command.arg("-H").arg(header);
        }
        let output = command.arg(url).kill_on_drop(true).output().await.map_err(|e| format!("run wrk: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let fields: Vec<f64> = stdout
            .lines()
            .find_map(|line| line.strip_prefix(WRK_MARK))
            .map(|rest| rest.split_whitespace().filter_map(|f| f.parse().ok()).collect())
            .unwrap_or_default();
        let [duration_us, requests, connect, read, write, timeout, status, p99_us] = fields[..] else {
            return Err(format!("no report from wrk:\n{stdout}{}", String::from_utf8_lossy(&output.stderr)));
        };
        let rps = if duration_us > 0.0 { requests / (duration_us / 1e6) } else { 0.0 };
        // wrk printed integer counts: the casts drop nothing.
        Ok(Sample {
            requests: requests as u64,
            rps,
            p99_us,
            errors: (connect + read + write + timeout + status) as u64,
        })
    }
}

/// What [`measure`] collected: one warm-up sample per case, then one sample
/// per case per round, both indexed by case.
pub struct Measured<const N: usize> {
    pub warm_up: [Sample; N],
    pub rounds: [Vec<Sample>; N],
}

/// Runs each case once for [`WARM_UP_SECS`] unmeasured, then `rounds`
/// rounds of all cases in the order `schedule(round)` gives, printing one
/// line per round (p99 right-aligned in `p99_width` columns). `wrk(i, load)`
/// runs case `i`, named `keys[i]`.
pub async fn measure<const N: usize>(
    keys: [&str; N],
    schedule: fn(usize) -> [usize; N],
    rounds: u32,
    load: Load,
    p99_width: usize,
    wrk: impl AsyncFn(usize, Load) -> Result<Sample, String>,
) -> Result<Measured<N>, String> {
    let warm_up = Load { secs: WARM_UP_SECS, ..load };
    let mut warm_ups = Vec::with_capacity(N);
    for (i, key) in keys.iter().enumerate() {
        warm_ups.push(wrk(i, warm_up).await.map_err(|e| format!("warm-up of case {key}: {e}"))?);
    }
    let mut samples: [Vec<Sample>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..rounds as usize {
        let mut line = format!("round {}/{}:", round + 1, rounds);
        for i in schedule(round) {
            let key = keys[i];
            let sample = wrk(i, load).await.map_err(|e| format!("round {}, case {key}: {e}", round + 1))?;
            let _ = write!(line, "  {key} {:>6.0} req/s p99 {:>p99_width$.0} µs", sample.rps, sample.p99_us);
            if sample.errors > 0 {
                let _ = write!(line, " ({} errors)", sample.errors);
            }
            samples[i].push(sample);
        }
        println!("{line}");
    }
    println!();
    let warm_up = warm_ups.try_into().map_err(|_| "a warm-up sample per case".to_owned())?;
    Ok(Measured { warm_up, rounds: samples })
}

/// The per-case medians over the rounds, with the req/s spread; `cases`
/// gives each case's key and description, in `samples` order.
pub fn print_cases<'a>(cases: impl IntoIterator<Item = (&'a str, &'a str)>, samples: &[Vec<Sample>]) {
    println!(
        "{:<42} {:>9} {:>9} {:>17} {:>7}",
        "case (median of rounds)", "req/s", "p99 µs", "req/s min..max", "errors"
    );
    for ((key, what), runs) in cases.into_iter().zip(samples) {
        let rps = median(runs.iter().map(|s| s.rps));
        let p99 = median(runs.iter().map(|s| s.p99_us));
        let (lo, hi) = runs.iter().fold((f64::MAX, 0.0_f64), |(lo, hi), s| (lo.min(s.rps), hi.max(s.rps)));
        let errors: u64 = runs.iter().map(|s| s.errors).sum();
        let spread = format!("{lo:.0}..{hi:.0}");
        println!("{:<42} {rps:>9.0} {p99:>9.0} {spread:>17} {errors:>7}", format!("{key}  {what}"));
    }
    println!();
}

/// The per-round ratios `of(case x) / of(case base)`, 0 where the baseline
/// measured 0.
pub fn ratios(samples: &[Vec<Sample>], x: usize, base: usize, of: fn(&Sample) -> f64) -> Vec<f64> {
    samples[x].iter().zip(&samples[base]).map(|(s, b)| if of(b) > 0.0 { of(s) / of(b) } else { 0.0 }).collect()
}

/// The heading of the targets table.
pub fn print_targets_heading() {
    println!(
        "{:<42} {:>9} {:>15} {:>10}",
        "target (median of per-round ratios)", "measured", "rounds min..max", "goal"
    );
}

/// One target row: the median of the per-round `ratios` (with their spread)
/// against `target`.
pub fn print_ratio_target(what: &str, ratios: Vec<f64>, target: f64) {
    let (m, spread) = median_and_spread(ratios);
    println!("{what:<42} {m:>9.3} {spread:>15} {:>10} {}", format!(">= {target:.2}"), verdict(m >= target));
}

/// The median of per-round ratios, and their spread as `min..max`.
fn median_and_spread(ratios: Vec<f64>) -> (f64, String) {
    let (lo, hi) = ratios.iter().fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    (median(ratios.into_iter()), format!("{lo:.2}..{hi:.2}"))
}

/// A ratio row without a target: the median of the per-round `ratios`,
/// with their spread.
pub fn print_ratio(what: &str, ratios: Vec<f64>) {
    let (m, spread) = median_and_spread(ratios);
    println!("{what:<42} {m:>9.3} {spread:>15}");
}

/// `wrk -v`'s first line, or `None` when wrk is not installed.
pub async fn wrk_version() -> Option<String> {
    // `wrk -v` prints its version and usage, then exits 1.
    let output = tokio::process::Command::new("wrk").arg("-v").output().await.ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().unwrap_or("wrk (unknown version)");
    Some(first.split(" Copyright").next().unwrap_or(first).trim().to_owned())
}

/// `nproc`: the cores this process may use.
pub async fn nproc() -> String {
    match tokio::process::Command::new("nproc").output().await {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Err(_) => std::thread::available_parallelism().map_or_else(|_| "?".to_owned(), |n| n.to_string()),
    }
}

/// The 1, 5 and 15 minute load averages: how busy the neighbours were.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "(unknown)".to_owned())
}

/// PASS or MISS: information, not an exit code.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// The median, 0 for no values.
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        Options::parse(args.iter().map(|a| (*a).to_owned()), "bench-test")
    }

    #[test]
    fn flags_take_separate_or_inline_values() {
        let options = parse(&["--workers", "2", "--rounds=5", "--duration", "3", "--connections=8"]).unwrap();
        assert_eq!((options.workers, options.rounds, options.duration_secs, options.connections), (2, 5, 3, 8));
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        assert!(parse(&["--workers"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--rounds"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--workers", "0"]).unwrap_err().contains("positive integer"));
        assert!(parse(&["--threads", "2"]).unwrap_err().contains("unknown argument"));
        assert_eq!(parse(&["--help"]).unwrap_err(), usage("bench-test"));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
    }
}

/// A process's memory, from `/proc/<pid>/status` and `/proc/<pid>/smaps`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`.
    pub rss_kb: u64,
    /// `RssAnon`: resident anonymous pages, what a container's memory
    /// accounting charges for a process (file-backed pages of a shared
    /// binary are not).
    pub anon_kb: u64,
    /// `VmHWM`: the peak of `VmRSS`.
    pub peak_kb: u64,
    /// Resident anonymous pages in executable mappings: JIT-compiled code
    /// (V8's code space holds the Wasm modules' machine code).
    pub code_kb: u64,
}

impl Memory {
    /// The memory of process `pid` now.
    pub fn of(pid: u32) -> Result<Self, String> {
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| format!("/proc/{pid}/{file}: {e}"))
        };
        let status = read("status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_default()
        };
        let mut memory =
            Self { rss_kb: field("VmRSS:"), anon_kb: field("RssAnon:"), peak_kb: field("VmHWM:"), ..Self::default() };
        // Each mapping is a header line (`start-end perms offset dev inode
        // [path]`) followed by `Key: value kB` lines.
        let mut executable = false;
        for line in read("smaps")?.lines() {
            let mut words = line.split_whitespace();
            let (Some(first), second) = (words.next(), words.next()) else { continue };
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                executable = second.is_some_and(|perms| perms.contains('x'));
            } else if first == "Anonymous:" && executable {
                memory.code_kb += second.and_then(|kb| kb.parse::<u64>().ok()).unwrap_or_default();
            }
        }
        Ok(memory)
    }
}

/// Kilobytes as megabytes, one decimal.
pub fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}
