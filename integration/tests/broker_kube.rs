//! The broker's Kubernetes client (`token_broker::kube`, kube-rs) against
//! the harness's Kubernetes API over real HTTP: the pod reflector, the
//! direct read on a miss, life on the cache while the API is down,
//! TokenRequest and denial Events.

use std::collections::BTreeMap;

use integration::KubeApi;
use integration::kube_api::{self, ApiRequest};
use integration::wait;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use token_broker::authz::{ENABLED_LABEL, ENABLED_VALUE, ROLE_ARN_ANNOTATION};
use token_broker::kube::{Cluster, DENIAL_EVENT_REASON, PodWatch, REPORTING_CONTROLLER};

const NS: &str = "default";
const SA: &str = "app";
const AUDIENCE: &str = "sts.amazonaws.com";

/// The broker's client for the harness API: plain http, no credentials.
fn client(api: &KubeApi) -> kube::Client {
    let url = api.url().parse().unwrap_or_else(|e| panic!("{e}"));
    token_broker::kube::client(kube::Config::new(url)).unwrap_or_else(|e| panic!("kube client: {e}"))
}

/// A pod running as [`SA`], opted in unless `enabled` is false.
fn pod(name: &str, enabled: bool) -> Pod {
    let labels = enabled.then(|| BTreeMap::from([(ENABLED_LABEL.to_owned(), ENABLED_VALUE.to_owned())]));
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NS.to_owned()),
            labels,
            annotations: Some(BTreeMap::from([(
                ROLE_ARN_ANNOTATION.to_owned(),
                "arn:aws:iam::123456789012:role/app".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { service_account_name: Some(SA.to_owned()), ..PodSpec::default() }),
        ..Pod::default()
    }
}

/// A pod watch over `api`, synced.
async fn synced_watch(api: &KubeApi) -> PodWatch {
    let watch = PodWatch::spawn(client(api));
    tokio::time::timeout(wait::PATIENCE, watch.synced()).await.unwrap_or_else(|_| panic!("the pod watch never synced"));
    assert!(watch.is_synced());
    watch
}

/// Direct reads of the pod `name` (not lists or watches).
fn direct_reads(api: &KubeApi, name: &str) -> Vec<ApiRequest> {
    let path = format!("/api/v1/namespaces/{NS}/pods/{name}");
    api.requests().into_iter().filter(|r| r.method == "GET" && r.uri.split('?').next() == Some(path.as_str())).collect()
}

/// Requests for all pods: the reflector's lists and watches.
fn pod_lists_and_watches(api: &KubeApi) -> usize {
    api.requests().iter().filter(|r| r.uri.starts_with("/api/v1/pods?")).count()
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_else(|| panic!("pod without uid"))
}

#[tokio::test]
async fn reflector_syncs_and_sees_a_pod_added_later() {
    let api = KubeApi::start().await;
    let before = api.add_pod(pod("before", true));
    api.add_pod(pod("not-opted-in", false));
    let watch = synced_watch(&api).await;

    let cached = watch.cached(NS, "before").unwrap_or_else(|| panic!("the listed pod is not cached"));
    assert_eq!(cached.metadata.uid, before.metadata.uid);
    assert!(watch.cached(NS, "not-opted-in").is_none(), "the label selector let an unlabelled pod in");
    // Only opted-in pods are listed, from every namespace.
    let list = api.requests().into_iter().find(|r| r.uri.starts_with("/api/v1/pods?")).map(|r| r.uri);
    let list = list.unwrap_or_else(|| panic!("no pod list across namespaces: {:?}", api.requests()));
    assert!(list.contains("labelSelector=gkemulticloud.googleapis.com%2Faws-imds-emulator-enabled%3DTrue"), "{list}");

    let later = api.add_pod(pod("later", true));
    let cached = wait::until("the watch to deliver the later pod", || async { watch.cached(NS, "later") }).await;
    assert_eq!(cached.metadata.uid, later.metadata.uid);
    assert_eq!(watch.pod(NS, "later").await.ok().flatten().map(|p| uid(&p).to_owned()).as_deref(), Some(uid(&later)));
    assert!(direct_reads(&api, "later").is_empty(), "a cached pod was read directly");

    api.delete_pod(NS, "before");
    wait::until("the watch to drop the deleted pod", || async { watch.cached(NS, "before").is_none().then_some(()) })
        .await;
}

#[tokio::test]
async fn watch_is_not_synced_until_the_initial_list_succeeds() {
    let api = KubeApi::start().await;
    api.add_pod(pod("app", true));
    api.set_down(true);
    let watch = PodWatch::spawn(client(&api));
    wait::until("the reflector's list to be refused", || async { (pod_lists_and_watches(&api) > 0).then_some(()) })
        .await;
    assert!(!watch.is_synced(), "synced without a list");

    api.set_down(false);
    tokio::time::timeout(wait::PATIENCE, watch.synced()).await.unwrap_or_else(|_| panic!("never synced"));
    assert!(watch.is_synced());
    assert!(watch.cached(NS, "app").is_some());
}

#[tokio::test]
async fn pod_the_watch_has_not_delivered_is_read_directly() {
    let api = KubeApi::start().await;
    let watch = synced_watch(&api).await;
    // Not opted in, so the watch never delivers it; only a direct read
    // finds it (and authorization then names the missing label).
    let stored = api.add_pod(pod("unlabelled", false));

    let found = watch.pod(NS, "unlabelled").await.unwrap_or_else(|e| panic!("{e}"));
    let found = found.unwrap_or_else(|| panic!("the pod was not read directly"));
    assert_eq!(uid(&found), uid(&stored));
    assert_eq!(direct_reads(&api, "unlabelled").len(), 1);

    assert!(watch.pod(NS, "absent").await.unwrap_or_else(|e| panic!("{e}")).is_none());
    assert_eq!(direct_reads(&api, "absent").len(), 1, "a missing pod is read once per lookup");
}

#[tokio::test]
async fn cached_pods_are_served_while_the_api_is_down() {
    let api = KubeApi::start().await;
    let stored = api.add_pod(pod("app", true));
    let watch = synced_watch(&api).await;

    let before = pod_lists_and_watches(&api);
    api.set_down(true);
    // The watch ends; wait until the reflector's next watch has been
    // refused, so the cache has really lived through a failure.
    wait::until("the reflector to be refused", || async { (pod_lists_and_watches(&api) > before).then_some(()) }).await;

    let found = watch.pod(NS, "app").await.unwrap_or_else(|e| panic!("a cached pod failed while down: {e}"));
    assert_eq!(found.as_deref().map(uid), Some(uid(&stored)));
    assert!(watch.is_synced(), "a synced watch stays synced while the API is down");
    assert!(direct_reads(&api, "app").is_empty());

    // A miss needs the API, and says it is unavailable.
    let error = watch.pod(NS, "other").await.err().unwrap_or_else(|| panic!("a miss succeeded while down"));
    assert_eq!(error.label(), "api_unavailable", "{error}");

    // Back up: the relist brings the watch current again.
    api.set_down(false);
    api.add_pod(pod("after-outage", true));
    wait::until("the watch to recover", || async { watch.cached(NS, "after-outage") }).await;
}

#[tokio::test]
async fn token_is_a_jwt_for_the_service_account_bound_to_the_pod() {
    let api = KubeApi::start().await;
    let stored = api.add_pod(pod("app", true));
    let cluster = Cluster::new(client(&api), "broker-0");

    let token = cluster.token(NS, SA, "app", uid(&stored), AUDIENCE, 3600).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(!format!("{token:?}").contains(token.expose()), "Debug shows the token");
    let claims = kube_api::verify_token(token.expose()).unwrap_or_else(|| panic!("the token does not verify"));
    assert_eq!(claims["sub"], format!("system:serviceaccount:{NS}:{SA}"));
    assert_eq!(claims["aud"], serde_json::json!([AUDIENCE]));
    assert_eq!(claims["iss"], kube_api::ISSUER);
    assert_eq!(claims["kubernetes.io"]["namespace"], NS);
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], SA);
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "app");
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid(&stored));
    assert_eq!(claims["exp"].as_u64().zip(claims["iat"].as_u64()).map(|(exp, iat)| exp - iat), Some(3600));
    assert_eq!(api.token_request_count(), 1);
}

