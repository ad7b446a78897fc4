//! The broker's request flow, apart from its HTTP framing: what a credential
//! request must get past before the cache is asked, and what each failure
//! answers. Kept out of `server.rs` so the order of the checks, which is the
//! security argument, reads in one place, and the HTTP layer stays thin.
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
//!    recorded in the audit trail ([`crate::audit`]) with the rule and as
//!    an Event on the pod;
//! 5. credentials for (role, namespace, service account) from the
//!    [`Cache`], whose fetch mints a pod-bound TokenRequest and exchanges it
//!    at STS (failures: see [`fetch_error_response`]);
//! 6. the IMDS credential document ([`crate::fetch::credential_document`]),
//!    which [`crate::server`] sends, recorded in the audit trail.
//!
//! Apart from requests, [`crate::prefetch`] warms the cache for pods the
//! watch sees appear (on by default: [`AppConfig::prefetch`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use percent_encoding::percent_decode_str;
use prometheus_client::registry::Registry;

use crate::audit;
use crate::authz::{self, Denial, NamespacePolicy, PodFacts};
use crate::cache::{Cache, CacheConfig, CacheKey, FailedAt, FetchError, FetchErrorKind, FetchFuture};
use crate::connections::HttpLimits;
use crate::error::BrokerError;
use crate::fetch::{Bindings, Fetcher, Served};
use crate::identity::{self, CallerIdentity, IdentityMode, SpiffeId};
use crate::kube::{Cluster, KubeError, LookupError, NamespaceWatch, PodWatch, Stale};
use crate::metrics::{CacheCollector, Metrics, RuleLabel, WatchCollector};
use crate::peer::{self, PeerError, SourceRange};
use crate::prefetch::{self, Prefetcher};
use crate::server::Connection;
use crate::session;
use crate::sts::StsClient;

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
    /// Whether a pod the watch sees appear gets its credentials fetched
    /// before it asks ([`crate::prefetch`]). On by default.
    pub prefetch: bool,
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
            prefetch: true,
        }
    }
}

/// The running service's state, shared by every request.
pub struct App {
    pub(crate) config: AppConfig,
    pods: PodWatch,
    /// Only with the namespace policy.
    namespaces: Option<Arc<NamespaceWatch>>,
    /// Only with [`AppConfig::prefetch`]; stopped with the app.
    prefetcher: Option<tokio::task::JoinHandle<()>>,
    cluster: Arc<Cluster>,
    cache: Arc<Cache<Served>>,
    bindings: Arc<Bindings>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) registry: Registry,
    /// Set by [`App::drain`]: `/readyz` answers 503 from then on.
    draining: std::sync::atomic::AtomicBool,
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(prefetcher) = &self.prefetcher {
            prefetcher.abort();
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("config", &self.config).finish_non_exhaustive()
    }
}

impl App {
    /// Starts the pod watch, the cache and, if on, the prefetch;
    /// `instance` names this replica in the Events it records. Must be
    /// called inside a tokio runtime.
    pub fn new(config: AppConfig, client: ::kube::Client, sts: StsClient, instance: impl Into<String>) -> Self {
        let bound = config.watch_staleness_bound;
        let (pods, arrivals) = if config.prefetch {
            let (sender, arrivals) = tokio::sync::mpsc::channel(prefetch::ARRIVALS_QUEUE);
            (PodWatch::with_arrivals(client.clone(), bound, sender), Some(arrivals))
        } else {
            (PodWatch::with_staleness_bound(client.clone(), bound), None)
        };
        let namespaces = config
            .namespace_policy
            .clone()
            .map(|policy| Arc::new(NamespaceWatch::with_staleness_bound(client.clone(), policy, bound)));
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
        let watches = std::iter::once(pods.health()).chain(namespaces.as_deref().map(NamespaceWatch::health)).collect();
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
        let prefetcher = arrivals.map(|arrivals| {
            let prefetcher = Prefetcher {
                cache: Arc::clone(&cache),
                bindings: Arc::clone(&bindings),
                namespaces: namespaces.clone(),
                metrics: Arc::clone(&metrics),
            };
            prefetcher.spawn(arrivals)
        });
        let draining = std::sync::atomic::AtomicBool::new(false);
        Self { config, pods, namespaces, prefetcher, cluster, cache, bindings, metrics, registry, draining }
    }

