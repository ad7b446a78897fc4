//! The broker's Kubernetes calls: the pods it authorizes against, the
//! service-account tokens it exchanges at STS, namespaces (for the optional
//! namespace policy) and the Events that tell an operator why a pod was
//! denied.
//!
//! - [`PodWatch`] keeps a reflector over the opted-in pods of every
//!   namespace (label [`ENABLE_LABEL`]=[`ENABLED_VALUE`]), so a request
//!   costs no API call. It keeps [`PodFacts`], not whole pods. A pod's first
//!   request can beat the watch, so a miss reads the pod directly before
//!   answering "no such pod"; those reads are shared by concurrent requests
//!   for the same pod, remembered for [`DIRECT_READ_REMEMBERED`] and
//!   rate-limited ([`DIRECT_READS_PER_SECOND`]), so requests naming pods
//!   that do not exist cannot turn into API load. Once synced, the cache
//!   keeps answering while the API server is unreachable, but only for
//!   the watch's staleness bound ([`DEFAULT_WATCH_STALENESS_BOUND`]): past
//!   it, [`PodWatch::stale`] says since when, and the broker stops
//!   authorizing from frozen data ([`WatchHealth`]). Started with
//!   [`PodWatch::with_arrivals`], it also hands on each pod that appears
//!   after the initial list, so the broker can warm its credentials before
//!   the pod asks.
//! - [`NamespaceWatch`] does the same for namespaces, as [`NamespaceRule`]s,
//!   when the namespace policy is on.
//! - [`Cluster`] makes the one-off calls: TokenRequest and Event create.
//!   Denial Events have a fixed budget per pod ([`DENIAL_EVENTS_PER_POD`])
//!   and a bound on writes in flight.
//!
//! Every one-off call (direct pod read, TokenRequest, Event) is bounded by
//! [`KUBE_CALL_TIMEOUT`]: kube sets no read timeout (a watch must be able to
//! wait), so an API server that accepts connections and never answers would
//! otherwise hold a request forever.
//!
//! Build their [`Client`] with [`client`]. Every failure is a [`KubeError`],
//! with a stable [`KubeError::label`] for metrics.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, StreamExt};
use imds_filter::config::{ENABLE_LABEL, ENABLED_VALUE};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, Lookup, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::{OnceCell, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::authz::{NamespacePolicy, NamespaceRule, PodFacts};

/// Longest any one-off Kubernetes call (direct pod read, TokenRequest, Event
/// create) may take before it fails as [`KubeError::Timeout`]: far above
/// the API server's own objective for single-object calls (1 s at the 99th
/// percentile), far below the filter's patience.
pub const KUBE_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the outcome of a direct pod read (found or not) answers later
/// requests for the same pod without another read. Short: a pod read
/// directly because the watch had not delivered it yet is in the watch's
/// cache by then, and a name that does not exist stays cheap.
pub const DIRECT_READ_REMEMBERED: Duration = Duration::from_secs(2);

/// Direct pod reads per second, on average, across all namespaces; beyond
/// it (and the burst [`DIRECT_READ_BURST`]) a lookup the watch cannot answer
/// is refused as [`LookupError::Throttled`] (429: the filter retries in a
/// second, by when the watch has usually caught up).
pub const DIRECT_READS_PER_SECOND: u32 = 20;

/// Direct pod reads allowed at once above [`DIRECT_READS_PER_SECOND`].
pub const DIRECT_READ_BURST: u32 = 40;

/// Pods per page of the pod watch's (re)list. Each page arrives as one
/// JSON body held whole while it is decoded: an Istio-injected pod is about
/// 16 KiB of it, so kube's default of 500 would be 8 MiB a page, held in
/// passing but then kept by the allocator; 100 keeps a relist of 10,000
/// pods to 100 calls and the broker's peak memory near its steady state.
const LIST_PAGE_SIZE: u32 = 100;

/// Bound on direct reads remembered (running, or within
/// [`DIRECT_READ_REMEMBERED`]); the rate limit keeps it far below this.
const MAX_DIRECT_READS: usize = 4096;

/// How long a synced watch's data is trusted without the watch showing it
/// still works (an event, or a completed relist): past it, requests that
/// rely on the watch's data answer 503 and `/readyz` fails. Long enough
/// that an API-server outage or upgrade of a few minutes keeps known pods
/// served from the cache; short enough that a watch that keeps failing
/// (its RBAC withdrawn, a connection stuck) stops authorizing from data that
/// no longer follows the cluster.
pub const DEFAULT_WATCH_STALENESS_BOUND: Duration = Duration::from_secs(300);

/// A watch nothing has confirmed for its staleness bound divided by this is
/// restarted (a relist), so that it confirms itself. kube's watcher makes
/// no event for a quiet watch (bookmarks and its own re-watches are
/// silent), and a watch that was established before its RBAC was withdrawn
/// keeps running without error until the API server ends it: only a new
/// list shows whether the broker may still list. Three tries per bound,
/// so one failed relist does not make the data stale. A watch that
/// delivers events never relists.
const RELISTS_PER_BOUND: u32 = 3;

/// `reportingController` of the Events the broker records.
pub const REPORTING_CONTROLLER: &str = "imds-mesh-token-broker";

/// `reason` of a denial Event: what `kubectl get events` shows in its
/// REASON column (CamelCase, as Kubernetes reasons are).
pub const DENIAL_EVENT_REASON: &str = "ImdsCredentialsDenied";

/// `action` of a denial Event (required by `events.k8s.io/v1`).
pub const DENIAL_EVENT_ACTION: &str = "IssueCredentials";

/// The window of the per-pod Event budget: a pod gets at most
/// [`DENIAL_EVENTS_PER_POD`] denial Events in it, and a repeated reason
/// none. IMDS clients retry fast; one Event per denied request would load
/// the API server and bury the Events an operator is looking for.
pub const DENIAL_EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// Denial Events one pod may get per [`DENIAL_EVENT_INTERVAL`], whatever
/// their reasons: the reason quotes the requested role, which the caller
/// chooses, so it cannot be what the budget is kept by.
pub const DENIAL_EVENTS_PER_POD: usize = 3;

/// Event writes running at once; a denial beyond it gets no Event (it is
/// still logged and counted).
pub const MAX_EVENT_WRITES_IN_FLIGHT: usize = 8;

/// Bound on the pods whose Event budget is tracked. When every one of them
/// has a live window, further pods get no Event until a window ends: a
/// flood of denials across that many pods must not become Events either.
const MAX_TRACKED_DENIALS: usize = 4096;

/// The API server cuts an Event's `note` at 1 KiB.
const MAX_NOTE: usize = 1024;

/// A failed Kubernetes API call.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The API server could not be reached, or answered that it cannot
    /// serve now (5xx, 429).
    #[error("Kubernetes API unavailable: {0}")]
    Unavailable(#[source] kube::Error),
    /// The broker's own service account may not make the call (401, 403):
    /// a deployment (RBAC) problem, not the caller's.
    #[error("Kubernetes API refused the broker: {0}")]
    Forbidden(#[source] kube::Error),
    /// The object named does not exist (404), e.g. the pod a token was to
    /// be bound to.
    #[error("Kubernetes object not found: {0}")]
    NotFound(#[source] kube::Error),
    /// The object changed under us (409): for a TokenRequest, the pod was
    /// deleted and recreated with another uid.
    #[error("Kubernetes object changed: {0}")]
    Conflict(#[source] kube::Error),
    /// The API server refused the request as invalid (400, 422), e.g. a
    /// token lifetime under 10 minutes or a pod running as another service
    /// account.
    #[error("Kubernetes API rejected the request: {0}")]
    Rejected(#[source] kube::Error),
    /// A TokenRequest answered without a token.
    #[error("Kubernetes API answered a TokenRequest without a token")]
    NoToken,
    /// No answer within [`KUBE_CALL_TIMEOUT`]: the API server (or the way
    /// to it) hangs.
    #[error("Kubernetes API did not answer within {} s", KUBE_CALL_TIMEOUT.as_secs())]
    Timeout,
    /// Anything else (an unexpected status, an undecodable answer).
    #[error("Kubernetes API call failed: {0}")]
    Other(#[source] kube::Error),
}

impl KubeError {
    /// A stable, low-cardinality name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "api_unavailable",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Rejected(_) => "rejected",
            Self::NoToken => "no_token",
            Self::Timeout => "timeout",
            Self::Other(_) => "other",
        }
    }
}

impl From<kube::Error> for KubeError {
    fn from(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(status) => match status.code {
                401 | 403 => Self::Forbidden(error),
                404 => Self::NotFound(error),
                409 => Self::Conflict(error),
                400 | 422 => Self::Rejected(error),
                429 | 500..=599 => Self::Unavailable(error),
                _ => Self::Other(error),
            },
            // Connection refused or reset, timeouts, TLS failures: the API
            // server is not reachable from here.
            kube::Error::HyperError(_) | kube::Error::Service(_) => Self::Unavailable(error),
            _ => Self::Other(error),
        }
    }
}

/// `call` under [`KUBE_CALL_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = Result<T, kube::Error>>) -> Result<T, KubeError> {
    match tokio::time::timeout(KUBE_CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(KubeError::Timeout),
    }
}

/// A client for `config` as the broker needs it: without kube's default
/// retry layer, which retries 429/503/504 up to 15 times with backoff growing
/// to minutes. A credential request must fail fast while the API server is
/// down (the cache backs off by itself, the reflector has its own backoff).
pub fn client(mut config: kube::Config) -> Result<Client, KubeError> {
    config.default_retry = false;
    Ok(Client::try_from(config)?)
}

/// A service-account token (a JWT). Never shown in logs: `Debug` redacts it
/// and there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretToken(String);

impl SecretToken {
    /// Wraps a JWT (tests and other token sources).
    pub fn new(token: String) -> Self {
        Self(token)
    }

    /// The JWT, for the one place that sends it (the STS request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken(<redacted>)")
    }
}

/// Why [`PodWatch::pod`] could not say whether a pod exists.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The watch has not delivered the pod and the direct-read budget
    /// ([`DIRECT_READS_PER_SECOND`]) is spent: try again in a second.
    #[error("too many lookups of pods the watch has not delivered; retry")]
    Throttled,
    /// The direct read failed (shared by every request that waited on it).
    #[error(transparent)]
    Api(Arc<KubeError>),
}

