//! A Kubernetes API endpoint for the broker's tests: the real REST paths and
//! JSON (k8s-openapi types) for what the broker calls, served on loopback.
//! No kube-apiserver can be installed here, so this speaks just enough of
//! its behaviour for kube-rs clients, reflectors and watchers:
//!
//! - pods: list (all namespaces or one), get, and watch (`?watch=true`), with
//!   equality-based `labelSelector` and a few `fieldSelector` fields,
//!   `resourceVersion` (resume after it), `sendInitialEvents` (the streaming
//!   list) and `timeoutSeconds`;
//! - namespaces: get;
//! - `serviceaccounts/{sa}/token` (TokenRequest): RS256 JWTs with the claims
//!   a cluster issues, bound to a pod; the keys are served as JWKS at
//!   `/openid/v1/jwks`, as a cluster's service-account issuer discovery does;
//! - events: create (`v1` and `events.k8s.io/v1`) and merge-patch
//!   (`events.k8s.io/v1`, which kube-rs's `Recorder` uses for a series).
//!
//! Errors are `Status` objects. The harness side adds and deletes pods
//! (watchers see the changes), reads back what was created, and can take
//! the whole API down (503) to test a client that must live on its cache.
//! Service accounts are not modelled: a token is issued for any name the
//! bound pod runs as.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestStatus};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status, StatusDetails, Time, WatchEvent};
use k8s_openapi::jiff::Timestamp;
use rsa::pkcs1v15::SigningKey;
use rsa::pkcs8::EncodePublicKey;
use rsa::rand_core::{OsRng, RngCore};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use token_broker::authz::{ENABLED_LABEL, ENABLED_VALUE, ROLE_ARN_ANNOTATION};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// The `iss` of every token, a cluster's default service-account issuer.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audiences a TokenRequest gets when it names none (the API server's
/// own, as on a default cluster).
pub const DEFAULT_AUDIENCE: &str = ISSUER;
/// `expirationSeconds` when a TokenRequest names none.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest token the API server issues (10 minutes).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// How long a watch stays open when the client names no `timeoutSeconds`
/// (the API server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// One TokenRequest the API answered.
#[derive(Debug, Clone)]
pub struct RecordedTokenRequest {
    pub namespace: String,
    pub service_account: String,
    /// The request as the client sent it.
    pub request: TokenRequest,
    /// The issued JWT.
    pub token: String,
    /// The JWT's claims.
    pub claims: Value,
}

/// One Event created (and possibly patched) through the API.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    /// `v1` or `events.k8s.io/v1`.
    pub api_version: String,
    pub namespace: String,
    /// The stored object, as the API would return it.
    pub object: Value,
}

impl RecordedEvent {
    pub fn name(&self) -> &str {
        self.object["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn reason(&self) -> &str {
        self.object["reason"].as_str().unwrap_or_default()
    }

    /// `Normal` or `Warning`.
    pub fn type_(&self) -> &str {
        self.object["type"].as_str().unwrap_or_default()
    }

    /// `message` (v1) or `note` (events.k8s.io/v1).
    pub fn message(&self) -> &str {
        self.object["message"].as_str().or_else(|| self.object["note"].as_str()).unwrap_or_default()
    }

    /// The object the event is about: `involvedObject` (v1) or `regarding`
    /// (events.k8s.io/v1).
    pub fn regarding(&self) -> &Value {
        match self.object.get("regarding") {
            Some(regarding) => regarding,
            None => &self.object["involvedObject"],
        }
    }
}

/// One request the API received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
}

/// A pod change, as watchers need it: the object before and after.
#[derive(Debug, Clone)]
struct Change {
    resource_version: u64,
    before: Option<Pod>,
    /// `None` when deleted (then `deleted` holds the final object).
    after: Option<Pod>,
    deleted: Option<Pod>,
}

#[derive(Default)]
struct Store {
    resource_version: u64,
    pods: BTreeMap<(String, String), Pod>,
    namespaces: BTreeMap<String, Namespace>,
    /// Every pod change, so a watch can resume from any resourceVersion.
    history: Vec<Change>,
    events: Vec<RecordedEvent>,
    token_requests: Vec<RecordedTokenRequest>,
    requests: Vec<ApiRequest>,
}

