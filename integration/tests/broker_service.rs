//! The broker's service (`token_broker::server::run`) in-process on
//! loopback, against a real Kubernetes API server (etcd and kube-apiserver,
//! the broker as its own service account with the rendered RBAC) and STS
//! (moto behind the web identity checks AWS makes, or a scripted STS for
//! throttling and single flight), driven over real HTTP with the raw client:
//! the v1 contract status by status, both identity modes, single flight,
//! readiness and metrics. What the broker asked of the API server comes from
//! its audit log.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use imds_filter::config::{ENABLE_LABEL, ROLE_ANNOTATION};
use integration::broker::{Scripted, ScriptedBroker};
use integration::kube_cluster::{self, BROKER_USER, KubeCluster, pod_ip};
use integration::logs::LogBuffer;
use integration::real_broker::SIDECAR_SOURCE;
use integration::scripted_sts::{self, ScriptedSts};
use integration::{ROLE_ARN, RealBroker, Reply, Req, Sts, wait};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mesh_config::render::Options;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use token_broker::app::AppConfig;
use token_broker::identity::{self, IdentityMode, SpiffeId, XfccVerifier};
use token_broker::kube::{Cluster, DENIAL_EVENT_REASON};
use token_broker::peer::PEER_ADDRESS_HEADER;
use token_broker::telemetry;
use tracing_subscriber::prelude::*;

const NS: &str = "default";
const SA: &str = "app";
const OWN_ID: &str = "spiffe://cluster.local/ns/imds-mesh/sa/token-broker";
const POLICY_ANNOTATION: &str = "imds-mesh.io/permitted-roles";

fn xfcc() -> IdentityMode {
    let own_id = SpiffeId::parse(OWN_ID).unwrap_or_else(|e| panic!("{e:?}"));
    IdentityMode::Xfcc(XfccVerifier { own_id, trust_domain: "cluster.local".into() })
}

/// A broker over `cluster`, as its own service account with the default
/// rendered RBAC, and the STS at `sts_endpoint` (`insecure-dev` unless `tune`
/// says otherwise); ready.
async fn start(cluster: &KubeCluster, sts_endpoint: String, tune: impl FnOnce(&mut AppConfig)) -> RealBroker {
    let kube = cluster.broker_config(&Options::default()).await;
    RealBroker::with_kube(kube, sts_endpoint).tune(tune).start().await
}

/// A pod running as `sa` in [`NS`], opted in and annotated with [`ROLE_ARN`].
fn pod(name: &str, sa: &str) -> Pod {
    kube_cluster::enabled_pod(NS, name, sa, ROLE_ARN)
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_else(|| panic!("pod without uid"))
}

/// Whether `cluster` has a denial Event on the pod `name` of [`NS`].
async fn denial_event_on(cluster: &KubeCluster, name: &str) -> bool {
    denial_events_on(cluster, name).await.next().is_some()
}

/// The notes of the denial Events on the pod `name` of [`NS`].
async fn denial_events_on(cluster: &KubeCluster, name: &str) -> impl Iterator<Item = String> {
    let events = cluster.events(NS).await.into_iter().filter(|e| {
        e.reason.as_deref() == Some(DENIAL_EVENT_REASON)
            && e.type_.as_deref() == Some("Warning")
            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
    });
    events.map(|e| e.note.unwrap_or_default())
}

fn credentials_path(role_arn: &str, pod: &str) -> String {
    let encoded: String = role_arn.replace(':', "%3A").replace('/', "%2F");
    format!("/v1/credentials?role_arn={encoded}&pod={pod}")
}

/// A credential request as the `insecure-dev` caller `NS`/`sa`.
fn dev_request(sa: &str, pod: &str) -> Req {
    Req::get(credentials_path(ROLE_ARN, pod))
        .host("token-broker")
        .header(identity::DEV_NAMESPACE_HEADER, NS)
        .header(identity::DEV_SERVICE_ACCOUNT_HEADER, sa)
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    Req::get(path).host("token-broker").send(addr).await
}