impl LookupError {
    /// A stable, low-cardinality name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::Api(error) => error.label(),
        }
    }
}

/// A pod as the broker decodes it from the API server: only the fields
/// [`PodFacts`] come from. Everything else (managed fields, containers,
/// volumes, statuses: tens of KiB per pod as k8s-openapi types, most of it
/// managed fields as JSON trees) is skipped while decoding, never allocated,
/// so a relist of thousands of pods costs little even in passing.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct PodView {
    #[serde(deserialize_with = "lean_metadata")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodViewSpec>,
    #[serde(default)]
    status: Option<PodViewStatus>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodViewSpec {
    service_account_name: Option<String>,
    service_account: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodViewStatus {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<k8s_openapi::api::core::v1::PodIP>>,
}

/// The metadata fields the broker reads, and the resource version the
/// watcher resumes from.
fn lean_metadata<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        labels: Option<std::collections::BTreeMap<String, String>>,
        annotations: Option<std::collections::BTreeMap<String, String>>,
        deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    }
    let lean = <Lean as serde::Deserialize>::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        uid: lean.uid,
        resource_version: lean.resource_version,
        labels: lean.labels,
        annotations: lean.annotations,
        deletion_timestamp: lean.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

impl kube::Resource for PodView {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl From<PodView> for PodFacts {
    /// Through a [`Pod`] holding only what was decoded, so the rules'
    /// reading of a pod (service account defaults, phases, addresses) stays
    /// in one place, [`PodFacts`]'s `From<Pod>`.
    fn from(view: PodView) -> Self {
        let spec = view.spec.unwrap_or_default();
        let status = view.status.unwrap_or_default();
        PodFacts::from(Pod {
            metadata: view.metadata,
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                service_account_name: spec.service_account_name,
                service_account: spec.service_account,
                ..Default::default()
            }),
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: status.phase,
                pod_ip: status.pod_ip,
                pod_ips: status.pod_ips,
                ..Default::default()
            }),
        })
    }
}

/// The opted-in pods of every namespace, kept current by a reflector task;
/// the task stops when this is dropped.
pub struct PodWatch {
    client: Client,
    store: Store<PodFacts>,
    task: JoinHandle<()>,
    direct: DirectReads,
    health: Arc<WatchHealth>,
}

impl PodWatch {
    /// Starts watching pods labelled [`ENABLE_LABEL`]=[`ENABLED_VALUE`] in
    /// all namespaces, with [`DEFAULT_WATCH_STALENESS_BOUND`]. Must be called
    /// within a tokio runtime.
    pub fn spawn(client: Client) -> Self {
        Self::with_staleness_bound(client, DEFAULT_WATCH_STALENESS_BOUND)
    }

    /// [`PodWatch::spawn`] with its data trusted for `bound` without the
    /// watch confirming it ([`PodWatch::stale`]).
    pub fn with_staleness_bound(client: Client, bound: Duration) -> Self {
        Self::start(client, bound, |_| {})
    }

    /// [`PodWatch::with_staleness_bound`], also sending each pod that
    /// appears once the initial list is done (created, or labelled later) to
    /// `arrivals`. Best effort: when the channel is full the pod is left out
    /// (its first request then fetches as usual). Pods listed at start or
    /// found by a relist after a watch gap are not arrivals: they have been
    /// running, and a start-up of thousands of them must not become a burst
    /// of fetches nobody asked for.
    pub fn with_arrivals(client: Client, bound: Duration, arrivals: mpsc::Sender<Arc<PodFacts>>) -> Self {
        Self::start(client, bound, move |pod| {
            if arrivals.try_send(pod).is_err() {
                tracing::debug!("arrivals queue full or closed; a new pod is not prefetched");
            }
        })
    }

