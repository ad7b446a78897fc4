//! The broker's HTTP service: `GET /v1/credentials` (the v1 contract in
//! `token-broker/README.md`), `/healthz`, `/readyz` and `/metrics`, wired
//! from the tested pieces ([`crate::identity`], [`crate::authz`],
//! [`crate::kube`], [`crate::cache`], [`crate::sts`]).
//!
//! One credential request, in order, each step answering its own status:
//! 1. who is calling ([`IdentityMode`]) and from where ([`crate::peer`]: in
//!    `xfcc` mode only connections from the broker's sidecar count, and it
//!    states the caller's address), else 401;
//! 2. `role_arn` and `pod`, each exactly once and well-formed, else 400;
//! 3. the pod, from the watch or read directly (shared, remembered briefly,
//!    rate-limited: [`crate::kube::PodWatch::pod`]), else 404 (429 when the
//!    direct-read budget is spent, 503 when the Kubernetes API cannot say);
//! 4. the authorization rules and the optional namespace policy, then that
//!    the caller is the pod (its address one of the pod's IPs), else 403,
//!    logged with the rule and recorded as an Event on the pod;
//! 5. credentials for (role, namespace, service account) from the
//!    [`Cache`], whose fetch mints a pod-bound TokenRequest and exchanges it
//!    at STS (failures: see [`fetch_error_response`]);
//! 6. the IMDS credential document.
//!
//! [`run`] takes the listener and a shutdown future, so tests bind
//! `127.0.0.1:0` and stop the server when they like. Every listener's
//! connections are capped and timed out by [`crate::connections`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use percent_encoding::percent_decode_str;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use crate::authz::{self, Denial, NamespacePolicy, PodFacts};
use crate::cache::{
    Cache, CacheConfig, CacheKey, Credentials, Expiring, FailedAt, FetchError, FetchErrorKind, FetchFuture,
};
use crate::connections::{self, HttpLimits};
use crate::error::BrokerError;
use crate::identity::{self, CallerIdentity, IdentityError, SpiffeId, XfccVerifier};
use crate::kube::{Cluster, KubeError, LookupError, NamespaceWatch, PodWatch, Stale, WatchHealth};
use crate::peer::{self, PeerError, SourceRange};
use crate::session;
use crate::sts::StsClient;
use crate::tls::{ClientCertificate, MtlsListener};

/// The audience of the service-account tokens exchanged at STS: what the
/// role's trust policy conditions on (`<issuer>:aud`).
pub const DEFAULT_TOKEN_AUDIENCE: &str = "sts.amazonaws.com";

/// Lifetime asked of each TokenRequest. The token is used once, right away;
/// the API server refuses less than 600 s.
pub const DEFAULT_TOKEN_LIFETIME_SECONDS: i64 = 3600;

/// Longest a credential request waits for the cache (a queued or running
/// fetch) before answering 503. Under the filter's own call timeout would be
/// better still, but the cache's fetch timeout is 30 s, and a waiter giving
/// up earlier does not cancel the fetch; the next request joins it.
pub const DEFAULT_CREDENTIALS_DEADLINE: Duration = Duration::from_secs(25);

/// `Retry-After` when the broker's own budget for pod lookups the watch
/// cannot answer is spent ([`crate::kube::DIRECT_READS_PER_SECOND`]).
pub const LOOKUP_RETRY: Duration = Duration::from_secs(1);

/// `Retry-After` for an STS throttle that named no delay of its own.
pub const DEFAULT_THROTTLE_RETRY: Duration = Duration::from_secs(5);

/// Plain-header identity in `insecure-dev` mode.
pub const DEV_NAMESPACE_HEADER: &str = "x-imds-mesh-namespace";
/// Plain-header identity in `insecure-dev` mode.
pub const DEV_SERVICE_ACCOUNT_HEADER: &str = "x-imds-mesh-service-account";

/// The caller-identity header in `xfcc` mode. The headers are looked up by
/// `HeaderName`, not `&str`, so no request pays for parsing the name.
const XFCC_HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const DEV_NAMESPACE: HeaderName = HeaderName::from_static(DEV_NAMESPACE_HEADER);
const DEV_SERVICE_ACCOUNT: HeaderName = HeaderName::from_static(DEV_SERVICE_ACCOUNT_HEADER);

/// How the broker learns who is calling.
#[derive(Debug, Clone)]
pub enum IdentityMode {
    /// From the `X-Forwarded-Client-Cert` element the broker's own sidecar
    /// appended (the production mode).
    Xfcc(XfccVerifier),
    /// From the plain headers [`DEV_NAMESPACE_HEADER`] and
    /// [`DEV_SERVICE_ACCOUNT_HEADER`], which any caller can set: for local
    /// development only. The caller is given a SPIFFE ID in `trust_domain`.
    InsecureDev { trust_domain: String },
    /// From the URI SAN of the client certificate the broker's own TLS
    /// listener verified ([`crate::tls`]); served by [`run_mtls`].
    Mtls { trust_domain: String },
}

