//! boto3 (botocore's default chain, shared with the AWS CLI) resolves
//! credentials through the filter in a real Envoy, with method `iam-role`.

use integration::broker::access_key_id;
use integration::clients::SdkClient;
use integration::{Envoy, HOUR, Scripted, ScriptedBroker};

#[tokio::test]
async fn boto3_resolves_credentials_as_an_iam_role() {
    let broker = ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    let credentials = SdkClient::python("boto3_credentials.py", &envoy).run().await;

    assert_eq!(credentials["method"], "iam-role");
    assert_eq!(credentials["access_key"], access_key_id(0));
    assert_eq!(credentials["secret_key"], "harness-secret-0");
    assert_eq!(credentials["token"], "harness-session-token-0");
}

#[tokio::test]
async fn boto3_with_imdsv1_disabled_resolves_credentials_over_imdsv2() {
    let broker = ScriptedBroker::start(|n| Scripted::credentials_for(HOUR, n)).await;
    let envoy = Envoy::sidecar().broker(&broker).sdk_endpoint().start().await;

    let credentials =
        SdkClient::python("boto3_credentials.py", &envoy).env("AWS_EC2_METADATA_V1_DISABLED", "true").run().await;

    assert_eq!(credentials["method"], "iam-role");
    assert_eq!(credentials["access_key"], access_key_id(0));
    envoy.wait_for_stat("imds_mesh.tokens.issued", 1).await;
}
