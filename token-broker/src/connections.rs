//! The broker's HTTP/1.1 connections, served within bounds: at most
//! [`HttpLimits::max_connections`] open at once per listener, and each closed
//! when it does not deliver a request head within
//! [`HttpLimits::header_timeout`], whether it just connected, is sending its
//! head slowly, or sits idle between keep-alive requests.
//!
//! `axum::serve` sets neither: it gives hyper no timer (so hyper's own
//! header timeout is off) and accepts every connection it is offered. This
//! loop is axum's, with both added: hyper's `header_read_timeout` with tokio's
//! timer (hyper starts that timer when it waits for a request head, on a
//! fresh connection and again each time a keep-alive connection goes idle,
//! so the one bound covers slow heads and idle connections alike), and a
//! semaphore permit taken before each `accept`, so connections beyond the cap
//! wait in the kernel's accept queue, unserved, until others close.
//!
//! Graceful shutdown as axum does it: stop accepting, let each connection
//! finish its request in flight, close idle ones at once.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::Extensions;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

/// Connections a credentials listener holds open at once by default. The
/// broker's callers are few: in `xfcc` mode its own sidecar, which pools
/// connections; in `mtls` mode the pods' sidecars, one or a few each.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Connections the admin listener (`/healthz`, `/readyz`, `/metrics`) holds
/// open at once: kubelet probes and a few scrapers.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to deliver a request head, counted from
/// when it connected or from its previous response: longer than any client
/// of ours pauses on purpose (Envoy pools idle connections, and reconnects
/// at once when one is closed), short enough that abandoned or slow
/// connections do not hold their slot for long.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What one listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// See [`DEFAULT_HEADER_TIMEOUT`].
    pub header_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { max_connections: DEFAULT_MAX_CONNECTIONS, header_timeout: DEFAULT_HEADER_TIMEOUT }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`
/// completes, then stops accepting and waits for the open connections to
/// finish their requests. Every request on a connection gets the request
/// extensions `on_connection` made for it (its `ConnectInfo`s).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: HttpLimits,
    on_connection: impl Fn(&L::Io, &L::Addr) -> Extensions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    L: Listener,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Each connection holds a receiver: `send` starts their graceful
    // shutdown, `closed` tells when the last one has ended.
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { break };
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let extensions = on_connection(&io, &addr);
        let router = router.clone();
        let mut stopping = stopped.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().extend(extensions.clone());
                router.clone().oneshot(request.map(axum::body::Body::new))
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
            let mut connection = pin!(http.serve_connection(TokioIo::new(io), service));
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        break;
                    }
                    changed = stopping.changed(), if !draining => {
                        draining = true;
                        if changed.is_ok() {
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(stopped);
    stop.send_replace(true);
    stop.closed().await;
    Ok(())
}

/// For [`serve`] on a plain TCP listener: each request gets the
/// connection's peer address as `ConnectInfo<SocketAddr>`.
pub fn peer_address(_io: &tokio::net::TcpStream, addr: &std::net::SocketAddr) -> Extensions {
    let mut extensions = Extensions::new();
    extensions.insert(axum::extract::ConnectInfo(*addr));
    extensions
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::Instant;

    use super::*;

    const REQUEST: &[u8] = b"GET /peer HTTP/1.1\r\nHost: broker\r\n\r\n";

    /// A server with `limits` whose `/peer` answers the peer address it was
    /// given, and the shutdown trigger.
    async fn start(limits: HttpLimits) -> (SocketAddr, watch::Sender<()>, tokio::task::JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }));
        let (trigger, mut triggered) = watch::channel(());
        let server = tokio::spawn(serve(listener, router, limits, peer_address, async move {
            let _ = triggered.changed().await;
        }));
        (addr, trigger, server)
    }

    /// Sends one request on `stream` and reads its whole response.
    async fn exchange(stream: &mut TcpStream) -> String {
        stream.write_all(REQUEST).await.unwrap();
        let mut response = Vec::new();
        let mut buf = [0; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "closed before a response: {}", String::from_utf8_lossy(&response));
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|l| l.parse::<usize>().ok())
                    .unwrap_or_default();
                if body.len() >= length {
                    return text.into_owned();
                }
            }
        }
    }

    /// Waits until the server closes `stream` (EOF or reset).
    async fn closed(stream: &mut TcpStream) {
        let mut buf = [0; 64];
        if let Ok(n @ 1..) = stream.read(&mut buf).await {
            panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n]));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
        let limits = HttpLimits { header_timeout: Duration::from_secs(30), ..HttpLimits::default() };
        let (addr, _trigger, _server) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        // Paused time moves on only when every task waits: the server's
        // timer fires, nothing else could have closed the connection.
        tokio::time::timeout(Duration::from_secs(3600), closed(&mut silent)).await.expect("never closed");
        let waited = started.elapsed();
        assert!(waited >= limits.header_timeout && waited < limits.header_timeout * 2, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_is_closed_at_the_header_timeout() {
        let limits = HttpLimits { header_timeout: Duration::from_secs(30), ..HttpLimits::default() };
        let (addr, _trigger, _server) = start(limits).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let response = exchange(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        // The connection's peer address reached the handler.
        assert!(response.ends_with(&client.local_addr().unwrap().to_string()), "{response}");
        let answered = Instant::now();
        tokio::time::timeout(Duration::from_secs(3600), closed(&mut client)).await.expect("never closed");
        let waited = answered.elapsed();
        assert!(waited >= limits.header_timeout && waited < limits.header_timeout * 2, "{waited:?}");
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_not_served_until_one_closes() {
        // Real time, with the header timeout out of the way: "not served"
        // is checked over a short wait, which a broken cap fails at once
        // and a slow machine cannot fail wrongly.
        let limits = HttpLimits { max_connections: 4, header_timeout: Duration::from_secs(3600) };
        let (addr, _trigger, _server) = start(limits).await;
        let mut open = Vec::new();
        for _ in 0..limits.max_connections {
            let mut client = TcpStream::connect(addr).await.unwrap();
            assert!(exchange(&mut client).await.starts_with("HTTP/1.1 200"));
            open.push(client);
        }
        let mut extra: Vec<TcpStream> = Vec::new();
        for _ in 0..3 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            client.write_all(REQUEST).await.unwrap();
            extra.push(client);
        }
        for client in &mut extra {
            let mut buf = [0; 1];
            let read = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
            assert!(read.is_err(), "a connection beyond the cap was served: {read:?}");
        }
        // One of the four closes: exactly one waiting connection is served.
        drop(open.pop());
        let mut first = extra.remove(0);
        let mut buf = [0; 1024];
        let n = tokio::time::timeout(Duration::from_secs(30), first.read(&mut buf)).await.expect("not served").unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        for client in &mut extra {
            let mut buf = [0; 1];
            let read = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
            assert!(read.is_err(), "more connections than the cap were served: {read:?}");
        }
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_returns() {
        let (addr, trigger, server) = start(HttpLimits::default()).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        assert!(exchange(&mut client).await.starts_with("HTTP/1.1 200"));
        trigger.send_replace(());
        tokio::time::timeout(Duration::from_secs(30), closed(&mut client)).await.expect("idle connection kept");
        let result = tokio::time::timeout(Duration::from_secs(30), server).await.expect("server kept running");
        assert!(result.unwrap().is_ok());
    }
}