#[tokio::test]
async fn token_refusals_carry_their_meaning() {
    let api = KubeApi::start().await;
    let stored = api.add_pod(pod("app", true));
    let cluster = Cluster::new(client(&api), "broker-0");
    let label = |result: Result<_, token_broker::kube::KubeError>| result.err().map(|e| e.label());

    // The pod was deleted and recreated: its uid changed.
    let recreated = cluster.token(NS, SA, "app", "00000000-0000-4000-8000-000000000000", AUDIENCE, 3600).await;
    assert_eq!(label(recreated), Some("conflict"));
    assert_eq!(label(cluster.token(NS, SA, "gone", uid(&stored), AUDIENCE, 3600).await), Some("not_found"));
    assert_eq!(label(cluster.token(NS, "other", "app", uid(&stored), AUDIENCE, 3600).await), Some("rejected"));
    assert_eq!(label(cluster.token(NS, SA, "app", uid(&stored), AUDIENCE, 599).await), Some("rejected"));

    // Down: one attempt, no retrying (kube's default client would retry
    // 503 for minutes while the caller waits).
    api.set_down(true);
    let before = api.requests().len();
    assert_eq!(label(cluster.token(NS, SA, "app", uid(&stored), AUDIENCE, 3600).await), Some("api_unavailable"));
    assert_eq!(api.requests().len() - before, 1, "the TokenRequest was retried: {:?}", &api.requests()[before..]);
    assert_eq!(api.token_request_count(), 0);
}

