//! The harness's STS (moto) and Kubernetes API endpoint, driven over real
//! HTTP with the raw client, so the broker's tests can rely on them.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use integration::http::Streaming;
use integration::kube_api::{self, KubeApi};
use integration::sts::{self, Sts};
use integration::{ROLE_ARN, Req};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rsa::signature::Verifier;
use rsa::{BigUint, RsaPublicKey};
use serde_json::{Value, json};
use sha2::Sha256;

const ENABLE_LABEL: &str = "gkemulticloud.googleapis.com/aws-imds-emulator-enabled";

fn pod(namespace: &str, name: &str, service_account: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { service_account_name: Some(service_account.into()), ..PodSpec::default() }),
        ..Pod::default()
    }
}

fn names(list: &Value) -> Vec<String> {
    let items = list["items"].as_array().unwrap_or_else(|| panic!("not a list: {list}"));
    items.iter().map(|p| format!("{}/{}", p["metadata"]["namespace"], p["metadata"]["name"]).replace('"', "")).collect()
}

async fn get(api: &KubeApi, path: &str) -> integration::Reply {
    Req::get(path).host("kubernetes").send(api.addr()).await
}

async fn post(api: &KubeApi, path: &str, body: &Value) -> integration::Reply {
    Req::new("POST", path)
        .host("kubernetes")
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send(api.addr())
        .await
}

async fn token_request(api: &KubeApi, ns: &str, sa: &str, pod: &Pod, expiration: i64) -> integration::Reply {
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["sts.amazonaws.com"],
            "expirationSeconds": expiration,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.metadata.name,
                "uid": pod.metadata.uid,
            },
        },
    });
    post(api, &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"), &body).await
}

