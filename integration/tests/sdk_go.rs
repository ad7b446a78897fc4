//! The AWS SDK for Go v2 (pinned in `integration/sdk-go/go.mod`, built by
//! `just sdk-go`), as an unmodified Go app in the pod uses it: its default
//! config chain finds the sidecar's IMDS, gets the role's credentials over
//! IMDSv2 (the chain asks for a token first), and signs an STS
//! `GetCallerIdentity` with them, which STS answers with the assumed role.

use imds_filter::config::HttpTokens;
use integration::clients::{IssuedCredentials, SdkClient};
use integration::{Envoy, ROLE_ARN, ScriptedBroker, Sts};
use serde_json::Value;

/// Who STS says the app is: the role, as session `app-pod`.
const ASSUMED_ROLE: &str = "arn:aws:sts::123456789012:assumed-role/app/app-pod";

#[tokio::test]
async fn go_default_chain_signs_sts_calls_as_the_pods_role() {
    let sts = Sts::start().await;
    let issued = IssuedCredentials::assume(&sts, ROLE_ARN, "app-pod").await;
    let broker = ScriptedBroker::start(issued.script()).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    let app = SdkClient::go(&envoy).sts(&sts).run().await;

    assert_holds(&app, &issued);
    assert_eq!(broker.call_count(), 1);
    // Stats are flushed once a second, hence the polling.
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}

#[tokio::test]
async fn go_default_chain_signs_sts_calls_as_the_pods_role_with_tokens_required() {
    let sts = Sts::start().await;
    let issued = IssuedCredentials::assume(&sts, ROLE_ARN, "app-pod").await;
    let broker = ScriptedBroker::start(issued.script()).await;
    let envoy =
        Envoy::sidecar().broker(&broker).config(|c| c.http_tokens = HttpTokens::Required).sdk_endpoint().start().await;

    // The filter answers 401 to any request without a token, so success
    // means every request the SDK made carried one the filter issued.
    let app = SdkClient::go(&envoy).sts(&sts).run().await;

    assert_holds(&app, &issued);
    assert_eq!(broker.call_count(), 1);
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}

/// The app holds what STS issued and the broker served, from the EC2 role
/// provider, expiring when STS said; and STS names the pod's role.
fn assert_holds(app: &Value, issued: &IssuedCredentials) {
    assert_eq!(app["source"], "EC2RoleProvider", "{app}");
    assert_eq!(app["canExpire"], true, "{app}");
    issued.assert_held_by(app, ASSUMED_ROLE);
}