impl IdentityMode {
    /// The caller, from the request headers or, in mtls mode, the
    /// connection's client certificate.
    fn verify(&self, headers: &HeaderMap, peer: Option<&ClientCertificate>) -> Result<CallerIdentity, BrokerError> {
        let unauthenticated = |error: IdentityError| {
            tracing::info!(%error, "caller not authenticated");
            BrokerError::Unauthenticated { label: error.label() }
        };
        match self {
            Self::Xfcc(verifier) => {
                let values: Vec<&[u8]> = headers.get_all(XFCC_HEADER).iter().map(HeaderValue::as_bytes).collect();
                verifier.verify(&values).map_err(unauthenticated)
            }
            Self::Mtls { trust_domain } => peer
                .ok_or(IdentityError::NoClientCertificate)
                .and_then(|p| p.caller(trust_domain))
                .map_err(unauthenticated),
            Self::InsecureDev { trust_domain } => {
                let one = |name: &HeaderName| {
                    let mut values = headers.get_all(name).iter();
                    match (values.next(), values.next()) {
                        (Some(value), None) => value.to_str().ok(),
                        _ => None,
                    }
                };
                let (Some(namespace), Some(service_account)) = (one(&DEV_NAMESPACE), one(&DEV_SERVICE_ACCOUNT)) else {
                    return Err(BrokerError::Unauthenticated { label: "missing" });
                };
                // Parsing the SPIFFE ID checks both names as Kubernetes would.
                let spiffe_id =
                    SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"))
                        .map_err(|_| BrokerError::Unauthenticated { label: "not_spiffe" })?;
                Ok(CallerIdentity {
                    namespace: spiffe_id.namespace().to_owned(),
                    service_account: spiffe_id.service_account().to_owned(),
                    spiffe_id,
                })
            }
        }
    }

    fn is_insecure(&self) -> bool {
        matches!(self, Self::InsecureDev { .. })
    }
}

/// What the service does beyond the clients it is given.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub identity: IdentityMode,
    /// Audience of the minted service-account tokens.
    pub token_audience: String,
    /// `expirationSeconds` of each TokenRequest (at least 600).
    pub token_lifetime_seconds: i64,
    /// The optional namespace allow-list of role patterns.
    pub namespace_policy: Option<NamespacePolicy>,
    /// See [`DEFAULT_CREDENTIALS_DEADLINE`].
    pub credentials_deadline: Duration,
    /// How long the pod (and namespace) watch's data is trusted without the
    /// watch confirming it: [`crate::kube::DEFAULT_WATCH_STALENESS_BOUND`].
    pub watch_staleness_bound: Duration,
    /// The cache's limits and clock.
    pub cache: CacheConfig,
    /// Connections per listener and how long one may take to send a
    /// request head ([`crate::connections`]); the admin listener's cap is
    /// [`crate::connections::ADMIN_MAX_CONNECTIONS`].
    pub http: HttpLimits,
    /// Whether the caller must be the pod it names: its connection's peer
    /// address one of the pod's IPs ([`crate::peer`]). On by default; off
    /// only where something between the pods and the broker rewrites source
    /// addresses. Never checked in `insecure-dev` mode.
    pub pod_address_check: bool,
    /// `xfcc` mode: where the broker's own sidecar connects from
    /// ([`peer::DEFAULT_SIDECAR_SOURCES`]); every other connection skipped
    /// the sidecar and is refused (401).
    pub sidecar_sources: Vec<SourceRange>,
}

impl AppConfig {
    /// Defaults for everything but the identity mode.
    pub fn new(identity: IdentityMode) -> Self {
        Self {
            identity,
            token_audience: DEFAULT_TOKEN_AUDIENCE.to_owned(),
            token_lifetime_seconds: DEFAULT_TOKEN_LIFETIME_SECONDS,
            namespace_policy: None,
            credentials_deadline: DEFAULT_CREDENTIALS_DEADLINE,
            watch_staleness_bound: crate::kube::DEFAULT_WATCH_STALENESS_BOUND,
            cache: CacheConfig::default(),
            http: HttpLimits::default(),
            pod_address_check: true,
            sidecar_sources: peer::default_sidecar_sources(),
        }
    }
}

/// The running service's state, shared by every request.
pub struct App {
    config: AppConfig,
    pods: PodWatch,
    /// Only with the namespace policy.
    namespaces: Option<NamespaceWatch>,
    cluster: Arc<Cluster>,
    cache: Arc<Cache<Served>>,
    bindings: Arc<Bindings>,
    metrics: Arc<Metrics>,
    registry: Registry,
    /// Set by [`App::drain`]: `/readyz` answers 503 from then on.
    draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("config", &self.config).finish_non_exhaustive()
    }
}

