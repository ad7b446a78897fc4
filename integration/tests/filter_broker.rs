//! The filter against the real broker on the local bootstraps
//! (`mesh-config envoy`): the app's sidecar (Envoy with the filter) calls the
//! broker over mTLS with the app's workload certificate, from the pod's IP;
//! the broker's sidecar verifies it, appends its XFCC element and states the
//! connection's address; the broker (`xfcc` mode) checks the pod (and that
//! the caller is at its IP) in the real API server, mints a pod-bound token
//! and exchanges it at STS (moto, behind the token checks AWS makes); boto3
//! in the "pod" gets the result as an IAM role. Then the same without the broker's sidecar, the broker terminating
//! mTLS itself (a deployment outside a mesh). The same chain on Istio's own
//! generated configuration is `istio_translation.rs`.

use integration::clients::SdkClient;
use integration::kube_cluster::{self, BROKER_USER, KubeCluster, pod_ip};
use integration::pki::{self, Mesh};
use integration::real_broker::credentials_request;
use integration::{CREDENTIALS_PATH, Envoy, Pod, ROLE_ARN, RealBroker, Req, Sts, wait};
use k8s_openapi::api::core::v1::Pod as KubePod;
use token_broker::kube::DENIAL_EVENT_REASON;
use token_broker::peer::PEER_ADDRESS_HEADER;
use token_broker::tls::MtlsFiles;

/// The Kubernetes object of the pod an [`Envoy`] sidecar belongs to, with
/// the role annotation `role_arn`.
fn kube_pod(pod: &Pod, role_arn: &str) -> KubePod {
    kube_cluster::enabled_pod(&pod.namespace, &pod.name, &pod.service_account, role_arn)
}

#[tokio::test]
async fn boto3_gets_sts_credentials_through_the_mesh_and_the_real_broker() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let pod = Pod::enabled();
    let bound = cluster.add_pod(kube_pod(&pod, ROLE_ARN)).await;
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.xfcc().start().await;
    let broker_sidecar = Envoy::broker_sidecar(broker.addr, &mesh.broker).await;
    let app = Envoy::sidecar()
        .pod(pod.clone())
        .pod_ip(pod_ip(&bound))
        .broker_mtls(broker_sidecar.addr, &mesh.app, &pki::broker_id())
        .sdk_endpoint()
        .start()
        .await;

    let credentials = SdkClient::python("boto3_credentials.py", &app).run().await;
    assert_eq!(credentials["method"], "iam-role");
    assert!(credentials["access_key"].as_str().is_some_and(|k| k.starts_with("ASIA")), "not from STS: {credentials}");

    // One token, for the app's service account, bound to its pod, as the
    // API server signed it and STS verified it.
    let token_requests = cluster.token_requests(BROKER_USER);
    assert_eq!(token_requests.len(), 1);
    let binding = token_requests[0].bound_object_ref.as_ref().and_then(|r| r.uid.clone());
    assert_eq!(binding, bound.metadata.uid);
    let seen = sts.seen();
    let [claims] = &seen.accepted[..] else { panic!("{seen:?}") };
    assert_eq!(claims["sub"], format!("system:serviceaccount:{}:{}", pod.namespace, pod.service_account));
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], serde_json::json!(bound.metadata.uid));
}

#[tokio::test]
async fn a_pod_whose_annotation_names_another_role_gets_no_credentials() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    // The sidecar's metadata says ROLE_ARN; the API server, which the pod
    // cannot edit through its sidecar, says another role.
    let pod = Pod::enabled();
    let ip = pod_ip(&cluster.add_pod(kube_pod(&pod, "arn:aws:iam::123456789012:role/other")).await);
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.xfcc().start().await;
    let broker_sidecar = Envoy::broker_sidecar(broker.addr, &mesh.broker).await;
    let app = Envoy::sidecar().pod(pod).pod_ip(ip).broker_mtls(broker_sidecar.addr, &mesh.app, &pki::broker_id());
    let app = app.start().await;

    app.wait_for_stat("imds_mesh.broker_fetches.denied", 1).await;
    assert_eq!(app.imds(Req::get(CREDENTIALS_PATH)).await.status, 404);
    assert_eq!(cluster.token_requests(BROKER_USER).len(), 0, "a denied pod caused a token");
}