impl Store {
    fn next_resource_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    down: watch::Sender<bool>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock already fails the test; the data
        // stays usable for the logs.
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running Kubernetes API endpoint; stopped on drop.
pub struct KubeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl KubeApi {
    /// Starts the API on a free loopback port, with the `default`
    /// namespace.
    pub async fn start() -> Self {
        // Generate the signing key before serving, so the first
        // TokenRequest is not slowed by it.
        let _ = keys();
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind kube api: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (changes, _) = broadcast::channel(1024);
        let (down, _) = watch::channel(false);
        let shared = Arc::new(Shared { store: Mutex::new(Store::default()), changes, down });
        let app = Router::new()
            .route("/api/v1/pods", get(list_all_pods))
            .route("/api/v1/namespaces/{ns}/pods", get(list_namespaced_pods))
            .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
            .route("/api/v1/namespaces/{name}", get(get_namespace))
            .route("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token", post(create_token))
            .route("/api/v1/namespaces/{ns}/events", post(create_core_event))
            .route("/apis/events.k8s.io/v1/namespaces/{ns}/events", post(create_events_event))
            .route("/apis/events.k8s.io/v1/namespaces/{ns}/events/{name}", patch(patch_events_event))
            .route("/openid/v1/jwks", get(|| async { json_response(StatusCode::OK, &jwks()) }))
            .route("/.well-known/openid-configuration", get(openid_configuration))
            .fallback(|| async {
                status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource", None)
            })
            .layer(middleware::from_fn_with_state(Arc::clone(&shared), record_and_gate))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let api = Self { addr, shared, task };
        api.add_namespace(namespace("default"));
        api
    }

    /// `http://127.0.0.1:<port>`: the cluster URL for a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a pod, or replaces the one with the same namespace and name
    /// (watchers see ADDED or MODIFIED). Fills in what the API server sets:
    /// uid (unless given), creationTimestamp, resourceVersion; returns the
    /// stored pod.
    pub fn add_pod(&self, mut pod: Pod) -> Pod {
        let mut store = self.shared.store();
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_else(|| panic!("add_pod: the pod has no name"));
        let key = (namespace.clone(), name);
        let before = store.pods.get(&key).cloned();
        pod.metadata.namespace = Some(namespace);
        if pod.metadata.uid.is_none() {
            pod.metadata.uid = Some(before.as_ref().and_then(|p| p.metadata.uid.clone()).unwrap_or_else(uid));
        }
        if pod.metadata.creation_timestamp.is_none() {
            pod.metadata.creation_timestamp = Some(now());
        }
        let resource_version = store.next_resource_version();
        pod.metadata.resource_version = Some(resource_version);
        store.pods.insert(key, pod.clone());
        let change =
            Change { resource_version: store.resource_version, before, after: Some(pod.clone()), deleted: None };
        store.history.push(change.clone());
        // Sent under the lock, so a watch that snapshots under it misses
        // nothing and sees nothing twice.
        let _ = self.shared.changes.send(change);
        pod
    }

    /// Deletes a pod (watchers see DELETED); false if there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let mut store = self.shared.store();
        let Some(mut pod) = store.pods.remove(&(namespace.to_owned(), name.to_owned())) else {
            return false;
        };
        let before = Some(pod.clone());
        pod.metadata.resource_version = Some(store.next_resource_version());
        let change = Change { resource_version: store.resource_version, before, after: None, deleted: Some(pod) };
        store.history.push(change.clone());
        let _ = self.shared.changes.send(change);
        true
    }

    /// Adds or replaces a namespace.
    pub fn add_namespace(&self, mut namespace: Namespace) {
        let mut store = self.shared.store();
        let name = namespace.metadata.name.clone().unwrap_or_else(|| panic!("add_namespace: no name"));
        namespace.metadata.uid.get_or_insert_with(uid);
        namespace.metadata.creation_timestamp.get_or_insert_with(now);
        namespace.metadata.resource_version = Some(store.next_resource_version());
        store.namespaces.insert(name, namespace);
    }

