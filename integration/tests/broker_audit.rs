//! The broker's audit trail (`token_broker::audit`) as an operator ships it
//! to a SIEM: the broker's own log filter and JSON format, at `--log warn`
//! (audit events stay on), and one JSON line per credential answered and
//! per caller refused, saying who, which pod, which role and what came of
//! it, and never a secret. Against a real API server and moto STS.

use integration::kube_cluster::{self, KubeCluster};
use integration::logs::LogBuffer;
use integration::real_broker::{credentials_request, dev_credentials_request};
use integration::{RealBroker, Req, Sts};
use serde_json::Value;
use token_broker::identity::{DEV_NAMESPACE_HEADER, DEV_SERVICE_ACCOUNT_HEADER};
use token_broker::{audit, telemetry};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const NS: &str = "default";
const ROLE: &str = "arn:aws:iam::123456789012:role/app";

// One test in this binary: the subscriber is the process's global default
// (see broker_service.rs's log test for why not a scoped one).
#[tokio::test(flavor = "current_thread")]
async fn each_credential_issued_and_each_refusal_is_one_json_audit_line_without_secrets() {
    let logs = LogBuffer::default();
    // `--log warn --log-format json`, as main.rs sets them up.
    let filter = telemetry::log_filter("warn").unwrap_or_else(|e| panic!("{e}"));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().json().with_writer(logs.writer()))
        .try_init()
        .unwrap_or_else(|e| panic!("{e}"));

    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let app = cluster.add_pod(kube_cluster::enabled_pod(NS, "app-0", "app", ROLE)).await;
    let other = cluster.add_pod(kube_cluster::enabled_pod(NS, "other-0", "other", ROLE)).await;
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.start().await;

    let issued = dev_credentials_request(NS, "app", ROLE, "app-0").send(broker.addr).await;
    assert_eq!(issued.status, 200, "{}", issued.body_text());
    let cached = dev_credentials_request(NS, "app", ROLE, "app-0").send(broker.addr).await;
    assert_eq!(cached.status, 200, "{}", cached.body_text());
    // The app's service account naming another account's pod.
    let denied = dev_credentials_request(NS, "app", ROLE, "other-0").send(broker.addr).await;
    assert_eq!(denied.status, 403, "{}", denied.body_text());
    let anonymous = credentials_request(ROLE, "app-0").send(broker.addr).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body_text());
    // Malformed: neither issued nor refused, so not an audit event.
    let malformed = Req::get("/v1/credentials?role_arn=not-an-arn&pod=app-0")
        .host("token-broker")
        .header(DEV_NAMESPACE_HEADER, NS)
        .header(DEV_SERVICE_ACCOUNT_HEADER, "app")
        .send(broker.addr)
        .await;
    assert_eq!(malformed.status, 400, "{}", malformed.body_text());

    let events: Vec<Value> = logs.json_lines().into_iter().filter(|line| line["target"] == audit::TARGET).collect();
    let outcomes: Vec<&str> = events.iter().map(|e| e["fields"]["outcome"].as_str().unwrap_or("?")).collect();
    assert_eq!(outcomes, ["issued", "issued", "denied", "unauthenticated"], "{events:#?}");

    let document = issued.json();
    for event in &events[..2] {
        let fields = &event["fields"];
        assert_eq!(event["level"], "INFO");
        assert_eq!(fields["spiffe_id"], "spiffe://cluster.local/ns/default/sa/app");
        assert_eq!(fields["pod"], "default/app-0");
        assert_eq!(fields["pod_uid"].as_str(), app.metadata.uid.as_deref());
        assert_eq!(fields["role_arn"], ROLE);
        // What CloudTrail records for every call made with the credential.
        assert_eq!(fields["access_key_id"], document["AccessKeyId"]);
        assert_eq!(fields["expiration"], document["Expiration"]);
    }
    let refusal = &events[2]["fields"];
    assert_eq!(refusal["spiffe_id"], "spiffe://cluster.local/ns/default/sa/app");
    assert_eq!(refusal["pod"], "default/other-0");
    assert_eq!(refusal["pod_uid"].as_str(), other.metadata.uid.as_deref());
    assert_eq!(refusal["rule"], "wrong_service_account");
    assert_eq!(refusal["reason"], denied.json()["Message"]);
    assert_eq!(events[3]["fields"]["reason"], "missing");

    let log = logs.text();
    for secret in ["SecretAccessKey", "Token"] {
        let value = document[secret].as_str().unwrap_or_default();
        assert!(!value.is_empty(), "no {secret} in {document}");
        assert!(!log.contains(value), "the {secret} in the broker's log:\n{log}");
    }
    // At warn, nothing but the audit trail (and warnings) was written.
    let info: Vec<&str> = log.lines().filter(|l| l.contains("\"INFO\"") && !l.contains(audit::TARGET)).collect();
    assert!(info.is_empty(), "info lines other than the audit trail at --log warn:\n{}", info.join("\n"));
}