    /// Whether the pod watch holds pod `namespace/name` (no API call): for
    /// tests and tools that must know the broker has seen a pod.
    pub fn watches_pod(&self, namespace: &str, name: &str) -> bool {
        self.pods.cached(namespace, name).is_some()
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
    /// ([`crate::shutdown::DEFAULT_SHUTDOWN_DELAY`]): requests are still
    /// served.
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
        let namespaces = self.namespaces.as_deref().and_then(NamespaceWatch::stale);
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
    pub(crate) fn unsynced_watches(&self) -> Vec<&'static str> {
        let pods = (!self.pods.is_synced()).then_some("pod");
        let namespaces = self.namespaces.as_ref().filter(|watch| !watch.is_synced()).map(|_| "namespace");
        pods.into_iter().chain(namespaces).collect()
    }

    /// Answers one credential request: the whole contract but the HTTP
    /// framing.
    pub(crate) async fn credentials(
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
            self.check_caller_is_pod(&caller, &role_arn, address, &pod)?;
        }

        // The caller's names move into the key: only its SPIFFE ID, for the
        // audit trail, is needed after this.
        let CallerIdentity { namespace, service_account, spiffe_id } = caller;
        let key = CacheKey { role_arn, namespace, service_account };
        // The fetch binds its token to the pod that asked last for this key.
        self.bindings.bind(&key, &pod_name, &pod.uid);
        let served = match self.cache.get_cached(&key) {
            Some(served) => served,
            // Boxed: the wait is the rare path, and its future would
            // otherwise enlarge every request's.
            None => Box::pin(self.wait_for(&key, &spiffe_id, &pod)).await?,
        };
        audit::issued(&spiffe_id, &pod, &key.role_arn, &served.access_key_id, served.expiration);
        Ok(served)
    }

    /// A cache miss: waits for the fetch under the deadline.
    async fn wait_for(
        &self,
        key: &CacheKey,
        caller: &SpiffeId,
        pod: &Arc<PodFacts>,
    ) -> Result<Arc<Served>, BrokerError> {
        match tokio::time::timeout(self.config.credentials_deadline, self.cache.get(key)).await {
            Ok(Ok(credentials)) => Ok(credentials),
            Ok(Err(error)) => {
                if error.kind == FetchErrorKind::Denied {
                    self.sts_denied(key, caller, pod, &error.detail);
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
            return Err(self.deny(caller, role_arn, pod, denial));
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
        namespace.check(role_arn).map_err(|denial| self.deny(caller, role_arn, pod, denial))
    }

    /// A denial: in the audit trail, counted, and recorded as an Event on
    /// the pod in the background.
    fn deny(&self, caller: &CallerIdentity, role_arn: &str, pod: &Arc<PodFacts>, denial: Denial) -> BrokerError {
        let reason = denial.reason();
        audit::denied(&caller.spiffe_id, pod, role_arn, denial.label(), &reason);
        self.metrics.denials.get_or_create(&RuleLabel { rule: denial.label() }).inc();
        self.cluster.spawn_denial_event(Arc::clone(pod), reason.clone());
        BrokerError::AccessDenied { label: denial.label(), reason }
    }

    /// STS refused the role (its trust policy said no to this identity):
    /// in the audit trail, counted (rule `sts_denied`) and recorded as an
    /// Event on the pod like the broker's own denials, within the same
    /// per-pod budget. A remembered refusal (the cache's backoff) counts
    /// again; its Event does not repeat within the budget's window.
    fn sts_denied(&self, key: &CacheKey, caller: &SpiffeId, pod: &Arc<PodFacts>, detail: &str) {
        let reason = format!(
            "STS refused role {} to service account {}/{}: {detail}",
            key.role_arn, key.namespace, key.service_account
        );
        audit::denied(caller, pod, &key.role_arn, STS_DENIED_RULE, &reason);
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
            tracing::debug!(%error, "caller not authenticated");
            BrokerError::Unauthenticated { label: error.label() }
        })
    }

    /// The caller must be the pod it names: a sibling pod of the same
    /// service account has the same mesh identity but not the same address.
    /// A pod without an address yet is the start-up race of 404.
    fn check_caller_is_pod(
        &self,
        caller: &CallerIdentity,
        role_arn: &str,
        address: IpAddr,
        pod: &Arc<PodFacts>,
    ) -> Result<(), BrokerError> {
        if pod.ips.is_empty() {
            let namespace = pod.namespace.clone().unwrap_or_default();
            return Err(BrokerError::PodHasNoAddress { namespace, name: pod.name.clone() });
        }
        authz::caller_is_pod(address, pod).map_err(|denial| self.deny(caller, role_arn, pod, denial))
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
/// never stored. Public for the fuzz targets (`fuzz/`).
pub fn parse_query(query: Option<&str>) -> Result<(String, std::borrow::Cow<'_, str>), BrokerError> {
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