/// Asserts the contract's error: status, JSON `Code`, a `Message`.
fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.body_text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["Code"], code, "{body}");
    assert!(body["Message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
}

/// Asserts the IMDS credential document.
fn assert_document(reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let doc = reply.json();
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    for key in ["AccessKeyId", "SecretAccessKey", "Token"] {
        assert!(doc[key].as_str().is_some_and(|v| !v.is_empty()), "{key} in {doc}");
    }
    for key in ["LastUpdated", "Expiration"] {
        let text = doc[key].as_str().unwrap_or_else(|| panic!("{key} in {doc}"));
        assert!(text.ends_with('Z'), "{key} {text}");
        OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{key} {text}: {e}"));
    }
    doc
}

#[tokio::test]
async fn an_allowed_pod_gets_credentials_from_sts() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let web = cluster.add_pod(pod("web-0", SA)).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    let doc = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    // moto issues ASIA keys; the scripted STS and the harness broker do not.
    assert!(doc["AccessKeyId"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{doc}");

    // The TokenRequest, as the API server granted it.
    let granted = cluster.token_requests(BROKER_USER);
    let [spec] = &granted[..] else { panic!("{granted:?}") };
    assert_eq!(spec.audiences, ["sts.amazonaws.com"]);
    assert_eq!(spec.expiration_seconds, Some(3600));
    let bound = spec.bound_object_ref.as_ref().unwrap_or_else(|| panic!("the token is not bound to the pod"));
    assert_eq!((bound.name.as_deref(), bound.uid.as_deref()), (Some("web-0"), Some(uid(&web))));
    // The token, as STS verified it.
    let seen = sts.seen();
    let [claims] = &seen.accepted[..] else { panic!("{seen:?}") };
    assert_eq!(claims["sub"], format!("system:serviceaccount:{NS}:{SA}"));
    assert_eq!(claims["kubernetes.io"]["pod"]["uid"], uid(&web));

    // The second request is a cache hit: no new token.
    let again = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    assert_eq!(again["AccessKeyId"], doc["AccessKeyId"]);
    assert_eq!(cluster.token_requests(BROKER_USER).len(), 1);
    assert_eq!(sts.seen().accepted.len(), 1);
}

#[tokio::test]
async fn xfcc_identity_comes_only_from_the_brokers_own_sidecar_element() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let web_ip = pod_ip(&cluster.add_pod(pod("web-0", SA)).await).to_string();
    let broker = start(&cluster, sts.endpoint(), |config| config.identity = xfcc()).await;
    let ours = format!("By={OWN_ID};Hash=0a1b;URI=spiffe://cluster.local/ns/{NS}/sa/{SA}");
    // This test stands in for the broker's sidecar: it connects from the
    // sidecar's address and states where the caller (web-0) is.
    let request = |xfcc: Option<&str>| {
        let req = Req::get(credentials_path(ROLE_ARN, "web-0"))
            .host("token-broker")
            .source(SIDECAR_SOURCE)
            .header(PEER_ADDRESS_HEADER, &web_ip);
        match xfcc {
            Some(value) => req.header("x-forwarded-client-cert", value),
            None => req,
        }
    };

    assert_document(&request(Some(&ours)).send(broker.addr).await);
    // A client-supplied element before ours changes nothing.
    let with_client_part = format!("By={OWN_ID};URI=spiffe://cluster.local/ns/other/sa/admin,{ours}");
    assert_document(&request(Some(&with_client_part)).send(broker.addr).await);

    let forged = [
        // No XFCC at all (plaintext, or a bypass of the sidecar).
        None,
        // The client claims to be our sidecar, and a real sidecar appended
        // its own element with another By: the last element is not ours.
        Some(format!("{ours},By=spiffe://cluster.local/ns/x/sa/other-proxy;URI=spiffe://cluster.local/ns/x/sa/x")),
        // No By.
        Some(format!("URI=spiffe://cluster.local/ns/{NS}/sa/{SA}")),
        // Another trust domain.
        Some(format!("By={OWN_ID};URI=spiffe://evil.example/ns/{NS}/sa/{SA}")),
        // An open quote swallowing what follows.
        Some(format!("Hash=\"x,{ours}")),
    ];
    for xfcc in &forged {
        assert_error(&request(xfcc.as_deref()).send(broker.addr).await, 401, "Unauthenticated");
    }
    // The plain development headers mean nothing in xfcc mode.
    let dev = dev_request(SA, "web-0").source(SIDECAR_SOURCE).header(PEER_ADDRESS_HEADER, &web_ip);
    assert_error(&dev.send(broker.addr).await, 401, "Unauthenticated");
}

/// A request for `pod`'s credentials as the broker's sidecar makes it: from
/// the sidecar's address, with the XFCC element it appends for a caller
/// running as [`NS`]/[`SA`], stating that the caller is at `caller`.
fn via_sidecar(pod: &str, caller: IpAddr) -> Req {
    Req::get(credentials_path(ROLE_ARN, pod))
        .host("token-broker")
        .source(SIDECAR_SOURCE)
        .header("x-forwarded-client-cert", &format!("By={OWN_ID};URI=spiffe://cluster.local/ns/{NS}/sa/{SA}"))
        .header(PEER_ADDRESS_HEADER, &caller.to_string())
}

/// Whether the broker's metrics have `line`.
async fn has_metric(broker: &RealBroker, line: &str) -> bool {
    broker.admin_get("/metrics").await.body_text().lines().any(|l| l == line)
}

#[tokio::test]
async fn a_pod_without_the_label_cannot_use_its_enabled_siblings_role() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    // Two pods of one service account, so of one mesh identity: one opted
    // in, one not (its sidecar has no filter, but its app can call the
    // broker through it all the same).
    let web = pod_ip(&cluster.add_pod(pod("web-0", SA)).await);
    let mut plain = pod("plain-0", SA);
    plain.metadata.labels = None;
    let plain = pod_ip(&cluster.add_pod(plain).await);
    let broker = start(&cluster, sts.endpoint(), |config| config.identity = xfcc()).await;

    let borrowed = via_sidecar("web-0", plain).send(broker.addr).await;
    assert_error(&borrowed, 403, "AccessDenied");
    let message = borrowed.json()["Message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains(&format!("caller at {plain} is not pod \"web-0\"")), "{message}");
    // The Event on the pod whose role was asked for, as the API server has
    // it: which address asked, and the pod's own.
    let note = wait::until("the denial Event on web-0", || async {
        denial_events_on(&cluster, "web-0").await.find(|note| note.contains(&plain.to_string()))
    })
    .await;
    assert!(note.contains(&web.to_string()), "{note}");
    assert!(has_metric(&broker, "token_broker_denials_total{rule=\"caller_not_pod\"} 1").await);
    assert!(cluster.token_requests(BROKER_USER).is_empty(), "a denied request minted a token");

    // The pod itself is served.
    assert_document(&via_sidecar("web-0", web).send(broker.addr).await);
}

