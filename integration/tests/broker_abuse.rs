//! The broker bounded under abuse, on a real Kubernetes API server (etcd and
//! kube-apiserver, the broker as its own service account with the rendered
//! RBAC): requests naming pods that do not exist cost a bounded number of
//! API reads; a hung API server (SIGSTOP) costs a request at most the
//! broker's call deadline; a flood of denials records a bounded number of
//! Events; the namespace policy is served from a watch, through an outage.
//! What the broker asked of the API server comes from its audit log, the
//! Events from the server itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use imds_filter::config::ENABLE_LABEL;
use integration::kube_cluster::{self, BROKER_USER, KubeCluster};
use integration::real_broker::dev_credentials_request;
use integration::{ROLE_ARN, RealBroker, Reply, Req, Sts, wait};
use mesh_config::render::Options;
use serde_json::json;
use token_broker::authz::NamespacePolicy;
use token_broker::kube::{
    DENIAL_EVENT_REASON, DENIAL_EVENTS_PER_POD, DIRECT_READ_BURST, DIRECT_READS_PER_SECOND, KUBE_CALL_TIMEOUT,
};

const NS: &str = "default";
const SA: &str = "app";
const POLICY_ANNOTATION: &str = "imds-mesh.io/permitted-roles";

/// A credential request for `pod` and `role_arn` as the `insecure-dev`
/// caller `default/app`.
fn request(pod: &str, role_arn: &str) -> Req {
    request_as(SA, pod, role_arn)
}

/// [`request`] as the caller `default/<service_account>`.
fn request_as(service_account: &str, pod: &str, role_arn: &str) -> Req {
    dev_credentials_request(NS, service_account, role_arn, pod)
}

/// The broker's direct reads of pods named `prefix*` in [`NS`].
fn direct_reads(cluster: &KubeCluster, prefix: &str) -> usize {
    let path = format!("/api/v1/namespaces/{NS}/pods/{prefix}");
    cluster.requests(BROKER_USER).iter().filter(|uri| uri.starts_with(&path)).count()
}

