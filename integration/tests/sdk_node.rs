//! The AWS SDK for JavaScript's IMDS credentials provider
//! (`@smithy/credential-provider-imds`, pinned in
//! `integration/clients/package-lock.json`, installed by
//! `scripts/setup-node.sh`) resolves credentials through the filter in a real
//! Envoy. It runs in node as `integration/clients/smithy-imds.mjs`, which
//! prints what the provider resolved as JSON.

use std::time::Duration;

use integration::broker::access_key_id;
use integration::clients::SdkClient;
use integration::{Envoy, HOUR, Scripted, ScriptedBroker};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[tokio::test]
async fn smithy_imds_provider_resolves_credentials_through_the_filter() {
    let broker = ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    let credentials = smithy_imds(&envoy, &[]).await;

    assert_issued_by_first_broker_call(&credentials);
    assert_eq!(broker.call_count(), 1);
    // The provider tries IMDSv2 first and only falls back to v1 on failure.
    wait_for_issued_token(&envoy).await;
}

#[tokio::test]
async fn smithy_imds_provider_with_imdsv1_disabled_resolves_credentials_over_imdsv2() {
    let broker = ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    // With this set the package throws instead of retrying without a token,
    // so success means every request carried a token the filter issued.
    let credentials = smithy_imds(&envoy, &[("AWS_EC2_METADATA_V1_DISABLED", "true")]).await;

    assert_issued_by_first_broker_call(&credentials);
    assert_eq!(broker.call_count(), 1);
    wait_for_issued_token(&envoy).await;
}

/// Runs `smithy-imds.mjs` against `envoy` and returns what it printed.
async fn smithy_imds(envoy: &Envoy, env: &[(&str, &str)]) -> Value {
    env.iter()
        .fold(SdkClient::node("smithy-imds.mjs", envoy), |client, (name, value)| client.env(name, value))
        .run()
        .await
}

/// The credentials are the broker's first issue (call 0), expiring in about
/// the hour the broker gave them.
fn assert_issued_by_first_broker_call(credentials: &Value) {
    assert_eq!(credentials["accessKeyId"], access_key_id(0), "{credentials}");
    assert_eq!(credentials["secretAccessKey"], "harness-secret-0");
    assert_eq!(credentials["sessionToken"], "harness-session-token-0");
    let expiration = credentials["expiration"].as_str().unwrap_or_else(|| panic!("no expiration: {credentials}"));
    let expiration =
        OffsetDateTime::parse(expiration, &Rfc3339).unwrap_or_else(|e| panic!("expiration {expiration}: {e}"));
    let left = expiration - OffsetDateTime::now_utc();
    // The broker issued them for an hour; allow for the time the test took.
    assert!(left > HOUR - Duration::from_secs(60) && left <= HOUR, "expiration {left} from now, want about an hour");
}

/// Stats are flushed once a second, hence the polling.
async fn wait_for_issued_token(envoy: &Envoy) {
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}