#[tokio::test]
async fn only_connections_through_the_brokers_sidecar_are_served() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let web = pod_ip(&cluster.add_pod(pod("web-0", SA)).await);
    let broker = start(&cluster, sts.endpoint(), |config| config.identity = xfcc()).await;

    // A port-forward, or a process reaching the broker's port past the
    // sidecar: its XFCC element and stated address are its own words, even
    // from the pod's own address.
    for source in [IpAddr::from(Ipv4Addr::LOCALHOST), web] {
        let direct = via_sidecar("web-0", web).source(source).send(broker.addr).await;
        assert_error(&direct, 401, "Unauthenticated");
        assert!(direct.body_text().contains("not_through_sidecar"), "{}", direct.body_text());
    }
    // From the sidecar, but without its statement of the caller's address.
    let unstated = Req::get(credentials_path(ROLE_ARN, "web-0"))
        .host("token-broker")
        .source(SIDECAR_SOURCE)
        .header("x-forwarded-client-cert", &format!("By={OWN_ID};URI=spiffe://cluster.local/ns/{NS}/sa/{SA}"));
    assert_error(&unstated.send(broker.addr).await, 401, "Unauthenticated");
    assert!(cluster.token_requests(BROKER_USER).is_empty(), "{:?}", cluster.token_requests(BROKER_USER));

    assert_document(&via_sidecar("web-0", web).send(broker.addr).await);
    assert!(has_metric(&broker, "token_broker_unauthenticated_total{reason=\"not_through_sidecar\"} 2").await);
    assert!(has_metric(&broker, "token_broker_unauthenticated_total{reason=\"no_stated_address\"} 1").await);
}

#[tokio::test]
async fn the_sidecars_address_is_configurable_and_the_pod_check_can_be_turned_off() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(pod("web-0", SA)).await;
    let elsewhere = IpAddr::from(Ipv4Addr::new(127, 0, 0, 7));
    let broker = start(&cluster, sts.endpoint(), |config| {
        config.identity = xfcc();
        config.sidecar_sources = vec!["127.0.0.7".parse().unwrap_or_else(|e| panic!("{e}"))];
        config.pod_address_check = false;
    })
    .await;

    // Only the configured source counts as the sidecar.
    let stranger = IpAddr::from(Ipv4Addr::new(127, 99, 0, 1));
    let from_default = via_sidecar("web-0", stranger).send(broker.addr).await;
    assert_error(&from_default, 401, "Unauthenticated");
    // Without the pod check, any caller of the service account is served,
    // wherever it is, stated or not.
    assert_document(&via_sidecar("web-0", stranger).source(elsewhere).send(broker.addr).await);
    let unstated = Req::get(credentials_path(ROLE_ARN, "web-0"))
        .host("token-broker")
        .source(elsewhere)
        .header("x-forwarded-client-cert", &format!("By={OWN_ID};URI=spiffe://cluster.local/ns/{NS}/sa/{SA}"));
    assert_document(&unstated.send(broker.addr).await);
}

