//! The broker against a real Kubernetes API server (etcd and kube-apiserver
//! built from their Go modules): it runs as its own service account with
//! exactly the RBAC `mesh-config` renders, reads a pod created through the
//! API, and exchanges a token the API server signed and bound to the pod.
//! Then, rule by rule, the rendered RBAC less one rule: the API server's
//! audit log shows it refusing the broker that call, and the broker fails
//! where it needs it. Together the rules suffice; each is needed.

use integration::kube_api;
use integration::kube_cluster::KubeCluster;
use integration::{ROLE_ARN, RealBroker, Req, Sts, wait};
use mesh_config::render::{self, BROKER, Object, Options};
use token_broker::server;

/// The rendered objects the broker's permissions come from: its namespace,
/// service account, ClusterRole and ClusterRoleBinding.
fn broker_identity(options: &Options) -> Vec<serde_json::Value> {
    render::render(options)
        .into_iter()
        .filter(|o| {
            matches!(
                o,
                Object::Namespace(_)
                    | Object::ServiceAccount(_)
                    | Object::ClusterRole(_)
                    | Object::ClusterRoleBinding(_)
            )
        })
        .map(|o| serde_json::to_value(o).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// A credential request for `pod` as the `insecure-dev` caller
/// `default/<service_account>`.
fn request_as(service_account: &str, pod: &str) -> Req {
    let role = ROLE_ARN.replace(':', "%3A").replace('/', "%2F");
    Req::get(format!("/v1/credentials?role_arn={role}&pod={pod}"))
        .host("token-broker")
        .header(server::DEV_NAMESPACE_HEADER, "default")
        .header(server::DEV_SERVICE_ACCOUNT_HEADER, service_account)
}

fn request(pod: &str) -> Req {
    request_as("app", pod)
}

/// The broker's user name at the API server.
const BROKER_USER: &str = "system:serviceaccount:imds-mesh:token-broker";

/// A fresh cluster with the broker's rendered identity less `verb` on
/// `resource`, an enabled pod `app-0`, and the broker on it as its own
/// service account (not waiting for it to be ready).
async fn broker_without(resource: &str, verb: &str, sts: &Sts) -> (KubeCluster, RealBroker) {
    let cluster = KubeCluster::start().await;
    let options = Options::default();
    let mut objects = broker_identity(&options);
    for object in &mut objects {
        let Some(rules) = object.get_mut("rules").and_then(|r| r.as_array_mut()) else { continue };
        for rule in rules.iter_mut() {
            let names = rule["resources"].as_array().is_some_and(|r| r.iter().any(|x| x.as_str() == Some(resource)));
            if let (true, Some(verbs)) = (names, rule["verbs"].as_array_mut()) {
                verbs.retain(|v| v.as_str() != Some(verb));
            }
        }
        rules.retain(|rule| rule["verbs"].as_array().is_some_and(|v| !v.is_empty()));
    }
    cluster.apply(&objects).await;
    cluster.create_pod(kube_api::enabled_pod("default", "app-0", "app", ROLE_ARN), "10.244.1.10").await;
    let token = cluster.token(&options.namespace, BROKER).await;
    let broker = RealBroker::with_kube(cluster.config(&token), sts.endpoint()).start_unsynced().await;
    (cluster, broker)
}

/// Waits until the API server has refused the broker `verb` on `resource`.
async fn until_refused(cluster: &KubeCluster, verb: &str, resource: &str) {
    let call = format!("{verb} {resource}");
    wait::until(&format!("the API server to refuse the broker {call}"), || {
        let refused = cluster.refusals(BROKER_USER).contains(&call);
        async move { refused.then_some(()) }
    })
    .await;
}

async fn until_ready(broker: &RealBroker) {
    wait::until("the broker to be ready", || async { (broker.admin_get("/readyz").await.status == 200).then_some(()) })
        .await;
}

#[tokio::test]
async fn without_any_one_rendered_rbac_rule_the_broker_fails_where_it_needs_it() {
    let sts = Sts::start().await;

    // The pod watch cannot start: never ready.
    let (cluster, broker) = broker_without("pods", "list", &sts).await;
    until_refused(&cluster, "list", "pods").await;
    assert_eq!(broker.admin_get("/readyz").await.status, 503);
    drop((broker, cluster));

    // The pod watch cannot follow changes.
    let (cluster, broker) = broker_without("pods", "watch", &sts).await;
    until_refused(&cluster, "watch", "pods").await;
    drop((broker, cluster));

    // A pod the watch has not delivered cannot be looked up: the broker
    // can no longer say it does not exist.
    let (cluster, broker) = broker_without("pods", "get", &sts).await;
    until_ready(&broker).await;
    let reply = request("ghost").send(broker.addr).await;
    assert_ne!(reply.json()["Code"], "PodNotFound", "{}", reply.body_text());
    until_refused(&cluster, "get", "pods").await;
    drop((broker, cluster));

    // No token, so no credentials.
    let (cluster, broker) = broker_without("serviceaccounts/token", "create", &sts).await;
    until_ready(&broker).await;
    let reply = request("app-0").send(broker.addr).await;
    assert!(reply.status >= 500, "{} {}", reply.status, reply.body_text());
    until_refused(&cluster, "create", "serviceaccounts/token").await;
    drop((broker, cluster));

    // A denial is still answered, but not recorded on the pod.
    let (cluster, broker) = broker_without("events", "create", &sts).await;
    until_ready(&broker).await;
    assert_eq!(request_as("intruder", "app-0").send(broker.addr).await.status, 403);
    until_refused(&cluster, "create", "events").await;
}

#[tokio::test]
async fn the_broker_with_the_rendered_rbac_gets_sts_credentials_for_a_pod_of_the_api_server() {
    let (cluster, sts) = (KubeCluster::start().await, Sts::start().await);
    let options = Options::default();
    cluster.apply(&broker_identity(&options)).await;
    let pod = cluster.create_pod(kube_api::enabled_pod("default", "app-0", "app", ROLE_ARN), "10.244.1.10").await;
    assert!(pod.metadata.uid.is_some());

    // The broker as its own service account, with the rendered RBAC only.
    let token = cluster.token(&options.namespace, BROKER).await;
    let broker = RealBroker::with_kube(cluster.config(&token), sts.endpoint()).start().await;
    let reply = request("app-0").send(broker.addr).await;
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert!(reply.json()["AccessKeyId"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{}", reply.body_text());
    // A pod the API server does not know.
    let reply = request("ghost").send(broker.addr).await;
    assert_eq!(reply.json()["Code"], "PodNotFound", "{}", reply.body_text());
    // The whole rendered RBAC: nothing the broker asked was refused.
    assert_eq!(cluster.refusals(BROKER_USER), Vec::<String>::new());
}
