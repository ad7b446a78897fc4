//! The broker against a real Kubernetes API server (etcd and kube-apiserver
//! built from their Go modules): it runs as its own service account with
//! exactly the RBAC `mesh-config` renders, reads a pod created through the
//! API, and exchanges a token the API server signed and bound to the pod.
//! Then, rule by rule, the rendered RBAC less one rule: the API server's
//! audit log shows it refusing the broker that call, and the broker fails
//! where it needs it. Together the rules suffice; each is needed.

use integration::kube_cluster::{self, BROKER_USER, KubeCluster};
use integration::real_broker::dev_credentials_request;
use integration::{ROLE_ARN, RealBroker, Req, Sts, wait};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use mesh_config::render::{BROKER, Options};

/// A credential request for `pod` as the `insecure-dev` caller
/// `default/<service_account>`.
fn request_as(service_account: &str, pod: &str) -> Req {
    dev_credentials_request("default", service_account, ROLE_ARN, pod)
}

fn request(pod: &str) -> Req {
    request_as("app", pod)
}

/// A fresh cluster with the broker's rendered identity less `verb` on
/// `resource`, an enabled pod `app-0`, and the broker on it as its own
/// service account (not waiting for it to be ready).
async fn broker_without(resource: &str, verb: &str, sts: &Sts) -> (KubeCluster, RealBroker) {
    let cluster = KubeCluster::start().await;
    let options = Options::default();
    let mut objects = kube_cluster::broker_identity(&options);
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
    cluster.create_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE_ARN), "10.244.1.10").await;
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

/// Waits for the broker's pod watch to sync (what `/readyz` waits for; an
/// `insecure-dev` broker, as here, is never ready).
async fn until_synced(broker: &RealBroker) {
    wait::until("the broker's pod watch to sync", || async { broker.is_synced().then_some(()) }).await;
}

#[tokio::test]
async fn without_any_one_rendered_rbac_rule_the_broker_fails_where_it_needs_it() {
    let sts = Sts::start().await;

    // The pod watch cannot start: never ready.
    let (cluster, broker) = broker_without("pods", "list", &sts).await;
    until_refused(&cluster, "list", "pods").await;
    let readyz = broker.admin_get("/readyz").await;
    assert_eq!(readyz.status, 503);
    assert!(readyz.body_text().contains("the pod watch has not synced"), "{}", readyz.body_text());
    assert!(!broker.is_synced());
    drop((broker, cluster));

    // The pod watch cannot follow changes.
    let (cluster, broker) = broker_without("pods", "watch", &sts).await;
    until_refused(&cluster, "watch", "pods").await;
    drop((broker, cluster));

    // A pod the watch has not delivered cannot be looked up: the broker
    // can no longer say it does not exist.
    let (cluster, broker) = broker_without("pods", "get", &sts).await;
    until_synced(&broker).await;
    let reply = request("ghost").send(broker.addr).await;
    assert_ne!(reply.json()["Code"], "PodNotFound", "{}", reply.body_text());
    until_refused(&cluster, "get", "pods").await;
    drop((broker, cluster));

    // No token, so no credentials.
    let (cluster, broker) = broker_without("serviceaccounts/token", "create", &sts).await;
    until_synced(&broker).await;
    let reply = request("app-0").send(broker.addr).await;
    assert!(reply.status >= 500, "{} {}", reply.status, reply.body_text());
    until_refused(&cluster, "create", "serviceaccounts/token").await;
    drop((broker, cluster));

    // A denial is still answered, but not recorded on the pod.
    let (cluster, broker) = broker_without("events", "create", &sts).await;
    until_synced(&broker).await;
    assert_eq!(request_as("intruder", "app-0").send(broker.addr).await.status, 403);
    until_refused(&cluster, "create", "events").await;
}

#[tokio::test]
async fn the_broker_with_the_rendered_rbac_gets_sts_credentials_for_a_pod_of_the_api_server() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let pod = cluster.create_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE_ARN), "10.244.1.10").await;

    // The broker as its own service account, with the rendered RBAC only.
    let broker = RealBroker::with_kube(cluster.broker_config(&Options::default()).await, sts.endpoint()).start().await;
    let reply = request("app-0").send(broker.addr).await;
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert!(reply.json()["AccessKeyId"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{}", reply.body_text());
    // STS verified what the API server signed: the pod's service account,
    // audience sts.amazonaws.com, bound to that pod.
    let seen = sts.seen();
    assert_eq!(seen.refused, Vec::<String>::new());
    let [claims] = &seen.accepted[..] else { panic!("{seen:?}") };
    assert_eq!(claims["sub"], "system:serviceaccount:default:app");
    assert_eq!(claims["aud"], serde_json::json!(["sts.amazonaws.com"]));
    assert_eq!(claims["iss"], kube_cluster::ISSUER);
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], serde_json::json!(pod.metadata.uid));
    // A pod the API server does not know.
    let reply = request("ghost").send(broker.addr).await;
    assert_eq!(reply.json()["Code"], "PodNotFound", "{}", reply.body_text());
    // The whole rendered RBAC: nothing the broker asked was refused.
    assert_eq!(cluster.refusals(BROKER_USER), Vec::<String>::new());
}