#[tokio::test]
async fn a_pod_without_an_address_yet_is_not_found_for_now() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    // Created, not yet given a sandbox: no status, no IP.
    cluster.service_account(NS, SA).await;
    Api::<Pod>::namespaced(cluster.admin(), NS)
        .create(&PostParams::default(), &pod("starting-0", SA))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let broker = start(&cluster, sts.endpoint(), |config| config.identity = xfcc()).await;

    // 404 tells the filter to retry soon; a 403 would be remembered.
    let reply =
        via_sidecar("starting-0", "127.244.0.99".parse().unwrap_or_else(|e| panic!("{e}"))).send(broker.addr).await;
    assert_error(&reply, 404, "PodNotFound");
    assert!(reply.body_text().contains("no IP address yet"), "{}", reply.body_text());
    assert!(!denial_event_on(&cluster, "starting-0").await);
}

#[tokio::test]
async fn every_deny_rule_is_403_with_an_event_on_the_pod() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    // Held by a finalizer once deleted: terminating.
    let mut terminating = pod("terminating", SA);
    terminating.metadata.finalizers = Some(vec!["imds-mesh.io/test".to_owned()]);
    let mut not_enabled = pod("not-enabled", SA);
    not_enabled.metadata.labels = Some(BTreeMap::from([(ENABLE_LABEL.to_owned(), "true".to_owned())]));
    let mut no_annotation = pod("no-annotation", SA);
    no_annotation.metadata.annotations = None;
    let mut other_role = pod("other-role", SA);
    other_role.metadata.annotations =
        Some(BTreeMap::from([(ROLE_ANNOTATION.to_owned(), "arn:aws:iam::123456789012:role/other".to_owned())]));
    for pod in [pod("other-sa", "admin"), pod("finished", SA), terminating, not_enabled, no_annotation, other_role] {
        cluster.add_pod(pod).await;
    }
    // Run to completion, as a kubelet would report it.
    let finished = json!({ "status": { "phase": "Succeeded" } });
    Api::<Pod>::namespaced(cluster.admin(), NS)
        .patch_status("finished", &PatchParams::default(), &Patch::Merge(&finished))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.delete_pod(NS, "terminating").await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    for name in ["other-sa", "finished", "terminating", "not-enabled", "no-annotation", "other-role"] {
        let reply = dev_request(SA, name).send(broker.addr).await;
        assert_error(&reply, 403, "AccessDenied");
        wait::until(&format!("a denial Event on {name}"), || async {
            denial_event_on(&cluster, name).await.then_some(())
        })
        .await;
    }
    let granted = cluster.token_requests(BROKER_USER);
    assert!(granted.is_empty(), "a denied request minted a token: {granted:?}");
}

#[tokio::test]
async fn the_namespace_policy_narrows_the_roles_a_namespace_may_use() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(pod("web-0", SA)).await;
    // Rendered with the policy, the broker may list and watch namespaces.
    let broker = RealBroker::with_namespace_policy(&cluster, sts.endpoint(), POLICY_ANNOTATION).await.start().await;
    let with_policy = |pattern: &str| {
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": NS, "annotations": { POLICY_ANNOTATION: pattern } },
        });
        let cluster = &cluster;
        async move { cluster.apply(&[namespace]).await }
    };

    // No annotation: the namespace permits nothing.
    assert_error(&dev_request(SA, "web-0").send(broker.addr).await, 403, "AccessDenied");
    with_policy("arn:aws:iam::123456789012:role/other").await;
    assert_error(&dev_request(SA, "web-0").send(broker.addr).await, 403, "AccessDenied");
    with_policy("arn:aws:iam::123456789012:role/.*").await;
    // The broker learns of the change from its namespace watch.
    let reply = wait::until("the broader policy to reach the broker", || async {
        Some(dev_request(SA, "web-0").send(broker.addr).await).filter(|reply| reply.status != 403)
    })
    .await;
    assert_document(&reply);
}

