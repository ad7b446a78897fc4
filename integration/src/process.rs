//! Teardown shared by the harness's child processes.

use std::process::Child;

use tempfile::TempDir;

/// Kills `child`; if the test is panicking, keeps `dir` and prints the end
/// of its `log_file`, so a failure shows what the process said.
pub(crate) fn stop(child: &mut Child, dir: &mut Option<TempDir>, log_file: &str, what: &str) {
    let _ = child.kill();
    let _ = child.wait();
    if std::thread::panicking()
        && let Some(dir) = dir.take()
    {
        let kept = dir.keep();
        let log = std::fs::read_to_string(kept.join(log_file)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!("--- {what} log (kept in {}), last lines:", kept.display());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}
