//! An in-memory sink for `tracing` output, so a test can install the
//! broker's own log filter and formats ([`token_broker::telemetry`]) in its
//! process and read back every line written.

use std::sync::{Arc, Mutex, PoisonError};

/// What `fmt` layers given [`LogBuffer::writer`] wrote; clones share it.
#[derive(Clone, Default)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// A `make_writer` for a `fmt` layer.
    pub fn writer(&self) -> impl Fn() -> Self + Send + Sync + 'static {
        let buffer = self.clone();
        move || buffer.clone()
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// The lines written so far that parse as JSON (a JSON `fmt` layer's).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.text().lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