    /// Events created so far, in order (patches applied).
    pub fn events(&self) -> Vec<RecordedEvent> {
        self.shared.store().events.clone()
    }

    /// TokenRequests answered so far, in order (refused ones are not
    /// counted).
    pub fn token_requests(&self) -> Vec<RecordedTokenRequest> {
        self.shared.store().token_requests.clone()
    }

    pub fn token_request_count(&self) -> usize {
        self.shared.store().token_requests.len()
    }

    /// Every request received, in order (including refused ones).
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.store().requests.clone()
    }

    /// When `down`, every request is answered 503 and open watches are
    /// closed, as when the API server is unreachable behind its load
    /// balancer.
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// The current resourceVersion (of the last change).
    pub fn resource_version(&self) -> String {
        self.shared.store().resource_version.to_string()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
        // Ends the open watch streams too.
        self.shared.down.send_replace(true);
    }
}

/// A pod `namespace/name` running as `service_account`, opted in (the
/// enable label `True`) and annotated with `role_arn`.
pub fn enabled_pod(namespace: &str, name: &str, service_account: &str, role_arn: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(ENABLED_LABEL.to_owned(), ENABLED_VALUE.to_owned())])),
            annotations: Some(BTreeMap::from([(ROLE_ARN_ANNOTATION.to_owned(), role_arn.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { service_account_name: Some(service_account.into()), ..PodSpec::default() }),
        ..Pod::default()
    }
}

/// A namespace object named `name`.
pub fn namespace(name: &str) -> Namespace {
    Namespace { metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() }, ..Namespace::default() }
}

/// The public key the API signs tokens with.
pub fn public_key() -> RsaPublicKey {
    keys().private.to_public_key()
}

/// The signing key as a JWKS document (what `/openid/v1/jwks` serves).
pub fn jwks() -> Value {
    let keys = keys();
    let public = keys.private.to_public_key();
    json!({ "keys": [{
        "use": "sig",
        "kty": "RSA",
        "kid": keys.kid,
        "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    }]})
}

/// The claims of a token this API issued, if its RS256 signature verifies
/// against [`public_key`]. Checks nothing else (not `exp`, not `aud`).
pub fn verify_token(token: &str) -> Option<Value> {
    use rsa::signature::Verifier;
    let (signed, signature) = token.rsplit_once('.')?;
    let (_, payload) = signed.split_once('.')?;
    let signature = rsa::pkcs1v15::Signature::try_from(URL_SAFE_NO_PAD.decode(signature).ok()?.as_slice()).ok()?;
    rsa::pkcs1v15::VerifyingKey::<Sha256>::new(public_key()).verify(signed.as_bytes(), &signature).ok()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

struct Keys {
    private: RsaPrivateKey,
    kid: String,
}

/// One 2048-bit key per process: generating it is the slow part.
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let private = RsaPrivateKey::new(&mut OsRng, 2048).unwrap_or_else(|e| panic!("generate RSA key: {e}"));
        // As the API server names its keys: the SHA-256 of the public key's
        // DER (SubjectPublicKeyInfo), base64url.
        let der = private.to_public_key().to_public_key_der().unwrap_or_else(|e| panic!("encode RSA key: {e}"));
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(der.as_bytes()));
        Keys { private, kid }
    })
}

fn sign_jwt(claims: &Value) -> String {
    let keys = keys();
    let header = json!({ "alg": "RS256", "kid": keys.kid });
    let signed =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = SigningKey::<Sha256>::new(keys.private.clone()).sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// Records each request, then answers 503 for all of them while down.
async fn record_and_gate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let uri = request.uri().path_and_query().map(ToString::to_string).unwrap_or_default();
    shared.store().requests.push(ApiRequest { method: request.method().to_string(), uri });
    if *shared.down.borrow() {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
            None,
        );
    }
    next.run(request).await
}

