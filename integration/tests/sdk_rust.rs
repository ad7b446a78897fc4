//! The Rust AWS SDK's own IMDS credentials provider (`aws-config`), which
//! speaks IMDSv2 only (token PUT, then GETs carrying the token), resolves
//! credentials through the filter in a real Envoy.

use std::time::{Duration, SystemTime};

use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::ProvideCredentials;
use integration::broker::access_key_id;
use integration::{Envoy, HOUR, Scripted, ScriptedBroker};

#[tokio::test]
async fn aws_config_imds_provider_resolves_credentials_over_imdsv2() {
    let broker = ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    // `aws-config` is built without its default HTTPS client, so it gets a
    // plain-HTTP hyper client (the endpoint is http://127.0.0.1). `build_http`
    // is doc(hidden) but is the crate's own TLS-free constructor; the
    // alternative compiles rustls and ring only to never use them.
    let http_client = aws_smithy_http_client::Builder::new().build_http();
    let config = ProviderConfig::without_region().with_http_client(http_client);
    let imds = aws_config::imds::Client::builder()
        .configure(&config)
        .endpoint(envoy.endpoint())
        .unwrap_or_else(|e| panic!("endpoint {}: {e}", envoy.endpoint()))
        .max_attempts(1)
        .build();
    let provider = ImdsCredentialsProvider::builder().configure(&config).imds_client(imds).build();

    let credentials = provider.provide_credentials().await.unwrap_or_else(|e| panic!("provide_credentials: {e:?}"));

    assert_eq!(credentials.access_key_id(), access_key_id(0));
    assert_eq!(credentials.secret_access_key(), "harness-secret-0");
    assert_eq!(credentials.session_token(), Some("harness-session-token-0"));
    let expiry = credentials.expiry().unwrap_or_else(|| panic!("IMDS credentials carry an expiry"));
    let left = expiry.duration_since(SystemTime::now()).unwrap_or_else(|_| panic!("expiry {expiry:?} is in the past"));
    // The broker issued them for an hour; allow for the time the test took.
    assert!(left > HOUR - Duration::from_secs(60) && left <= HOUR, "expiry {left:?} from now, want about an hour");
    assert_eq!(broker.call_count(), 1, "one broker call for one credential fetch");

    // The provider went through IMDSv2: the filter issued a session token.
    // Stats are flushed once a second, hence the polling.
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}
