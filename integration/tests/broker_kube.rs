//! The broker's Kubernetes client (`token_broker::kube`, kube-rs) against a
//! real Kubernetes API server (etcd and kube-apiserver on loopback), as the
//! broker's own service account with the RBAC `mesh-config` renders: the pod
//! reflector, the direct read on a miss, life on the cache while the API
//! server is down, the namespace watch, TokenRequest and denial Events.
//! What the broker asked for comes from the server's audit log.

use imds_filter::config::ENABLE_LABEL;
use integration::kube_cluster::{self, BROKER_USER, KubeCluster};
use integration::{ROLE_ARN, Sts, wait};
use k8s_openapi::api::core::v1::Pod;
use mesh_config::render::{BROKER, Options};
use serde_json::json;
use token_broker::authz::{NamespacePolicy, PodFacts};
use token_broker::kube::{Cluster, DENIAL_EVENT_REASON, KubeError, NamespaceWatch, PodWatch, REPORTING_CONTROLLER};

const NS: &str = "default";
const SA: &str = "app";
const AUDIENCE: &str = "sts.amazonaws.com";
/// The namespace annotation of the broker's namespace policy (which also
/// grants it `list` and `watch namespaces`).
const POLICY_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// The broker's client, as the broker's service account with the rendered
/// RBAC for `options`.
async fn client_with(cluster: &KubeCluster, options: &Options) -> kube::Client {
    token_broker::kube::client(cluster.broker_config(options).await).unwrap_or_else(|e| panic!("kube client: {e}"))
}

async fn client(cluster: &KubeCluster) -> kube::Client {
    client_with(cluster, &Options::default()).await
}

/// A pod running as [`SA`], opted in unless `enabled` is false.
fn pod(name: &str, enabled: bool) -> Pod {
    let mut pod = kube_cluster::enabled_pod(NS, name, SA, ROLE_ARN);
    if !enabled {
        pod.metadata.labels.get_or_insert_default().remove(ENABLE_LABEL);
    }
    pod
}

/// A pod watch as the broker, synced.
async fn synced_watch(cluster: &KubeCluster) -> PodWatch {
    let watch = PodWatch::spawn(client(cluster).await);
    tokio::time::timeout(wait::PATIENCE, watch.synced()).await.unwrap_or_else(|_| panic!("the pod watch never synced"));
    assert!(watch.is_synced());
    watch
}

/// The broker's direct reads of the pod `name` (not lists or watches).
fn direct_reads(cluster: &KubeCluster, name: &str) -> usize {
    let path = format!("/api/v1/namespaces/{NS}/pods/{name}");
    cluster.requests(BROKER_USER).iter().filter(|uri| uri.split('?').next() == Some(path.as_str())).count()
}

/// [`direct_reads`] once the audit log shows at least one.
async fn logged_direct_reads(cluster: &KubeCluster, name: &str) -> usize {
    wait::until(&format!("a direct read of {name} in the audit log"), || {
        let reads = direct_reads(cluster, name);
        async move { (reads > 0).then_some(reads) }
    })
    .await
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_else(|| panic!("pod without uid"))
}

fn label<T>(result: Result<T, KubeError>) -> Option<&'static str> {
    result.err().map(|e| e.label())
}