/// The list and watch query parameters kube-rs sends.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    watch: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    resource_version: Option<String>,
    timeout_seconds: Option<String>,
    send_initial_events: Option<String>,
}

async fn list_all_pods(State(shared): State<Arc<Shared>>, Query(query): Query<ListQuery>) -> Response {
    pods(&shared, None, query)
}

async fn list_namespaced_pods(
    State(shared): State<Arc<Shared>>,
    Path(ns): Path<String>,
    Query(query): Query<ListQuery>,
) -> Response {
    pods(&shared, Some(ns), query)
}

/// What a list or watch selects: namespace, labels, fields.
struct Selection {
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selection {
    fn matches(&self, pod: &Pod) -> bool {
        let namespace_ok = self.namespace.as_deref().is_none_or(|ns| pod.metadata.namespace.as_deref() == Some(ns));
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        namespace_ok
            && self.labels.iter().all(|r| r.matches(labels.get(&r.key).map(String::as_str)))
            && self.fields.iter().all(|r| r.matches(pod_field(pod, &r.key).as_deref()))
    }
}

/// One selector term: `key=value`, `key==value`, `key!=value`, `key`, `!key`.
struct Requirement {
    key: String,
    op: Op,
}

enum Op {
    Equals(String),
    NotEquals(String),
    Exists,
    DoesNotExist,
}

impl Requirement {
    fn matches(&self, value: Option<&str>) -> bool {
        match &self.op {
            Op::Equals(want) => value == Some(want.as_str()),
            Op::NotEquals(want) => value != Some(want.as_str()),
            Op::Exists => value.is_some(),
            Op::DoesNotExist => value.is_none(),
        }
    }
}

/// Parses an equality-based selector; set-based terms (`in`, `notin`) are
/// refused rather than misread.
fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut requirements = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some((key, value)) = term.split_once("!=") {
            Requirement { key: key.trim().into(), op: Op::NotEquals(value.trim().into()) }
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement { key: key.trim().into(), op: Op::Equals(value.trim().into()) }
        } else if let Some(key) = term.strip_prefix('!') {
            Requirement { key: key.trim().into(), op: Op::DoesNotExist }
        } else if term.contains([' ', '(', ')']) {
            return Err(format!("unsupported selector term {term:?}: only equality-based selectors are served here"));
        } else {
            Requirement { key: term.into(), op: Op::Exists }
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// The pod fields the API server allows in a `fieldSelector` that the
/// harness serves.
fn pod_field(pod: &Pod, field: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    match field {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "status.phase" => pod.status.as_ref().and_then(|s| s.phase.clone()),
        _ => None,
    }
}

const FIELDS: [&str; 5] =
    ["metadata.name", "metadata.namespace", "spec.serviceAccountName", "spec.nodeName", "status.phase"];

fn pods(shared: &Arc<Shared>, namespace: Option<String>, query: ListQuery) -> Response {
    let labels = match parse_selector(query.label_selector.as_deref().unwrap_or_default()) {
        Ok(labels) => labels,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message, None),
    };
    let fields = match parse_selector(query.field_selector.as_deref().unwrap_or_default()) {
        Ok(fields) => fields,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message, None),
    };
    if let Some(field) = fields.iter().find(|f| !FIELDS.contains(&f.key.as_str())) {
        let message = format!("field label not supported: {}", field.key);
        return status(StatusCode::BAD_REQUEST, "BadRequest", &message, None);
    }
    let selection = Selection { namespace, labels, fields };
    if matches!(query.watch.as_deref(), Some("true" | "1")) {
        return watch_pods(shared, selection, &query);
    }
    let store = shared.store();
    let items: Vec<Pod> = store.pods.values().filter(|p| selection.matches(p)).cloned().collect();
    let list = k8s_openapi::List::<Pod> {
        items,
        metadata: ListMeta { resource_version: Some(store.resource_version.to_string()), ..ListMeta::default() },
    };
    json_response(StatusCode::OK, &list)
}

