//! Prefetch: when the broker's pod watch sees an enabled pod appear, the
//! broker fetches the credentials of its (role, namespace, service account)
//! before the pod asks, so the pod's first request is a cache hit. Against
//! a real API server, as the broker's own service account, and moto STS
//! behind the OIDC check (which records every token it accepted).

use integration::kube_cluster::{self, KubeCluster};
use integration::real_broker::dev_credentials_request;
use integration::{RealBroker, Reply, Sts, wait};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use mesh_config::render::Options;
use serde_json::json;
use token_broker::kube::{DEFAULT_WATCH_STALENESS_BOUND, PodWatch};

const NS: &str = "default";
const ROLE: &str = "arn:aws:iam::123456789012:role/app";
/// The namespace annotation of the broker's namespace policy.
const POLICY_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// The pod a token STS accepted is bound to (its `kubernetes.io` claim).
fn bound_pods(sts: &Sts) -> Vec<String> {
    let accepted = sts.seen().accepted;
    accepted.iter().map(|claims| claims["kubernetes.io"]["pod"]["name"].as_str().unwrap_or("?").to_owned()).collect()
}

/// Waits until STS has accepted `n` tokens, and returns the pods they were
/// bound to.
async fn sts_calls(sts: &Sts, n: usize) -> Vec<String> {
    wait::until(&format!("{n} token(s) accepted by STS"), || {
        let pods = bound_pods(sts);
        async move { (pods.len() >= n).then_some(pods) }
    })
    .await
}

/// A credential request for `pod` as the `insecure-dev` caller
/// `default/<service_account>`.
async fn request(broker: &RealBroker, service_account: &str, pod: &str) -> Reply {
    dev_credentials_request(NS, service_account, ROLE, pod).send(broker.addr).await
}

/// The value of the broker's metric sample `line` (name and labels), 0 if
/// absent.
async fn metric(broker: &RealBroker, line: &str) -> f64 {
    let metrics = broker.admin_get("/metrics").await.body_text();
    metrics.lines().find_map(|l| l.strip_prefix(line).and_then(|rest| rest.trim().parse().ok())).unwrap_or_default()
}

#[tokio::test]
async fn a_new_pods_credentials_are_fetched_before_it_asks_and_its_first_request_is_a_hit() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.start().await;

    cluster.add_pod(kube_cluster::enabled_pod(NS, "app-0", "app", ROLE)).await;

    // Nobody asked: the watch saw the pod and the broker fetched for it.
    assert_eq!(sts_calls(&sts, 1).await, ["app-0"]);
    wait::until("the prefetched credential in the cache", || async {
        (metric(&broker, "token_broker_cache_fetches_in_flight").await == 0.0).then_some(())
    })
    .await;
    let first = request(&broker, "app", "app-0").await;
    assert_eq!(first.status, 200, "{}", first.body_text());
    assert_eq!(metric(&broker, "token_broker_cache_hits_total").await, 1.0);
    assert_eq!(metric(&broker, "token_broker_cache_misses_total").await, 0.0);
    assert_eq!(bound_pods(&sts).len(), 1, "the first request made an STS call of its own");
    assert_eq!(metric(&broker, "token_broker_prefetches_total{outcome=\"started\"}").await, 1.0);
}

#[tokio::test]
async fn pods_running_before_the_broker_started_and_pods_the_rules_refuse_are_not_prefetched() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    // team-a permits one role.
    let app_role = "arn:aws:iam::123456789012:role/app-web";
    cluster
        .apply(&[json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": "team-a", "annotations": { POLICY_ANNOTATION: app_role } },
        })])
        .await;
    cluster.add_pod(kube_cluster::enabled_pod("team-a", "running-0", "running", app_role)).await;
    let broker = RealBroker::with_namespace_policy(&cluster, sts.endpoint(), POLICY_ANNOTATION).await.start().await;

    // Refused by the namespace policy, then one it permits.
    let admin_role = "arn:aws:iam::123456789012:role/admin";
    cluster.add_pod(kube_cluster::enabled_pod("team-a", "admin-0", "admin", admin_role)).await;
    cluster.add_pod(kube_cluster::enabled_pod("team-a", "web-0", "web", app_role)).await;

    // Arrivals are handled in order, so by the time web-0's fetch has
    // reached STS, admin-0 was decided: refused, no fetch.
    assert_eq!(sts_calls(&sts, 1).await, ["web-0"]);
    assert_eq!(metric(&broker, "token_broker_prefetches_total{outcome=\"refused\"}").await, 1.0);
    assert_eq!(metric(&broker, "token_broker_prefetches_total{outcome=\"started\"}").await, 1.0);
    // The pod that was already running fetches when it asks, as before.
    let running = dev_credentials_request("team-a", "running", app_role, "running-0").send(broker.addr).await;
    assert_eq!(running.status, 200, "{}", running.body_text());
    assert_eq!(bound_pods(&sts), ["web-0", "running-0"]);
}

