//! A plain HTTP upstream standing for whatever else the app talks to on port
//! 80. It records every request exactly as it arrived and answers each with
//! the same fixed bytes, so passthrough can be compared byte for byte.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The body of every upstream answer: binary, with bytes a careless filter
/// would mangle.
pub const BODY: &[u8] = b"upstream body \x00\x01\xff\r\n\r\nHTTP/1.1 200 OK\r\n end";

/// A running upstream.
pub struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind upstream: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = Arc::clone(&seen);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(serve(stream, Arc::clone(&recorder)));
            }
        });
        Self { addr, seen, connections, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, head and body as raw bytes.
    pub fn requests(&self) -> Vec<Vec<u8>> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Connections accepted so far, whatever was sent on them (HTTP or not).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The exact response bytes the upstream sends.
    pub fn response_bytes() -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nx-upstream: plain\r\ncontent-length: {}\r\n\r\n",
            BODY.len()
        )
        .into_bytes();
        out.extend_from_slice(BODY);
        out
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buffer = Vec::new();
    loop {
        // Read until one complete request (head plus Content-Length body).
        let request_len = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(head)) = request.parse(&buffer) {
                let body = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                if buffer.len() >= head + body {
                    break head + body;
                }
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        let request: Vec<u8> = buffer.drain(..request_len).collect();
        if let Ok(mut seen) = seen.lock() {
            seen.push(request);
        }
        if stream.write_all(&Upstream::response_bytes()).await.is_err() {
            return;
        }
    }
}