/// A watch: newline-delimited `WatchEvent`s on a chunked response that
/// stays open until `timeoutSeconds`, the client leaves, or the API goes
/// down.
fn watch_pods(shared: &Arc<Shared>, selection: Selection, query: &ListQuery) -> Response {
    let timeout = match query.timeout_seconds.as_deref().map(str::parse::<u64>) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(seconds)) => Duration::from_secs(seconds),
        Some(Err(_)) => return status(StatusCode::BAD_REQUEST, "BadRequest", "timeoutSeconds: not a number", None),
    };
    let streaming_list = query.send_initial_events.as_deref() == Some("true");
    let since = match query.resource_version.as_deref() {
        // Unset or "0": "start at most recent" (or any): synthetic ADDED
        // events for what exists, then changes. The streaming list does the
        // same and ends its initial events with a bookmark.
        None | Some("" | "0") => None,
        _ if streaming_list => None,
        Some(version) => match version.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => {
                let message = format!("invalid resource version {version:?}");
                return status(StatusCode::BAD_REQUEST, "BadRequest", &message, None);
            }
        },
    };
    let mut initial = Vec::new();
    let mut changes = {
        let store = shared.store();
        match since {
            None => {
                for pod in store.pods.values().filter(|p| selection.matches(p)) {
                    initial.push(line(&WatchEvent::Added(pod.clone())));
                }
            }
            Some(version) => {
                for change in store.history.iter().filter(|c| c.resource_version > version) {
                    initial.extend(event_for(&selection, change));
                }
            }
        }
        if streaming_list {
            initial.push(bookmark(store.resource_version, true));
        }
        shared.changes.subscribe()
    };
    let mut down = shared.down.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        for event in initial {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let change = tokio::select! {
                change = changes.recv() => change,
                () = &mut deadline => return,
                _ = down.wait_for(|down| *down) => return,
                () = tx.closed() => return,
            };
            let event = match change {
                Ok(change) => event_for(&selection, &change),
                // As the API server does when a watcher falls too far
                // behind: 410 Gone, and the client lists again.
                Err(broadcast::error::RecvError::Lagged(_)) => Some(line(&WatchEvent::<Pod>::ErrorStatus(
                    status_object(410, "Expired", "too old resource version", None),
                ))),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if let Some(event) = event
                && tx.send(event).await.is_err()
            {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The event a watcher with `selection` sees for `change`, if any: like the
/// API server, an object that starts or stops matching the selector is
/// ADDED or DELETED for that watcher.
fn event_for(selection: &Selection, change: &Change) -> Option<Bytes> {
    let was = change.before.as_ref().is_some_and(|p| selection.matches(p));
    match (&change.after, &change.deleted) {
        (Some(pod), _) => match (was, selection.matches(pod)) {
            (false, true) => Some(line(&WatchEvent::Added(pod.clone()))),
            (true, true) => Some(line(&WatchEvent::Modified(pod.clone()))),
            (true, false) => Some(line(&WatchEvent::Deleted(pod.clone()))),
            (false, false) => None,
        },
        (None, Some(pod)) if was => Some(line(&WatchEvent::Deleted(pod.clone()))),
        _ => None,
    }
}

fn line<T: serde::Serialize>(event: &WatchEvent<T>) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A BOOKMARK for pods. Built by hand: k8s-openapi serializes a bookmark
/// without `kind`/`apiVersion`, which the API server sends and kube-rs
/// requires.
fn bookmark(resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut annotations = serde_json::Map::new();
    if initial_events_end {
        annotations.insert("k8s.io/initial-events-end".into(), "true".into());
    }
    let event = json!({
        "type": "BOOKMARK",
        "object": {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": resource_version.to_string(), "annotations": annotations },
        },
    });
    let mut bytes = serde_json::to_vec(&event).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

async fn get_pod(State(shared): State<Arc<Shared>>, Path((ns, name)): Path<(String, String)>) -> Response {
    let pod = shared.store().pods.get(&(ns, name.clone())).cloned();
    match pod {
        Some(pod) => json_response(StatusCode::OK, &pod),
        None => not_found("pods", &name),
    }
}

async fn get_namespace(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let namespace = shared.store().namespaces.get(&name).cloned();
    match namespace {
        Some(namespace) => json_response(StatusCode::OK, &namespace),
        None => not_found("namespaces", &name),
    }
}

/// TokenRequest, with the checks the API server makes for a pod-bound
/// token (`pkg/registry/core/serviceaccount/storage/token.go`).
async fn create_token(
    State(shared): State<Arc<Shared>>,
    Path((ns, sa)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid TokenRequest: {e}"), None),
    };
    let received = request.clone();
    let expiration = request.spec.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    if expiration < MIN_EXPIRATION_SECONDS {
        let message = format!(
            "TokenRequest.authentication.k8s.io \"{sa}\" is invalid: spec.expirationSeconds: Invalid value: {expiration}: may not specify a duration less than 10 minutes"
        );
        return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message, None);
    }
    if request.spec.audiences.is_empty() {
        request.spec.audiences = vec![DEFAULT_AUDIENCE.to_owned()];
    }
    request.spec.expiration_seconds = Some(expiration);

    let mut store = shared.store();
    let mut pod_claim = None;
    if let Some(bound) = &request.spec.bound_object_ref {
        if bound.kind.as_deref() != Some("Pod") {
            let message = format!("cannot bind token to object of kind {:?}: only Pod is served here", bound.kind);
            return status(StatusCode::BAD_REQUEST, "BadRequest", &message, None);
        }
        let Some(pod) = store.pods.get(&(ns.clone(), bound.name.clone().unwrap_or_default())) else {
            return not_found("pods", bound.name.as_deref().unwrap_or_default());
        };
        let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
        if let Some(uid) = &bound.uid
            && *uid != pod_uid
        {
            let message = format!(
                "the UID in the bound object reference ({uid}) does not match the UID in record. The object might have been deleted and then recreated"
            );
            return status(StatusCode::CONFLICT, "Conflict", &message, None);
        }
        let runs_as = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).unwrap_or("default");
        if runs_as != sa {
            let message = format!(
                "cannot bind token for serviceaccount {sa:?} to pod running with different serviceaccount name."
            );
            return status(StatusCode::BAD_REQUEST, "BadRequest", &message, None);
        }
        pod_claim = Some(json!({ "name": pod.metadata.name, "uid": pod_uid }));
    }

    let issued_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let exp = issued_at + u64::try_from(expiration).unwrap_or_default();
    let mut kubernetes = json!({
        "namespace": ns,
        "serviceaccount": { "name": sa, "uid": service_account_uid(&ns, &sa) },
    });
    if let Some(pod) = pod_claim {
        kubernetes["pod"] = pod;
    }
    let claims = json!({
        "aud": request.spec.audiences,
        "exp": exp,
        "iat": issued_at,
        "nbf": issued_at,
        "iss": ISSUER,
        "jti": uid(),
        "kubernetes.io": kubernetes,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
    });
    let token = sign_jwt(&claims);
    let expires_at = Timestamp::from_second(i64::try_from(exp).unwrap_or_default()).map(Time).unwrap_or_else(|_| now());
    request.metadata.name = Some(sa.clone());
    request.metadata.namespace = Some(ns.clone());
    request.metadata.creation_timestamp = Some(now());
    request.status = Some(TokenRequestStatus { token: token.clone(), expiration_timestamp: expires_at });
    store.token_requests.push(RecordedTokenRequest {
        namespace: ns,
        service_account: sa,
        request: received,
        token,
        claims,
    });
    json_response(StatusCode::CREATED, &request)
}

/// A stable uid per service account (they are not modelled as objects).
fn service_account_uid(namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("serviceaccount/{namespace}/{name}"));
    format_uuid(&digest[..16])
}

async fn create_core_event(State(shared): State<Arc<Shared>>, Path(ns): Path<String>, body: Bytes) -> Response {
    create_event::<k8s_openapi::api::core::v1::Event>(&shared, "v1", ns, &body)
}

async fn create_events_event(State(shared): State<Arc<Shared>>, Path(ns): Path<String>, body: Bytes) -> Response {
    create_event::<k8s_openapi::api::events::v1::Event>(&shared, "events.k8s.io/v1", ns, &body)
}

/// Creates an Event of type `E` (parsed as that type, so a malformed one is
/// refused as the API server would), as `201 Created`.
fn create_event<E>(shared: &Shared, api_version: &str, ns: String, body: &[u8]) -> Response
where
    E: serde::de::DeserializeOwned + serde::Serialize + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    let mut event: E = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid Event: {e}"), None),
    };
    let mut store = shared.store();
    let metadata = event.metadata_mut();
    if metadata.namespace.as_ref().is_some_and(|n| *n != ns) {
        let message = "the namespace of the provided object does not match the namespace sent on the request";
        return status(StatusCode::BAD_REQUEST, "BadRequest", message, None);
    }
    metadata.namespace = Some(ns.clone());
    let name = match (&metadata.name, &metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => name.clone(),
        (_, Some(prefix)) => format!("{prefix}{}", &uid()[..5]),
        _ => return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value", None),
    };
    if store.events.iter().any(|e| e.namespace == ns && e.api_version == api_version && e.name() == name) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("events {name:?} already exists"),
            Some(details("events", &name)),
        );
    }
    metadata.name = Some(name);
    metadata.uid = Some(uid());
    metadata.creation_timestamp = Some(now());
    metadata.resource_version = Some(store.next_resource_version());
    let object = serde_json::to_value(&event).unwrap_or_default();
    store.events.push(RecordedEvent { api_version: api_version.to_owned(), namespace: ns, object: object.clone() });
    json_response(StatusCode::CREATED, &object)
}