#[tokio::test]
async fn reflector_syncs_and_sees_a_pod_added_later() {
    let cluster = KubeCluster::start().await;
    let before = cluster.add_pod(pod("before", true)).await;
    cluster.add_pod(pod("not-opted-in", false)).await;
    let watch = synced_watch(&cluster).await;

    let cached = watch.cached(NS, "before").unwrap_or_else(|| panic!("the listed pod is not cached"));
    assert_eq!(Some(&cached.uid), before.metadata.uid.as_ref());
    assert!(watch.cached(NS, "not-opted-in").is_none(), "the label selector let an unlabelled pod in");
    // Only opted-in pods are listed, from every namespace.
    let requests = cluster.requests(BROKER_USER);
    let list = requests.iter().find(|uri| uri.starts_with("/api/v1/pods?"));
    let list = list.unwrap_or_else(|| panic!("no pod list across namespaces: {requests:?}"));
    assert!(list.contains("labelSelector=gkemulticloud.googleapis.com%2Faws-imds-emulator-enabled%3DTrue"), "{list}");

    let later = cluster.add_pod(pod("later", true)).await;
    let cached = wait::until("the watch to deliver the later pod", || async { watch.cached(NS, "later") }).await;
    assert_eq!(Some(&cached.uid), later.metadata.uid.as_ref());
    assert_eq!(watch.pod(NS, "later").await.ok().flatten().map(|p| p.uid.clone()).as_deref(), Some(uid(&later)));
    assert_eq!(direct_reads(&cluster, "later"), 0, "a cached pod was read directly");

    cluster.delete_pod(NS, "before").await;
    wait::until("the watch to drop the deleted pod", || async { watch.cached(NS, "before").is_none().then_some(()) })
        .await;
}

#[tokio::test]
async fn watch_is_not_synced_until_the_initial_list_succeeds() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("app", true)).await;
    // The broker's rendered identity, less `list pods`: the initial list is
    // refused. (A refusal, not an outage: a refused connection leaves no
    // trace in the audit log, so a test could not tell the list was tried.)
    let options = Options::default();
    let identity = kube_cluster::broker_identity(&options);
    let mut without_list = identity.clone();
    for rule in without_list.iter_mut().filter_map(|o| o.get_mut("rules")).filter_map(|r| r.as_array_mut()).flatten() {
        if rule["resources"] == json!(["pods"]) {
            rule["verbs"] = json!(["get", "watch"]);
        }
    }
    cluster.apply(&without_list).await;
    let token = cluster.token(&options.namespace, BROKER).await;
    let client = token_broker::kube::client(cluster.config(&token)).unwrap_or_else(|e| panic!("{e}"));
    let watch = PodWatch::spawn(client);
    wait::until("the reflector's list to be refused", || {
        let refused = cluster.refusals(BROKER_USER).iter().any(|call| call == "list pods");
        async move { refused.then_some(()) }
    })
    .await;
    assert!(!watch.is_synced(), "synced without a list");

    // The rule granted again: the reflector's next list succeeds.
    cluster.apply(&identity).await;
    tokio::time::timeout(wait::PATIENCE, watch.synced()).await.unwrap_or_else(|_| panic!("never synced"));
    assert!(watch.is_synced());
    assert!(watch.cached(NS, "app").is_some());
}

#[tokio::test]
async fn pod_the_watch_has_not_delivered_is_read_directly() {
    let cluster = KubeCluster::start().await;
    let watch = synced_watch(&cluster).await;
    // Not opted in, so the watch never delivers it; only a direct read
    // finds it (and authorization then names the missing label).
    let stored = cluster.add_pod(pod("unlabelled", false)).await;

    let found = watch.pod(NS, "unlabelled").await.unwrap_or_else(|e| panic!("{e}"));
    let found = found.unwrap_or_else(|| panic!("the pod was not read directly"));
    assert_eq!(found.uid, uid(&stored));
    assert_eq!(logged_direct_reads(&cluster, "unlabelled").await, 1);

    assert!(watch.pod(NS, "absent").await.unwrap_or_else(|e| panic!("{e}")).is_none());
    assert_eq!(logged_direct_reads(&cluster, "absent").await, 1, "a missing pod is read once per lookup");
}

#[tokio::test]
async fn cached_pods_are_served_while_the_api_is_down() {
    let mut cluster = KubeCluster::start().await;
    let stored = cluster.add_pod(pod("app", true)).await;
    let watch = synced_watch(&cluster).await;

    // The API server is gone, and its watch connection with it.
    cluster.stop_apiserver();
    // A miss needs the API, and says it is unavailable.
    let error = watch.pod(NS, "other").await.err().unwrap_or_else(|| panic!("a miss succeeded while down"));
    assert_eq!(error.label(), "api_unavailable", "{error}");

    // A cached pod is served (a direct read would have failed).
    let found = watch.pod(NS, "app").await.unwrap_or_else(|e| panic!("a cached pod failed while down: {e}"));
    assert_eq!(found.map(|p| p.uid.clone()).as_deref(), Some(uid(&stored)));
    assert!(watch.is_synced(), "a synced watch stays synced while the API is down");

    // Back up: the reflector lists or watches again and is current.
    cluster.start_apiserver().await;
    cluster.add_pod(pod("after-outage", true)).await;
    wait::until("the watch to recover", || async { watch.cached(NS, "after-outage") }).await;
}

