//! The broker's `mtls` identity mode over real TLS: certificates made by
//! rcgen, the broker's own listener (`token_broker::tls`), rustls clients,
//! a real Kubernetes API server (the broker as its own service account with
//! the rendered RBAC) and moto STS behind the web identity checks AWS makes.

use std::net::IpAddr;
use std::time::Duration;

use integration::kube_cluster::{self, BROKER_USER, KubeCluster, pod_ip};
use integration::pki::{self, MeshCa, TlsClient};
use integration::real_broker;
use integration::{ROLE_ARN, RealBroker, Req, Sts, wait};
use k8s_openapi::api::core::v1::Pod;
use mesh_config::render::Options;
use tempfile::TempDir;
use token_broker::tls::MtlsFiles;

const NS: &str = "default";
const SA: &str = "app";
const BROKER_ID: &str = "spiffe://cluster.local/ns/imds-mesh/sa/token-broker";

fn pod(name: &str) -> Pod {
    kube_cluster::enabled_pod(NS, name, SA, ROLE_ARN)
}

/// A request for web-0's credentials, connecting from `source` (the TLS
/// peer address the broker checks against web-0's).
fn credentials_request(source: IpAddr) -> Req {
    real_broker::credentials_request(ROLE_ARN, "web-0").source(source)
}

/// The broker's certificate from `ca`, trusting `ca` for clients, written to
/// `dir`.
fn broker_files(ca: &MeshCa, dir: &TempDir) -> MtlsFiles {
    let files = ca.workload(&[BROKER_ID]).write(dir.path(), "broker");
    MtlsFiles { certificate_chain: files.cert, private_key: files.key, client_ca_bundle: files.ca }
}

/// An mtls broker over `cluster` (as its own service account, with the
/// rendered RBAC) and `sts`, serving `files` (re-read every `reload`); ready.
async fn mtls_broker(cluster: &KubeCluster, sts: &Sts, files: MtlsFiles, reload: Duration) -> RealBroker {
    let kube = cluster.broker_config(&Options::default()).await;
    RealBroker::with_kube(kube, sts.endpoint()).mtls(files, reload).start().await
}

struct Setup {
    cluster: KubeCluster,
    ca: MeshCa,
    broker: RealBroker,
    /// web-0's address.
    web: IpAddr,
    _sts: Sts,
    _dir: TempDir,
}

impl Setup {
    /// How many tokens the API server has granted the broker.
    fn tokens_granted(&self) -> usize {
        self.cluster.token_requests(BROKER_USER).len()
    }
}

async fn setup(reload: Duration) -> Setup {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let web = pod_ip(&cluster.add_pod(pod("web-0")).await);
    let ca = MeshCa::new("mesh");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let broker = mtls_broker(&cluster, &sts, broker_files(&ca, &dir), reload).await;
    Setup { cluster, ca, broker, web, _sts: sts, _dir: dir }
}

/// A client of `ca` presenting a certificate with these URI SANs.
fn client(ca: &MeshCa, uris: &[&str]) -> TlsClient {
    ca.client(Some(&ca.workload(uris)))
}