/// A merge patch of an `events.k8s.io/v1` Event (kube-rs's `Recorder`
/// patches `series` this way when an event repeats).
async fn patch_events_event(
    State(shared): State<Arc<Shared>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("invalid patch: {e}"), None),
    };
    let mut store = shared.store();
    let resource_version = store.next_resource_version();
    let Some(event) =
        store.events.iter_mut().find(|e| e.namespace == ns && e.api_version == "events.k8s.io/v1" && e.name() == name)
    else {
        return not_found("events.events.k8s.io", &name);
    };
    merge_patch(&mut event.object, &patch);
    event.object["metadata"]["resourceVersion"] = Value::from(resource_version);
    json_response(StatusCode::OK, &event.object)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

async fn openid_configuration(State(_): State<Arc<Shared>>, request: Request) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1").to_owned();
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": ISSUER,
            "jwks_uri": format!("http://{host}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        }),
    )
}

fn json_response<T: serde::Serialize>(code: StatusCode, body: &T) -> Response {
    let body = serde_json::to_vec(body).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn details(kind: &str, name: &str) -> StatusDetails {
    StatusDetails { kind: Some(kind.to_owned()), name: Some(name.to_owned()), ..StatusDetails::default() }
}

fn not_found(kind: &str, name: &str) -> Response {
    let message = format!("{kind} {name:?} not found");
    status(StatusCode::NOT_FOUND, "NotFound", &message, Some(details(kind, name)))
}

fn status_object(code: u16, reason: &str, message: &str, details: Option<StatusDetails>) -> Status {
    Status {
        code: Some(i32::from(code)),
        details,
        message: Some(message.to_owned()),
        metadata: ListMeta::default(),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
    }
}

/// A failure as the API server sends it: a `Status` object.
fn status(code: StatusCode, reason: &str, message: &str, details: Option<StatusDetails>) -> Response {
    json_response(code, &status_object(code.as_u16(), reason, message, details))
}

/// The current time, as object timestamps carry it (k8s-openapi's jiff is
/// built without a clock).
fn now() -> Time {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or_default();
    Time(Timestamp::from_second(seconds).unwrap_or_default())
}

/// A random (v4) UUID, as the API server assigns to objects.
fn uid() -> String {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format_uuid(&bytes)
}

fn format_uuid(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}
