//! `token-broker`: the imds-mesh token broker binary. It reads its flags
//! (each also an environment variable), sets up logging, connects to the
//! Kubernetes API and STS, and serves [`token_broker::server`] until SIGTERM
//! or ctrl-c, then drains in-flight requests for at most the grace period.
//!
//! Layout: everything here is start-up; the service is
//! [`token_broker::server`], over the request flow of [`token_broker::app`].
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures_util::future::BoxFuture;
use token_broker::app::{self, App, AppConfig};
use token_broker::authz::NamespacePolicy;
use token_broker::cache::{MIN_SERVED_LIFETIME, MIN_UPSTREAM_LIFETIME, REFRESH_BEFORE};
use token_broker::connections::{self, HttpLimits};
use token_broker::identity::{IdentityMode, SpiffeId, XfccVerifier};
use token_broker::peer::{DEFAULT_SIDECAR_SOURCES, SourceRange};
use token_broker::server;
use token_broker::shutdown::{DEFAULT_SHUTDOWN_DELAY, DEFAULT_SHUTDOWN_GRACE, Shutdown};
use token_broker::sts::{StsClient, StsConfig};
use token_broker::telemetry;
use token_broker::tls::{MtlsFiles, MtlsListener};
use tracing_subscriber::prelude::*;

/// Turns a workload's mesh identity into AWS credentials for the role its
/// pod is annotated with (the imds-mesh filter's broker).
#[derive(Debug, Parser)]
#[command(name = "token-broker", version)]
struct Args {
    /// Address to serve on: credentials, health and metrics (HTTPS in mtls
    /// mode, else HTTP).
    #[arg(long, env = "TOKEN_BROKER_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// Also serve /healthz, /readyz and /metrics (only those) over plain HTTP
    /// on this address: in mtls mode kubelet probes and Prometheus cannot
    /// present a client certificate.
    #[arg(long, env = "TOKEN_BROKER_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,

    /// How callers are identified: `xfcc` trusts only the
    /// X-Forwarded-Client-Cert element added by the broker's own sidecar;
    /// `mtls` terminates TLS here and reads the SPIFFE URI SAN of the client
    /// certificate, which must chain to --tls-client-ca; `insecure-dev` trusts
    /// plain x-imds-mesh-namespace and x-imds-mesh-service-account headers
    /// (local development only, never in a cluster).
    #[arg(long, env = "TOKEN_BROKER_IDENTITY_MODE", value_enum, default_value_t = Mode::Xfcc)]
    identity_mode: Mode,

    /// The broker's own SPIFFE ID (the URI in its sidecar's certificate, which
    /// the sidecar writes as `By=`), e.g.
    /// spiffe://cluster.local/ns/imds-mesh/sa/token-broker. Required in xfcc
    /// mode.
    #[arg(long, env = "TOKEN_BROKER_OWN_SPIFFE_ID")]
    own_spiffe_id: Option<String>,

    /// mtls mode: the broker's certificate chain (PEM, leaf first).
    #[arg(long, env = "TOKEN_BROKER_TLS_CERT", required_if_eq("identity_mode", "mtls"))]
    tls_cert: Option<PathBuf>,

    /// mtls mode: the private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TOKEN_BROKER_TLS_KEY", required_if_eq("identity_mode", "mtls"))]
    tls_key: Option<PathBuf>,

    /// mtls mode: the CA bundle (PEM) client certificates must chain to, e.g.
    /// the mesh's root certificate.
    #[arg(long, env = "TOKEN_BROKER_TLS_CLIENT_CA", required_if_eq("identity_mode", "mtls"))]
    tls_client_ca: Option<PathBuf>,

    /// mtls mode: seconds between checks of the three TLS files; changed
    /// files are loaded without a restart (certificate rotation).
    #[arg(long, env = "TOKEN_BROKER_TLS_RELOAD_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    tls_reload_seconds: u64,

    /// The only trust domain callers may come from.
    #[arg(long, env = "TOKEN_BROKER_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// xfcc mode: the addresses (or CIDR blocks, comma-separated) the
    /// broker's own sidecar connects from: Istio's inbound passthrough
    /// addresses. Connections from anywhere else skipped the sidecar (a
    /// port-forward, a process reaching the port directly) and are refused.
    #[arg(long, env = "TOKEN_BROKER_SIDECAR_SOURCES", value_delimiter = ',', default_values = DEFAULT_SIDECAR_SOURCES)]
    sidecar_sources: Vec<SourceRange>,