#[tokio::test]
async fn with_prefetch_off_a_new_pod_fetches_on_its_first_request() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.tune(|config| config.prefetch = false).start().await;

    cluster.add_pod(kube_cluster::enabled_pod(NS, "app-0", "app", ROLE)).await;
    wait::until("the watch to deliver app-0", || async { broker.watches_pod(NS, "app-0").then_some(()) }).await;

    assert_eq!(bound_pods(&sts), Vec::<String>::new());
    let first = request(&broker, "app", "app-0").await;
    assert_eq!(first.status, 200, "{}", first.body_text());
    assert_eq!(bound_pods(&sts), ["app-0"]);
    assert_eq!(metric(&broker, "token_broker_cache_misses_total").await, 1.0);
    assert_eq!(metric(&broker, "token_broker_prefetches_total{outcome=\"started\"}").await, 0.0);
}

#[tokio::test]
async fn the_pod_watch_hands_on_only_pods_that_appear_after_its_first_list() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(kube_cluster::enabled_pod(NS, "listed-0", "app", ROLE)).await;
    let config = cluster.broker_config(&Options::default()).await;
    let client = token_broker::kube::client(config).unwrap_or_else(|e| panic!("kube client: {e}"));
    let (arrivals, mut arrived) = tokio::sync::mpsc::channel(16);
    let watch = PodWatch::with_arrivals(client, DEFAULT_WATCH_STALENESS_BOUND, arrivals);
    tokio::time::timeout(wait::PATIENCE, watch.synced()).await.unwrap_or_else(|_| panic!("never synced"));
    let mut next = async || {
        let pod = tokio::time::timeout(wait::PATIENCE, arrived.recv()).await.unwrap_or_else(|_| panic!("no arrival"));
        pod.unwrap_or_else(|| panic!("arrivals closed"))
    };

    let created = cluster.add_pod(kube_cluster::enabled_pod(NS, "new-0", "app", ROLE)).await;
    let first = next().await;
    assert_eq!(first.name, "new-0", "a pod listed at start was handed on");
    assert_eq!(Some(first.uid.as_str()), created.metadata.uid.as_deref());

    // A change to a pod the watch knows is not an arrival; a pod that gets
    // the label later is.
    let pods = Api::<Pod>::namespaced(cluster.admin(), NS);
    let relabel = json!({ "metadata": { "labels": { "revision": "2" } } });
    pods.patch("new-0", &PatchParams::default(), &Patch::Merge(&relabel)).await.unwrap_or_else(|e| panic!("{e}"));
    let mut late = kube_cluster::enabled_pod(NS, "late-0", "app", ROLE);
    late.metadata.labels = None;
    cluster.add_pod(late).await;
    let enable = json!({ "metadata": { "labels": { imds_filter::config::ENABLE_LABEL: "True" } } });
    pods.patch("late-0", &PatchParams::default(), &Patch::Merge(&enable)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(next().await.name, "late-0");

    // Deleted and created again under its name (a StatefulSet's pod): a
    // new pod, with a new uid.
    cluster.delete_pod(NS, "new-0").await;
    let again = cluster.add_pod(kube_cluster::enabled_pod(NS, "new-0", "app", ROLE)).await;
    let second = next().await;
    assert_eq!((second.name.as_str(), Some(second.uid.as_str())), ("new-0", again.metadata.uid.as_deref()));
    assert_ne!(second.uid, first.uid);
    assert!(arrived.try_recv().is_err(), "more arrivals than pods that appeared");
}
