//! The broker's STS client against real endpoints: moto for the exchange
//! itself, a scripted STS (real STS XML errors) for throttling and denial,
//! a closed port and a hanging server for STS down.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration::kube_api::KubeApi;
use integration::scripted_sts::{self, ScriptedSts};
use integration::{ROLE_ARN, Req, Sts};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use time::OffsetDateTime;
use token_broker::session::{self, InvalidRequest};
use token_broker::sts::{StsClient, StsConfig, StsError};

/// Stands in for a service-account token where STS never checks it; unique
/// enough that finding it in an error means the token leaked.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.harness-web-identity-token-7c1e.c2lnbmF0dXJl";

fn client(endpoint: String) -> StsClient {
    client_with(endpoint, |config| config)
}

fn client_with(endpoint: String, tune: impl FnOnce(StsConfig) -> StsConfig) -> StsClient {
    let config = StsConfig {
        endpoint_url: Some(endpoint),
        duration_seconds: 900,
        operation_timeout: Duration::from_secs(5),
        ..StsConfig::new("us-east-1")
    };
    StsClient::new(tune(config)).unwrap_or_else(|e| panic!("{e}"))
}

async fn exchange(client: &StsClient, role_arn: &str) -> Result<token_broker::cache::Credentials, StsError> {
    client.assume_role_with_web_identity(role_arn, &session::role_session_name("team-a", "app"), TOKEN).await
}

/// Neither form of the error may show the token.
fn assert_token_absent(error: &StsError, token: &str) {
    let shown = format!("{error} {error:?} {:?}", error.fetch_error());
    assert!(!shown.contains(token), "the token leaked: {shown}");
}

/// A pod-bound service-account token from the harness Kubernetes API's
/// TokenRequest, as the broker will mint it.
async fn service_account_token(api: &KubeApi, namespace: &str, service_account: &str) -> String {
    let pod = api.add_pod(Pod {
        metadata: ObjectMeta {
            name: Some("app-1".into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::new()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { service_account_name: Some(service_account.into()), ..PodSpec::default() }),
        ..Pod::default()
    });
    api.add_namespace(integration::kube_api::namespace(namespace));
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": ["sts.amazonaws.com"],
            "expirationSeconds": 3600,
            "boundObjectRef": { "apiVersion": "v1", "kind": "Pod", "name": "app-1", "uid": pod.metadata.uid },
        },
    });
    let reply = Req::new("POST", format!("/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"))
        .host("kubernetes")
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send(api.addr())
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body_text());
    reply.json()["status"]["token"].as_str().unwrap_or_else(|| panic!("no token")).to_owned()
}

#[tokio::test]
async fn a_service_account_token_is_exchanged_at_sts_for_credentials_of_the_requested_duration() {
    let api = KubeApi::start().await;
    let sts = Sts::start().await;
    let token = service_account_token(&api, "team-a", "app").await;
    let client = client(sts.endpoint());

    let before = OffsetDateTime::now_utc();
    let credentials = client
        .assume_role_with_web_identity(ROLE_ARN, &session::role_session_name("team-a", "app"), &token)
        .await
        .unwrap_or_else(|e| panic!("{e}\nmoto log:\n{}", sts.log()));
    let after = OffsetDateTime::now_utc();

    assert!(credentials.access_key_id.starts_with("ASIA"), "{}", credentials.access_key_id);
    assert!(!credentials.secret_access_key.is_empty() && !credentials.session_token.is_empty());
    // DurationSeconds=900 was sent and honoured (moto reports whole seconds).
    let lifetime = time::Duration::seconds(900);
    let slack = time::Duration::seconds(2);
    assert!(
        credentials.expiration >= before + lifetime - slack && credentials.expiration <= after + lifetime + slack,
        "expiration {} is not 900 s after {before}",
        credentials.expiration
    );
    let shown = format!("{credentials:?}");
    assert!(!shown.contains(&credentials.secret_access_key) && !shown.contains(&credentials.session_token));
}

#[tokio::test]
async fn sts_throttling_error_maps_to_throttled() {
    let sts = ScriptedSts::always(scripted_sts::error_with_status(400, "Throttling", "Rate exceeded")).await;
    let error = exchange(&client(sts.endpoint()), ROLE_ARN).await.unwrap_err();

    let StsError::Throttled { code, message, retry_after } = &error else { panic!("not throttled: {error:?}") };
    assert_eq!((code.as_str(), message.as_str(), *retry_after), ("Throttling", "Rate exceeded", None));
    assert_eq!(error.metric_label(), "Throttling");
    assert_eq!(error.fetch_error().kind, token_broker::cache::FetchErrorKind::Throttled);
    // Exactly one request: the SDK does not retry under the cache's backoff.
    assert_eq!(sts.request_count(), 1);
    assert_token_absent(&error, TOKEN);
}