impl App {
    /// Starts the pod watch and the cache; `instance` names this replica in
    /// the Events it records. Must be called inside a tokio runtime.
    pub fn new(config: AppConfig, client: ::kube::Client, sts: StsClient, instance: impl Into<String>) -> Self {
        let bound = config.watch_staleness_bound;
        let pods = PodWatch::with_staleness_bound(client.clone(), bound);
        let namespaces = config
            .namespace_policy
            .clone()
            .map(|policy| NamespaceWatch::with_staleness_bound(client.clone(), policy, bound));
        let cluster = Arc::new(Cluster::new(client, instance));
        let metrics = Arc::new(Metrics::default());
        let bindings = Arc::new(Bindings::new(config.cache.max_keys));
        let fetcher = Arc::new(Fetcher {
            cluster: Arc::clone(&cluster),
            sts,
            bindings: Arc::clone(&bindings),
            audience: config.token_audience.clone(),
            lifetime_seconds: config.token_lifetime_seconds,
            metrics: Arc::clone(&metrics),
        });
        let cache = Arc::new(Cache::new(config.cache.clone(), move |key| {
            let fetcher = Arc::clone(&fetcher);
            Box::pin(async move { fetcher.fetch(key).await.map(Served::new) }) as FetchFuture<Served>
        }));
        let mut registry = Registry::with_prefix("token_broker");
        metrics.register(&mut registry);
        registry.register_collector(Box::new(CacheCollector(Arc::clone(&cache))));
        let watches = std::iter::once(pods.health()).chain(namespaces.as_ref().map(NamespaceWatch::health)).collect();
        registry.register_collector(Box::new(WatchCollector(watches)));
        if config.identity.is_insecure() {
            tracing::warn!(
                "identity mode insecure-dev: callers are identified by plain headers anyone can set, and \
                 no caller's address is checked against the pod it names; /readyz stays 503; \
                 never run this in a cluster"
            );
        } else if !config.pod_address_check {
            tracing::warn!(
                "pod address check off: any pod of a service account can get the role of any enabled pod \
                 of that service account"
            );
        }
        let draining = std::sync::atomic::AtomicBool::new(false);
        Self { config, pods, namespaces, cluster, cache, bindings, metrics, registry, draining }
    }

    /// Whether the broker should get traffic (what `/readyz` answers): the
    /// pod watch has synced and its data is not stale, and the identity
    /// mode is not `insecure-dev`, which is never ready, so no Service sends
    /// it callers.
    pub fn is_ready(&self) -> bool {
        self.is_synced()
            && self.stale_watches().is_empty()
            && !self.config.identity.is_insecure()
            && !self.is_draining()
    }

