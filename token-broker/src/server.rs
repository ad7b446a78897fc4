//! The broker's HTTP service: `GET /v1/credentials` (the v1 contract in
//! `token-broker/README.md`), `/healthz`, `/readyz` and `/metrics`, wired
//! from the tested pieces ([`crate::identity`], [`crate::authz`],
//! [`crate::kube`], [`crate::cache`], [`crate::sts`]).
//!
//! Only the HTTP framing lives here: what one credential request goes
//! through, in order, is [`crate::app`]; metrics are [`crate::metrics`],
//! shutdown [`crate::shutdown`].
//!
//! [`run`] takes the listener and a shutdown future, so tests bind
//! `127.0.0.1:0` and stop the server when they like. Every listener's
//! connections are capped and timed out by [`crate::connections`].

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;

use crate::app::App;
use crate::connections::{self, HttpLimits};
use crate::error::BrokerError;
use crate::metrics::{OutcomeLabel, ReasonLabel};
use crate::tls::{ClientCertificate, MtlsListener};

/// Serves the broker over plain HTTP on `listener` (the `xfcc` and
/// `insecure-dev` modes) until `shutdown` completes, then stops accepting and
/// drains the requests in flight.
pub async fn run(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // The peer address of each connection: in xfcc mode, whether it came
    // through the broker's sidecar.
    let limits = app.config.http;
    connections::serve(listener, router(app), limits, connections::peer_address, shutdown).await
}

/// Serves the broker over TLS with verified client certificates (the `mtls`
/// mode), like [`run`].
pub async fn run_mtls(
    listener: MtlsListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = app.config.http;
    let connect_info = |stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>, peer: &SocketAddr| {
        let mut extensions = axum::http::Extensions::new();
        extensions.insert(ConnectInfo(ClientCertificate::of_connection(stream, *peer)));
        extensions.insert(ConnectInfo(*peer));
        extensions
    };
    connections::serve(listener, router(app), limits, connect_info, shutdown).await
}

/// Serves only `/healthz`, `/readyz` and `/metrics` over plain HTTP, like
/// [`run`]: for kubelet probes and Prometheus, which cannot present a client
/// certificate to the mtls listener.
pub async fn run_admin(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = HttpLimits { max_connections: connections::ADMIN_MAX_CONNECTIONS, ..app.config.http };
    connections::serve(listener, admin_routes().with_state(app), limits, connections::peer_address, shutdown).await
}

fn router(app: Arc<App>) -> Router {
    admin_routes().route("/v1/credentials", get(credentials_handler)).with_state(app)
}

fn admin_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(|| async { text(StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n") })
}

/// What the server knows of a request's connection.
pub(crate) struct Connection<'a> {
    /// The TCP peer (the broker's sidecar in `xfcc` mode).
    pub(crate) peer: Option<SocketAddr>,
    /// `mtls` mode: the verified client certificate.
    pub(crate) certificate: Option<&'a ClientCertificate>,
}

async fn credentials_handler(State(app): State<Arc<App>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let certificate = request.extensions().get::<ConnectInfo<ClientCertificate>>().map(|info| &info.0);
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|info| info.0);
    let connection = Connection { peer: peer.or_else(|| certificate.and_then(ClientCertificate::peer)), certificate };
    let result = app.credentials(request.headers(), &connection, request.uri().query()).await;
    let reply = match result {
        Ok(served) => {
            app.metrics.successes.inc();
            response(StatusCode::OK, "application/json", served.document.clone())
        }
        Err(error) => {
            app.metrics.requests.get_or_create(&OutcomeLabel { outcome: error.code() }).inc();
            if let BrokerError::Unauthenticated { label } = &error {
                crate::audit::unauthenticated(label, connection.peer.map(|peer| peer.ip().to_canonical()));
                app.metrics.unauthenticated.get_or_create(&ReasonLabel { reason: label }).inc();
            }
            error_response(&error)
        }
    };
    app.metrics.request_duration.observe(started.elapsed().as_secs_f64());
    reply
}

/// 200 `ready`, or 503 with one `not ready: <reason>` line per reason.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let mut body = String::new();
    for watch in app.unsynced_watches() {
        let _ = writeln!(body, "not ready: the {watch} watch has not synced");
    }
    for stale in app.stale_watches() {
        let _ = writeln!(body, "not ready: {stale}");
    }
    if app.is_draining() {
        let _ = writeln!(body, "not ready: shutting down");
    }
    if app.config.identity.is_insecure() {
        let _ = writeln!(
            body,
            "not ready: INSECURE-DEV IDENTITY MODE: callers are identified by plain headers anyone can set, \
             so this broker is never ready. Never run it in a cluster."
        );
    }
    if body.is_empty() { text(StatusCode::OK, "ready\n") } else { text(StatusCode::SERVICE_UNAVAILABLE, &body) }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &app.registry) {
        Ok(()) => response(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n"),
    }
}

fn error_response(error: &BrokerError) -> Response {
    let body = serde_json::to_value(error.body()).unwrap_or_default();
    let mut response = json(StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &body);
    if let Some(seconds) = error.retry_after() {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    response(status, "application/json", body.to_string())
}

fn text(status: StatusCode, body: &str) -> Response {
    response(status, "text/plain; charset=utf-8", body.to_owned())
}

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