#[tokio::test]
async fn unknown_pods_missing_identity_and_bad_parameters_get_their_status() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(pod("web-0", SA)).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    assert_error(&dev_request(SA, "nobody-0").send(broker.addr).await, 404, "PodNotFound");
    let anonymous = Req::get(credentials_path(ROLE_ARN, "web-0")).host("token-broker");
    assert_error(&anonymous.send(broker.addr).await, 401, "Unauthenticated");
    let bad_names =
        Req::get(credentials_path(ROLE_ARN, "web-0")).header(identity::DEV_NAMESPACE_HEADER, "Not_A_Namespace");
    assert_error(
        &bad_names.header(identity::DEV_SERVICE_ACCOUNT_HEADER, SA).send(broker.addr).await,
        401,
        "Unauthenticated",
    );

    let dev = |path: String| {
        Req::get(path).header(identity::DEV_NAMESPACE_HEADER, NS).header(identity::DEV_SERVICE_ACCOUNT_HEADER, SA)
    };
    for path in [
        credentials_path("arn:aws:iam::123:role/app", "web-0"),
        credentials_path("arn:aws:s3:::bucket", "web-0"),
        "/v1/credentials?pod=web-0".to_owned(),
        format!("{}&pod=web-1", credentials_path(ROLE_ARN, "web-0")),
        credentials_path(ROLE_ARN, "Web_0"),
    ] {
        assert_error(&dev(path).send(broker.addr).await, 400, "InvalidRequest");
    }
    let granted = cluster.token_requests(BROKER_USER);
    assert!(granted.is_empty(), "{granted:?}");
}

#[tokio::test]
async fn sts_throttling_is_429_with_retry_after() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("web-0", SA)).await;
    let sts = ScriptedSts::always(scripted_sts::error("Throttling", "Rate exceeded")).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    let reply = dev_request(SA, "web-0").send(broker.addr).await;
    assert_error(&reply, 429, "Throttled");
    let retry_after: u64 = reply.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or_default();
    assert!(retry_after >= 1, "Retry-After: {:?}", reply.header("retry-after"));
    assert_eq!(sts.request_count(), 1);
}

#[tokio::test]
async fn sts_refusals_are_502_naming_the_sts_code() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("web-0", SA)).await;
    let sts = ScriptedSts::always(scripted_sts::error("InvalidIdentityToken", "No OpenIDConnect provider")).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    let reply = dev_request(SA, "web-0").send(broker.addr).await;
    assert_error(&reply, 502, "StsError");
    assert!(
        reply.json()["Message"].as_str().is_some_and(|m| m.contains("InvalidIdentityToken")),
        "{}",
        reply.body_text()
    );
}

#[tokio::test]
async fn an_sts_access_denied_is_403_with_an_event_on_the_pod() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("web-0", SA)).await;
    let sts = ScriptedSts::always(scripted_sts::error(
        "AccessDenied",
        "Not authorized to perform sts:AssumeRoleWithWebIdentity",
    ))
    .await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    let reply = dev_request(SA, "web-0").send(broker.addr).await;
    assert_error(&reply, 403, "AccessDenied");
    let note =
        wait::until("a denial Event on web-0", || async { denial_events_on(&cluster, "web-0").await.next() }).await;
    assert!(note.contains("STS refused role") && note.contains("AccessDenied"), "{note}");
    assert!(note.contains(ROLE_ARN), "{note}");
    assert!(has_metric(&broker, "token_broker_denials_total{rule=\"sts_denied\"} 1").await);

    // Remembered (the cache's backoff): denied and counted again, but the
    // per-pod budget records no second Event for the same reason.
    assert_error(&dev_request(SA, "web-0").send(broker.addr).await, 403, "AccessDenied");
    assert_eq!(sts.request_count(), 1);
    wait::until("the second denial counted", || async {
        has_metric(&broker, "token_broker_denials_total{rule=\"sts_denied\"} 2").await.then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(denial_events_on(&cluster, "web-0").await.count(), 1);
}

#[tokio::test]
async fn an_sts_call_the_cache_abandons_leaves_no_call_in_flight() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("web-0", SA)).await;
    // STS never answers within the fetch's timeout: the cache aborts the
    // fetch, dropping it in the middle of the STS call.
    let sts = ScriptedSts::always(sts_success(Duration::from_secs(20))).await;
    let broker = start(&cluster, sts.endpoint(), |config| config.cache.fetch_timeout = Duration::from_secs(2)).await;

    let addr = broker.addr;
    let request = tokio::spawn(async move { dev_request(SA, "web-0").send(addr).await });
    wait::until("the STS call in flight", || async {
        has_metric(&broker, "token_broker_sts_calls_in_flight 1").await.then_some(())
    })
    .await;
    let reply = request.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.status >= 500, "{}", reply.body_text());
    wait::until("no STS call in flight", || async {
        has_metric(&broker, "token_broker_sts_calls_in_flight 0").await.then_some(())
    })
    .await;
    assert!(has_metric(&broker, "token_broker_sts_calls_total 1").await);
}

/// A successful `AssumeRoleWithWebIdentity` answer, as STS writes it, after
/// `delay`.
fn sts_success(delay: Duration) -> Scripted {
    sts_success_numbered(1, delay)
}