    /// Do not require the caller's connection to come from one of the
    /// addresses of the pod it names (xfcc: as the broker's sidecar states
    /// it; mtls: the TLS peer). Without the check, any pod of a service
    /// account can get the role of any enabled pod of that service account.
    /// Only for networks that rewrite pod source addresses on the way.
    #[arg(long, env = "TOKEN_BROKER_SKIP_POD_ADDRESS_CHECK")]
    skip_pod_address_check: bool,

    /// Do not fetch a new pod's credentials when the pod watch sees it
    /// appear; its first request fetches them instead.
    #[arg(long, env = "TOKEN_BROKER_NO_PREFETCH")]
    no_prefetch: bool,

    /// insecure-dev mode: start even inside a Kubernetes cluster
    /// (KUBERNETES_SERVICE_HOST set), where it refuses to by default. Any
    /// caller can then claim any identity.
    #[arg(long, env = "TOKEN_BROKER_ALLOW_INSECURE_DEV_IN_CLUSTER")]
    allow_insecure_dev_in_cluster: bool,

    /// Kubernetes API URL to use without credentials (development and tests).
    /// Without it the client is inferred: in-cluster service account, else
    /// KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "TOKEN_BROKER_KUBE_API_URL")]
    kube_api_url: Option<String>,

    /// Names this replica in the denial Events it records (its pod name).
    #[arg(long, env = "TOKEN_BROKER_INSTANCE", default_value = "token-broker")]
    instance: String,

    /// AWS region of the STS endpoint (regional endpoints only).
    #[arg(long, env = "TOKEN_BROKER_STS_REGION")]
    sts_region: String,

    /// STS endpoint URL override, e.g. a VPC endpoint or a local test STS.
    #[arg(long, env = "TOKEN_BROKER_STS_ENDPOINT_URL")]
    sts_endpoint_url: Option<String>,

    /// DurationSeconds of each STS session (2401..=43200: more than the
    /// cache's 35-minute refresh margin plus its 5-minute serving floor; the
    /// role's maximum session duration must allow it).
    #[arg(long, env = "TOKEN_BROKER_SESSION_DURATION_SECONDS", default_value_t = 3600)]
    session_duration_seconds: u32,

    /// Audience of the service-account tokens exchanged at STS (the role's
    /// trust policy checks it).
    #[arg(long, env = "TOKEN_BROKER_TOKEN_AUDIENCE", default_value = app::DEFAULT_TOKEN_AUDIENCE)]
    token_audience: String,