#[tokio::test]
async fn namespace_is_read_or_absent() {
    let api = KubeApi::start().await;
    let mut annotated = kube_api::namespace("team-a");
    annotated.metadata.annotations =
        Some(BTreeMap::from([("iam.amazonaws.com/permitted".to_owned(), ".*".to_owned())]));
    api.add_namespace(annotated);
    let cluster = Cluster::new(client(&api), "broker-0");

    let namespace = cluster.namespace("team-a").await.unwrap_or_else(|e| panic!("{e}"));
    let annotations = namespace.and_then(|n| n.metadata.annotations).unwrap_or_default();
    assert_eq!(annotations.get("iam.amazonaws.com/permitted").map(String::as_str), Some(".*"));
    assert!(cluster.namespace("absent").await.unwrap_or_else(|e| panic!("{e}")).is_none());
}

#[tokio::test]
async fn denial_is_recorded_as_a_warning_event_on_the_pod() {
    let api = KubeApi::start().await;
    let stored = api.add_pod(pod("app", false));
    let cluster = Cluster::new(client(&api), "broker-0");

    cluster.record_denial(&stored, "pod \"app\" is not enabled").await;
    let events = api.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event.api_version, "events.k8s.io/v1");
    assert_eq!(event.namespace, NS);
    assert_eq!(event.type_(), "Warning");
    assert_eq!(event.reason(), DENIAL_EVENT_REASON);
    assert_eq!(event.message(), "pod \"app\" is not enabled");
    assert_eq!(event.object["reportingController"], REPORTING_CONTROLLER);
    assert_eq!(event.regarding()["kind"], "Pod");
    assert_eq!(event.regarding()["name"], "app");
    assert_eq!(event.regarding()["uid"], uid(&stored));

    // Another reason is another Event; recording never fails the caller,
    // even with the API down.
    cluster.record_denial(&stored, "pod \"app\" has no role annotation").await;
    api.set_down(true);
    cluster.record_denial(&stored, "pod \"app\" runs as another service account").await;
    let messages: Vec<String> = api.events().iter().map(|e| e.message().to_owned()).collect();
    assert_eq!(messages, ["pod \"app\" is not enabled", "pod \"app\" has no role annotation"]);
}