/// [`sts_success`] with access key `ASIASCRIPTED<call>`.
fn sts_success_numbered(call: usize, delay: Duration) -> Scripted {
    scripted_sts::success(call, delay)
}

#[tokio::test]
async fn credentials_in_use_are_refreshed_ahead_in_the_background() {
    let cluster = KubeCluster::start().await;
    let web = cluster.add_pod(pod("web-0", SA)).await;
    let sts = ScriptedSts::start(|call| sts_success_numbered(call, Duration::ZERO)).await;
    // One-hour credentials fall inside a 61-minute refresh window at once,
    // so the refresh-ahead timing shrinks from tens of minutes to seconds.
    let broker = start(&cluster, sts.endpoint(), |config| {
        config.cache.refresh_before = Duration::from_secs(61 * 60);
        config.cache.min_refresh_interval = Duration::from_secs(1);
        config.cache.sweep_interval = Duration::from_millis(100);
    })
    .await;

    let first = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    assert_eq!(first["AccessKeyId"], "ASIASCRIPTED0000000");
    // No request arrives, yet the broker fetches again: a new token and a
    // new STS call, bound to the same pod.
    wait::until("a background refresh", || async { (sts.request_count() >= 2).then_some(()) }).await;
    let granted = cluster.token_requests(BROKER_USER);
    assert!(granted.len() >= 2, "the refresh minted no new token: {granted:?}");
    for spec in &granted {
        let bound = spec.bound_object_ref.as_ref().and_then(|b| b.uid.as_deref());
        assert_eq!(bound, Some(uid(&web)), "{spec:?}");
    }
    // Requests then get the refreshed credential from the cache (once the
    // refresh STS answered has been stored).
    wait::until("the refreshed credential to be served", || async {
        let next = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
        (next["AccessKeyId"] != first["AccessKeyId"]).then_some(())
    })
    .await;
    let metrics = broker.admin_get("/metrics").await.body_text();
    assert!(!metrics.contains("token_broker_cache_refreshes_total 0\n"), "{metrics}");
}

#[tokio::test]
async fn fifty_concurrent_first_requests_cause_one_token_and_one_sts_call() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("web-0", SA)).await;
    let sts = ScriptedSts::always(sts_success(Duration::from_millis(300))).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    let addr = broker.addr;
    let requests = (0..50).map(|_| async move { dev_request(SA, "web-0").send(addr).await });
    let replies = futures_util::future::join_all(requests).await;
    for reply in &replies {
        let doc = assert_document(reply);
        assert_eq!(doc["AccessKeyId"], "ASIASCRIPTED0000001");
    }
    assert_eq!(cluster.token_requests(BROKER_USER).len(), 1);
    assert_eq!(sts.request_count(), 1);
}

#[tokio::test]
async fn readiness_waits_for_the_pod_watch_and_never_comes_in_insecure_dev_mode() {
    let mut cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let kube = cluster.broker_config(&Options::default()).await;
    // Down from the start: the pod watches cannot list.
    cluster.stop_apiserver();
    let secure =
        RealBroker::with_kube(kube.clone(), sts.endpoint()).tune(|c| c.identity = xfcc()).start_unsynced().await;
    let insecure = RealBroker::with_kube(kube, sts.endpoint()).start_unsynced().await;
    for broker in [&secure, &insecure] {
        assert_eq!(get(broker.addr, "/healthz").await.status, 200);
        let unready = get(broker.addr, "/readyz").await;
        assert_eq!(unready.status, 503, "{}", unready.body_text());
        assert!(unready.body_text().contains("not ready: the pod watch has not synced"), "{}", unready.body_text());
    }
    assert!(!get(secure.addr, "/readyz").await.body_text().contains("INSECURE"));

    cluster.start_apiserver().await;
    let addr = secure.addr;
    wait::until(
        "the xfcc broker to be ready",
        || async move { (get(addr, "/readyz").await.status == 200).then_some(()) },
    )
    .await;
    assert_eq!(get(secure.addr, "/readyz").await.body_text(), "ready\n");
    // Synced, and still not ready: insecure-dev never is.
    wait::until("the insecure broker's watch to sync", || async { insecure.is_synced().then_some(()) }).await;
    let never = get(insecure.addr, "/readyz").await;
    assert_eq!(never.status, 503, "{}", never.body_text());
    assert_eq!(never.body_text().lines().count(), 1, "{}", never.body_text());
    assert!(never.body_text().starts_with("not ready: INSECURE-DEV IDENTITY MODE"), "{}", never.body_text());
}