#[tokio::test]
async fn the_exchange_is_sent_unsigned() {
    let sts = ScriptedSts::always(scripted_sts::error("AccessDenied", "denied")).await;
    let _ = exchange(&client(sts.endpoint()), ROLE_ARN).await;
    let requests = sts.requests();
    assert_eq!(requests.len(), 1);
    let headers = &requests[0].headers;
    for signature_header in ["authorization", "x-amz-security-token", "x-amz-date", "x-amz-content-sha256"] {
        assert!(headers.get(signature_header).is_none(), "{signature_header} was sent: {headers:?}");
    }
}

#[tokio::test]
async fn sts_retry_after_header_is_kept() {
    let reply = scripted_sts::error_with_status(400, "Throttling", "Rate exceeded").header("Retry-After", "17");
    let sts = ScriptedSts::always(reply).await;
    let error = exchange(&client(sts.endpoint()), ROLE_ARN).await.unwrap_err();
    assert_eq!(error.fetch_error().retry_after, Some(Duration::from_secs(17)), "{error:?}");
}

#[tokio::test]
async fn sts_access_denied_maps_to_access_denied() {
    let message = "Not authorized to perform sts:AssumeRoleWithWebIdentity";
    let sts = ScriptedSts::always(scripted_sts::error("AccessDenied", message)).await;
    let error = exchange(&client(sts.endpoint()), ROLE_ARN).await.unwrap_err();

    assert_eq!(error, StsError::AccessDenied { code: "AccessDenied".into(), message: message.into() });
    assert_eq!(error.fetch_error().kind, token_broker::cache::FetchErrorKind::Denied);
    assert_eq!(sts.request_count(), 1);
    assert_token_absent(&error, TOKEN);
}

#[tokio::test]
async fn sts_invalid_identity_token_is_a_failure_naming_the_code() {
    let sts = ScriptedSts::always(scripted_sts::error("InvalidIdentityToken", "No OpenIDConnect provider found")).await;
    let error = exchange(&client(sts.endpoint()), ROLE_ARN).await.unwrap_err();
    assert!(matches!(error, StsError::Failed { .. }), "{error:?}");
    assert_eq!(error.code(), "InvalidIdentityToken");
    assert!(error.to_string().contains("InvalidIdentityToken"), "{error}");
}

#[tokio::test]
async fn sts_down_fails_quickly() {
    // A port that was free a moment ago: nothing listens, connect is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let client = client(format!("http://127.0.0.1:{port}"));

    let start = Instant::now();
    let error = exchange(&client, ROLE_ARN).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert!(matches!(error, StsError::Failed { .. }), "{error:?}");
    assert_eq!(error.code(), "Unreachable", "{error}");
    assert_eq!(error.fetch_error().kind, token_broker::cache::FetchErrorKind::Failed);
    assert_token_absent(&error, TOKEN);
}

#[tokio::test]
async fn sts_that_hangs_times_out_at_the_operation_timeout() {
    let reply = scripted_sts::error("Throttling", "too late").delayed(Duration::from_secs(60));
    let sts = ScriptedSts::always(reply).await;
    let client =
        client_with(sts.endpoint(), |config| StsConfig { operation_timeout: Duration::from_secs(1), ..config });

    let start = Instant::now();
    let error = exchange(&client, ROLE_ARN).await.unwrap_err();
    let took = start.elapsed();
    assert!((Duration::from_secs(1)..Duration::from_secs(3)).contains(&took), "took {took:?}");
    assert_eq!(error.code(), "Timeout", "{error:?}");
    assert_eq!(error.metric_label(), "Timeout");
    assert_token_absent(&error, TOKEN);
}

#[tokio::test]
async fn invalid_role_arn_is_refused_without_calling_sts() {
    let sts = ScriptedSts::always(scripted_sts::error("AccessDenied", "should not be asked")).await;
    let client = client(sts.endpoint());

    for arn in ["arn:aws:iam::123456789012:user/app", "arn:aws:iam::123:role/app", "", "role/app"] {
        let error = exchange(&client, arn).await.unwrap_err();
        assert!(matches!(error, StsError::InvalidRequest(InvalidRequest::RoleArn(_))), "{arn}: {error:?}");
        assert_eq!(error.code(), "InvalidRequest");
    }
    assert_eq!(sts.request_count(), 0);
}

#[tokio::test]
async fn sts_error_message_echoing_the_token_is_scrubbed() {
    // STS does not echo the token today; a proxy or a future message might.
    let sts = ScriptedSts::always(scripted_sts::error("InvalidIdentityToken", &format!("bad token {TOKEN}"))).await;
    let error = exchange(&client(sts.endpoint()), ROLE_ARN).await.unwrap_err();
    assert_eq!(error.code(), "InvalidIdentityToken");
    assert!(error.to_string().contains("bad token <redacted>"), "{error}");
    assert_token_absent(&error, TOKEN);
}
