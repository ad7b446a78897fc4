//! `just demo`: imds-mesh end to end on this machine, on local defaults.
//!
//! It starts what a cluster would run, each piece real except the cluster
//! itself:
//! - a mesh CA and SPIFFE workload certificates (rcgen), standing in for
//!   Istio's;
//! - a Kubernetes API endpoint (the harness's: real REST paths and JSON,
//!   RS256 service-account tokens) holding one enabled pod;
//! - AWS STS (PyPI `moto`);
//! - Istio's own xDS generator (`integration/istio-xds`) translating the
//!   default rendering (`mesh-config render`) for the pod's sidecar and the
//!   broker's, as istiod would send it to them;
//! - the `token-broker` binary in `xfcc` mode, behind its Envoy sidecar
//!   running that output (inbound mTLS, XFCC `APPEND_FORWARD`);
//! - the pod's Envoy sidecar running that output, with the filter on the
//!   metadata chain. Without iptables, the app reaches it as an HTTP proxy,
//!   on a loopback address standing for 169.254.169.254
//!   (`integration::istio` lists every rewrite of Istio's output).
//!
//! Then it runs an unmodified boto3 app "in the pod": boto3 finds the
//! metadata service, gets the pod's role credentials, and STS names the
//! assumed role. Last, another workload asks the broker for the pod's role
//! and is refused. Everything stops when the demo ends.
//!
//! Usage: `just demo` (builds the filter, the broker and `istio-xds`
//! first), or `cargo run -p integration --bin demo` with
//! `IMDS_MESH_BROKER_BIN` pointing at a built `token-broker`.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};

use integration::clients::SdkClient;
use integration::istio::{self, AppSidecar, Cluster};
use integration::kube_api::{self, KubeApi};
use integration::pki::{self, MeshCa};
use integration::{CREDENTIALS_PATH, Pod, ROLE_ARN, Req, Sts, paths, process, wait};
use mesh_config::metadata::METADATA_CHAIN;
use mesh_config::render::BROKER_PORT;

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

/// The broker process; killed when the demo ends.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn demo() -> Result<(), String> {
    let dir = tempfile::Builder::new().prefix("imds-mesh-demo-").tempdir().map_err(|e| e.to_string())?;
    let pod = Pod::enabled();

    step("Mesh identities: a CA and SPIFFE certificates (standing in for Istio's)");
    let ca = MeshCa::new("imds-mesh demo mesh");
    let app_id = pki::spiffe_id(&pod.namespace, &pod.service_account);
    let broker_id = pki::broker_id();
    let broker_certs = ca.workload(&[&broker_id]).write(dir.path(), "broker");
    let app_certs = ca.workload(&[&app_id]).write(dir.path(), "app");
    show("broker", &broker_id);
    show("app pod", &app_id);

    step("Kubernetes API with the app pod, opted in as on GKE");
    let api = KubeApi::start().await;
    api.add_pod(kube_api::enabled_pod(&pod.namespace, &pod.name, &pod.service_account, ROLE_ARN));
    show("API", api.url());
    show("pod", format!("{}/{} (service account {})", pod.namespace, pod.name, pod.service_account));
    show("label", "gkemulticloud.googleapis.com/aws-imds-emulator-enabled: \"True\"");
    show("annotation", format!("gkemulticloud.googleapis.com/aws-imds-emulator-role-arn: {ROLE_ARN}"));

    step("AWS STS (moto)");
    let sts = Sts::start().await;
    show("endpoint", sts.endpoint());

    step("Istio's own translation of the rendering (its xDS generator, as istiod)");
    let options = istio::translated_options();
    let (app_proxy, broker_proxy) = (istio::proxy_of(&pod), istio::broker_proxy(&options, 0));
    let mut xds = Cluster::harness(&options, 1).try_generate(&[&app_proxy, &broker_proxy])?;
    let app_xds = xds.remove(&app_proxy).ok_or("istiod sent nothing for the app pod")?;
    let broker_xds = xds.remove(&broker_proxy).ok_or("istiod sent nothing for the broker pod")?;
    let chain = app_xds.http_filters("0.0.0.0_80", Some(METADATA_CHAIN));
    show("app sidecar", format!("{} listeners, {} clusters", app_xds.listeners.len(), app_xds.clusters.len()));
    show("metadata chain filters", chain.join(", "));

    step("token-broker (xfcc mode) behind its sidecar");
    let (broker_addr, admin_addr) = (free_addr()?, free_addr()?);
    let mut broker = start_broker(&api, &sts, broker_addr, admin_addr, dir.path())?;
    let log = dir.path().join("token-broker.log");
    process::until_answering(&mut broker.0, "token-broker", &log, admin_addr, "/readyz").await;
    let inbound = istio::loopback_port(BROKER_PORT);
    let broker_sidecar = istio::start_broker_sidecar(&broker_xds, inbound, broker_addr, &broker_certs).await;
    show("broker", format!("{broker_addr} (ready: pod watch synced)"));
    show("broker sidecar (mTLS)", broker_sidecar.addr);

    step("The app pod's sidecar, with the filter");
    let endpoint = (format!("{}:{BROKER_PORT}", istio::broker_ip(0)), inbound);
    let app = AppSidecar::start(&app_xds, &app_certs, &[endpoint], 1).await;
    show("169.254.169.254 stands at", app.metadata);

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
    let intruder = ca.client(Some(&ca.workload(&[&pki::spiffe_id(&pod.namespace, "intruder")])));
    let role = ROLE_ARN.replace(':', "%3A").replace('/', "%2F");
    let request = Req::get(format!("/v1/credentials?role_arn={role}&pod={}", pod.name)).host("token-broker");
    let refused = request.send_tls(&intruder, broker_sidecar.addr).await.map_err(|e| e.to_string())?;
    let body = refused.json();
    show("answer", format!("{} {}", refused.status, body["Code"].as_str().unwrap_or_default()));
    show("why", body["Message"].as_str().unwrap_or_default());
    if refused.status != 403 {
        return Err("the broker did not refuse another workload".into());
    }
    let pod_name = pod.name.clone();
    let event = wait::until("the denial Event", || {
        let found = api.events().into_iter().find(|e| e.regarding()["name"] == pod_name.as_str());
        async move { found }
    })
    .await;
    show("Kubernetes Event on the pod", format!("{} {}", event.type_(), event.reason()));

    step("What the operators see");
    let metrics = Req::get("/metrics").host("token-broker").send(admin_addr).await.body_text();
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
    app.assert_node_untouched();
    show("node's IMDS", "never reached");

    println!("\nimds-mesh demo: OK. Everything it started is stopping now.");
    Ok(())
}

fn free_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| format!("no free port: {e}"))
}

fn start_broker(
    api: &KubeApi,
    sts: &Sts,
    listen: SocketAddr,
    admin: SocketAddr,
    dir: &std::path::Path,
) -> Result<Broker, String> {
    let binary = paths::broker_binary();
    let log = std::fs::File::create(dir.join("token-broker.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&binary)
        .args(["--identity-mode", "xfcc", "--own-spiffe-id", &pki::broker_id()])
        .args(["--kube-api-url", &api.url(), "--sts-region", "us-east-1", "--sts-endpoint-url", &sts.endpoint()])
        .args([
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--instance",
            "token-broker-demo",
        ])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start {}: {e} (run `just demo`, which builds it)", binary.display()))?;
    Ok(Broker(child))
}