#[tokio::test]
async fn metrics_count_outcomes_without_arns_or_secrets() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(pod("web-0", SA)).await;
    cluster.add_pod(pod("other-sa", "admin")).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;
    let doc = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    assert_error(&dev_request(SA, "other-sa").send(broker.addr).await, 403, "AccessDenied");
    assert_error(&dev_request(SA, "nobody").send(broker.addr).await, 404, "PodNotFound");

    let reply = get(broker.addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    let metrics = reply.body_text();
    for line in [
        "token_broker_credential_requests_total{outcome=\"Success\"} 2",
        "token_broker_credential_requests_total{outcome=\"AccessDenied\"} 1",
        "token_broker_credential_requests_total{outcome=\"PodNotFound\"} 1",
        "token_broker_denials_total{rule=\"wrong_service_account\"} 1",
        "token_broker_sts_calls_total 1",
        "token_broker_sts_calls_in_flight 0",
        "token_broker_cache_hits_total 1",
        "token_broker_cache_misses_total 1",
        "token_broker_cache_refreshes_total 0",
        "token_broker_credential_request_duration_seconds_count 4",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in:\n{metrics}");
    }
    for secret in ["AccessKeyId", "SecretAccessKey", "Token"] {
        let value = doc[secret].as_str().unwrap_or_default();
        assert!(!metrics.contains(value), "{secret} in the metrics");
    }
    assert!(!metrics.contains("arn:"), "an ARN in the metrics:\n{metrics}");
    assert!(!metrics.contains("web-0"), "a pod name in the metrics:\n{metrics}");
}

#[tokio::test]
async fn kubernetes_api_down_after_sync_still_serves_known_pods() {
    let mut cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(pod("web-0", SA)).await;
    cluster.add_pod(pod("worker-0", "worker")).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;
    let cached = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);

    cluster.stop_apiserver();
    // Watch cache and credential cache: no API call needed.
    let served = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    assert_eq!(served["AccessKeyId"], cached["AccessKeyId"]);
    // The pod is in the watch cache, but its key needs a new TokenRequest.
    let new_key = dev_request("worker", "worker-0").send(broker.addr).await;
    assert_error(&new_key, 503, "Unavailable");
    assert!(
        new_key.json()["Message"].as_str().is_some_and(|m| m.contains("Kubernetes API")),
        "{}",
        new_key.body_text()
    );
    // Not in the watch cache: the direct read fails, so the broker cannot
    // say the pod does not exist (503, not 404).
    let unknown = dev_request(SA, "nobody-0").send(broker.addr).await;
    assert_error(&unknown, 503, "Unavailable");
    assert_eq!(cluster.token_requests(BROKER_USER).len(), 1);
    assert!(broker.is_synced(), "the watch stays synced through the outage");
}

/// An STS that answers [`sts_success`] until `down` is set, then 503
/// `ServiceUnavailable` as STS does when it is down.
async fn switchable_sts(down: &Arc<AtomicBool>) -> ScriptedSts {
    let down = Arc::clone(down);
    ScriptedSts::start(move |_| {
        if down.load(Ordering::SeqCst) {
            scripted_sts::error_with_status(503, "ServiceUnavailable", "Service is unavailable")
        } else {
            sts_success(Duration::ZERO)
        }
    })
    .await
}

#[tokio::test]
async fn sts_down_serves_cached_credentials_and_answers_502_for_new_keys() {
    let cluster = KubeCluster::start().await;
    cluster.add_pod(pod("web-0", SA)).await;
    cluster.add_pod(pod("worker-0", "worker")).await;
    let down = Arc::new(AtomicBool::new(false));
    let sts = switchable_sts(&down).await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;
    let cached = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);

    down.store(true, Ordering::SeqCst);
    let new_key = dev_request("worker", "worker-0").send(broker.addr).await;
    assert_error(&new_key, 502, "StsError");
    assert!(
        new_key.json()["Message"].as_str().is_some_and(|m| m.contains("ServiceUnavailable")),
        "{}",
        new_key.body_text()
    );
    // Before and after the failure of another key, the cached one is served.
    for _ in 0..2 {
        let served = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
        assert_eq!(served["AccessKeyId"], cached["AccessKeyId"]);
        assert_eq!(served["SecretAccessKey"], cached["SecretAccessKey"]);
    }
    assert_eq!(sts.request_count(), 2, "only the new key reached STS");
}

/// The token in the scripted API server's undecodable TokenRequest answer.
const UNDECODABLE_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.undecodable-token-request-answer.c2lnbmF0dXJl";