/// The next watch event, failing the test if none comes.
async fn next_event(watch: &mut Streaming) -> Value {
    let line = tokio::time::timeout(integration::wait::PATIENCE, watch.next_line())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {:?}", integration::wait::PATIENCE))
        .unwrap_or_else(|| panic!("the watch ended"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[tokio::test]
async fn pod_list_filters_by_namespace_and_label_selector() {
    let api = KubeApi::start().await;
    api.add_pod(pod("default", "enabled", "app", &[(ENABLE_LABEL, "True"), ("app", "a")]));
    api.add_pod(pod("default", "lowercase", "app", &[(ENABLE_LABEL, "true")]));
    api.add_pod(pod("other", "enabled-elsewhere", "app", &[(ENABLE_LABEL, "True")]));

    let all = get(&api, "/api/v1/pods").await;
    assert_eq!(all.status, 200, "{}", all.body_text());
    let all = all.json();
    assert_eq!(all["kind"], "PodList");
    assert_eq!(all["apiVersion"], "v1");
    assert_eq!(all["metadata"]["resourceVersion"], api.resource_version());
    assert_eq!(names(&all), ["default/enabled", "default/lowercase", "other/enabled-elsewhere"]);

    let selected = get(&api, &format!("/api/v1/pods?labelSelector={ENABLE_LABEL}%3DTrue")).await.json();
    assert_eq!(names(&selected), ["default/enabled", "other/enabled-elsewhere"]);

    let in_default =
        get(&api, &format!("/api/v1/namespaces/default/pods?labelSelector={ENABLE_LABEL}%3DTrue,app%3Da&limit=500"))
            .await
            .json();
    assert_eq!(names(&in_default), ["default/enabled"]);
    assert_eq!(in_default["items"][0]["kind"], "Pod");

    let set_based = get(&api, "/api/v1/pods?labelSelector=app%20in%20(a,b)").await;
    assert_eq!(set_based.status, 400, "set-based selectors are refused, not misread");
}

#[tokio::test]
async fn pod_and_namespace_get_and_missing_ones_are_not_found_status() {
    let api = KubeApi::start().await;
    let stored = api.add_pod(pod("default", "app-1", "app", &[]));

    let reply = get(&api, "/api/v1/namespaces/default/pods/app-1").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let got: Pod = serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.metadata.uid, stored.metadata.uid);
    assert!(got.metadata.uid.is_some() && got.metadata.resource_version.is_some());

    let missing = get(&api, "/api/v1/namespaces/default/pods/nope").await;
    assert_eq!(missing.status, 404);
    let status = missing.json();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NotFound");
    assert_eq!(status["code"], 404);
    assert_eq!(status["details"]["name"], "nope");
    assert_eq!(status["message"], "pods \"nope\" not found");

    assert_eq!(get(&api, "/api/v1/namespaces/default").await.json()["metadata"]["name"], "default");
    assert_eq!(get(&api, "/api/v1/namespaces/other").await.status, 404);
    api.add_namespace(kube_api::namespace("other"));
    assert_eq!(get(&api, "/api/v1/namespaces/other").await.json()["kind"], "Namespace");
}

#[tokio::test]
async fn token_request_issues_a_signed_pod_bound_jwt() {
    let api = KubeApi::start().await;
    let bound = api.add_pod(pod("team-a", "app-1", "app", &[]));

    let reply = token_request(&api, "team-a", "app", &bound, 3600).await;
    assert_eq!(reply.status, 201, "{}", reply.body_text());
    let answer = reply.json();
    assert_eq!(answer["kind"], "TokenRequest");
    assert!(answer["status"]["expirationTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    let token = answer["status"]["token"].as_str().unwrap_or_else(|| panic!("no token: {answer}"));

    // Verify the signature with the key the API publishes, as an OIDC
    // relying party (STS) would.
    let jwks = get(&api, "/openid/v1/jwks").await.json();
    let key = &jwks["keys"][0];
    let part = |v: &Value| URL_SAFE_NO_PAD.decode(v.as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    let public = RsaPublicKey::new(BigUint::from_bytes_be(&part(&key["n"])), BigUint::from_bytes_be(&part(&key["e"])))
        .unwrap_or_else(|e| panic!("{e}"));
    let (signed, signature) = token.rsplit_once('.').unwrap_or_else(|| panic!("not a JWT: {token}"));
    let signature =
        rsa::pkcs1v15::Signature::try_from(part(&Value::from(signature)).as_slice()).unwrap_or_else(|e| panic!("{e}"));
    rsa::pkcs1v15::VerifyingKey::<Sha256>::new(public)
        .verify(signed.as_bytes(), &signature)
        .unwrap_or_else(|e| panic!("signature does not verify: {e}"));

    let mut parts = signed.split('.');
    let header: Value = serde_json::from_slice(&part(&Value::from(parts.next()))).unwrap_or_default();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], key["kid"]);
    let claims: Value = serde_json::from_slice(&part(&Value::from(parts.next()))).unwrap_or_default();
    assert_eq!(claims["iss"], kube_api::ISSUER);
    assert_eq!(claims["sub"], "system:serviceaccount:team-a:app");
    assert_eq!(claims["aud"], json!(["sts.amazonaws.com"]));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let iat = claims["iat"].as_u64().unwrap_or_default();
    assert!(iat.abs_diff(now) < 60, "iat {iat} is not now ({now})");
    assert_eq!(claims["nbf"], claims["iat"]);
    assert_eq!(claims["exp"].as_u64(), Some(iat + 3600));
    let kubernetes = &claims["kubernetes.io"];
    assert_eq!(kubernetes["namespace"], "team-a");
    assert_eq!(kubernetes["serviceaccount"]["name"], "app");
    assert!(kubernetes["serviceaccount"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert_eq!(kubernetes["pod"]["name"], "app-1");
    assert_eq!(kubernetes["pod"]["uid"].as_str(), bound.metadata.uid.as_deref());

    assert_eq!(kube_api::verify_token(token).as_ref(), Some(&claims));
    let recorded = api.token_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!((recorded[0].namespace.as_str(), recorded[0].service_account.as_str()), ("team-a", "app"));
    assert_eq!(recorded[0].request.spec.audiences, ["sts.amazonaws.com"]);
}

#[tokio::test]
async fn token_request_is_refused_as_the_api_server_refuses_it() {
    let api = KubeApi::start().await;
    let bound = api.add_pod(pod("default", "app-1", "app", &[]));

    let other_sa = token_request(&api, "default", "admin", &bound, 3600).await;
    assert_eq!(other_sa.status, 400, "{}", other_sa.body_text());
    assert_eq!(other_sa.json()["reason"], "BadRequest");

    let too_short = token_request(&api, "default", "app", &bound, 599).await;
    assert_eq!(too_short.status, 422, "{}", too_short.body_text());

    let gone = pod("default", "deleted", "app", &[]);
    assert_eq!(token_request(&api, "default", "app", &gone, 3600).await.status, 404);

    let mut recreated = bound.clone();
    recreated.metadata.uid = Some("00000000-0000-4000-8000-000000000000".into());
    assert_eq!(token_request(&api, "default", "app", &recreated, 3600).await.status, 409);

    assert_eq!(api.token_request_count(), 0);
}

#[tokio::test]
async fn events_are_created_and_recorded() {
    let api = KubeApi::start().await;
    let core = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": { "generateName": "app-1." },
        "involvedObject": { "kind": "Pod", "namespace": "default", "name": "app-1" },
        "reason": "AccessDenied",
        "message": "pod app-1 is not annotated with the role",
        "type": "Warning",
        "source": { "component": "imds-mesh-token-broker" },
    });
    let reply = post(&api, "/api/v1/namespaces/default/events", &core).await;
    assert_eq!(reply.status, 201, "{}", reply.body_text());
    let created = reply.json();
    assert!(created["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("app-1.") && n.len() > 6));
    assert_eq!(created["metadata"]["namespace"], "default");
    assert!(created["metadata"]["uid"].is_string());

    let modern = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": { "name": "app-1.denied", "namespace": "default" },
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "regarding": { "kind": "Pod", "namespace": "default", "name": "app-1" },
        "reason": "AccessDenied",
        "note": "role not allowed",
        "type": "Warning",
        "action": "GetCredentials",
        "reportingController": "imds-mesh.io/token-broker",
        "reportingInstance": "token-broker-0",
    });
    let reply = post(&api, "/apis/events.k8s.io/v1/namespaces/default/events", &modern).await;
    assert_eq!(reply.status, 201, "{}", reply.body_text());
    assert_eq!(post(&api, "/apis/events.k8s.io/v1/namespaces/default/events", &modern).await.status, 409);
    let series = json!({ "series": { "count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z" } });
    let patched = Req::new("PATCH", "/apis/events.k8s.io/v1/namespaces/default/events/app-1.denied")
        .host("kubernetes")
        .header("Content-Type", "application/merge-patch+json")
        .body(series.to_string())
        .send(api.addr())
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body_text());

    let wrong_namespace = post(&api, "/api/v1/namespaces/other/events", &created).await;
    assert_eq!(wrong_namespace.status, 400);

    let events = api.events();
    assert_eq!(events.len(), 2);
    assert_eq!((events[0].reason(), events[0].type_()), ("AccessDenied", "Warning"));
    assert_eq!(events[0].message(), "pod app-1 is not annotated with the role");
    assert_eq!(events[0].regarding()["name"], "app-1");
    assert_eq!(events[1].api_version, "events.k8s.io/v1");
    assert_eq!(events[1].message(), "role not allowed");
    assert_eq!(events[1].object["series"]["count"], 2);
}

#[tokio::test]
async fn watch_streams_pods_added_after_it_started() {
    let api = KubeApi::start().await;
    api.add_pod(pod("default", "before", "app", &[(ENABLE_LABEL, "True")]));
    let path =
        format!("/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=290&labelSelector={ENABLE_LABEL}%3DTrue");
    let mut watch = Req::get(path).host("kubernetes").open(api.addr()).await;
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("content-type"), Some("application/json"));

    // No resourceVersion: what exists now arrives as ADDED first.
    let first = next_event(&mut watch).await;
    assert_eq!((first["type"].as_str(), first["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("before")));

    api.add_pod(pod("default", "ignored", "app", &[(ENABLE_LABEL, "False")]));
    api.add_pod(pod("other", "elsewhere", "app", &[(ENABLE_LABEL, "True")]));
    api.add_pod(pod("default", "after", "app", &[(ENABLE_LABEL, "True")]));
    let added = next_event(&mut watch).await;
    assert_eq!(added["type"], "ADDED");
    assert_eq!(added["object"]["kind"], "Pod");
    assert_eq!(added["object"]["metadata"]["name"], "after");
    let after_version = added["object"]["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned();

    // Losing the label is a DELETED for this selector.
    api.add_pod(pod("default", "after", "app", &[(ENABLE_LABEL, "False")]));
    let unlabelled = next_event(&mut watch).await;
    assert_eq!(
        (unlabelled["type"].as_str(), unlabelled["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("after"))
    );
    assert!(api.delete_pod("default", "before"));
    assert_eq!(next_event(&mut watch).await["type"], "DELETED");

    // A watch resumed from a resourceVersion replays what came after it.
    let path = format!("/api/v1/pods?watch=true&resourceVersion={after_version}&allowWatchBookmarks=true");
    let mut resumed = Req::get(path).host("kubernetes").open(api.addr()).await;
    let replayed = next_event(&mut resumed).await;
    assert_eq!(
        (replayed["type"].as_str(), replayed["object"]["metadata"]["name"].as_str()),
        (Some("MODIFIED"), Some("after"))
    );
    assert_eq!(next_event(&mut resumed).await["type"], "DELETED");

    // The streaming list: initial ADDED events, then the end bookmark.
    let mut streaming = Req::get(
        "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true",
    )
    .host("kubernetes")
    .open(api.addr())
    .await;
    let mut initial = Vec::new();
    let bookmark = loop {
        let event = next_event(&mut streaming).await;
        if event["type"] != "ADDED" {
            break event;
        }
        initial.push(event["object"]["metadata"]["name"].as_str().unwrap_or_default().to_owned());
    };
    assert_eq!(initial, ["after", "ignored", "elsewhere"]);
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    assert_eq!(bookmark["object"]["metadata"]["resourceVersion"], api.resource_version());
}

#[tokio::test]
async fn watch_ends_at_its_timeout() {
    let api = KubeApi::start().await;
    let mut watch = Req::get("/api/v1/pods?watch=true&timeoutSeconds=1").host("kubernetes").open(api.addr()).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.next_line()).await;
    assert_eq!(ended.ok(), Some(None), "the watch should end, empty, after timeoutSeconds");
}

#[tokio::test]
async fn down_api_answers_503_and_closes_watches() {
    let api = KubeApi::start().await;
    api.add_pod(pod("default", "app-1", "app", &[]));
    let mut watch = Req::get("/api/v1/pods?watch=true").host("kubernetes").open(api.addr()).await;
    assert_eq!(next_event(&mut watch).await["type"], "ADDED");

    api.set_down(true);
    let ended = tokio::time::timeout(integration::wait::PATIENCE, watch.next_line()).await;
    assert_eq!(ended.ok(), Some(None), "an open watch ends when the API goes down");
    for path in ["/api/v1/pods", "/api/v1/namespaces/default/pods/app-1", "/api/v1/pods?watch=true"] {
        let reply = get(&api, path).await;
        assert_eq!(reply.status, 503, "{path}");
        assert_eq!(reply.json()["reason"], "ServiceUnavailable");
    }

    api.set_down(false);
    assert_eq!(get(&api, "/api/v1/namespaces/default/pods/app-1").await.status, 200);
    let requests = api.requests();
    assert!(requests.iter().filter(|r| r.uri == "/api/v1/namespaces/default/pods/app-1").count() == 2);
}

#[tokio::test]
async fn moto_sts_exchanges_a_service_account_token_for_credentials() {
    let (sts, api) = tokio::join!(Sts::start(), KubeApi::start());
    let bound = api.add_pod(pod("default", "app-1", "app", &[]));
    let token = token_request(&api, "default", "app", &bound, 3600).await.json()["status"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(sts.endpoint().starts_with("http://127.0.0.1:"));

    let reply = sts.assume_role_with_web_identity(ROLE_ARN, "default-app", &token).await;
    let xml = reply.body_text();
    assert_eq!(reply.status, 200, "{xml}\n{}", sts.log());
    assert!(xml.contains("<AssumeRoleWithWebIdentityResponse"), "{xml}");
    let field = |name| sts::xml_element(&xml, name).unwrap_or_else(|| panic!("no <{name}> in {xml}"));
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