#[tokio::test]
async fn token_is_a_jwt_for_the_service_account_bound_to_the_pod() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let stored = cluster.add_pod(pod("app", true)).await;
    let broker = Cluster::new(client(&cluster).await, "broker-0");

    let token = broker.token(NS, SA, "app", uid(&stored), AUDIENCE, 3600).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{token:?}").contains(token.expose()), "Debug shows the token");
    // What the API server granted, as its audit log has it.
    let granted = cluster.token_requests(BROKER_USER);
    let [spec] = &granted[..] else { panic!("{granted:?}") };
    assert_eq!(spec.audiences, [AUDIENCE]);
    assert_eq!(spec.expiration_seconds, Some(3600));
    // The token, as STS verifies it (signature, issuer, audience, expiry,
    // and the cluster's TokenReview).
    let reply = sts.assume_role_with_web_identity(ROLE_ARN, "app", token.expose()).await;
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    let seen = sts.seen();
    let [claims] = &seen.accepted[..] else { panic!("{seen:?}") };
    assert_eq!(claims["sub"], format!("system:serviceaccount:{NS}:{SA}"));
    assert_eq!(claims["aud"], json!([AUDIENCE]));
    assert_eq!(claims["iss"], kube_cluster::ISSUER);
    assert_eq!(claims["kubernetes.io"]["namespace"], NS);
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], SA);
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "app");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid(&stored));
    assert_eq!(claims["exp"].as_u64().zip(claims["iat"].as_u64()).map(|(exp, iat)| exp - iat), Some(3600));
}

#[tokio::test]
async fn token_refusals_carry_their_meaning() {
    let mut cluster = KubeCluster::start().await;
    let stored = cluster.add_pod(pod("app", true)).await;
    cluster.service_account(NS, "other").await;
    let broker = Cluster::new(client(&cluster).await, "broker-0");
    let token = |account: &'static str, pod: &'static str, uid: &str, lifetime: i64| {
        let uid = uid.to_owned();
        let broker = &broker;
        async move { broker.token(NS, account, pod, &uid, AUDIENCE, lifetime).await }
    };

    // The pod was deleted and recreated: its uid changed.
    assert_eq!(label(token(SA, "app", "00000000-0000-4000-8000-000000000000", 3600).await), Some("conflict"));
    assert_eq!(label(token(SA, "gone", uid(&stored), 3600).await), Some("not_found"));
    // The pod runs as another service account.
    assert_eq!(label(token("other", "app", uid(&stored), 3600).await), Some("rejected"));
    // A service account that does not exist.
    assert_eq!(label(token("absent", "app", uid(&stored), 3600).await), Some("not_found"));
    // Under the 10-minute minimum.
    assert_eq!(label(token(SA, "app", uid(&stored), 599).await), Some("rejected"));
    let granted = cluster.token_requests(BROKER_USER);
    assert!(granted.is_empty(), "{granted:?}");

    // Down: the call fails at once, nothing granted. (A stopped server
    // refuses the connection; that a 503 is not retried is shown by the
    // tower-test unit tests in token-broker/src/kube.rs.)
    cluster.stop_apiserver();
    let down = tokio::time::timeout(wait::PATIENCE, token(SA, "app", uid(&stored), 3600)).await;
    let down = down.unwrap_or_else(|_| panic!("the TokenRequest hung while the API server was down"));
    assert_eq!(label(down), Some("api_unavailable"));
    let granted = cluster.token_requests(BROKER_USER);
    assert!(granted.is_empty(), "{granted:?}");
}

