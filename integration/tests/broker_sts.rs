//! The broker's STS client against real endpoints: moto for the exchange
//! itself (behind the web identity checks AWS makes, with a token a real
//! Kubernetes API server signed), a scripted STS (real STS XML errors) for
//! throttling and denial, a closed port and a hanging server for STS down.

use std::time::{Duration, Instant};

use integration::kube_cluster::{self, KubeCluster};
use integration::scripted_sts::{self, ScriptedSts};
use integration::{ROLE_ARN, Sts};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use time::OffsetDateTime;
use token_broker::session::{self, InvalidRequest};
use token_broker::sts::{Credentials, StsClient, StsConfig, StsError};

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

async fn exchange(client: &StsClient, role_arn: &str) -> Result<Credentials, StsError> {
    client.assume_role_with_web_identity(role_arn, &session::role_session_name("team-a", "app"), TOKEN).await
}

/// Neither form of the error may show the token.
fn assert_token_absent(error: &StsError, token: &str) {
    let shown = format!("{error} {error:?} {:?}", error.fetch_error());
    assert!(!shown.contains(token), "the token leaked: {shown}");
}

/// A token for `namespace/service_account` bound to a new pod of that
/// account, from the API server's TokenRequest, as the broker mints it.
async fn service_account_token(cluster: &KubeCluster, namespace: &str, service_account: &str) -> String {
    let pod = cluster.add_pod(kube_cluster::enabled_pod(namespace, "app-1", service_account, ROLE_ARN)).await;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![integration::sts_oidc::AUDIENCE.into()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name,
                uid: pod.metadata.uid,
            }),
        },
        ..TokenRequest::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(cluster.admin(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest: {e}"));
    issued.status.map(|s| s.token).unwrap_or_else(|| panic!("no token"))
}

#[tokio::test]
async fn a_service_account_token_is_exchanged_at_sts_for_credentials_of_the_requested_duration() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let token = service_account_token(&cluster, "team-a", "app").await;
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
    // STS accepted the token for what the API server signed into it.
    let seen = sts.seen();
    let [claims] = &seen.accepted[..] else { panic!("{seen:?}") };
    assert_eq!(claims["sub"], "system:serviceaccount:team-a:app");
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "app-1");
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