fn statuses(replies: &[Reply]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for reply in replies {
        *counts.entry(reply.status).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_flood_of_unknown_pod_names_costs_a_bounded_number_of_api_reads() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.start().await;

    // One name asked 50 times at once: one read, shared (or remembered,
    // for a request that came after it).
    let same = (0..50).map(|_| async move { request("nobody-0", ROLE_ARN).send(broker.addr).await });
    let replies = futures_util::future::join_all(same).await;
    assert!(replies.iter().all(|r| r.status == 404), "{:?}", statuses(&replies));
    wait::until("the shared read in the audit log", || {
        let reads = direct_reads(&cluster, "nobody-0");
        async move { (reads >= 1).then_some(()) }
    })
    .await;
    assert_eq!(direct_reads(&cluster, "nobody-0"), 1, "concurrent lookups of one pod read it more than once");

    // 200 distinct names nobody runs, at once.
    let started = Instant::now();
    let flood = (0..200).map(|i| async move { request(&format!("nope-{i}"), ROLE_ARN).send(broker.addr).await });
    let replies = futures_util::future::join_all(flood).await;
    let elapsed = started.elapsed();

    let counts = statuses(&replies);
    let (not_found, throttled) = (counts.get(&404).copied().unwrap_or(0), counts.get(&429).copied().unwrap_or(0));
    assert_eq!(not_found + throttled, replies.len(), "only 404 PodNotFound and 429 Throttled: {counts:?}");
    for reply in replies.iter().filter(|r| r.status == 429) {
        assert_eq!(reply.json()["Code"], "Throttled");
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    // The budget: the burst, plus the sustained rate over the time the
    // flood took (rounded up).
    let seconds = usize::try_from(elapsed.as_secs()).unwrap_or(usize::MAX).saturating_add(1);
    let budget = DIRECT_READ_BURST as usize + DIRECT_READS_PER_SECOND as usize * seconds;
    assert!(not_found <= budget, "{not_found} lookups read the API (budget {budget} over {elapsed:?})");
    // Each 404 is one read, each 429 none, as the API server saw it.
    let reads = wait::until("the direct reads in the audit log", || {
        let reads = direct_reads(&cluster, "nope-");
        async move { (reads >= not_found).then_some(reads) }
    })
    .await;
    assert_eq!(reads, not_found, "API reads for {not_found} PodNotFound answers");
}

#[tokio::test]
async fn a_hung_api_server_costs_a_request_at_most_the_call_deadline() {
    assert!(KUBE_CALL_TIMEOUT * 3 < wait::PATIENCE, "the deadline must be far below the test's patience");
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(kube_cluster::enabled_pod(NS, "app-0", SA, ROLE_ARN)).await;
    // Known to the watch, never asked for: nothing cached for its account.
    cluster.add_pod(kube_cluster::enabled_pod(NS, "worker-0", "worker", ROLE_ARN)).await;
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.start().await;
    let cached = request("app-0", ROLE_ARN).send(broker.addr).await;
    assert_eq!(cached.status, 200, "{}", cached.body_text());

    // The server accepts connections (the kernel does) and answers nothing.
    cluster.pause_apiserver().await;
    let within_patience = |req: Req| async move {
        tokio::time::timeout(wait::PATIENCE, req.send(broker.addr))
            .await
            .unwrap_or_else(|_| panic!("a request hung with the API server"))
    };
    // A pod the watch has not delivered: the direct read gives up.
    let unknown = within_patience(request("app-1", ROLE_ARN)).await;
    assert_eq!((unknown.status, unknown.json()["Message"].as_str()), (503, Some("Kubernetes API: timeout")));
    // A pod the watch knows, but a new credential needs a TokenRequest.
    let worker = request_as("worker", "worker-0", ROLE_ARN);
    let minting = within_patience(worker.clone()).await;
    assert_eq!(
        (minting.status, minting.json()["Message"].as_str()),
        (503, Some("Kubernetes API: TokenRequest failed: timeout")),
        "{}",
        minting.body_text()
    );
    // What the watch and the cache know is served as before.
    let again = within_patience(request("app-0", ROLE_ARN)).await;
    assert_eq!(again.status, 200, "{}", again.body_text());
    assert_eq!(again.json()["AccessKeyId"], cached.json()["AccessKeyId"]);

    cluster.resume_apiserver();
    wait::until("a credential once the API server answers again", || {
        let worker = worker.clone();
        async move { (within_patience(worker).await.status == 200).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_thousand_denials_with_distinct_roles_record_a_bounded_number_of_events() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(kube_cluster::enabled_pod(NS, "app-0", SA, ROLE_ARN)).await;
    let mut marker = kube_cluster::enabled_pod(NS, "marker-0", SA, ROLE_ARN);
    marker.metadata.labels.get_or_insert_default().remove(ENABLE_LABEL);
    cluster.add_pod(marker).await;
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.start().await;

    // Each asks for another role than the pod's: 1,000 different reasons.
    for batch in 0..20 {
        let requests = (0..50).map(|i| {
            let role = format!("arn:aws:iam::123456789012:role/r-{}", batch * 50 + i);
            async move { request("app-0", &role).send(broker.addr).await }
        });
        let replies = futures_util::future::join_all(requests).await;
        assert!(replies.iter().all(|r| r.status == 403), "{:?}", statuses(&replies));
    }
    // A later denial of another pod shows the Event writes have run.
    let denied = request("marker-0", ROLE_ARN).send(broker.addr).await;
    assert_eq!(denied.status, 403, "{}", denied.body_text());
    let on = |events: &[k8s_openapi::api::events::v1::Event], pod: &str| {
        events
            .iter()
            .filter(|e| e.reason.as_deref() == Some(DENIAL_EVENT_REASON))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
            .count()
    };
    wait::until("the marker's denial Event", || async {
        (on(&cluster.events(NS).await, "marker-0") == 1).then_some(())
    })
    .await;

    let events = cluster.events(NS).await;
    let recorded = on(&events, "app-0");
    assert!((1..=DENIAL_EVENTS_PER_POD).contains(&recorded), "{recorded} Events for one pod's 1,000 denials");
    let notes: Vec<&str> = events.iter().filter_map(|e| e.note.as_deref()).collect();
    assert!(notes.iter().any(|n| n.contains("role/r-")), "{notes:?}");
    let writes = cluster.requests(BROKER_USER).iter().filter(|uri| uri.contains("/events")).count();
    assert!(writes <= DENIAL_EVENTS_PER_POD + 1, "{writes} Event writes");
}

#[tokio::test]
async fn the_namespace_policy_comes_from_a_watch_and_holds_through_an_outage() {
    let mut cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    cluster.add_pod(kube_cluster::enabled_pod(NS, "app-0", SA, ROLE_ARN)).await;
    let other_role = "arn:aws:iam::123456789012:role/other";
    cluster.add_pod(kube_cluster::enabled_pod(NS, "other-0", SA, other_role)).await;
    let annotate = |pattern: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": NS, "annotations": { POLICY_ANNOTATION: pattern } },
        })
    };
    cluster.apply(&[annotate(ROLE_ARN)]).await;
    let policy = || Some(NamespacePolicy { annotation: POLICY_ANNOTATION.into() });

    // The default rendering grants no namespace reads: that broker's
    // namespace watch never syncs, so it never gets ready (rather than
    // answering every request 503).
    let unrendered = RealBroker::with_kube(cluster.broker_config(&Options::default()).await, sts.endpoint())
        .tune(|config| config.namespace_policy = policy())
        .start_unsynced()
        .await;
    wait::until("the namespace list to be refused", || {
        let refused = cluster.refusals(BROKER_USER).iter().any(|call| call == "list namespaces");
        async move { refused.then_some(()) }
    })
    .await;
    assert!(!unrendered.is_synced());
    let readyz = unrendered.admin_get("/readyz").await;
    assert!(readyz.body_text().contains("not ready: the namespace watch has not synced"), "{}", readyz.body_text());
    drop(unrendered);

    // Rendered with the policy: the broker may list and watch namespaces.
    let broker = RealBroker::with_namespace_policy(&cluster, sts.endpoint(), POLICY_ANNOTATION).await.start().await;
    let allowed = request("app-0", ROLE_ARN).send(broker.addr).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body_text());
    let forbidden = request("other-0", other_role).send(broker.addr).await;
    assert_eq!(forbidden.status, 403, "{}", forbidden.body_text());
    assert!(forbidden.body_text().contains("does not permit role"), "{}", forbidden.body_text());
    // A change reaches the broker through the watch.
    cluster.apply(&[annotate(&format!("{ROLE_ARN}|{other_role}"))]).await;
    wait::until("the policy change to reach the broker", || async {
        (request("other-0", other_role).send(broker.addr).await.status == 200).then_some(())
    })
    .await;
    cluster.apply(&[annotate(ROLE_ARN)]).await;
    wait::until("the policy to narrow again", || async {
        (request("other-0", other_role).send(broker.addr).await.status == 403).then_some(())
    })
    .await;
    // No request read the namespace: only the watch's list and watch.
    let reads: Vec<String> = cluster
        .requests(BROKER_USER)
        .into_iter()
        .filter(|uri| uri.starts_with("/api/v1/namespaces/default?") || uri == "/api/v1/namespaces/default")
        .collect();
    assert_eq!(reads, Vec::<String>::new(), "namespace reads per request");

    // The API server goes away: the policy still answers from the watch.
    cluster.stop_apiserver();
    let served = request("app-0", ROLE_ARN).send(broker.addr).await;
    assert_eq!(served.status, 200, "{}", served.body_text());
    let still_forbidden = request("other-0", other_role).send(broker.addr).await;
    assert_eq!(still_forbidden.status, 403, "{}", still_forbidden.body_text());
    assert!(broker.is_synced(), "a synced broker stays synced through an outage");

    // Back: the namespace watch follows the server again.
    cluster.start_apiserver().await;
    cluster.apply(&[annotate(&format!("{ROLE_ARN}|{other_role}"))]).await;
    wait::until("the namespace watch to follow the server again", || async {
        (request("other-0", other_role).send(broker.addr).await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_brokers_listeners_cap_connections_and_close_idle_ones() {
    use token_broker::connections::{ADMIN_MAX_CONNECTIONS, HttpLimits};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let cap = 4;
    let limits = HttpLimits { max_connections: cap, header_timeout: Duration::from_secs(2) };
    let broker = RealBroker::on(&cluster, sts.endpoint()).await.tune(|config| config.http = limits).start().await;
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: token-broker\r\n\r\n";
    // Reads until the server closes the connection: what it sent.
    async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
        let mut received = Vec::new();
        let read = tokio::time::timeout(wait::PATIENCE, stream.read_to_end(&mut received)).await;
        read.unwrap_or_else(|_| panic!("the broker kept an idle connection open")).ok();
        received
    }

    // Connections that never send a request head hold every slot...
    let mut silent = Vec::new();
    for _ in 0..cap {
        silent.push(TcpStream::connect(broker.addr).await.unwrap_or_else(|e| panic!("{e}")));
    }
    // ...so one more is not served (a short wait: a broken cap answers at
    // once)...
    let mut waiting = TcpStream::connect(broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    waiting.write_all(healthz).await.unwrap_or_else(|e| panic!("{e}"));
    let mut byte = [0; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut byte)).await;
    assert!(early.is_err(), "a connection beyond the cap was served: {early:?}");
    // ...until the header timeout closes the silent ones, without a byte.
    for stream in &mut silent {
        assert_eq!(until_closed(stream).await, b"");
    }
    // It is served once a slot frees, then closed when idle in its turn.
    let reply = until_closed(&mut waiting).await;
    assert!(reply.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&reply));
    assert!(reply.ends_with(b"ok\n"), "{}", String::from_utf8_lossy(&reply));

    // The admin listener has its own cap, so probes get through a flood of
    // the credentials listener; it closes idle connections alike.
    assert!(ADMIN_MAX_CONNECTIONS > cap);
    let mut probe = TcpStream::connect(broker.admin_addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(until_closed(&mut probe).await, b"");
}