#[tokio::test]
async fn namespace_watch_keeps_each_namespaces_policy_and_follows_changes() {
    let cluster = KubeCluster::start().await;
    let annotated = |pattern: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": "team-a", "annotations": { POLICY_ANNOTATION: pattern } },
        })
    };
    cluster.apply(&[annotated(ROLE_ARN)]).await;
    let options = Options { namespace_policy_annotation: Some(POLICY_ANNOTATION.into()), ..Options::default() };
    let policy = NamespacePolicy { annotation: POLICY_ANNOTATION.into() };
    let watch = NamespaceWatch::spawn(client_with(&cluster, &options).await, policy);
    tokio::time::timeout(wait::PATIENCE, watch.synced()).await.unwrap_or_else(|_| panic!("never synced"));

    let team_a = watch.get("team-a").unwrap_or_else(|| panic!("team-a not listed"));
    assert_eq!(team_a.check(ROLE_ARN), Ok(()));
    assert!(watch.get("absent").is_none());
    // Every namespace, with or without the annotation.
    let default = watch.get(NS).unwrap_or_else(|| panic!("default not listed"));
    assert_eq!(default.check(ROLE_ARN).map_err(|d| d.label()), Err("no_namespace_policy"));

    let other = "arn:aws:iam::123456789012:role/other";
    cluster.apply(&[annotated(other)]).await;
    wait::until("the watch to deliver the new policy", || async {
        watch.get("team-a").filter(|ns| ns.check(other).is_ok()).map(drop)
    })
    .await;
    // Only list and watch: never a read per namespace.
    let requests = cluster.requests(BROKER_USER);
    assert!(requests.iter().all(|uri| !uri.starts_with("/api/v1/namespaces/team-a")), "{requests:?}");
    assert!(requests.iter().any(|uri| uri.starts_with("/api/v1/namespaces?")), "{requests:?}");
}

/// The Events the broker recorded in [`NS`] (the API server records some
/// of its own there, e.g. when it repairs the `kubernetes` Service's IP).
async fn broker_events(cluster: &KubeCluster) -> Vec<k8s_openapi::api::events::v1::Event> {
    let events = cluster.events(NS).await.into_iter();
    events.filter(|e| e.reporting_controller.as_deref() == Some(REPORTING_CONTROLLER)).collect()
}

#[tokio::test]
async fn denial_is_recorded_as_a_warning_event_on_the_pod() {
    let mut cluster = KubeCluster::start().await;
    let stored = cluster.add_pod(pod("app", false)).await;
    let broker = Cluster::new(client(&cluster).await, "broker-0");

    let stored = PodFacts::from(stored);
    broker.record_denial(&stored, "pod \"app\" is not enabled").await;
    let events = broker_events(&cluster).await;
    let [event] = &events[..] else { panic!("{events:?}") };
    assert_eq!(event.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.reason.as_deref(), Some(DENIAL_EVENT_REASON));
    assert_eq!(event.note.as_deref(), Some("pod \"app\" is not enabled"));
    assert_eq!(event.reporting_controller.as_deref(), Some(REPORTING_CONTROLLER));
    let regarding = event.regarding.clone().unwrap_or_default();
    assert_eq!(regarding.kind.as_deref(), Some("Pod"));
    assert_eq!(regarding.name.as_deref(), Some("app"));
    assert_eq!(regarding.uid.as_deref(), Some(stored.uid.as_str()));

    // Another reason is another Event; recording never fails the caller,
    // even with the API server down.
    broker.record_denial(&stored, "pod \"app\" has no role annotation").await;
    cluster.stop_apiserver();
    broker.record_denial(&stored, "pod \"app\" runs as another service account").await;
    cluster.start_apiserver().await;
    let notes: Vec<String> = broker_events(&cluster).await.into_iter().filter_map(|e| e.note).collect();
    assert_eq!(notes, ["pod \"app\" is not enabled", "pod \"app\" has no role annotation"]);
}