    fn start(client: Client, bound: Duration, on_arrival: impl Fn(Arc<PodFacts>) + Send + 'static) -> Self {
        let config =
            watcher::Config::default().labels(&format!("{ENABLE_LABEL}={ENABLED_VALUE}")).page_size(LIST_PAGE_SIZE);
        let health = Arc::new(WatchHealth::new("pod", bound));
        let api = Api::<PodView>::all(client.clone());
        let (store, task) = spawn_reflector(api, config, Arc::clone(&health), PodFacts::from, on_arrival);
        Self { client, store, task, direct: DirectReads::default(), health }
    }

    /// Whether the initial list has completed (the broker is ready). Stays
    /// true when the API server goes away later: the cache is still used,
    /// until [`PodWatch::stale`].
    pub fn is_synced(&self) -> bool {
        is_ready(&self.store)
    }

    /// Since when the synced data has not been confirmed, once that is
    /// longer than the staleness bound; `None` before the sync (nothing is
    /// served from the cache then) and while the watch works.
    pub fn stale(&self) -> Option<Stale> {
        self.is_synced().then(|| self.health.stale(Instant::now())).flatten()
    }

    /// The watch's health, for metrics.
    pub fn health(&self) -> Arc<WatchHealth> {
        Arc::clone(&self.health)
    }

    /// Waits until [`PodWatch::is_synced`].
    pub async fn synced(&self) {
        // Errs only if the reflector task ended, which it does only when
        // this is dropped.
        let _ = self.store.wait_until_ready().await;
    }

    /// The pod `namespace/name` if the watch has delivered it, without any
    /// API call.
    pub fn cached(&self, namespace: &str, name: &str) -> Option<Arc<PodFacts>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }

    /// The pod `namespace/name`: from the cache, or, on a miss, read
    /// directly (a pod's first request can beat the watch). `None` when it
    /// does not exist. Concurrent misses for one pod share one read; its
    /// outcome answers for [`DIRECT_READ_REMEMBERED`]; new reads beyond
    /// [`DIRECT_READS_PER_SECOND`] are refused. A pod read directly may
    /// lack the enabling label; [`crate::authz::authorize`] says so.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Arc<PodFacts>>, LookupError> {
        if let Some(pod) = self.cached(namespace, name) {
            return Ok(Some(pod));
        }
        // Boxed: this is the rare path and its future is large (the read's
        // is about 1.7 KiB); inline, it would make every caller's future
        // that large, and the server allocates one of those per request.
        Box::pin(self.read_directly(namespace, name)).await
    }

    /// The miss path of [`PodWatch::pod`].
    async fn read_directly(&self, namespace: &str, name: &str) -> Result<Option<Arc<PodFacts>>, LookupError> {
        let read = self.direct.join(namespace, name)?;
        let outcome = read
            .get_or_init(|| async {
                let api = Api::<PodView>::namespaced(self.client.clone(), namespace);
                let pod = bounded(api.get_opt(name)).await;
                (Instant::now(), pod.map(|pod| pod.map(|pod| Arc::new(PodFacts::from(pod)))).map_err(Arc::new))
            })
            .await;
        outcome.1.clone().map_err(LookupError::Api)
    }
}

#[cfg(test)]
impl PodWatch {
    /// A watch over `store` (filled by the test), with no task.
    fn over(client: Client, store: Store<PodFacts>) -> Self {
        let health = Arc::new(WatchHealth::new("pod", DEFAULT_WATCH_STALENESS_BOUND));
        Self { client, store, task: tokio::spawn(async {}), direct: DirectReads::default(), health }
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A direct read's outcome and when it came.
type DirectRead = (Instant, Result<Option<Arc<PodFacts>>, Arc<KubeError>>);

/// The direct pod reads running or remembered, and their rate limit.
#[derive(Default)]
struct DirectReads {
    reads: Mutex<HashMap<(String, String), Pending>>,
    budget: Mutex<TokenBucket>,
}

struct Pending {
    started: Instant,
    read: Arc<OnceCell<DirectRead>>,
}

impl Pending {
    /// Whether this read still answers for its pod: running (and not
    /// abandoned past [`KUBE_CALL_TIMEOUT`]), or found an answer (not an
    /// error) within [`DIRECT_READ_REMEMBERED`].
    fn answers(&self, now: Instant) -> bool {
        match self.read.get() {
            None => now.duration_since(self.started) < KUBE_CALL_TIMEOUT,
            Some((at, outcome)) => outcome.is_ok() && now.duration_since(*at) < DIRECT_READ_REMEMBERED,
        }
    }
}

impl DirectReads {
    /// The read to wait on for `namespace/name`: one that answers already,
    /// else a new one if the budget allows.
    fn join(&self, namespace: &str, name: &str) -> Result<Arc<OnceCell<DirectRead>>, LookupError> {
        let now = Instant::now();
        let key = (namespace.to_owned(), name.to_owned());
        let mut reads = self.reads.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pending) = reads.get(&key).filter(|p| p.answers(now)) {
            return Ok(Arc::clone(&pending.read));
        }
        if !self.budget.lock().unwrap_or_else(PoisonError::into_inner).try_take(now) {
            return Err(LookupError::Throttled);
        }
        if reads.len() >= MAX_DIRECT_READS {
            reads.retain(|_, pending| pending.answers(now));
            if reads.len() >= MAX_DIRECT_READS {
                return Err(LookupError::Throttled);
            }
        }
        let read = Arc::new(OnceCell::new());
        reads.insert(key, Pending { started: now, read: Arc::clone(&read) });
        Ok(read)
    }
}

/// A token bucket in its GCRA form that refuses rather than queues: a
/// request path must not wait for budget.
#[derive(Debug)]
struct TokenBucket {
    /// Time between two takes at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained rate a burst may run.
    tolerance: Duration,
    /// The "theoretical arrival time" of the next take at the sustained rate.
    next: Option<Instant>,
}

impl TokenBucket {
    fn new(per_second: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / per_second.max(1);
        Self { interval, tolerance: interval * (burst.max(1) - 1), next: None }
    }

    /// Takes a token if one is left at `now`.
    fn try_take(&mut self, now: Instant) -> bool {
        let theoretical = self.next.map_or(now, |next| next.max(now));
        if theoretical.duration_since(now) > self.tolerance {
            return false;
        }
        self.next = Some(theoretical + self.interval);
        true
    }
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self::new(DIRECT_READS_PER_SECOND, DIRECT_READ_BURST)
    }
}

/// Every namespace as the [`NamespacePolicy`] sees it ([`NamespaceRule`]s),
/// kept current by a reflector task, so the policy costs no API call per
/// request and keeps answering while the API server is unreachable. The
/// task stops when this is dropped.
pub struct NamespaceWatch {
    store: Store<NamespaceRule>,
    task: JoinHandle<()>,
    health: Arc<WatchHealth>,
}

impl NamespaceWatch {
    /// Starts watching all namespaces for `policy`, with
    /// [`DEFAULT_WATCH_STALENESS_BOUND`]. Must be called within a tokio
    /// runtime.
    pub fn spawn(client: Client, policy: NamespacePolicy) -> Self {
        Self::with_staleness_bound(client, policy, DEFAULT_WATCH_STALENESS_BOUND)
    }