#[tokio::test]
async fn a_caller_is_identified_by_the_spiffe_uri_of_its_client_certificate() {
    let s = setup(Duration::from_secs(60)).await;
    let app = client(&s.ca, &[&pki::spiffe_id(NS, SA)]);

    let reply = credentials_request(s.web).send_tls(&app, s.broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    assert!(reply.json()["AccessKeyId"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{}", reply.body_text());
    assert_eq!(s.tokens_granted(), 1);

    // Another service account of the same namespace may not use this pod.
    let other = client(&s.ca, &[&pki::spiffe_id(NS, "admin")]);
    let reply = credentials_request(s.web).send_tls(&other, s.broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 403, "{}", reply.body_text());
    assert_eq!(reply.json()["Code"], "AccessDenied");
}

#[tokio::test]
async fn a_sibling_pod_with_the_same_identity_is_not_the_pod_it_names() {
    let s = setup(Duration::from_secs(60)).await;
    // Another pod of web-0's service account, without the label: the same
    // certificate identity, its own address.
    let mut sibling = pod("sibling-0");
    sibling.metadata.labels = None;
    let sibling = pod_ip(&s.cluster.add_pod(sibling).await);
    let app = client(&s.ca, &[&pki::spiffe_id(NS, SA)]);

    let reply = credentials_request(sibling).send_tls(&app, s.broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((reply.status, reply.json()["Code"].as_str()), (403, Some("AccessDenied")), "{}", reply.body_text());
    let message = reply.json()["Message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains(&format!("caller at {sibling} is not pod \"web-0\"")), "{message}");
    wait::until("the denial Event on web-0", || async {
        let events = s.cluster.events(NS).await;
        let on_web = |e: &k8s_openapi::api::events::v1::Event| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("web-0")
                && e.note.as_deref().is_some_and(|note| note.contains(&sibling.to_string()))
        };
        events.iter().any(on_web).then_some(())
    })
    .await;
    assert_eq!(s.tokens_granted(), 0);

    let reply = credentials_request(s.web).send_tls(&app, s.broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
}

#[tokio::test]
async fn certificates_that_do_not_name_one_caller_in_the_trust_domain_are_401() {
    let s = setup(Duration::from_secs(60)).await;
    let ours = pki::spiffe_id(NS, SA);
    for uris in [
        // No URI SAN at all (a plain server certificate).
        vec![],
        // Two identities: which one is calling?
        vec![ours.as_str(), "spiffe://cluster.local/ns/kube-system/sa/admin"],
        // Another trust domain.
        vec!["spiffe://evil.example/ns/default/sa/app"],
        // Not a workload SPIFFE ID.
        vec!["https://cluster.local/ns/default/sa/app"],
    ] {
        let reply = credentials_request(s.web)
            .send_tls(&client(&s.ca, &uris), s.broker.addr)
            .await
            .unwrap_or_else(|e| panic!("{uris:?}: {e}"));
        assert_eq!(reply.status, 401, "{uris:?}: {}", reply.body_text());
        assert_eq!(reply.json()["Code"], "Unauthenticated", "{uris:?}");
    }
    // Identity headers mean nothing in this mode.
    let spoofed = credentials_request(s.web)
        .header(token_broker::identity::DEV_NAMESPACE_HEADER, NS)
        .header(token_broker::identity::DEV_SERVICE_ACCOUNT_HEADER, SA)
        .header("x-forwarded-client-cert", &format!("By={BROKER_ID};URI={ours}"));
    let reply = spoofed.send_tls(&client(&s.ca, &[]), s.broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 401, "{}", reply.body_text());
    assert_eq!(s.tokens_granted(), 0);
}

#[tokio::test]
async fn connections_without_a_certificate_from_the_configured_ca_are_refused() {
    let s = setup(Duration::from_secs(60)).await;
    let ours = pki::spiffe_id(NS, SA);

    let anonymous = s.ca.client(None);
    let result = credentials_request(s.web).send_tls(&anonymous, s.broker.addr).await;
    assert!(result.is_err(), "served a client without a certificate: {result:?}");

    // The right SPIFFE ID, signed by a CA the broker does not trust.
    let rogue = MeshCa::new("rogue");
    let impostor = s.ca.client(Some(&rogue.workload(&[&ours])));
    let result = credentials_request(s.web).send_tls(&impostor, s.broker.addr).await;
    assert!(result.is_err(), "served a certificate from an untrusted CA: {result:?}");
    assert_eq!(s.tokens_granted(), 0);

    // Plain HTTP gets no answer either.
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(s.broker.addr).await?;
        stream.write_all(&credentials_request(s.web).to_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map(|_| raw)
    })
    .await;
    let answered = matches!(&plain, Ok(Ok(raw)) if raw.starts_with(b"HTTP/"));
    assert!(!answered, "plain HTTP was answered: {plain:?}");

    // Probes and scrapes use the plain admin listener.
    assert_eq!(s.broker.admin_get("/readyz").await.status, 200);
    assert_eq!(s.broker.admin_get("/v1/credentials").await.status, 404);
}

#[tokio::test]
async fn rotated_certificates_and_roots_are_picked_up_without_a_restart() {
    let cluster = KubeCluster::start().await;
    let sts = Sts::trusting(&cluster).await;
    let web = pod_ip(&cluster.add_pod(pod("web-0")).await);
    let (old, new) = (MeshCa::new("mesh-2026"), MeshCa::new("mesh-2027"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let files = broker_files(&old, &dir);
    let broker = mtls_broker(&cluster, &sts, files, Duration::from_millis(100)).await;
    let caller = pki::spiffe_id(NS, SA);
    let (old_client, new_client) = (client(&old, &[&caller]), client(&new, &[&caller]));

    let reply = credentials_request(web).send_tls(&old_client, broker.addr).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());

    // The mesh moves to a new root: the broker's certificate and the bundle
    // it trusts are replaced in place.
    broker_files(&new, &dir);
    wait::until("the broker to serve the new certificate", || {
        let client = new_client.clone();
        async move { credentials_request(web).send_tls(&client, broker.addr).await.ok().filter(|r| r.status == 200) }
    })
    .await;
    // A client that trusts the new root but presents a certificate from the
    // old one is refused: the broker no longer trusts the old root.
    let stale = new.client(Some(&old.workload(&[&caller])));
    let result = credentials_request(web).send_tls(&stale, broker.addr).await;
    assert!(result.is_err(), "still trusts the old root: {result:?}");
}
