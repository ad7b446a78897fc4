//! The broker's Kubernetes calls: the pods it authorizes against, the
//! service-account tokens it exchanges at STS, namespaces (for the optional
//! namespace policy) and the Events that tell an operator why a pod was
//! denied.
//!
//! - [`PodWatch`] keeps a reflector over the opted-in pods of every
//!   namespace (label [`ENABLED_LABEL`]=[`ENABLED_VALUE`]), so a request
//!   costs no API call. A pod's first request can beat the watch, so a miss
//!   reads the pod directly once before answering "no such pod". Once synced,
//!   the cache keeps answering while the API server is unreachable.
//! - [`Cluster`] makes the one-off calls: TokenRequest, namespace get, Event
//!   create.
//!
//! Build their [`Client`] with [`client`]. Every failure is a [`KubeError`],
//! with a stable [`KubeError::label`] for metrics.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::authz::{ENABLED_LABEL, ENABLED_VALUE};

/// `reportingController` of the Events the broker records.
pub const REPORTING_CONTROLLER: &str = "imds-mesh-token-broker";

/// `reason` of a denial Event: what `kubectl get events` shows in its
/// REASON column (CamelCase, as Kubernetes reasons are).
pub const DENIAL_EVENT_REASON: &str = "ImdsCredentialsDenied";

/// `action` of a denial Event (required by `events.k8s.io/v1`).
pub const DENIAL_EVENT_ACTION: &str = "IssueCredentials";

/// A pod denied again for the same reason within this interval gets no new
/// Event. IMDS clients retry fast; one Event per denied request would load
/// the API server and bury the Events an operator is looking for.
pub const DENIAL_EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// Bound on the (pod, reason) pairs remembered for [`DENIAL_EVENT_INTERVAL`].
const MAX_RECENT_DENIALS: usize = 4096;

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

/// The opted-in pods of every namespace, kept current by a reflector task;
/// the task stops when this is dropped.
pub struct PodWatch {
    client: Client,
    store: Store<Pod>,
    task: JoinHandle<()>,
}

impl PodWatch {
    /// Starts watching pods labelled [`ENABLED_LABEL`]=[`ENABLED_VALUE`] in
    /// all namespaces. Must be called within a tokio runtime.
    pub fn spawn(client: Client) -> Self {
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().labels(&format!("{ENABLED_LABEL}={ENABLED_VALUE}"));
        // The watcher relists and rewatches by itself after errors, with
        // backoff; the store keeps its last state meanwhile and is replaced
        // whole once a relist completes.
        let events = watcher(Api::<Pod>::all(client.clone()), config).default_backoff().reflect(writer);
        let task = tokio::spawn(events.for_each(|event| {
            match event {
                Ok(watcher::Event::InitDone) => tracing::info!("pod watch listed all opted-in pods"),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "pod watch failed; serving cached pods while it retries"),
            }
            std::future::ready(())
        }));
        Self { client, store, task }
    }

    /// Whether the initial list has completed (the broker is ready). Stays
    /// true when the API server goes away later: the cache is still used.
    pub fn is_synced(&self) -> bool {
        // The store's own readiness, so this and [`PodWatch::synced`] never
        // disagree.
        self.store.wait_until_ready().now_or_never().is_some_and(|ready| ready.is_ok())
    }

    /// Waits until [`PodWatch::is_synced`].
    pub async fn synced(&self) {
        // Errs only if the reflector task ended, which it does only when
        // this is dropped.
        let _ = self.store.wait_until_ready().await;
    }

    /// The pod `namespace/name` if the watch has delivered it, without any
    /// API call.
    pub fn cached(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }

    /// The pod `namespace/name`: from the cache, or, on a miss, read
    /// directly once (a pod's first request can beat the watch). `None`
    /// when it does not exist. A pod read directly may lack the enabling
    /// label; [`crate::authz::authorize`] says so.
    pub async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Arc<Pod>>, KubeError> {
        if let Some(pod) = self.cached(namespace, name) {
            return Ok(Some(pod));
        }
        // Boxed, `Api` included: this read is the rare path and its future is
        // large (about 1.7 KiB); inline, it would make every caller's future
        // that large, and the server allocates one of those per request.
        let api = Api::<Pod>::namespaced(self.client.clone(), namespace);
        let pod = Box::pin(async move { api.get_opt(name).await }).await?;
        Ok(pod.map(Arc::new))
    }
}