    /// [`NamespaceWatch::spawn`] with its data trusted for `bound` without
    /// the watch confirming it ([`NamespaceWatch::stale`]).
    pub fn with_staleness_bound(client: Client, policy: NamespacePolicy, bound: Duration) -> Self {
        let api = Api::<Namespace>::all(client);
        let health = Arc::new(WatchHealth::new("namespace", bound));
        let (store, task) =
            spawn_reflector(api, watcher::Config::default(), Arc::clone(&health), move |ns| policy.rule(ns), |_| {});
        Self { store, task, health }
    }

    /// Whether the initial list has completed.
    pub fn is_synced(&self) -> bool {
        is_ready(&self.store)
    }

    /// As [`PodWatch::stale`].
    pub fn stale(&self) -> Option<Stale> {
        self.is_synced().then(|| self.health.stale(Instant::now())).flatten()
    }

    /// The watch's health, for metrics.
    pub fn health(&self) -> Arc<WatchHealth> {
        Arc::clone(&self.health)
    }

    /// Waits until [`NamespaceWatch::is_synced`].
    pub async fn synced(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// The namespace `name`, if the watch has delivered it.
    pub fn get(&self, name: &str) -> Option<Arc<NamespaceRule>> {
        self.store.get(&ObjectRef::new(name))
    }
}

impl Drop for NamespaceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a watch still follows the cluster: when it last showed it
/// works (an event, a completed relist) and how often it failed. Shared by
/// the watch's task, the request path and the metrics.
#[derive(Debug)]
pub struct WatchHealth {
    what: &'static str,
    bound: Duration,
    /// When the watch last worked, on the monotonic clock and the wall
    /// clock (for messages).
    confirmed: Mutex<(Instant, SystemTime)>,
    errors: AtomicU64,
}

impl WatchHealth {
    /// A watch of `what` (`pod`, `namespace`), trusted for `bound`, counted
    /// as working from now (before its sync nothing relies on it).
    pub fn new(what: &'static str, bound: Duration) -> Self {
        Self { what, bound, confirmed: Mutex::new((Instant::now(), SystemTime::now())), errors: AtomicU64::new(0) }
    }

    /// The watch's name: `pod`, `namespace`.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Errors the watch has met (each retried with backoff).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// How long since the watch last worked, at `now`.
    pub fn unconfirmed_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.confirmed().0)
    }

    /// `Some` once the watch has not worked for longer than its bound.
    pub fn stale(&self, now: Instant) -> Option<Stale> {
        let (at, since) = self.confirmed();
        let age = now.saturating_duration_since(at);
        (age > self.bound).then_some(Stale { what: self.what, since, age, bound: self.bound })
    }

    fn confirmed(&self) -> (Instant, SystemTime) {
        *self.confirmed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn confirm(&self) {
        *self.confirmed.lock().unwrap_or_else(PoisonError::into_inner) = (Instant::now(), SystemTime::now());
    }

    fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// A watch whose data is past its staleness bound: the reason a request is
/// refused (503) and `/readyz` fails.
#[derive(Debug, Clone)]
pub struct Stale {
    /// The watch: `pod`, `namespace`.
    pub what: &'static str,
    /// When it last worked (wall clock).
    pub since: SystemTime,
    /// How long ago that was.
    pub age: Duration,
    /// The bound it is past.
    pub bound: Duration,
}

impl fmt::Display for Stale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = Timestamp::try_from(self.since)
            .and_then(|at| Timestamp::from_second(at.as_second()))
            .map_or_else(|_| "?".to_owned(), |at| at.to_string());
        write!(
            f,
            "{what} data is stale: the {what} watch has failed since {since} ({} s, past the {} s bound)",
            self.age.as_secs(),
            self.bound.as_secs(),
            what = self.what,
        )
    }
}

/// Starts a reflector over `api` that keeps `keep(object)` of each object,
/// calls `on_arrival` with each object that appears once the first list is
/// done (an applied object the store did not hold), and returns its store
/// and task. The watcher relists and rewatches by
/// itself after errors, with backoff; the store keeps its last state
/// meanwhile and is replaced whole once a relist completes. Every event and
/// completed relist confirms `health`; every error counts in it; a watch
/// unconfirmed for a [`RELISTS_PER_BOUND`]th of the bound is restarted,
/// which relists.
fn spawn_reflector<K, F>(
    api: Api<K>,
    config: watcher::Config,
    health: Arc<WatchHealth>,
    keep: impl Fn(K) -> F + Send + 'static,
    on_arrival: impl Fn(Arc<F>) + Send + 'static,
) -> (Store<F>, JoinHandle<()>)
where
    K: kube::Resource + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
    F: Lookup<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let (store, mut writer) = reflector::store();
    let reader = store.clone();
    let what = health.what;
    let relist_after = (health.bound / RELISTS_PER_BOUND).max(Duration::from_millis(100));
    let task = tokio::spawn(async move {
        let mut listed = false;
        loop {
            let started = Instant::now();
            let mut events = watcher(api.clone(), config.clone()).default_backoff().boxed();
            loop {
                let due = health.confirmed().0.max(started) + relist_after;
                let event = tokio::select! {
                    event = events.next() => event,
                    () = tokio::time::sleep_until(due) => break,
                };
                // Each object is reduced as it arrives: the whole object
                // lives only while it is decoded, never in the store.
                let event = match event {
                    // The watcher retries forever; were it to end, start anew.
                    None => break,
                    Some(Ok(event)) => match event {
                        watcher::Event::Apply(object) => watcher::Event::Apply(keep(object)),
                        watcher::Event::Delete(object) => watcher::Event::Delete(keep(object)),
                        watcher::Event::InitApply(object) => watcher::Event::InitApply(keep(object)),
                        watcher::Event::Init => watcher::Event::Init,
                        watcher::Event::InitDone => watcher::Event::InitDone,
                    },
                    Some(Err(error)) => {
                        health.failed();
                        tracing::warn!(%error, "{what} watch failed; serving cached {what}s while it retries");
                        continue;
                    }
                };
                let arrival = match &event {
                    watcher::Event::Apply(object) if listed => {
                        let at = ObjectRef::from_obj(object);
                        reader.get(&at).is_none().then_some(at)
                    }
                    _ => None,
                };
                writer.apply_watcher_event(&event);
                if let Some(object) = arrival.and_then(|at| reader.get(&at)) {
                    on_arrival(object);
                }
                match event {
                    // Sent before the list is asked for: proves nothing.
                    watcher::Event::Init => {}
                    watcher::Event::InitDone => {
                        health.confirm();
                        if !listed {
                            tracing::info!("{what} watch listed everything");
                        }
                        listed = true;
                    }
                    _ => health.confirm(),
                }
            }
            tracing::debug!("{what} watch unconfirmed for {relist_after:?}; relisting");
        }
    });
    (store, task)
}

/// The store's own readiness, so `is_synced` and `synced` never disagree.
fn is_ready<K: Lookup + Clone + 'static>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + Hash + Clone,
{
    store.wait_until_ready().now_or_never().is_some_and(|ready| ready.is_ok())
}