    /// Lifetime asked of each TokenRequest, in seconds (at least 600).
    #[arg(long, env = "TOKEN_BROKER_TOKEN_LIFETIME_SECONDS", default_value_t = app::DEFAULT_TOKEN_LIFETIME_SECONDS,
          value_parser = clap::value_parser!(i64).range(600..))]
    token_lifetime_seconds: i64,

    /// Enables the namespace policy: the Namespace annotation holding a
    /// regular expression every requested role ARN must match in full. A
    /// namespace without it then permits no role.
    #[arg(long, env = "TOKEN_BROKER_NAMESPACE_POLICY_ANNOTATION")]
    namespace_policy_annotation: Option<String>,

    /// Seconds the pod (and namespace) watch's data is trusted without the
    /// watch showing it still works (an event, a completed relist). Past it,
    /// credential requests answer 503 and /readyz fails until the watch
    /// works again. Keep it above the API-server outages known pods should
    /// be served through.
    #[arg(long, env = "TOKEN_BROKER_WATCH_STALENESS_SECONDS",
          default_value_t = token_broker::kube::DEFAULT_WATCH_STALENESS_BOUND.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    watch_staleness_seconds: u64,

    /// Log format.
    #[arg(long, env = "TOKEN_BROKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Log filter directives (tracing EnvFilter syntax). Whatever this says,
    /// the AWS SDK's crates are capped at debug (at trace they log the web
    /// identity token) and kube-client's body logs (target
    /// kube_client::client, which can print a TokenRequest's token) are off.
    #[arg(long, env = "TOKEN_BROKER_LOG", default_value = telemetry::DEFAULT_LOG_FILTER)]
    log: String,

    /// Seconds to keep serving after SIGTERM or ctrl-c, with /readyz
    /// answering 503, before no longer accepting connections: the time the
    /// replica takes to leave the Service's endpoints.
    #[arg(long, env = "TOKEN_BROKER_SHUTDOWN_DELAY_SECONDS", default_value_t = DEFAULT_SHUTDOWN_DELAY.as_secs())]
    shutdown_delay_seconds: u64,

    /// Seconds in-flight requests may take to finish once the broker stops
    /// accepting connections (after --shutdown-delay-seconds), before it
    /// exits anyway. Keep it above the credential deadline (25 s).
    #[arg(long, env = "TOKEN_BROKER_SHUTDOWN_GRACE_SECONDS", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    shutdown_grace_seconds: u64,

    /// Connections --listen holds open at once; more wait, unserved, in the
    /// kernel's accept queue until others close (--admin-listen: 64).
    #[arg(long, env = "TOKEN_BROKER_MAX_CONNECTIONS", default_value_t = connections::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,

    /// Seconds a connection may take to send a request head, counted from
    /// when it connected or from its previous response: slow heads and
    /// idle keep-alive connections are closed after it (both listeners).
    #[arg(long, env = "TOKEN_BROKER_HEADER_TIMEOUT_SECONDS", default_value_t = connections::DEFAULT_HEADER_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The X-Forwarded-Client-Cert element from the broker's own sidecar.
    Xfcc,
    /// The client certificate of the broker's own TLS listener.
    Mtls,
    /// Plain headers anyone can set; local development only.
    InsecureDev,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(message) = init_logging(&args) {
        eprintln!("token-broker: {message}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(args: &Args) -> Result<(), String> {
    // Hard caps, not defaults: no directive can turn on the SDK's trace
    // logs or kube-client's body logs, which can hold a token.
    let filter = telemetry::log_filter(&args.log).map_err(|e| format!("--log {:?}: {e}", args.log))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match args.log_format {
        LogFormat::Text => registry.with(tracing_subscriber::fmt::layer()).try_init(),
        LogFormat::Json => registry.with(tracing_subscriber::fmt::layer().json()).try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}

async fn serve(args: Args) -> Result<(), String> {
    let identity = match args.identity_mode {
        Mode::Xfcc => {
            let own = args.own_spiffe_id.as_deref().ok_or("--own-spiffe-id is required in xfcc identity mode")?;
            let own_id = SpiffeId::parse(own).map_err(|e| format!("--own-spiffe-id: {}", e.reason()))?;
            IdentityMode::Xfcc(XfccVerifier { own_id, trust_domain: args.trust_domain.clone() })
        }
        Mode::Mtls => IdentityMode::Mtls { trust_domain: args.trust_domain.clone() },
        Mode::InsecureDev => IdentityMode::InsecureDev { trust_domain: args.trust_domain.clone() },
    };
    if args.identity_mode == Mode::InsecureDev && !args.allow_insecure_dev_in_cluster && in_cluster() {
        return Err("--identity-mode insecure-dev refuses to run inside a Kubernetes cluster \
                    (KUBERNETES_SERVICE_HOST is set): every caller could claim any identity. \
                    Use xfcc or mtls, or pass --allow-insecure-dev-in-cluster"
            .into());
    }
    // Flags of another mode are refused rather than ignored: a broker started
    // with `--tls-cert` but without `--identity-mode mtls` would otherwise
    // serve plain HTTP.
    let tls_flags = args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_client_ca.is_some();
    if tls_flags && args.identity_mode != Mode::Mtls {
        return Err("--tls-cert, --tls-key and --tls-client-ca apply only to --identity-mode mtls".into());
    }
    if args.own_spiffe_id.is_some() && args.identity_mode != Mode::Xfcc {
        return Err("--own-spiffe-id applies only to --identity-mode xfcc".into());
    }
    // Refused, not warned about: a session this short sits in the cache's
    // refresh window from the start, so every key in use would cost a
    // TokenRequest and an STS call every minute, and what is served would
    // have less than the filter's refresh margin left (it refetches too).
    let shortest = MIN_UPSTREAM_LIFETIME.as_secs();
    if u64::from(args.session_duration_seconds) <= shortest {
        return Err(format!(
            "--session-duration-seconds {} is too short: it must be more than {shortest} (the cache refreshes \
             credentials {} s before they expire and serves none with {} s or less left), or every key \
             in use would be refreshed every minute",
            args.session_duration_seconds,
            REFRESH_BEFORE.as_secs(),
            MIN_SERVED_LIFETIME.as_secs(),
        ));
    }
    // Checked before anything connects, so a bad file fails fast.
    let tls_files = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => {
            let files = MtlsFiles {
                certificate_chain: cert.clone(),
                private_key: key.clone(),
                client_ca_bundle: client_ca.clone(),
            };
            files.load().map_err(|e| format!("mtls: {e}"))?;
            Some(files)
        }
        _ if args.identity_mode == Mode::Mtls => {
            return Err("--identity-mode mtls needs --tls-cert, --tls-key and --tls-client-ca".into());
        }
        _ => None,
    };
    let kube_config = match &args.kube_api_url {
        Some(url) => kube::Config::new(url.parse().map_err(|e| format!("--kube-api-url: {e}"))?),
        None => kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    let client = token_broker::kube::client(kube_config).map_err(|e| format!("Kubernetes client: {e}"))?;
    let sts = StsClient::new(StsConfig {
        endpoint_url: args.sts_endpoint_url.clone(),
        duration_seconds: args.session_duration_seconds,
        ..StsConfig::new(args.sts_region.clone())
    })
    .map_err(|e| format!("--session-duration-seconds: {e}"))?;

    let mut config = AppConfig::new(identity);
    config.token_audience = args.token_audience.clone();
    config.token_lifetime_seconds = args.token_lifetime_seconds;
    config.namespace_policy = args.namespace_policy_annotation.clone().map(|annotation| NamespacePolicy { annotation });
    config.http = HttpLimits {
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        header_timeout: Duration::from_secs(args.header_timeout_seconds),
    };
    config.pod_address_check = !args.skip_pod_address_check;
    config.prefetch = !args.no_prefetch;
    config.watch_staleness_bound = Duration::from_secs(args.watch_staleness_seconds);
    config.sidecar_sources = args.sidecar_sources.clone();
    let app = Arc::new(App::new(config, client, sts, args.instance.clone()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, mode = ?args.identity_mode, "token broker serving");

    let admin_listener = match args.admin_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            tracing::info!(listen = %addr, "health and metrics serving");
            Some(listener)
        }
        None => None,
    };

    let shutdown = Shutdown::default();
    let main: BoxFuture<'static, std::io::Result<()>> = match tls_files {
        Some(files) => {
            let listener = MtlsListener::new(listener, files, Duration::from_secs(args.tls_reload_seconds))
                .map_err(|e| format!("mtls: {e}"))?;
            Box::pin(server::run_mtls(listener, Arc::clone(&app), shutdown.signal()))
        }
        None => Box::pin(server::run(listener, Arc::clone(&app), shutdown.signal())),
    };
    let admin: BoxFuture<'static, std::io::Result<()>> = match admin_listener {
        Some(listener) => Box::pin(server::run_admin(listener, Arc::clone(&app), shutdown.signal())),
        None => Box::pin(std::future::ready(Ok(()))),
    };
    // Either server failing stops both.
    let mut server = tokio::spawn(async move { tokio::try_join!(main, admin).map(|_| ()) });
    tokio::select! {
        result = &mut server => return finished(result),
        () = shutdown_signal() => {}
    }
    // Readiness off first, serving on: the replica leaves the Service's
    // endpoints (and the callers' sidecars' load balancing) while it still
    // answers whatever they send meanwhile.
    app.drain();
    tracing::info!(delay_seconds = args.shutdown_delay_seconds, "shutting down: not ready, serving on for the delay");
    tokio::select! {
        result = &mut server => return finished(result),
        () = tokio::time::sleep(Duration::from_secs(args.shutdown_delay_seconds)) => {}
    }
    tracing::info!(grace_seconds = args.shutdown_grace_seconds, "shutting down: draining in-flight requests");
    shutdown.trigger();
    match tokio::time::timeout(Duration::from_secs(args.shutdown_grace_seconds), &mut server).await {
        Ok(result) => finished(result),
        Err(_) => {
            tracing::warn!("grace period over with requests still in flight; exiting");
            Ok(())
        }
    }
}

/// Whether this process runs in a Kubernetes pod: the kubelet sets
/// `KUBERNETES_SERVICE_HOST` in every container (what in-cluster
/// configuration reads).
fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|host| !host.is_empty())
}

fn finished(result: Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<(), String> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("server failed: {error}")),
        Err(error) => Err(format!("server task failed: {error}")),
    }
}

/// SIGTERM (what Kubernetes sends) or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the broker");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
