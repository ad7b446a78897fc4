//! Start-up and teardown shared by the harness's child processes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;

use tempfile::TempDir;

use crate::{Req, wait};

/// Waits until `GET path` on `addr` answers 200, failing with the process's
/// log (at `log`) if it exits first.
pub async fn until_answering(child: &mut Child, what: &str, log: &Path, addr: SocketAddr, path: &str) {
    wait::until(&format!("{what} to answer"), || {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} exited with {status} before answering:\n{log}");
        }
        async move {
            let up = tokio::net::TcpStream::connect(addr).await.is_ok()
                && Req::get(path).host(&addr.to_string()).send(addr).await.status == 200;
            up.then_some(())
        }
    })
    .await;
}

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