#[cfg(test)]
impl PodWatch {
    /// A watch over `store` (filled by the test), with no task.
    fn over(client: Client, store: Store<Pod>) -> Self {
        Self { client, store, task: tokio::spawn(async {}) }
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The broker's one-off Kubernetes calls.
pub struct Cluster {
    client: Client,
    /// `reportingInstance` of Events: which broker replica saw the denial.
    instance: String,
    /// When each (pod uid, reason) last got an Event.
    recent_denials: Mutex<HashMap<(String, String), tokio::time::Instant>>,
}

impl Cluster {
    /// `instance` names this broker replica in the Events it records (its
    /// pod name, say).
    pub fn new(client: Client, instance: impl Into<String>) -> Self {
        Self { client, instance: instance.into(), recent_denials: Mutex::default() }
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
        let answer = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await?;
        match answer.status {
            Some(status) if !status.token.is_empty() => Ok(SecretToken(status.token)),
            _ => Err(KubeError::NoToken),
        }
    }

    /// The namespace `name`, `None` if it does not exist.
    pub async fn namespace(&self, name: &str) -> Result<Option<Namespace>, KubeError> {
        Ok(Api::<Namespace>::all(self.client.clone()).get_opt(name).await?)
    }

    /// Records a Warning Event on `pod` saying why it was denied
    /// (`reason`, from [`crate::authz::Denial::reason`]). At most one per
    /// pod and reason per [`DENIAL_EVENT_INTERVAL`]. A failure is logged,
    /// never returned: the denial stands either way.
    pub async fn record_denial(&self, pod: &Pod, reason: &str) {
        let uid = pod.uid().unwrap_or_default();
        if !self.first_recent_denial(&uid, reason) {
            return;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let event = self.denial_event(pod, reason);
        let events = Api::<Event>::namespaced(self.client.clone(), &namespace);
        if let Err(error) = events.create(&PostParams::default(), &event).await {
            let error = KubeError::from(error);
            tracing::warn!(
                %error,
                error_label = error.label(),
                pod = pod.name_any(),
                namespace,
                "could not record the denial as a Kubernetes Event"
            );
            // Let the next denial try again.
            self.recent_denials().remove(&(uid, reason.to_owned()));
        }
    }

    /// Whether `reason` for pod `uid` got no Event within
    /// [`DENIAL_EVENT_INTERVAL`]; if so, remembers it now.
    fn first_recent_denial(&self, uid: &str, reason: &str) -> bool {
        let now = tokio::time::Instant::now();
        let mut recent = self.recent_denials();
        let key = (uid.to_owned(), reason.to_owned());
        if recent.get(&key).is_some_and(|at| now.duration_since(*at) < DENIAL_EVENT_INTERVAL) {
            return false;
        }
        if recent.len() >= MAX_RECENT_DENIALS {
            recent.retain(|_, at| now.duration_since(*at) < DENIAL_EVENT_INTERVAL);
            if recent.len() >= MAX_RECENT_DENIALS {
                // A flood of distinct denials: forget them all rather than
                // grow; the worst case is a repeated Event.
                recent.clear();
            }
        }
        recent.insert(key, now);
        true
    }

    fn recent_denials(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), tokio::time::Instant>> {
        // Only plain inserts and removes happen under the lock.
        self.recent_denials.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An `events.k8s.io/v1` Event, as kube-rs's `Recorder` builds them.
    /// Not the `Recorder` itself: it folds repeats by (reason, action,
    /// object) and keeps the first `note`, so a pod denied for a second
    /// reason would show the first one.
    fn denial_event(&self, pod: &Pod, reason: &str) -> Event {
        let now = Timestamp::now();
        let name = pod.name_any();
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: pod.namespace(),
                ..ObjectMeta::default()
            },
            action: Some(DENIAL_EVENT_ACTION.to_owned()),
            event_time: Some(MicroTime(now)),
            note: Some(truncate(reason, MAX_NOTE).to_owned()),
            reason: Some(DENIAL_EVENT_REASON.to_owned()),
            regarding: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(name),
                namespace: pod.namespace(),
                uid: pod.uid(),
                resource_version: pod.resource_version(),
                ..ObjectReference::default()
            }),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some("Warning".to_owned()),
            ..Event::default()
        }
    }
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
                labels: Some(BTreeMap::from([(ENABLED_LABEL.to_owned(), ENABLED_VALUE.to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec { service_account_name: Some(SA.to_owned()), ..PodSpec::default() }),
            ..Pod::default()
        }
    }

    /// A synced store holding `pods`.
    fn synced_store(pods: Vec<Pod>) -> Store<Pod> {
        let mut writer = Writer::default();
        writer.apply_watcher_event(&watcher::Event::Init);
        for pod in pods {
            writer.apply_watcher_event(&watcher::Event::InitApply(pod));
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
        writer.apply_watcher_event(&watcher::Event::InitApply(pod(NS, POD)));
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
        assert_eq!(found.metadata.uid.as_deref(), Some(UID));
        verified(verifier).await;
    }

    #[tokio::test]
    async fn pod_missing_from_the_cache_is_read_directly() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::PodRead);
        // Another pod of the same name elsewhere must not answer.
        let watch = PodWatch::over(client, synced_store(vec![pod("team-b", POD)]));
        let found = watch.pod(NS, POD).await.unwrap().expect("the pod read directly");
        assert_eq!(found.metadata.namespace.as_deref(), Some(NS));
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
        Cluster::new(client, "broker-0").record_denial(&pod(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_denial_within_the_interval_records_one_event() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::OneDenialEvent);
        let cluster = Cluster::new(client, "broker-0");
        cluster.record_denial(&pod(NS, POD), "pod is not enabled").await;
        tokio::time::advance(DENIAL_EVENT_INTERVAL - Duration::from_secs(1)).await;
        cluster.record_denial(&pod(NS, POD), "pod is not enabled").await;
        verified(verifier).await;

        // After the interval, the same denial is recorded again.
        let (client, verifier) = mock_client();
        let cluster = Cluster { client, ..cluster };
        let verifier = verifier.run(Scenario::OneDenialEvent);
        tokio::time::advance(Duration::from_secs(1)).await;
        cluster.record_denial(&pod(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[tokio::test]
    async fn failed_denial_event_is_swallowed_and_retried_on_the_next_denial() {
        let (client, verifier) = mock_client();
        let verifier = verifier.run(Scenario::DenialEventFailsThenSucceeds);
        let cluster = Cluster::new(client, "broker-0");
        cluster.record_denial(&pod(NS, POD), "pod is not enabled").await;
        cluster.record_denial(&pod(NS, POD), "pod is not enabled").await;
        verified(verifier).await;
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate(&"x".repeat(2000), MAX_NOTE).len(), MAX_NOTE);
    }
}