    /// Turns readiness off for good, the first step of a graceful shutdown
    /// ([`DEFAULT_SHUTDOWN_DELAY`]): requests are still served.
    pub fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`App::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The synced watches whose data is past the staleness bound: requests
    /// relying on them answer 503 and `/readyz` fails, until they work again.
    pub fn stale_watches(&self) -> Vec<Stale> {
        let namespaces = self.namespaces.as_ref().and_then(NamespaceWatch::stale);
        self.pods.stale().into_iter().chain(namespaces).collect()
    }

    /// Whether the pod watch, and with the namespace policy the namespace
    /// watch, have synced. A broker whose service account may not list
    /// namespaces (RBAC rendered without the policy) so never gets ready,
    /// rather than answering every request 503.
    pub fn is_synced(&self) -> bool {
        self.unsynced_watches().is_empty()
    }

    /// The watches that have not synced yet: `pod`, `namespace`.
    fn unsynced_watches(&self) -> Vec<&'static str> {
        let pods = (!self.pods.is_synced()).then_some("pod");
        let namespaces = self.namespaces.as_ref().filter(|watch| !watch.is_synced()).map(|_| "namespace");
        pods.into_iter().chain(namespaces).collect()
    }

    /// Answers one credential request: the whole contract but the HTTP
    /// framing.
    async fn credentials(
        &self,
        headers: &HeaderMap,
        connection: &Connection<'_>,
        query: Option<&str>,
    ) -> Result<Arc<Served>, BrokerError> {
        let address = self.caller_address(headers, connection)?;
        let caller = self.config.identity.verify(headers, connection.certificate)?;
        let (role_arn, pod_name) = parse_query(query)?;
        let ns = caller.namespace.as_str();

        // Every answer below rests on the pod watch (a cached credential
        // too: it is served only to a pod the watch still vouches for).
        if let Some(stale) = self.pods.stale() {
            return Err(BrokerError::Unavailable(stale.to_string()));
        }
        let pod = match self.pods.pod(ns, &pod_name).await {
            Ok(Some(pod)) => pod,
            Ok(None) => return Err(BrokerError::PodNotFound { namespace: ns.to_owned(), name: pod_name.into_owned() }),
            Err(LookupError::Throttled) => return Err(BrokerError::Throttled { retry_after: LOOKUP_RETRY }),
            Err(LookupError::Api(error)) => return Err(self.kube_unavailable(&error)),
        };
        self.authorize(&caller, &role_arn, &pod)?;
        if let Some(address) = address {
            self.check_caller_is_pod(&caller, address, &pod)?;
        }

        // The caller's names move into the key: it is not needed after this.
        let CallerIdentity { namespace, service_account, .. } = caller;
        let key = CacheKey { role_arn, namespace, service_account };
        // The fetch binds its token to the pod that asked last for this key.
        self.bindings.bind(&key, &pod_name, &pod.uid);
        if let Some(credentials) = self.cache.get_cached(&key) {
            return Ok(credentials);
        }
        // A miss waits, under the deadline. Boxed: the wait is the rare path,
        // and its future would otherwise enlarge every request's.
        let wait = Box::pin(tokio::time::timeout(self.config.credentials_deadline, self.cache.get(&key)));
        match wait.await {
            Ok(Ok(credentials)) => Ok(credentials),
            Ok(Err(error)) => {
                if error.kind == FetchErrorKind::Denied {
                    self.sts_denied(&key, &pod, &error.detail);
                }
                Err(fetch_error_response(&error))
            }
            Err(_) => Err(BrokerError::Unavailable("timed out waiting for credentials; retry".into())),
        }
    }

    /// The pod rules, then the namespace policy; a denial is logged, counted
    /// and recorded as an Event in the background.
    fn authorize(&self, caller: &CallerIdentity, role_arn: &str, pod: &Arc<PodFacts>) -> Result<(), BrokerError> {
        let (ns, sa) = (caller.namespace.as_str(), caller.service_account.as_str());
        if let Err(denial) = authz::authorize(ns, sa, role_arn, pod) {
            return Err(self.deny(caller, pod, denial));
        }
        let Some(namespaces) = &self.namespaces else { return Ok(()) };
        if let Some(stale) = namespaces.stale() {
            return Err(BrokerError::Unavailable(stale.to_string()));
        }
        // From the namespace watch: no API call, and it answers through an
        // API server outage. A namespace it has not delivered yet (created
        // a moment ago) is not denied: that would be remembered as a denial.
        let Some(namespace) = namespaces.get(ns) else {
            return Err(BrokerError::Unavailable(format!("namespace {ns} not known to the broker yet; retry")));
        };
        namespace.check(role_arn).map_err(|denial| self.deny(caller, pod, denial))
    }

    fn deny(&self, caller: &CallerIdentity, pod: &Arc<PodFacts>, denial: Denial) -> BrokerError {
        let reason = denial.reason();
        tracing::warn!(caller = %caller.spiffe_id, rule = denial.label(), %reason, "credentials denied");
        self.metrics.denials.get_or_create(&RuleLabel { rule: denial.label() }).inc();
        self.cluster.spawn_denial_event(Arc::clone(pod), reason.clone());
        BrokerError::AccessDenied { label: denial.label(), reason }
    }

    /// STS refused the role (its trust policy said no to this identity):
    /// logged, counted (rule `sts_denied`) and recorded as an Event on the
    /// pod like the broker's own denials, within the same per-pod budget.
    /// A remembered refusal (the cache's backoff) counts again; its Event
    /// does not repeat within the budget's window.
    fn sts_denied(&self, key: &CacheKey, pod: &Arc<PodFacts>, detail: &str) {
        let reason = format!(
            "STS refused role {} to service account {}/{}: {detail}",
            key.role_arn, key.namespace, key.service_account
        );
        tracing::warn!(rule = STS_DENIED_RULE, %reason, "credentials denied");
        self.metrics.denials.get_or_create(&RuleLabel { rule: STS_DENIED_RULE }).inc();
        self.cluster.spawn_denial_event(Arc::clone(pod), reason);
    }

    /// Where the caller's connection comes from, when the pod check needs
    /// it ([`crate::peer`]); in `xfcc` mode, first that the connection came
    /// through the broker's sidecar at all. Either failing is 401.
    fn caller_address(&self, headers: &HeaderMap, connection: &Connection<'_>) -> Result<Option<IpAddr>, BrokerError> {
        let check = self.config.pod_address_check;
        let address = match &self.config.identity {
            IdentityMode::Xfcc(_) => peer::through_sidecar(connection.peer, &self.config.sidecar_sources)
                .and_then(|()| if check { peer::stated(headers).map(Some) } else { Ok(None) }),
            IdentityMode::Mtls { .. } if check => {
                connection.peer.map(|peer| Some(peer.ip().to_canonical())).ok_or(PeerError::NoConnection)
            }
            // insecure-dev has no verifiable peer: it runs outside the
            // cluster, where no caller has a pod's address.
            IdentityMode::Mtls { .. } | IdentityMode::InsecureDev { .. } => Ok(None),
        };
        address.map_err(|error| {
            tracing::info!(%error, "caller not authenticated");
            BrokerError::Unauthenticated { label: error.label() }
        })
    }

    /// The caller must be the pod it names: a sibling pod of the same
    /// service account has the same mesh identity but not the same address.
    /// A pod without an address yet is the start-up race of 404.
    fn check_caller_is_pod(
        &self,
        caller: &CallerIdentity,
        address: IpAddr,
        pod: &Arc<PodFacts>,
    ) -> Result<(), BrokerError> {
        if pod.ips.is_empty() {
            let namespace = pod.namespace.clone().unwrap_or_default();
            return Err(BrokerError::PodHasNoAddress { namespace, name: pod.name.clone() });
        }
        authz::caller_is_pod(address, pod).map_err(|denial| self.deny(caller, pod, denial))
    }

    fn kube_unavailable(&self, error: &KubeError) -> BrokerError {
        tracing::warn!(%error, "Kubernetes API call failed");
        self.metrics.kube_error(error);
        BrokerError::Unavailable(format!("Kubernetes API: {}", error.label()))
    }
}

/// The denial rule of an STS `AccessDenied` (in `denials_total` and the
/// 403's label).
pub const STS_DENIED_RULE: &str = "sts_denied";

/// Maps a failed fetch to the contract:
/// - `Throttled` → 429 with `Retry-After` (STS's own hint, else
///   [`DEFAULT_THROTTLE_RETRY`]);
/// - `Denied` → 403 AccessDenied (the role's trust policy refused);
/// - `Failed` from STS (or the cache's own checks of what STS answered) →
///   502 StsError naming the STS code;
/// - `Failed` from Kubernetes (the TokenRequest) → 503 Unavailable: the
///   broker cannot mint a token now, which is neither STS's answer nor the
///   caller's fault, so the filter backs off and keeps serving what it has.
pub fn fetch_error_response(error: &FetchError) -> BrokerError {
    match (error.kind, &error.failed_at) {
        (FetchErrorKind::Throttled, _) => {
            BrokerError::Throttled { retry_after: error.retry_after.unwrap_or(DEFAULT_THROTTLE_RETRY) }
        }
        (FetchErrorKind::Denied, _) => {
            BrokerError::AccessDenied { label: STS_DENIED_RULE, reason: error.detail.clone() }
        }
        (FetchErrorKind::Failed, FailedAt::Kubernetes) => {
            BrokerError::Unavailable(format!("Kubernetes API: {}", error.detail))
        }
        (FetchErrorKind::Failed, FailedAt::Sts { code }) => {
            BrokerError::Sts { code: code.clone(), message: error.detail.clone() }
        }
        (FetchErrorKind::Failed, FailedAt::Cache) => {
            BrokerError::Sts { code: "InternalFailure".to_owned(), message: error.detail.clone() }
        }
    }
}

/// The two parameters of a credential request, each exactly once.
/// Values are percent-decoded as RFC 3986 says (a `+` stays a `+`: IAM role
/// names may contain it, and the filter percent-encodes it). The pod name
/// stays borrowed from the query unless it needed decoding: it is looked up,
/// never stored.
fn parse_query(query: Option<&str>) -> Result<(String, std::borrow::Cow<'_, str>), BrokerError> {
    let invalid = |message: &str| BrokerError::InvalidRequest(message.to_owned());
    let (mut role_arn, mut pod) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "role_arn" => &mut role_arn,
            "pod" => &mut pod,
            // Unknown parameters are ignored, so a newer filter can add some.
            _ => continue,
        };
        if slot.is_some() {
            return Err(invalid("role_arn and pod must each appear once"));
        }
        let value = percent_decode_str(value).decode_utf8().map_err(|_| invalid("parameters must be UTF-8"))?;
        *slot = Some(value);
    }
    let (Some(role_arn), Some(pod)) = (role_arn, pod) else {
        return Err(invalid("role_arn and pod are required"));
    };
    session::validate_role_arn(&role_arn).map_err(|e| BrokerError::InvalidRequest(e.to_string()))?;
    if !identity::is_dns1123_subdomain(&pod) {
        return Err(invalid("pod is not a Kubernetes pod name"));
    }
    Ok((role_arn.into_owned(), pod))
}

/// The IMDS credential document, exactly as the filter serves it.
pub fn credential_document(credentials: &Credentials) -> serde_json::Value {
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": imds_time(credentials.last_updated),
        "Type": "AWS-HMAC",
        "AccessKeyId": credentials.access_key_id,
        "SecretAccessKey": credentials.secret_access_key,
        "Token": credentials.session_token,
        "Expiration": imds_time(credentials.expiration),
    })
}

/// RFC 3339 in UTC with `Z` and whole seconds, as IMDS writes times.
fn imds_time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    at.replace_nanosecond(0).unwrap_or(at).format(&Rfc3339).unwrap_or_default()
}

/// A credential as the cache holds it: its IMDS document, rendered once per
/// fetch, so a cache hit answers with a reference-counted clone of the same
/// bytes instead of building JSON per request. No `Debug`: the bytes hold
/// the secret and the session token.
struct Served {
    expiration: OffsetDateTime,
    /// [`credential_document`], serialized.
    document: Bytes,
}

impl Served {
    fn new(credentials: Credentials) -> Self {
        let document = credential_document(&credentials).to_string();
        Self { expiration: credentials.expiration, document: Bytes::from(document) }
    }
}

impl Expiring for Served {
    fn expiration(&self) -> OffsetDateTime {
        self.expiration
    }
}

// ---------------------------------------------------------------------------
// The cache's fetch: TokenRequest, then STS.

/// Which pod each key's token is bound to: the one that asked last. Bounded
/// like the cache; beyond that the binding used longest ago goes (its key's
/// next request binds it again).
struct Bindings {
    max: usize,
    map: Mutex<HashMap<CacheKey, Binding>>,
}

struct Binding {
    pod: String,
    uid: String,
    at: Instant,
}

impl Bindings {
    fn new(max: usize) -> Self {
        Self { max: max.max(1), map: Mutex::default() }
    }

    fn bind(&self, key: &CacheKey, pod: &str, uid: &str) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // Almost every request re-binds the pod already bound: then only the
        // time moves, and nothing is allocated.
        if let Some(binding) = map.get_mut(key) {
            if binding.pod != pod || binding.uid != uid {
                binding.pod = pod.to_owned();
                binding.uid = uid.to_owned();
            }
            binding.at = now;
            return;
        }
        if map.len() >= self.max {
            let oldest = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(key.clone(), Binding { pod: pod.to_owned(), uid: uid.to_owned(), at: now });
    }

    fn get(&self, key: &CacheKey) -> Option<(String, String)> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).map(|b| (b.pod.clone(), b.uid.clone()))
    }
}

struct Fetcher {
    cluster: Arc<Cluster>,
    sts: StsClient,
    bindings: Arc<Bindings>,
    audience: String,
    lifetime_seconds: i64,
    metrics: Arc<Metrics>,
}

impl Fetcher {
    /// One TokenRequest and one STS call for `key`. Errors say where they
    /// failed, for [`fetch_error_response`]; none carries the token.
    async fn fetch(&self, key: CacheKey) -> Result<Credentials, FetchError> {
        let (ns, sa) = (key.namespace.as_str(), key.service_account.as_str());
        let Some((pod, uid)) = self.bindings.get(&key) else {
            return Err(FetchError::failed_at(FailedAt::Kubernetes, "no pod to bind the token to"));
        };
        let token =
            self.cluster.token(ns, sa, &pod, &uid, &self.audience, self.lifetime_seconds).await.map_err(|error| {
                tracing::warn!(%error, namespace = ns, service_account = sa, "TokenRequest failed");
                self.metrics.kube_error(&error);
                FetchError::failed_at(FailedAt::Kubernetes, format!("TokenRequest failed: {}", error.label()))
            })?;

        let session_name = session::role_session_name(ns, sa);
        self.metrics.sts_calls.inc();
        // A guard, not inc/dec around the await: the cache aborts a fetch
        // past its timeout, dropping this future mid-call.
        let in_flight = InFlight::enter(&self.metrics.sts_in_flight);
        let started = std::time::Instant::now();
        let result = self.sts.assume_role_with_web_identity(&key.role_arn, &session_name, token.expose()).await;
        self.metrics.sts_duration.observe(started.elapsed().as_secs_f64());
        drop(in_flight);
        result.map_err(|error| {
            tracing::warn!(%error, role_arn = key.role_arn, namespace = ns, service_account = sa, "STS call failed");
            self.metrics.sts_errors.get_or_create(&CodeLabel { code: error.metric_label() }).inc();
            error.fetch_error()
        })
    }
}

/// One unit of a gauge of things in progress, given back when dropped:
/// on completion or when the future holding it is cancelled.
struct InFlight(Gauge);

impl InFlight {
    fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---------------------------------------------------------------------------
// Metrics. Labels are fixed vocabularies: outcome codes, rule names, STS
// codes through `StsError::metric_label`, `KubeError::label`.

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    error: &'static str,
}

/// Latency buckets from 0.5 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

struct Metrics {
    requests: Family<OutcomeLabel, Counter>,
    /// `requests` for outcome `Success`, looked up once: the hot path then
    /// skips the family's lock and label hashing.
    successes: Counter,
    request_duration: Histogram,
    denials: Family<RuleLabel, Counter>,
    unauthenticated: Family<ReasonLabel, Counter>,
    sts_calls: Counter,
    sts_errors: Family<CodeLabel, Counter>,
    sts_duration: Histogram,
    sts_in_flight: Gauge,
    kube_errors: Family<ErrorLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<OutcomeLabel, Counter>::default();
        let successes = requests.get_or_create(&OutcomeLabel { outcome: "Success" }).clone();
        Self {
            requests,
            successes,
            request_duration: latency_histogram(),
            denials: Family::default(),
            unauthenticated: Family::default(),
            sts_calls: Counter::default(),
            sts_errors: Family::default(),
            sts_duration: latency_histogram(),
            sts_in_flight: Gauge::default(),
            kube_errors: Family::default(),
        }
    }
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "credential_requests",
            "Credential requests by outcome (Success or the contract's error Code)",
            self.requests.clone(),
        );
        registry.register(
            "credential_request_duration_seconds",
            "Time to answer a credential request",
            self.request_duration.clone(),
        );
        registry.register("denials", "Credential requests denied, by authorization rule", self.denials.clone());
        registry.register(
            "unauthenticated",
            "Credential requests without a verifiable caller, by reason",
            self.unauthenticated.clone(),
        );
        registry.register("sts_calls", "AssumeRoleWithWebIdentity calls made", self.sts_calls.clone());
        registry.register("sts_errors", "Failed STS calls by STS error code", self.sts_errors.clone());
        registry.register("sts_call_duration_seconds", "Time of one STS call", self.sts_duration.clone());
        registry.register("sts_calls_in_flight", "STS calls running now", self.sts_in_flight.clone());
        registry.register("kube_api_errors", "Failed Kubernetes API calls by kind", self.kube_errors.clone());
    }

    fn kube_error(&self, error: &KubeError) {
        self.kube_errors.get_or_create(&ErrorLabel { error: error.label() }).inc();
    }
}

/// Exports [`Cache::stats`] at scrape time.
#[derive(Debug)]
struct CacheCollector(Arc<Cache<Served>>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let counters = [
            ("cache_hits", "Credential gets answered from the cache", stats.hits),
            ("cache_misses", "Credential gets with nothing servable cached", stats.misses),
            ("cache_fetches", "Upstream fetches started (TokenRequest plus STS)", stats.fetches),
            ("cache_refreshes", "Fetches started while a servable credential existed", stats.refreshes),
            ("cache_fetch_errors", "Fetches that failed", stats.fetch_errors),
            ("cache_evictions", "Cache keys evicted", stats.evictions),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let gauges = [
            ("cache_keys", "Keys held in the cache", stats.keys),
            ("cache_fetches_in_flight", "Fetches holding a concurrency permit", stats.fetches_in_flight),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Exports each watch's [`WatchHealth`] at scrape time, labelled `watch`.
#[derive(Debug)]
struct WatchCollector(Vec<Arc<WatchHealth>>);

impl Collector for WatchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "Errors of the pod (and namespace) watch, each retried with backoff";
        let mut family = encoder.encode_descriptor("watch_errors", help, None, MetricType::Counter)?;
        for health in &self.0 {
            let counter = ConstCounter::new(health.errors());
            counter.encode(family.encode_family(&WatchLabel { watch: health.what() })?)?;
        }
        let help = "Seconds since the watch last showed it works (an event or a completed relist)";
        let mut family = encoder.encode_descriptor("watch_unconfirmed_seconds", help, None, MetricType::Gauge)?;
        let now = tokio::time::Instant::now();
        for health in &self.0 {
            let gauge = ConstGauge::new(health.unconfirmed_for(now).as_secs_f64());
            gauge.encode(family.encode_family(&WatchLabel { watch: health.what() })?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabel {
    watch: &'static str,
}

// ---------------------------------------------------------------------------
// HTTP.

/// How long a broker told to stop (SIGTERM) keeps serving, not ready,
/// before it stops accepting connections: the time the endpoints
/// controller, kube-proxy and the callers' sidecars take to stop sending it
/// requests once it is terminating. Without it, requests sent in that
/// window meet a closed port.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// How long the requests in flight when a broker stops accepting may take
/// to finish: above [`DEFAULT_CREDENTIALS_DEADLINE`], the longest a
/// credential request waits, so none is cut off.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// One shutdown for the several servers of a broker (service and admin
/// listeners): every [`Shutdown::signal`] completes once [`Shutdown::trigger`]
/// is called or the `Shutdown` is dropped.
#[derive(Debug)]
pub struct Shutdown(tokio::sync::watch::Sender<()>);

impl Default for Shutdown {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(()))
    }
}

impl Shutdown {
    /// A future for [`run`], [`run_mtls`] or [`run_admin`].
    pub fn signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut changed = self.0.subscribe();
        async move {
            let _ = changed.changed().await;
        }
    }

    /// Starts the graceful shutdown of every server given a signal.
    pub fn trigger(&self) {
        self.0.send_replace(());
    }
}

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
struct Connection<'a> {
    /// The TCP peer (the broker's sidecar in `xfcc` mode).
    peer: Option<SocketAddr>,
    /// `mtls` mode: the verified client certificate.
    certificate: Option<&'a ClientCertificate>,
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

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:iam::123456789012:role/team/app+x";

    #[test]
    fn query_needs_both_parameters_exactly_once() {
        let ok = parse_query(Some("role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fteam%2Fapp%2Bx&pod=web-0"));
        assert_eq!(ok, Ok((ARN.to_owned(), "web-0".into())));
        assert_eq!(parse_query(Some(&format!("pod=web-0&role_arn={ARN}&extra=1"))).map(|q| q.1), Ok("web-0".into()));
        for bad in [
            None,
            Some("pod=web-0"),
            Some("role_arn=arn:aws:iam::123456789012:role/app"),
            Some("role_arn=arn:aws:iam::123456789012:role/app&pod=a&pod=b"),
            Some("role_arn=arn:aws:iam::123456789012:role/app&role_arn=arn:aws:iam::123456789012:role/app&pod=a"),
            Some("role_arn=not-an-arn&pod=web-0"),
            Some("role_arn=arn:aws:iam::123456789012:role/app&pod=Web_0"),
            Some("role_arn=arn:aws:iam::123456789012:role/app&pod=%FF"),
        ] {
            let error = parse_query(bad).expect_err("accepted");
            assert_eq!(error.status(), 400, "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_plus_in_the_arn_stays_a_plus() {
        assert_eq!(parse_query(Some(&format!("role_arn={ARN}&pod=p"))).map(|q| q.0), Ok(ARN.to_owned()));
    }

    #[test]
    fn the_document_is_the_imds_shape_with_whole_second_utc_times() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).expect("time");
        let credentials = Credentials {
            access_key_id: "ASIA".into(),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration: at + Duration::from_secs(3600),
            last_updated: at,
        };
        assert_eq!(
            credential_document(&credentials),
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": "2027-01-15T08:00:00Z",
                "Type": "AWS-HMAC",
                "AccessKeyId": "ASIA",
                "SecretAccessKey": "secret",
                "Token": "token",
                "Expiration": "2027-01-15T09:00:00Z",
            })
        );
        // What a cache hit answers: the same document, rendered at fetch time.
        let served = Served::new(credentials.clone());
        let body: serde_json::Value = serde_json::from_slice(&served.document).expect("JSON");
        assert_eq!(body, credential_document(&credentials));
        assert_eq!(served.expiration(), credentials.expiration);
    }

    #[test]
    fn a_key_is_bound_to_the_pod_that_asked_last() {
        let key = CacheKey { role_arn: ARN.into(), namespace: "ns".into(), service_account: "sa".into() };
        let bindings = Bindings::new(1);
        bindings.bind(&key, "web-0", "uid-0");
        bindings.bind(&key, "web-0", "uid-0");
        assert_eq!(bindings.get(&key), Some(("web-0".into(), "uid-0".into())));
        bindings.bind(&key, "web-1", "uid-1");
        assert_eq!(bindings.get(&key), Some(("web-1".into(), "uid-1".into())));
        // Beyond the bound, the binding used longest ago goes.
        let other = CacheKey { namespace: "other".into(), ..key.clone() };
        bindings.bind(&other, "web-2", "uid-2");
        assert_eq!((bindings.get(&key), bindings.get(&other)), (None, Some(("web-2".into(), "uid-2".into()))));
    }

    #[test]
    fn fetch_failures_map_to_the_contract() {
        let sts = |kind, code: &str, detail: &str| FetchError {
            kind,
            retry_after: None,
            failed_at: FailedAt::Sts { code: code.into() },
            detail: detail.into(),
        };
        let throttled = sts(FetchErrorKind::Throttled, "Throttling", "slow down");
        assert_eq!(fetch_error_response(&throttled).retry_after(), Some(DEFAULT_THROTTLE_RETRY.as_secs()));
        assert_eq!(fetch_error_response(&sts(FetchErrorKind::Denied, "AccessDenied", "no")).status(), 403);
        assert_eq!(
            fetch_error_response(&sts(FetchErrorKind::Failed, "InvalidIdentityToken", "bad token")),
            BrokerError::Sts { code: "InvalidIdentityToken".into(), message: "bad token".into() }
        );
        let kube = FetchError::failed_at(FailedAt::Kubernetes, "TokenRequest failed: api_unavailable");
        assert_eq!(fetch_error_response(&kube).status(), 503);
        // The cache's own failures (timeouts, too-short credentials) are 502s.
        assert_eq!(fetch_error_response(&FetchError::failed("fetch timed out")).status(), 502);
    }
}