// The subscriber is the process's global default, not a scoped one: with a
// scoped default, the other tests' threads (no subscriber) race it for
// tracing's per-callsite interest cache, and a callsite can end up disabled
// here. Their lines land in the buffer too, which only widens the check.
#[tokio::test(flavor = "current_thread")]
async fn no_key_secret_or_token_reaches_the_broker_logs() {
    let logs = LogBuffer::default();
    // The broker's own logging (main.rs `init_logging`): the filter it
    // builds, at its default level, with its caps; both formats it offers.
    let filter = telemetry::log_filter(telemetry::DEFAULT_LOG_FILTER).unwrap_or_else(|e| panic!("{e}"));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(logs.writer()))
        .with(tracing_subscriber::fmt::layer().json().with_writer(logs.writer()));
    subscriber.try_init().unwrap_or_else(|e| panic!("{e}"));

    let cluster = KubeCluster::start().await;
    for (name, sa) in [("web-0", SA), ("other-sa", "admin"), ("worker-0", "worker"), ("batch-0", "batch")] {
        cluster.add_pod(pod(name, sa)).await;
    }
    // STS call 0 succeeds, 1 refuses, 2 throttles.
    let sts = ScriptedSts::start(|n| match n {
        0 => sts_success(Duration::ZERO),
        1 => scripted_sts::error("InvalidIdentityToken", "No OpenIDConnect provider"),
        _ => scripted_sts::error("Throttling", "Rate exceeded"),
    })
    .await;
    let broker = start(&cluster, sts.endpoint(), |_| {}).await;

    let doc = assert_document(&dev_request(SA, "web-0").send(broker.addr).await);
    assert_error(&dev_request(SA, "other-sa").send(broker.addr).await, 403, "AccessDenied");
    assert_error(&dev_request("worker", "worker-0").send(broker.addr).await, 502, "StsError");
    assert_error(&dev_request("batch", "batch-0").send(broker.addr).await, 429, "Throttled");
    // The denial's Event is recorded in the background; its logs count too.
    wait::until("the denial Event", || async { denial_event_on(&cluster, "other-sa").await.then_some(()) }).await;
    drop(broker);
    // kube-client logs a body it cannot decode at warn: an API server (or
    // something in front of it) answering a TokenRequest with a token in a
    // body of the wrong shape. The broker's TokenRequest code, against a
    // scripted API server that answers so.
    let undecodable = ScriptedBroker::start(|_| Scripted {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: json!({"kind": "TokenRequest", "status": {"token": UNDECODABLE_TOKEN}}).to_string(),
        delay: Duration::ZERO,
    })
    .await;
    let url = format!("http://{}", undecodable.addr()).parse().unwrap_or_else(|e| panic!("{e}"));
    let client = token_broker::kube::client(kube::Config::new(url)).unwrap_or_else(|e| panic!("{e}"));
    let token = Cluster::new(client, "broker-test-0").token(NS, SA, "web-0", "uid", "sts.amazonaws.com", 3600).await;
    assert!(token.is_err(), "an undecodable TokenRequest answer gave a token");
    assert_eq!(undecodable.call_count(), 1);

    // The access key ID is not a secret: the audit trail names it, as
    // CloudTrail does, so a SIEM can join the two.
    let mut secrets: Vec<(String, String)> = ["SecretAccessKey", "Token"]
        .iter()
        .map(|key| (key.to_string(), doc[key].as_str().unwrap_or_default().to_owned()))
        .collect();
    assert_eq!(cluster.token_requests(BROKER_USER).len(), 3, "one token per key that reached STS");
    // The API server's response with each token is not logged, but every
    // token it signs opens with the same header (algorithm, key id), so a
    // line holding any of its tokens holds that header: the three the
    // broker exchanged, and its own.
    let some_token = cluster.token(NS, SA).await;
    let header = some_token.split('.').next().unwrap_or_default().to_owned();
    secrets.push(("a service-account token (its JWT header)".to_owned(), header));
    secrets.push(("the token in an undecodable TokenRequest answer".to_owned(), UNDECODABLE_TOKEN.to_owned()));
    let log = logs.text();
    for (what, secret) in &secrets {
        assert!(!secret.is_empty(), "{what} is empty");
        let leaks: Vec<&str> = log.lines().filter(|line| line.contains(secret.as_str())).collect();
        assert!(leaks.is_empty(), "{what} in the broker's logs:\n{}", leaks.join("\n"));
    }
    // Lines from the request tasks (spawned per connection): the capture
    // covers the tasks the broker spawns. (The pod watch's own "listed" line
    // is not required: it can land after the requests are done.)
    for expected in
        ["credentials issued", "credentials denied", "STS call failed", "InvalidIdentityToken", "Throttling"]
    {
        assert!(log.contains(expected), "no {expected:?} in the broker's logs:\n{log}");
    }
}
