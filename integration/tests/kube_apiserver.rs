//! The broker against a real Kubernetes API server (etcd and kube-apiserver
//! built from their Go modules): it runs as its own service account with
//! exactly the RBAC `mesh-config` renders, reads a pod created through the
//! API, and exchanges a token the API server signed and bound to the pod.

use integration::kube_api;
use integration::kube_cluster::KubeCluster;
use integration::{ROLE_ARN, RealBroker, Req, Sts};
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
/// `default/app`.
fn request(pod: &str) -> Req {
    let role = ROLE_ARN.replace(':', "%3A").replace('/', "%2F");
    Req::get(format!("/v1/credentials?role_arn={role}&pod={pod}"))
        .host("token-broker")
        .header(server::DEV_NAMESPACE_HEADER, "default")
        .header(server::DEV_SERVICE_ACCOUNT_HEADER, "app")
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
}