#[tokio::test]
async fn only_the_brokers_sidecar_can_vouch_for_a_caller() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let pod = Pod::enabled();
    let ip = pod_ip(&cluster.add_pod(kube_pod(&pod, ROLE_ARN)).await);
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.xfcc().start().await;
    let broker_sidecar = Envoy::broker_sidecar(broker.addr, &mesh.broker).await;
    let request = credentials_request(ROLE_ARN, &pod.name).source(ip);

    // Over plaintext (PERMISSIVE) the sidecar drops a forged XFCC element.
    let app_id = pki::spiffe_id(&pod.namespace, &pod.service_account);
    let forged = request.clone().header("x-forwarded-client-cert", &format!("By={};URI={app_id}", pki::broker_id()));
    let reply = forged.send(broker_sidecar.plain_addr).await;
    assert_eq!((reply.status, reply.json()["Code"].as_str()), (401, Some("Unauthenticated")), "{}", reply.body_text());

    // Over mTLS, the caller is who its certificate says, whatever it claims.
    let other = mesh.ca.client(Some(&mesh.ca.workload(&[&pki::spiffe_id(&pod.namespace, "admin")])));
    let reply = forged.send_tls(&other, broker_sidecar.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((reply.status, reply.json()["Code"].as_str()), (403, Some("AccessDenied")), "{}", reply.body_text());
    let app = mesh.ca.client(Some(&mesh.ca.workload(&[&app_id])));
    let reply = request.send_tls(&app, broker_sidecar.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
}

#[tokio::test]
async fn a_pod_without_the_label_cannot_borrow_its_siblings_role_through_the_brokers_sidecar() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    // Two pods of one service account: the enabled one, and a plain one
    // whose app calls the broker itself, over its sidecar's mTLS (the same
    // certificate identity), naming its sibling.
    let pod = Pod::enabled();
    let ip = pod_ip(&cluster.add_pod(kube_pod(&pod, ROLE_ARN)).await);
    let mut plain = kube_cluster::enabled_pod(&pod.namespace, "plain-0", &pod.service_account, ROLE_ARN);
    plain.metadata.labels = None;
    let plain_ip = pod_ip(&cluster.add_pod(plain).await);
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.xfcc().start().await;
    let broker_sidecar = Envoy::broker_sidecar(broker.addr, &mesh.broker).await;
    let request = credentials_request(ROLE_ARN, &pod.name);
    let identity = mesh.ca.client(Some(&mesh.ca.workload(&[&pki::spiffe_id(&pod.namespace, &pod.service_account)])));

    // It claims to be at its sibling's address, in the broker's header and
    // in `X-Forwarded-For`: the sidecar states where the connection really
    // comes from.
    let claim = ip.to_string();
    let borrowed =
        request.clone().source(plain_ip).header(PEER_ADDRESS_HEADER, &claim).header("x-forwarded-for", &claim);
    let reply = borrowed.send_tls(&identity, broker_sidecar.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((reply.status, reply.json()["Code"].as_str()), (403, Some("AccessDenied")), "{}", reply.body_text());
    let message = reply.json()["Message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains(&format!("caller at {plain_ip} is not pod \"{}\"", pod.name)), "{message}");
    wait::until("the denial Event on the enabled pod", || async {
        let events = cluster.events(&pod.namespace).await;
        events
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(DENIAL_EVENT_REASON)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod.name.as_str())
                    && e.note.as_deref().is_some_and(|note| note.contains(&plain_ip.to_string()))
            })
            .then_some(())
    })
    .await;
    assert_eq!(cluster.token_requests(BROKER_USER).len(), 0, "a denied request caused a token");

    // The enabled pod itself, whatever it claims, is where it is.
    let own = request.source(ip).header(PEER_ADDRESS_HEADER, &plain_ip.to_string());
    let reply = own.send_tls(&identity, broker_sidecar.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
}

#[tokio::test]
async fn the_filter_reaches_a_broker_that_terminates_mtls_itself() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let pod = Pod::enabled();
    let ip = pod_ip(&cluster.add_pod(kube_pod(&pod, ROLE_ARN)).await);
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let files = MtlsFiles {
        certificate_chain: mesh.broker.cert.clone(),
        private_key: mesh.broker.key.clone(),
        client_ca_bundle: mesh.broker.ca.clone(),
    };
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.mtls(files, wait::PATIENCE).start().await;
    let app = Envoy::sidecar().pod(pod).pod_ip(ip).broker_mtls(broker.addr, &mesh.app, &pki::broker_id()).start().await;

    let reply = app.imds(Req::get(CREDENTIALS_PATH)).await;
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert!(reply.json()["AccessKeyId"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{}", reply.body_text());
}
