//! The broker through a control-plane outage of the real API server: the
//! server is stopped under a running broker (etcd keeps the data), then
//! started again on the same address. What the README promises: pods the
//! watch already knows keep being served from the cache; what needs the
//! API now (a TokenRequest, a pod the watch has not delivered) is 503
//! `Unavailable`, never a wrong `PodNotFound`; once the server is back the
//! watch follows it again without a restart. A watch that keeps failing
//! (here: its RBAC withdrawn) is trusted only for the staleness bound.

use integration::kube_cluster::{self, BROKER_USER, KubeCluster};
use integration::real_broker::dev_credentials_request;
use integration::{RealBroker, Reply, Sts, wait};
use mesh_config::render::Options;

const ROLE: &str = "arn:aws:iam::123456789012:role/app";

/// A credential request for `pod` as the `insecure-dev` caller
/// `default/<service_account>`.
async fn request(broker: &RealBroker, service_account: &str, pod: &str) -> Reply {
    dev_credentials_request("default", service_account, ROLE, pod).send(broker.addr).await
}

#[tokio::test]
async fn known_pods_are_served_through_an_api_server_outage_and_the_watch_follows_it_back() {
    let mut cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE)).await;
    // Known to the watch, never asked for: nothing cached for its account.
    cluster.add_pod(kube_cluster::enabled_pod("default", "worker-0", "worker", ROLE)).await;
    // Started once the pod watch has listed both.
    let broker = RealBroker::with_kube(cluster.broker_config(&Options::default()).await, sts.endpoint()).start().await;
    let before = request(&broker, "app", "app-0").await;
    assert_eq!(before.status, 200, "{}", before.body_text());

    cluster.stop_apiserver();

    let cached = request(&broker, "app", "app-0").await;
    assert_eq!(cached.status, 200, "{}", cached.body_text());
    assert_eq!(cached.json()["AccessKeyId"], before.json()["AccessKeyId"]);
    // The pod is known, but a new credential needs a TokenRequest.
    let minting = request(&broker, "worker", "worker-0").await;
    assert_eq!(
        (minting.status, minting.json()["Code"].as_str()),
        (503, Some("Unavailable")),
        "{}",
        minting.body_text()
    );
    assert_eq!(minting.json()["Message"], "Kubernetes API: TokenRequest failed: api_unavailable");
    // A pod the watch never delivered cannot be looked up: unavailable,
    // not "no such pod".
    let unknown = request(&broker, "app", "app-1").await;
    assert_eq!(
        (unknown.status, unknown.json()["Code"].as_str()),
        (503, Some("Unavailable")),
        "{}",
        unknown.body_text()
    );
    assert_eq!(unknown.json()["Message"], "Kubernetes API: api_unavailable");
    // (An insecure-dev broker is never ready: its watch is what stays.)
    assert!(broker.is_synced(), "a synced watch stays synced through an outage");

    cluster.start_apiserver().await;

    let minted = request(&broker, "worker", "worker-0").await;
    assert_eq!(minted.status, 200, "{}", minted.body_text());
    // The watch follows the server again: a cached pod is served without
    // asking the API, so only the watch can tell the broker it is gone.
    cluster.delete_pod("default", "app-0").await;
    wait::until("the watch to drop app-0", || async {
        (request(&broker, "app", "app-0").await.json()["Code"] == "PodNotFound").then_some(())
    })
    .await;
    assert_eq!(sts.seen().refused, Vec::<String>::new());
}

#[tokio::test]
async fn a_pod_watch_that_keeps_failing_stops_authorizing_past_the_staleness_bound_and_recovers() {
    // Short, so the test sees it pass; the broker relists an unconfirmed
    // watch every third of it, which is how a withdrawn `list` shows.
    const BOUND: std::time::Duration = std::time::Duration::from_secs(3);
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE)).await;
    let options = Options::default();
    let broker = RealBroker::with_kube(cluster.broker_config(&options).await, sts.endpoint())
        .tune(|config| config.watch_staleness_bound = BOUND)
        .start()
        .await;
    let before = request(&broker, "app", "app-0").await;
    assert_eq!(before.status, 200, "{}", before.body_text());
    assert_eq!(watch_errors(&broker).await, 0);

    // The broker's ClusterRole as rendered, but pods only `get`: an RBAC
    // change that leaves the running watch without its list and watch.
    let identity = kube_cluster::broker_identity(&options);
    let mut withdrawn = identity.clone();
    for object in &mut withdrawn {
        if object["kind"] == "ClusterRole" {
            for rule in object["rules"].as_array_mut().into_iter().flatten() {
                if rule["resources"] == serde_json::json!(["pods"]) {
                    rule["verbs"] = serde_json::json!(["get"]);
                }
            }
        }
    }
    cluster.apply(&withdrawn).await;

    let refused = wait::until("the known pod to be refused as stale", || async {
        let reply = request(&broker, "app", "app-0").await;
        (reply.status == 503).then_some(reply)
    })
    .await;
    assert_eq!(refused.json()["Code"], "Unavailable");
    let message = refused.json()["Message"].as_str().unwrap_or_default().to_owned();
    assert!(message.starts_with("pod data is stale: the pod watch has failed since "), "{message}");
    assert!(message.ends_with("past the 3 s bound)"), "{message}");
    let ready = broker.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(
        ready.body_text().contains("not ready: pod data is stale: the pod watch has failed since "),
        "{}",
        ready.body_text()
    );
    assert!(watch_errors(&broker).await > 0, "the failed relists are counted");
    assert!(cluster.refusals(BROKER_USER).iter().any(|call| call == "list pods"));

    cluster.apply(&identity).await;

    wait::until("the known pod to be served again", || async {
        (request(&broker, "app", "app-0").await.status == 200).then_some(())
    })
    .await;
    let ready = broker.admin_get("/readyz").await;
    assert!(!ready.body_text().contains("stale"), "{}", ready.body_text());
}

/// `token_broker_watch_errors_total{watch="pod"}` as the broker exports it.
async fn watch_errors(broker: &RealBroker) -> u64 {
    let metrics = broker.admin_get("/metrics").await.body_text();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("token_broker_watch_errors_total{watch=\"pod\"} "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pod watch error count in {metrics}"))
}
