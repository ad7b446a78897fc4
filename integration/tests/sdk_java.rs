//! The AWS SDK for Java v2 (its BOM pinned in `integration/sdk-java/pom.xml`,
//! built by `just sdk-java`), as a Java app in the pod uses it:
//! `InstanceProfileCredentialsProvider` gets the role's credentials from
//! the sidecar's IMDS over IMDSv2 (it asks for a token first), and an STS
//! client signs `GetCallerIdentity` with them, which STS answers with the
//! assumed role. (This version asks only for `security-credentials/`, not
//! the `security-credentials-extended/` path, which the filter answers 404.)

use imds_filter::config::HttpTokens;
use integration::clients::{IssuedCredentials, SdkClient};
use integration::{Envoy, ROLE_ARN, ScriptedBroker, Sts};
use serde_json::Value;

/// Who STS says the app is: the role, as session `app-pod`.
const ASSUMED_ROLE: &str = "arn:aws:sts::123456789012:assumed-role/app/app-pod";

#[tokio::test]
async fn java_instance_profile_provider_signs_sts_calls_as_the_pods_role() {
    let sts = Sts::start().await;
    let issued = IssuedCredentials::assume(&sts, ROLE_ARN, "app-pod").await;
    let broker = ScriptedBroker::start(issued.script()).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    let app = SdkClient::java(&envoy).sts(&sts).run().await;

    assert_holds(&app, &issued);
    assert_eq!(broker.call_count(), 1);
    // Stats are flushed once a second, hence the polling.
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}

#[tokio::test]
async fn java_instance_profile_provider_signs_sts_calls_as_the_pods_role_with_tokens_required() {
    let sts = Sts::start().await;
    let issued = IssuedCredentials::assume(&sts, ROLE_ARN, "app-pod").await;
    let broker = ScriptedBroker::start(issued.script()).await;
    let envoy =
        Envoy::sidecar().broker(&broker).config(|c| c.http_tokens = HttpTokens::Required).sdk_endpoint().start().await;

    // The filter answers 401 to any request without a token, so success
    // means every request the SDK made carried one the filter issued.
    let app = SdkClient::java(&envoy).sts(&sts).run().await;

    assert_holds(&app, &issued);
    assert_eq!(broker.call_count(), 1);
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}

/// The app holds what STS issued and the broker served, expiring when STS
/// said; and STS names the pod's role.
fn assert_holds(app: &Value, issued: &IssuedCredentials) {
    issued.assert_held_by(app, ASSUMED_ROLE);
}