/// A token the API server signs for `default/app`, for `audience`, bound
/// to `pod` if given.
async fn minted(cluster: &KubeCluster, audience: &str, pod: Option<&k8s_openapi::api::core::v1::Pod>) -> String {
    let bound_object_ref = pod.map(|pod| BoundObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
    });
    let request = TokenRequest {
        spec: TokenRequestSpec { audiences: vec![audience.into()], bound_object_ref, ..TokenRequestSpec::default() },
        ..TokenRequest::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(cluster.admin(), "default")
        .create_token_request("app", &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest: {e}"));
    issued.status.map(|s| s.token).unwrap_or_default()
}

#[tokio::test]
async fn sts_exchanges_a_token_the_api_server_signed_for_credentials() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let pod = cluster.add_pod(kube_cluster::enabled_pod("default", "app-1", "app", ROLE_ARN)).await;
    let token = minted(&cluster, "sts.amazonaws.com", Some(&pod)).await;

    let reply = sts.assume_role_with_web_identity(ROLE_ARN, "default-app", &token).await;
    let xml = reply.body_text();
    assert_eq!(reply.status, 200, "{xml}\n{}", sts.log());
    assert!(xml.contains("<AssumeRoleWithWebIdentityResponse"), "{xml}");
    let field = |name| integration::sts::xml_element(&xml, name).unwrap_or_else(|| panic!("no <{name}> in {xml}"));
    assert!(field("AccessKeyId").starts_with("ASIA"));
    assert!(!field("SecretAccessKey").is_empty());
    assert!(!field("SessionToken").is_empty());
    let expiration = field("Expiration");
    assert!(
        time::OffsetDateTime::parse(expiration, &time::format_description::well_known::Rfc3339).is_ok(),
        "Expiration {expiration} is not RFC 3339"
    );
    assert!(field("Arn").ends_with(":assumed-role/app/default-app"));
}

/// The STS error code and message of a refusal.
#[track_caller]
fn refusal(reply: integration::Reply) -> (String, String) {
    assert_eq!(reply.status, 400, "{}", reply.body_text());
    let body = reply.body_text();
    let code = integration::sts::xml_element(&body, "Code").unwrap_or_default().to_owned();
    let message = integration::sts::xml_element(&body, "Message").unwrap_or_default().to_owned();
    (code, message)
}

#[tokio::test]
async fn sts_refuses_a_token_of_another_audience_another_signer_no_pod_or_a_deleted_pod() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let pod = cluster.add_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE_ARN)).await;
    let sts = &sts;
    let exchange = |token: String| async move { sts.assume_role_with_web_identity(ROLE_ARN, "s", &token).await };

    // The token the broker would present is accepted.
    let good = minted(&cluster, "sts.amazonaws.com", Some(&pod)).await;
    assert_eq!(exchange(good).await.status, 200);

    let (code, message) = refusal(exchange(minted(&cluster, "vault", Some(&pod)).await).await);
    assert_eq!((code.as_str(), message.as_str()), ("InvalidIdentityToken", "Incorrect token audience"));

    let (code, message) = refusal(exchange(minted(&cluster, "sts.amazonaws.com", None).await).await);
    assert_eq!((code.as_str(), message.as_str()), ("InvalidIdentityToken", "the token is not bound to a pod"));

    // Signed by another cluster's key: well-formed, valid claims, not ours.
    let other = KubeCluster::start().await;
    other.add_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE_ARN)).await;
    let foreign_pod = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(other.admin(), "default").get("app-0").await;
    let foreign = minted(&other, "sts.amazonaws.com", foreign_pod.as_ref().ok()).await;
    let (code, message) = refusal(exchange(foreign).await);
    assert_eq!(code, "InvalidIdentityToken");
    assert_eq!(message, "the token's key is not one the identity provider publishes");

    // The pod is gone: the signature still verifies, the cluster no longer
    // accepts the token (once its informers have seen the deletion; a token
    // it has just accepted stays accepted for its 10 s authentication cache,
    // so this one was never presented before).
    let doomed = minted(&cluster, "sts.amazonaws.com", Some(&pod)).await;
    cluster.delete_pod("default", "app-0").await;
    let reply = wait::until("STS to refuse the deleted pod's token", || {
        let doomed = doomed.clone();
        async move { Some(exchange(doomed).await).filter(|reply| reply.status != 200) }
    })
    .await;
    let (code, message) = refusal(reply);
    assert_eq!(code, "InvalidIdentityToken");
    assert!(message.starts_with("the cluster no longer accepts the token"), "{message}");
}
