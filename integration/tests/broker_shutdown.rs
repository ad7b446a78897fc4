//! The real `token-broker` binary told to stop (SIGTERM), as Kubernetes
//! stops a replica: readiness goes off at once, the broker keeps serving
//! for its shutdown delay, then stops accepting and lets the requests in
//! flight finish, and exits 0. Run after `cargo build -p token-broker`
//! (`paths::broker_binary`).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::kube_cluster::{self, KubeCluster};
use integration::real_broker::SIDECAR_SOURCE;
use integration::real_broker::credentials_request;
use integration::scripted_sts;
use integration::{Req, ScriptedSts, paths, pki, process, wait};
use mesh_config::render::{self, Options};
use token_broker::peer::PEER_ADDRESS_HEADER;

const ROLE: &str = "arn:aws:iam::123456789012:role/app";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test]
async fn sigterm_turns_readiness_off_at_once_and_a_request_in_flight_still_completes() {
    let cluster = KubeCluster::start().await;
    let app_ip =
        kube_cluster::pod_ip(&cluster.add_pod(kube_cluster::enabled_pod("default", "app-0", "app", ROLE)).await);
    // STS holds its answer: the credential request is in flight meanwhile.
    let sts = ScriptedSts::start(|_| scripted_sts::success(1, Duration::from_secs(4))).await;
    let options = Options::default();
    cluster.broker_config(&options).await;
    let kubeconfig = cluster.dir().join("broker.kubeconfig");
    std::fs::write(&kubeconfig, cluster.kubeconfig(&cluster.token(&options.namespace, render::BROKER).await))
        .unwrap_or_else(|e| panic!("{e}"));
    let log = cluster.dir().join("token-broker.log");
    let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let (addr, admin) = (free_addr(), free_addr());
    let mut child = Command::new(paths::broker_binary())
        .args(["--identity-mode", "xfcc", "--own-spiffe-id", &pki::broker_id()])
        .args(["--sts-region", "us-east-1", "--sts-endpoint-url", &sts.endpoint()])
        .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string()])
        .args(["--shutdown-delay-seconds", "2", "--shutdown-grace-seconds", "10"])
        .env_clear()
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap_or_else(|e| panic!("{e}")))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e} (cargo build -p token-broker)", paths::broker_binary().display()));
    process::until_answering(&mut child, "token-broker", &log, admin, "/readyz").await;

    // This test stands in for the broker's sidecar.
    let request = credentials_request(ROLE, "app-0")
        .source(SIDECAR_SOURCE)
        .header(PEER_ADDRESS_HEADER, &app_ip.to_string())
        .header(
            "x-forwarded-client-cert",
            &format!("By={};URI=spiffe://cluster.local/ns/default/sa/app", pki::broker_id()),
        );
    let in_flight = tokio::spawn(async move { request.send(addr).await });
    wait::until("the request to reach STS", || {
        let reached = sts.request_count() == 1;
        async move { reached.then_some(()) }
    })
    .await;

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM failed");

    let ready = wait::until("readiness to go off", || async move {
        let ready = Req::get("/readyz").host("token-broker").send(admin).await;
        (ready.status == 503).then_some(ready)
    })
    .await;
    assert_eq!(ready.body_text(), "not ready: shutting down\n");
    assert!(!in_flight.is_finished(), "readiness went off while the request was still in flight");
    // Still serving during the delay: new connections are answered.
    assert_eq!(Req::get("/healthz").host("token-broker").send(addr).await.status, 200);

    let reply = in_flight.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert_eq!(reply.json()["AccessKeyId"], "ASIASCRIPTED0000001");
    let status = wait::until("the broker to exit", || {
        let exited = child.try_wait().unwrap_or_else(|e| panic!("{e}"));
        async move { exited }
    })
    .await;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{status}:\n{logged}");
}