impl Lookup for PodFacts {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }
    fn name(&self) -> Option<Cow<'_, str>> {
        Some(self.name.as_str().into())
    }
    fn namespace(&self) -> Option<Cow<'_, str>> {
        self.namespace.as_deref().map(Cow::from)
    }
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }
    fn uid(&self) -> Option<Cow<'_, str>> {
        Some(self.uid.as_str().into())
    }
}

impl Lookup for NamespaceRule {
    type DynamicType = ();

    fn kind(_: &()) -> Cow<'_, str> {
        "Namespace".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "namespaces".into()
    }
    fn name(&self) -> Option<Cow<'_, str>> {
        Some(self.name.as_str().into())
    }
    fn namespace(&self) -> Option<Cow<'_, str>> {
        None
    }
    fn resource_version(&self) -> Option<Cow<'_, str>> {
        None
    }
    fn uid(&self) -> Option<Cow<'_, str>> {
        None
    }
}

/// The broker's one-off Kubernetes calls.
pub struct Cluster {
    client: Client,
    /// `reportingInstance` of Events: which broker replica saw the denial.
    instance: String,
    /// The Event budget of each recently denied pod, by uid.
    recent_denials: Mutex<HashMap<String, DenialWindow>>,
    /// Event writes in flight ([`MAX_EVENT_WRITES_IN_FLIGHT`]).
    event_writes: Arc<Semaphore>,
}

/// One pod's denial Events in the current [`DENIAL_EVENT_INTERVAL`].
struct DenialWindow {
    started: Instant,
    /// Hashes of the reasons recorded (at most [`DENIAL_EVENTS_PER_POD`]).
    reasons: Vec<u64>,
}

impl Cluster {
    /// `instance` names this broker replica in the Events it records (its
    /// pod name, say).
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        Self {
            client,
            instance: instance.into(),
            recent_denials: Mutex::default(),
            event_writes: Arc::new(Semaphore::new(MAX_EVENT_WRITES_IN_FLIGHT)),
        }
    }

    /// A token for `namespace/service_account`, for `audience`, valid for
    /// `expiration_seconds` (at least 600: the API server refuses less), and
    /// bound to the pod `pod_name` with `pod_uid`, so it dies with the pod.
    pub async fn token(
        &self,
        namespace: &str,
        service_account: &str,
        pod_name: &str,
        pod_uid: &str,
        audience: &str,
        expiration_seconds: i64,
    ) -> Result<SecretToken, KubeError> {
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.to_owned()],
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(pod_name.to_owned()),
                    uid: Some(pod_uid.to_owned()),
                }),
            },
            ..TokenRequest::default()
        };
        let accounts = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace);
        let answer = bounded(accounts.create_token_request(service_account, &PostParams::default(), &request)).await?;
        match answer.status {
            Some(status) if !status.token.is_empty() => Ok(SecretToken(status.token)),
            _ => Err(KubeError::NoToken),
        }
    }

    /// [`Cluster::record_denial`] in a task of its own, so the denied
    /// request does not wait for it; nothing at all if
    /// [`MAX_EVENT_WRITES_IN_FLIGHT`] writes are running already.
    pub fn spawn_denial_event(self: &Arc<Self>, pod: Arc<PodFacts>, reason: String) {
        let Ok(permit) = Arc::clone(&self.event_writes).try_acquire_owned() else {
            tracing::debug!(pod = %pod.name, "denial Event writes at their limit; this denial gets none");
            return;
        };
        let cluster = Arc::clone(self);
        tokio::spawn(async move {
            cluster.record_denial(&pod, &reason).await;
            drop(permit);
        });
    }

    /// Records a Warning Event on `pod` saying why it was denied
    /// (`reason`, from [`crate::authz::Denial::reason`]), within the pod's
    /// budget: at most [`DENIAL_EVENTS_PER_POD`] per
    /// [`DENIAL_EVENT_INTERVAL`], none for a reason it already got one for
    /// in that window. A failure (or [`KUBE_CALL_TIMEOUT`]) is logged, never
    /// returned: the denial stands either way.
    pub async fn record_denial(&self, pod: &PodFacts, reason: &str) {
        let reason_hash = hash(reason);
        if !self.take_denial_budget(&pod.uid, reason_hash) {
            return;
        }
        let namespace = pod.namespace.clone().unwrap_or_default();
        let event = self.denial_event(pod, reason);
        let events = Api::<Event>::namespaced(self.client.clone(), &namespace);
        if let Err(error) = bounded(events.create(&PostParams::default(), &event)).await {
            tracing::warn!(
                %error,
                error_label = error.label(),
                pod = %pod.name,
                namespace,
                "could not record the denial as a Kubernetes Event"
            );
            // Let the next denial try again.
            self.refund_denial_budget(&pod.uid, reason_hash);
        }
    }

    /// Whether pod `uid` may get an Event for the reason hashed
    /// `reason_hash` now; if so, counts it.
    fn take_denial_budget(&self, uid: &str, reason_hash: u64) -> bool {
        let now = Instant::now();
        let live = |window: &DenialWindow| now.duration_since(window.started) < DENIAL_EVENT_INTERVAL;
        let mut recent = self.recent_denials();
        if let Some(window) = recent.get_mut(uid).filter(|w| live(w)) {
            if window.reasons.contains(&reason_hash) || window.reasons.len() >= DENIAL_EVENTS_PER_POD {
                return false;
            }
            window.reasons.push(reason_hash);
            return true;
        }
        if recent.len() >= MAX_TRACKED_DENIALS && !recent.contains_key(uid) {
            recent.retain(|_, window| live(window));
            if recent.len() >= MAX_TRACKED_DENIALS {
                return false;
            }
        }
        let mut reasons = Vec::with_capacity(DENIAL_EVENTS_PER_POD);
        reasons.push(reason_hash);
        recent.insert(uid.to_owned(), DenialWindow { started: now, reasons });
        true
    }

    fn refund_denial_budget(&self, uid: &str, reason_hash: u64) {
        if let Some(window) = self.recent_denials().get_mut(uid) {
            window.reasons.retain(|r| *r != reason_hash);
        }
    }

    fn recent_denials(&self) -> std::sync::MutexGuard<'_, HashMap<String, DenialWindow>> {
        // Only plain inserts and removes happen under the lock.
        self.recent_denials.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An `events.k8s.io/v1` Event, as kube-rs's `Recorder` builds them.
    /// Not the `Recorder` itself: it folds repeats by (reason, action,
    /// object) and keeps the first `note`, so a pod denied for a second
    /// reason would show the first one.
    fn denial_event(&self, pod: &PodFacts, reason: &str) -> Event {
        let now = Timestamp::now();
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", pod.name, now.as_nanosecond())),
                namespace: pod.namespace.clone(),
                ..ObjectMeta::default()
            },
            action: Some(DENIAL_EVENT_ACTION.to_owned()),
            event_time: Some(MicroTime(now)),
            note: Some(truncate(reason, MAX_NOTE).to_owned()),
            reason: Some(DENIAL_EVENT_REASON.to_owned()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(pod.name.clone()),
                namespace: pod.namespace.clone(),
                uid: Some(pod.uid.clone()),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some("Warning".to_owned()),
            ..Event::default()
        }
    }
}

