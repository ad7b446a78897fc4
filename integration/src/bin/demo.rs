//! `just demo`: imds-mesh end to end on this machine, on local defaults.
//!
//! It starts the local stack ([`integration::stack`]), each piece real
//! except the nodes: a real Kubernetes API server holding one opted-in pod,
//! STS (moto) checking tokens against the API server's keys, Istio's own
//! translation of the default rendering, the `token-broker` binary as its
//! own service account behind its sidecar, and the pod's sidecar with the
//! filter.
//!
//! Then it runs an unmodified boto3 app "in the pod": boto3 finds the
//! metadata service, gets the pod's role credentials, and STS names the
//! assumed role. Last, another workload asks the broker for the pod's role,
//! is refused, and the API server holds the Warning Event on the pod.
//! Everything stops when the demo ends.
//!
//! Usage: `just demo` (builds the filter, the broker, `istio-xds` and the
//! API server first), or `cargo run -p integration --bin demo` with
//! `IMDS_MESH_BROKER_BIN` pointing at a built `token-broker`.

use std::process::ExitCode;

use integration::clients::SdkClient;
use integration::stack::Stack;
use integration::{CREDENTIALS_PATH, ROLE_ARN, Req, wait};
use serde_json::Value;
use token_broker::audit;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("demo: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("\ndemo failed: {message}");
            ExitCode::FAILURE
        }
    }
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(label: &str, value: impl std::fmt::Display) {
    println!("    {label:<30} {value}");
}

async fn demo() -> Result<(), String> {
    let dir = tempfile::Builder::new().prefix("imds-mesh-demo-").tempdir().map_err(|e| e.to_string())?;
    let stack = Stack::start(dir.path(), None, &mut |stage, facts| {
        step(stage);
        for (label, value) in facts {
            show(label, value);
        }
    })
    .await?;
    let (app, sts, pod) = (&stack.app, &stack.sts, &stack.pod);

    step("IMDSv2, by hand");
    let token = Req::token("21600").send(app.metadata).await;
    if token.status != 200 {
        return Err(format!("PUT /latest/api/token answered {}", token.status));
    }
    let token = token.body_text();
    let roles = Req::get("/latest/meta-data/iam/security-credentials/")
        .header("x-aws-ec2-metadata-token", &token)
        .send(app.metadata)
        .await;
    show("PUT /latest/api/token", format!("200, a {}-byte token", token.len()));
    show("GET .../security-credentials/", format!("{} {}", roles.status, roles.body_text()));
    let instance_id =
        Req::get("/latest/meta-data/instance-id").header("x-aws-ec2-metadata-token", &token).send(app.metadata).await;
    show("GET .../instance-id", format!("{} (only credentials are served)", instance_id.status));

    // The sidecar fetched the pod's credentials when it started; boto3
    // gives IMDS about a second, so wait until they are there.
    app.wait_for_credentials(integration::ROLE_NAME).await;

    step("An unmodified boto3 app in the pod");
    let whoami = SdkClient::python("whoami.py", &app.envoy)
        .through_sidecar(app.metadata)
        // STS (moto, on loopback) directly, not through the sidecar.
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .env("AWS_ENDPOINT_URL_STS", &sts.endpoint())
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .run()
        .await;
    let text = |key: &str| whoami[key].as_str().unwrap_or_default().to_owned();
    show("credentials from", text("method"));
    show("access key", text("access_key"));
    show("STS GetCallerIdentity", text("arn"));
    if !whoami["arn"].as_str().is_some_and(|arn| arn.starts_with("arn:aws:sts::123456789012:assumed-role/app/")) {
        return Err(format!("STS named another identity: {whoami}"));
    }

    step("Another workload asks the broker for the app pod's role");
    let intruder = stack.workload_client("intruder");
    let request = integration::real_broker::credentials_request(ROLE_ARN, &pod.name);
    let refused = request.send_tls(&intruder, stack.broker_sidecar.addr).await.map_err(|e| e.to_string())?;
    let body = refused.json();
    show("answer", format!("{} {}", refused.status, body["Code"].as_str().unwrap_or_default()));
    show("why", body["Message"].as_str().unwrap_or_default());
    if refused.status != 403 {
        return Err("the broker did not refuse another workload".into());
    }
    let event = wait::until("the denial Event", || async {
        let events = stack.kube.events(&pod.namespace).await;
        events.into_iter().find(|e| e.regarding.as_ref().and_then(|r| r.name.as_ref()) == Some(&pod.name))
    })
    .await;
    show(
        "Event on the pod (API server)",
        format!(
            "{} {}: {}",
            event.type_.unwrap_or_default(),
            event.reason.unwrap_or_default(),
            event.note.unwrap_or_default()
        ),
    );

    step("What the operators see");
    let metrics = Req::get("/metrics").host("token-broker").send(stack.broker.admin).await.body_text();
    for line in metrics.lines().filter(|l| {
        l.starts_with("token_broker_credential_requests_total{") || l.starts_with("token_broker_sts_calls_total")
    }) {
        show("broker", line);
    }
    // The filter flushes its counters once a second.
    app.envoy.wait_for_stat("imds_mesh.requests.credentials.2xx", 1).await;
    let stats = app.envoy.stats().await;
    for (name, value) in stats.iter().filter(|(name, value)| **value > 0 && name.contains("requests.")) {
        show("app sidecar", format!("{name} {value}"));
    }
    let elsewhere = Req::get("/").host("example.com").send(app.envoy.addr).await;
    show("other port-80 traffic", format!("{} (passed through)", elsewhere.status));
    let credentials = Req::get(CREDENTIALS_PATH).send(app.metadata).await;
    show("IMDSv1 credentials", format!("{} (served from the sidecar's cache)", credentials.status));
    // One worker: the flush that counts this request counts the passthrough.
    app.envoy.wait_for_stat("imds_mesh.requests.credentials.2xx", 3).await;
    let passed_on = app.envoy.stats().await.get("imds_mesh.passed_on").copied();
    if passed_on != Some(0) {
        return Err(format!("the filter saw ordinary port-80 traffic: imds_mesh.passed_on {passed_on:?}"));
    }
    show("requests the filter passed on", "0 (it runs on the metadata chain only)");
    let audit = audit_events(&stack.broker.log)?;
    for event in &audit {
        show("broker audit log", event);
    }
    if !(audit.iter().any(|e| e.starts_with("issued")) && audit.iter().any(|e| e.starts_with("denied"))) {
        return Err(format!("the broker's audit log lacks the issue or the refusal: {audit:?}"));
    }
    app.assert_node_untouched();
    show("node's IMDS", "never reached");
    let seen = sts.seen();
    show("tokens STS accepted / refused", format!("{} / {}", seen.accepted.len(), seen.refused.len()));
    if seen.accepted.is_empty() || !seen.refused.is_empty() {
        return Err(format!("STS did not verify exactly the broker's tokens: {seen:?}"));
    }

    println!("\nimds-mesh demo: OK. Everything it started is stopping now.");
    Ok(())
}

/// The audit events in the broker's JSON log, one line each: the outcome,
/// who, which pod and role, and the access key issued or the rule that
/// refused.
fn audit_events(log: &std::path::Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let events = text.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok());
    let audit = events.filter(|event| event["target"] == audit::TARGET);
    Ok(audit
        .map(|event| {
            let field = |name: &str| event["fields"][name].as_str().unwrap_or_default().to_owned();
            let what = if field("outcome") == audit::ISSUED { field("access_key_id") } else { field("rule") };
            format!("{} {} pod {} {}", field("outcome"), field("spiffe_id"), field("pod"), what)
        })
        .collect())
}