/// A reason, reduced to what the Event budget compares.
fn hash(reason: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    reason.hash(&mut hasher);
    hasher.finish()
}

/// The longest prefix of `text` of at most `max` bytes that ends on a
/// character boundary.
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// kube's mock API server pattern (controller-rs `fixtures.rs`): each test
/// names a [`Scenario`]; an [`ApiServerVerifier`] answers exactly the
/// requests it expects, checking each, and fails on anything else.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::{Method, Request, Response, StatusCode};
    use k8s_openapi::api::core::v1::PodSpec;
    use kube::client::Body;
    use kube::runtime::reflector::store::Writer;
    use serde_json::{Value, json};

    use super::*;

    type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    #[tokio::test(start_paused = true)]
    async fn watch_data_turns_stale_only_past_the_bound_and_fresh_again_when_confirmed() {
        let health = WatchHealth::new("pod", Duration::from_secs(300));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert!(health.stale(Instant::now()).is_none(), "at the bound, still trusted");
        health.failed();
        tokio::time::advance(Duration::from_secs(1)).await;
        let stale = health.stale(Instant::now()).expect("past the bound");
        assert_eq!((stale.what, stale.age, health.errors()), ("pod", Duration::from_secs(301), 1));
        let message = stale.to_string();
        assert!(message.starts_with("pod data is stale: the pod watch has failed since "), "{message}");
        assert!(message.ends_with(" (301 s, past the 300 s bound)"), "{message}");
        health.confirm();
        assert!(health.stale(Instant::now()).is_none());
        assert_eq!(health.unconfirmed_for(Instant::now()), Duration::ZERO);
    }

    /// Fails a test whose mock API server does not finish in time (a request
    /// never made, or one the code under test awaits forever).
    const SCENARIO_TIMEOUT: Duration = Duration::from_secs(1);
    /// How long the verifier waits to be sure no further request comes.
    const QUIET: Duration = Duration::from_millis(100);

    const NS: &str = "team-a";
    const SA: &str = "app";
    const POD: &str = "app-7d9";
    const UID: &str = "6a1c0b5e-0000-4000-8000-000000000001";
    const AUDIENCE: &str = "sts.amazonaws.com";
    const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";

    enum Scenario {
        /// One TokenRequest, bound to the pod, answered with [`JWT`].
        TokenIssued,
        /// One TokenRequest, answered with this status.
        TokenRefused(StatusCode),
        /// One TokenRequest whose connection fails.
        TokenConnectionFails,
        /// One direct pod read, answered with the pod.
        PodRead,
        /// One direct pod read, answered 404.
        PodReadNotFound,
        /// No request at all.
        Nothing,
        /// One Event created, then no other request.
        OneDenialEvent,
        /// One Event create refused with 500, then one created.
        DenialEventFailsThenSucceeds,
        /// Every request is taken and never answered (a hung API server).
        Hang,
        /// Exactly this many direct reads of pods, each answered 404, then
        /// no other request.
        PodReadsNotFound(usize),
        /// Exactly this many Events created, then no other request.
        DenialEvents(usize),
    }

    struct ApiServerVerifier(ApiServerHandle);

    fn mock_client() -> (Client, ApiServerVerifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "default"), ApiServerVerifier(handle))
    }

    impl ApiServerVerifier {
        fn run(self, scenario: Scenario) -> JoinHandle<()> {
            tokio::spawn(async move {
                let mut this = self;
                match scenario {
                    Scenario::TokenIssued => this.token_request(StatusCode::CREATED).await,
                    Scenario::TokenRefused(code) => this.token_request(code).await,
                    Scenario::TokenConnectionFails => {
                        let (request, send) = this.next().await;
                        assert_eq!(request.uri().path(), format!("/api/v1/namespaces/{NS}/serviceaccounts/{SA}/token"));
                        send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
                    }
                    Scenario::PodRead => this.pod_read(StatusCode::OK).await,
                    Scenario::PodReadNotFound => this.pod_read(StatusCode::NOT_FOUND).await,
                    Scenario::Nothing => {}
                    Scenario::OneDenialEvent => this.denial_event(StatusCode::CREATED).await,
                    Scenario::DenialEventFailsThenSucceeds => {
                        this.denial_event(StatusCode::INTERNAL_SERVER_ERROR).await;
                        this.denial_event(StatusCode::CREATED).await;
                    }
                    Scenario::Hang => {
                        let mut held = Vec::new();
                        while let Some(request) = this.0.next_request().await {
                            held.push(request);
                        }
                    }
                    Scenario::PodReadsNotFound(n) => {
                        for _ in 0..n {
                            let (request, send) = this.next().await;
                            assert_eq!(request.method(), Method::GET);
                            assert!(request.uri().path().starts_with(&format!("/api/v1/namespaces/{NS}/pods/")));
                            send.send_response(json_response(StatusCode::NOT_FOUND, &status(StatusCode::NOT_FOUND)));
                        }
                    }
                    Scenario::DenialEvents(n) => {
                        for _ in 0..n {
                            let (request, send) = this.next().await;
                            assert_eq!(request.uri().path(), format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"));
                            let body = request.into_body().collect_bytes().await.unwrap();
                            send.send_response(
                                Response::builder()
                                    .status(StatusCode::CREATED)
                                    .body(Body::from(body.to_vec()))
                                    .unwrap(),
                            );
                        }
                    }
                }
                this.no_more_requests().await;
            })
        }

        async fn next(&mut self) -> (Request<Body>, tower_test::mock::SendResponse<Response<Body>>) {
            self.0.next_request().await.expect("the client made no request")
        }

        async fn no_more_requests(&mut self) {
            if let Ok(Some((request, _))) = tokio::time::timeout(QUIET, self.0.next_request()).await {
                panic!("unexpected request: {} {}", request.method(), request.uri());
            }
        }

        async fn token_request(&mut self, code: StatusCode) {
            let (request, send) = self.next().await;
            assert_eq!(request.method(), Method::POST);
            assert_eq!(request.uri().path(), format!("/api/v1/namespaces/{NS}/serviceaccounts/{SA}/token"));
            let body: Value = serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["kind"], "TokenRequest");
            assert_eq!(body["apiVersion"], "authentication.k8s.io/v1");
            assert_eq!(body["spec"]["audiences"], json!([AUDIENCE]));
            assert_eq!(body["spec"]["expirationSeconds"], 3600);
            assert_eq!(
                body["spec"]["boundObjectRef"],
                json!({ "apiVersion": "v1", "kind": "Pod", "name": POD, "uid": UID })
            );
            let answer = if code.is_success() {
                let mut answer = body.clone();
                answer["status"] = json!({ "token": JWT, "expirationTimestamp": "2030-01-01T00:00:00Z" });
                answer
            } else {
                status(code)
            };
            send.send_response(json_response(code, &answer));
        }

        async fn pod_read(&mut self, code: StatusCode) {
            let (request, send) = self.next().await;
            assert_eq!(request.method(), Method::GET);
            assert_eq!(request.uri().path(), format!("/api/v1/namespaces/{NS}/pods/{POD}"));
            let answer = if code.is_success() { serde_json::to_value(pod(NS, POD)).unwrap() } else { status(code) };
            send.send_response(json_response(code, &answer));
        }

        async fn denial_event(&mut self, code: StatusCode) {
            let (request, send) = self.next().await;
            assert_eq!(request.method(), Method::POST);
            assert_eq!(request.uri().path(), format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"));
            let body: Value = serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], DENIAL_EVENT_REASON);
            assert_eq!(body["note"], "pod is not enabled");
            assert_eq!(body["action"], DENIAL_EVENT_ACTION);
            assert_eq!(body["reportingController"], REPORTING_CONTROLLER);
            assert_eq!(body["reportingInstance"], "broker-0");
            assert_eq!(body["regarding"]["kind"], "Pod");
            assert_eq!(body["regarding"]["apiVersion"], "v1");
            assert_eq!(body["regarding"]["name"], POD);
            assert_eq!(body["regarding"]["namespace"], NS);
            assert_eq!(body["regarding"]["uid"], UID);
            assert!(body["eventTime"].is_string(), "eventTime is required: {body}");
            assert!(body["metadata"]["namespace"] == NS, "{body}");
            let name = body["metadata"]["name"].as_str().unwrap();
            assert!(name.starts_with(&format!("{POD}.")), "{name}");
            let answer = if code.is_success() { body } else { status(code) };
            send.send_response(json_response(code, &answer));
        }
    }

    /// Waits for the verifier, failing on its panic or on a timeout.
    async fn verified(verifier: JoinHandle<()>) {
        tokio::time::timeout(SCENARIO_TIMEOUT, verifier)
            .await
            .expect("the mock API server timed out")
            .expect("the scenario failed");
    }

    fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
        Response::builder().status(code).body(Body::from(serde_json::to_vec(body).unwrap())).unwrap()
    }

    /// A failure as the API server sends it (`reason` CamelCase:
    /// `get_opt` reads 404 `NotFound` as "absent").
    fn status(code: StatusCode) -> Value {
        let reason = code.canonical_reason().unwrap_or_default().replace(' ', "");
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": code.to_string(), "reason": reason, "code": code.as_u16(),
        })
    }

    fn pod(namespace: &str, name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                uid: Some(UID.to_owned()),
                labels: Some(BTreeMap::from([(ENABLE_LABEL.to_owned(), ENABLED_VALUE.to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec { service_account_name: Some(SA.to_owned()), ..PodSpec::default() }),
            ..Pod::default()
        }
    }

    /// [`pod`] as the watch keeps it.
    fn facts(namespace: &str, name: &str) -> PodFacts {
        PodFacts::from(pod(namespace, name))
    }

    /// A synced store holding `pods`.
    fn synced_store(pods: Vec<Pod>) -> Store<PodFacts> {
        let mut writer = Writer::default();
        writer.apply_watcher_event(&watcher::Event::Init);
        for pod in pods {
            writer.apply_watcher_event(&watcher::Event::InitApply(PodFacts::from(pod)));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let store = writer.as_reader();
        // The reader outlives the writer in these tests.
        std::mem::forget(writer);
        store
    }

    async fn token(cluster: &Cluster) -> Result<SecretToken, KubeError> {
        cluster.token(NS, SA, POD, UID, AUDIENCE, 3600).await
    }

    #[tokio::test]
    async fn token_request_is_bound_to_the_pod_and_returns_the_jwt() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::TokenIssued);
        let token = token(&Cluster::new(client, "broker-0")).await.unwrap();
        assert_eq!(token.expose(), JWT);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn token_refusals_map_to_stable_labels() {
        for (code, label) in [
            (StatusCode::UNPROCESSABLE_ENTITY, "rejected"),
            (StatusCode::BAD_REQUEST, "rejected"),
            (StatusCode::CONFLICT, "conflict"),
            (StatusCode::NOT_FOUND, "not_found"),
            (StatusCode::FORBIDDEN, "forbidden"),
            (StatusCode::UNAUTHORIZED, "forbidden"),
            (StatusCode::TOO_MANY_REQUESTS, "api_unavailable"),
            (StatusCode::SERVICE_UNAVAILABLE, "api_unavailable"),
            (StatusCode::IM_A_TEAPOT, "other"),
        ] {
            let (client, verifier) = mock_client();
            let verifier = verifier.run(Scenario::TokenRefused(code));
            let error = token(&Cluster::new(client, "broker-0")).await.unwrap_err();
            assert_eq!(error.label(), label, "{code}: {error}");
            verified(verifier).await;
        }
    }

    #[tokio::test]
    async fn token_request_without_a_connection_is_api_unavailable() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::TokenConnectionFails);
        let error = token(&Cluster::new(client, "broker-0")).await.unwrap_err();
        assert_eq!(error.label(), "api_unavailable", "{error}");
        verified(verifier).await;
    }

    #[test]
    fn secret_token_debug_is_redacted() {
        let shown = format!("{:?}", SecretToken::new(JWT.to_owned()));
        assert!(!shown.contains(JWT) && !shown.contains("eyJ"), "{shown}");
    }

    #[tokio::test]
    async fn watch_is_synced_only_after_the_initial_list() {
        let (client, _verifier) = mock_client();
        let mut writer = Writer::default();
        let watch = PodWatch::over(client, writer.as_reader());
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(facts(NS, POD)));
        assert!(!watch.is_synced());
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(watch.is_synced());
        watch.synced().await;
    }

    #[tokio::test]
    async fn cached_pod_is_served_without_an_api_call() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::Nothing);
        let watch = PodWatch::over(client, synced_store(vec![pod(NS, POD)]));
        let found = watch.pod(NS, POD).await.unwrap().expect("the cached pod");
        assert_eq!(found.uid, UID);
        verified(verifier).await;
    }

    #[tokio::test]
    async fn pod_missing_from_the_cache_is_read_directly() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::PodRead);
        // Another pod of the same name elsewhere must not answer.
        let watch = PodWatch::over(client, synced_store(vec![pod("team-b", POD)]));
        let found = watch.pod(NS, POD).await.unwrap().expect("the pod read directly");
        assert_eq!(found.namespace.as_deref(), Some(NS));
        verified(verifier).await;
    }

    #[tokio::test]
    async fn pod_missing_from_cache_and_api_is_none() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::PodReadNotFound);
        let watch = PodWatch::over(client, synced_store(vec![]));
        assert!(watch.pod(NS, POD).await.unwrap().is_none());
        verified(verifier).await;
    }

    #[tokio::test]
    async fn denial_is_recorded_as_a_warning_event_on_the_pod() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::OneDenialEvent);
        Cluster::new(client, "broker-0").record_denial(&facts(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_denial_within_the_interval_records_one_event() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::OneDenialEvent);
        let cluster = Cluster::new(client, "broker-0");
        cluster.record_denial(&facts(NS, POD), "pod is not enabled").await;
        tokio::time::advance(DENIAL_EVENT_INTERVAL - Duration::from_secs(1)).await;
        cluster.record_denial(&facts(NS, POD), "pod is not enabled").await;
        verified(verifier).await;

        // After the interval, the same denial is recorded again.
        let (client, verifier) = mock_client();
        let cluster = Cluster { client, ..cluster };
        let verifier = verifier.run(Scenario::OneDenialEvent);
        tokio::time::advance(Duration::from_secs(1)).await;
        cluster.record_denial(&facts(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[tokio::test]
    async fn failed_denial_event_is_swallowed_and_retried_on_the_next_denial() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::DenialEventFailsThenSucceeds);
        let cluster = Cluster::new(client, "broker-0");
        cluster.record_denial(&facts(NS, POD), "pod is not enabled").await;
        cluster.record_denial(&facts(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[tokio::test(start_paused = true)]
    async fn every_one_off_call_to_a_hung_api_server_fails_at_the_deadline() {
        let (client, verifier) = mock_client();
        let _verifier = verifier.run(Scenario::Hang);
        let watch = PodWatch::over(client.clone(), synced_store(vec![]));
        let cluster = Cluster::new(client, "broker-0");

        // Paused time: a call that hangs fails the test when this fires.
        async fn within<T>(call: impl Future<Output = T>) -> T {
            tokio::time::timeout(KUBE_CALL_TIMEOUT * 2, call).await.expect("a call outlived its deadline")
        }
        let started = Instant::now();
        let error = within(watch.pod(NS, POD)).await.unwrap_err();
        assert_eq!((error.label(), started.elapsed()), ("timeout", KUBE_CALL_TIMEOUT), "{error}");
        let started = Instant::now();
        let error = within(token(&cluster)).await.unwrap_err();
        assert_eq!((error.label(), started.elapsed()), ("timeout", KUBE_CALL_TIMEOUT), "{error}");
        let started = Instant::now();
        within(cluster.record_denial(&facts(NS, POD), "pod is not enabled")).await;
        assert_eq!(started.elapsed(), KUBE_CALL_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_for_one_pod_share_one_read_remembered_for_a_while() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::PodReadsNotFound(1));
        let mut watch = PodWatch::over(client, synced_store(vec![]));
        let lookups = (0..50).map(|_| watch.pod(NS, "nope"));
        for found in futures_util::future::join_all(lookups).await {
            assert!(found.unwrap().is_none());
        }
        // Remembered: no second read.
        tokio::time::advance(DIRECT_READ_REMEMBERED - Duration::from_millis(1)).await;
        assert!(watch.pod(NS, "nope").await.unwrap().is_none());
        verified(verifier).await;

        // Forgotten: read again.
        let (client, verifier) = mock_client();
        watch.client = client;
        let verifier = verifier.run(Scenario::PodReadsNotFound(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(watch.pod(NS, "nope").await.unwrap().is_none());
        verified(verifier).await;
    }

    #[tokio::test(start_paused = true)]
    async fn direct_reads_beyond_the_budget_are_throttled_without_an_api_call() {
        let burst = DIRECT_READ_BURST as usize;
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::PodReadsNotFound(burst));
        let watch = PodWatch::over(client, synced_store(vec![]));
        let names: Vec<String> = (0..200).map(|i| format!("nope-{i}")).collect();
        let lookups = names.iter().map(|name| watch.pod(NS, name));
        let outcomes = futures_util::future::join_all(lookups).await;
        let throttled = outcomes.iter().filter(|o| matches!(o, Err(LookupError::Throttled))).count();
        assert_eq!(throttled, names.len() - burst);
        verified(verifier).await;

        // The refill at the sustained rate: `token_bucket_allows_the_burst_then_the_rate`.
    }

    #[tokio::test(start_paused = true)]
    async fn denials_with_distinct_reasons_stay_within_the_pods_event_budget() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::DenialEvents(DENIAL_EVENTS_PER_POD));
        let cluster = Cluster::new(client, "broker-0");
        for i in 0..1000 {
            let reason = format!("pod is annotated with another role than arn:aws:iam::123456789012:role/r-{i}");
            cluster.record_denial(&facts(NS, POD), &reason).await;
        }
        verified(verifier).await;

        // A new window, a new budget.
        let (client, verifier) = mock_client();
        let cluster = Cluster { client, ..cluster };
        let verifier = verifier.run(Scenario::DenialEvents(1));
        tokio::time::advance(DENIAL_EVENT_INTERVAL).await;
        cluster.record_denial(&facts(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[tokio::test(start_paused = true)]
    async fn event_writes_in_flight_are_capped() {
        let (client, mut handle) = mock_client();
        let cluster = Arc::new(Cluster::new(client, "broker-0"));
        for i in 0..100 {
            let mut pod = facts(NS, &format!("pod-{i}"));
            pod.uid = format!("uid-{i}");
            cluster.spawn_denial_event(Arc::new(pod), "pod is not enabled".to_owned());
        }
        // The API server holds every write it gets; only the capped number
        // ever reaches it.
        let mut held = Vec::new();
        while let Ok(Some(request)) = tokio::time::timeout(QUIET, handle.0.next_request()).await {
            held.push(request);
        }
        assert_eq!(held.len(), MAX_EVENT_WRITES_IN_FLIGHT);
    }

    #[test]
    fn a_pod_decoded_lean_has_the_same_facts_as_the_whole_pod() {
        let json = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": POD, "namespace": NS, "uid": UID, "resourceVersion": "42",
                "labels": { ENABLE_LABEL: ENABLED_VALUE, "app": "web" },
                "annotations": { imds_filter::config::ROLE_ANNOTATION: "arn:aws:iam::123456789012:role/app" },
                "deletionTimestamp": "2026-11-30T08:00:00Z",
                "managedFields": [{ "manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                    "fieldsV1": { "f:spec": { "f:containers": { "k:{\"name\":\"app\"}": {} } } } }],
            },
            "spec": {
                "serviceAccount": "legacy",
                "containers": [{ "name": "app", "image": "app", "env": [{ "name": "A", "value": "b" }] }],
            },
            "status": { "phase": "Failed", "podIP": "10.0.0.1", "podIPs": [{ "ip": "10.0.0.1" }, { "ip": "fd00::1" }] },
        });
        let whole = PodFacts::from(serde_json::from_value::<Pod>(json.clone()).unwrap());
        let view: PodView = serde_json::from_value(json).unwrap();
        assert_eq!(view.metadata.resource_version.as_deref(), Some("42"), "the watcher resumes from it");
        assert!(view.metadata.managed_fields.is_none());
        assert_eq!(PodFacts::from(view), whole);
        assert_eq!(
            (whole.service_account.as_str(), whole.finished, whole.terminating),
            ("legacy", Some("Failed"), true)
        );
        // The least a pod can be.
        let bare: PodView = serde_json::from_value(json!({ "metadata": { "name": POD } })).unwrap();
        assert_eq!(PodFacts::from(bare).service_account, crate::authz::DEFAULT_SERVICE_ACCOUNT);
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10, 3);
        let now = Instant::now();
        assert_eq!((0..5).map(|_| bucket.try_take(now)).collect::<Vec<_>>(), [true, true, true, false, false]);
        assert!(!bucket.try_take(now + Duration::from_millis(99)));
        assert!(bucket.try_take(now + Duration::from_millis(100)));
        assert!(!bucket.try_take(now + Duration::from_millis(100)));
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate(&"x".repeat(2000), MAX_NOTE).len(), MAX_NOTE);
    }
}
