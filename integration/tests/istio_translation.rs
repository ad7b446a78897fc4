//! imds-mesh on the configuration Istio itself generates from the rendering:
//! `istio-xds` (Istio's xDS server) translates the rendered objects for an
//! enabled pod, a pod without the label and a broker pod, and the sidecars
//! here run what istiod would send them, with only the rewrites
//! `integration::istio` lists.

use std::net::SocketAddr;

use imds_filter::config::{METADATA_ADDRESSES, METADATA_PORT};
use integration::clients::SdkClient;
use integration::envoy::Ports;
use integration::istio::{self, Cluster, Rewrites, SidecarXds};
use integration::kube_api::{self, KubeApi};
use integration::pki::{Mesh, WorkloadFiles};
use integration::{Envoy, Pod, ROLE_ARN, RealBroker, Req, Sts, Upstream, paths, wait};
use mesh_config::metadata::{self, METADATA_SERVICES};
use mesh_config::render::{BROKER_PORT, Options};

const APP_IP: &str = "10.244.1.10";
const PLAIN_IP: &str = "10.244.1.11";
const BROKER_IP: &str = "10.244.2.10";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
/// Istio's name for the WasmPlugin's filter (master since April 2026).
const FILTER: &str = "extensions.istio.io/trafficextension/istio-system.imds-mesh~istio-translated-wasmplugin";
/// The clusters Istio makes of the metadata ServiceEntries, where a request
/// nothing answered would go: the node's own IMDS.
fn node_imds_clusters() -> impl Iterator<Item = String> {
    METADATA_SERVICES.iter().map(|s| format!("outbound|{METADATA_PORT}||{}", s.host))
}

/// Every original-destination cluster a port-80 request can reach: the
/// metadata services to `node_imds`, the rest to `upstream`.
fn original_destinations(rewrites: Rewrites, node_imds: &Upstream, upstream: &Upstream) -> Rewrites {
    node_imds_clusters()
        .fold(rewrites, |r, cluster| r.original_destination(&cluster, node_imds.addr()))
        .original_destination("PassthroughCluster", upstream.addr())
}

fn enabled() -> Pod {
    Pod::enabled()
}

fn plain() -> Pod {
    Pod { name: "plain-5c8d7f9b4-q7w2e".into(), ..Pod::plain() }
}

fn proxy(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn broker_proxy() -> String {
    format!("{}/{}", Options::default().namespace, istio::broker_pod_name(0))
}

/// The default rendering with an enabled pod, a plain pod and one broker.
fn cluster() -> Cluster {
    let kube_pod = |pod: &Pod| {
        let mut object = kube_api::enabled_pod(&pod.namespace, &pod.name, &pod.service_account, ROLE_ARN);
        object.metadata.labels = Some(pod.labels.clone());
        object.metadata.annotations = Some(pod.annotations.clone());
        object
    };
    Cluster::rendered(&Options::default())
        .object(kube_api::namespace("default"))
        .object(kube_api::namespace("istio-system"))
        .pod(kube_pod(&enabled()), APP_IP)
        .pod(kube_pod(&plain()), PLAIN_IP)
        .broker_pods(&[BROKER_IP])
}

fn generate() -> (SidecarXds, SidecarXds, SidecarXds) {
    let mut xds = cluster().generate(&[&proxy(&enabled()), &proxy(&plain()), &broker_proxy()]);
    let mut take = |name: &str| xds.remove(name).unwrap_or_else(|| panic!("no config for {name}"));
    (take(&proxy(&enabled())), take(&proxy(&plain())), take(&broker_proxy()))
}

#[test]
fn istio_runs_the_filter_first_in_the_metadata_chain_of_enabled_pods_only() {
    let (app, plain, broker) = generate();
    let chain = Some(metadata::METADATA_CHAIN);
    let listener = "0.0.0.0_80";
    let filters = app.http_filters(listener, chain);
    assert_eq!(filters.first().map(String::as_str), Some(FILTER), "{filters:?}");
    // The WasmPlugin also places it in Istio's own port-80 chain; the
    // route configuration there switches it off.
    let disabled = &app.route("80").unwrap_or_else(|| panic!("no route 80"))["typed_per_filter_config"][FILTER];
    assert_eq!(disabled["disabled"], true, "{disabled}");
    for sidecar in [&app, &plain, &broker] {
        for chain in [None, chain] {
            let filters = sidecar.http_filters(listener, chain);
            let guard = filters.iter().position(|f| f == metadata::GUARD);
            let router = filters.iter().position(|f| f == "envoy.filters.http.router");
            assert_eq!(guard.map(|g| g + 1), router, "the guard must sit just before the router: {filters:?}");
        }
        assert!(sidecar.listener(listener).is_some_and(|l| {
            l["filter_chains"].as_array().into_iter().flatten().any(|c| c["name"] == metadata::METADATA_CHAIN)
        }));
    }
    for sidecar in [&plain, &broker] {
        for chain in [None, chain] {
            assert!(!sidecar.http_filters(listener, chain).iter().any(|f| f == FILTER));
        }
    }
    assert_eq!(
        app.endpoint_addresses(&Options::default().plugin_config().broker_cluster),
        [format!("{BROKER_IP}:{BROKER_PORT}")]
    );
}

#[test]
fn the_metadata_route_answers_for_every_metadata_authority() {
    let (app, _, _) = generate();
    let route = app.route("80").unwrap_or_else(|| panic!("no route 80"));
    // The fail-closed route's virtual hosts: one per metadata service.
    let domains: Vec<&str> = route["virtual_hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["routes"][0]["direct_response"]["status"] == 404)
        .flat_map(|h| h["domains"].as_array().into_iter().flatten().filter_map(|d| d.as_str()))
        .collect();
    for authority in METADATA_ADDRESSES.map(|a| a.authority) {
        assert!(domains.contains(&authority), "{authority} is not in the metadata route: {domains:?}");
    }
}

#[test]
fn the_brokers_sidecar_appends_the_callers_xfcc_element_whatever_the_mesh_default() {
    for default in ["", "defaultConfig: {proxyHeaders: {forwardedClientCert: ALWAYS_FORWARD_ONLY}}"] {
        let mut xds = cluster().mesh(default).generate(&[&broker_proxy()]);
        let broker = xds.remove(&broker_proxy()).unwrap_or_else(|| panic!("no broker config"));
        let inbound = broker.listener("virtualInbound").unwrap_or_else(|| panic!("no virtualInbound"));
        let managers: Vec<&serde_json::Value> = inbound["filter_chains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|chain| chain["filter_chain_match"]["destination_port"] == BROKER_PORT)
            .flat_map(|chain| chain["filters"].as_array().into_iter().flatten())
            .filter(|filter| filter["name"] == "envoy.filters.network.http_connection_manager")
            .collect();
        assert!(!managers.is_empty(), "no HTTP chain for port {BROKER_PORT}");
        for manager in managers {
            let config = &manager["typed_config"];
            assert_eq!(config["forward_client_cert_details"], "APPEND_FORWARD", "mesh default {default:?}");
            assert_eq!(config["set_current_client_cert_details"]["uri"], true);
        }
    }
}

/// Where one sidecar listens: `port` (80 outbound, 8080 inbound) on a
/// loopback address of its own, and its admin.
fn listening(port: u16) -> (SocketAddr, SocketAddr) {
    (istio::loopback_port(port), SocketAddr::from(([127, 0, 0, 1], Ports::free(false).admin)))
}

/// An app pod's sidecar on Istio's output: port 80 on `outbound` for
/// other destinations and on its own loopback address standing for the
/// metadata service (`metadata`), the broker at `broker`.
struct AppSidecar {
    envoy: Envoy,
    metadata: SocketAddr,
    node_imds: Upstream,
    upstream: Upstream,
}

async fn app_sidecar(xds: &SidecarXds, certificates: &WorkloadFiles, broker: Option<SocketAddr>) -> AppSidecar {
    let (node_imds, upstream) = (Upstream::start().await, Upstream::start().await);
    let ((outbound, admin), metadata) = (listening(80), istio::loopback_port(80));
    let mut rewrites = original_destinations(Rewrites::new(admin), &node_imds, &upstream)
        .listener("0.0.0.0_80", outbound)
        .metadata_at("0.0.0.0_80", metadata)
        .certificates(certificates)
        .wasm(&paths::filter_wasm());
    if let Some(broker) = broker {
        rewrites = rewrites.endpoint(&format!("{BROKER_IP}:{BROKER_PORT}"), broker);
    }
    // One worker: a flush of the filter's counters then covers every
    // request sent before it.
    let envoy = Envoy::start_bootstrap(&xds.bootstrap(&rewrites), outbound, admin, 1).await;
    AppSidecar { envoy, metadata, node_imds, upstream }
}

impl AppSidecar {
    /// Nothing reached the node's IMDS.
    fn assert_node_untouched(&self) {
        assert_eq!(self.node_imds.connections(), 0, "a connection reached the node's IMDS");
    }
}

#[tokio::test]
async fn boto3_gets_sts_credentials_on_the_sidecars_istio_generates() {
    let (api, sts) = (KubeApi::start().await, Sts::start().await);
    let pod = enabled();
    api.add_pod(kube_api::enabled_pod(&pod.namespace, &pod.name, &pod.service_account, ROLE_ARN));
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let broker = RealBroker::builder(&api, sts.endpoint()).xfcc().start().await;
    let (app_xds, _, broker_xds) = generate();

    let (inbound, admin) = listening(BROKER_PORT);
    let rewrites = Rewrites::new(admin)
        .inbound(inbound)
        .original_destination(&format!("inbound|{BROKER_PORT}||"), broker.addr)
        .certificates(&mesh.broker);
    let _broker_sidecar = Envoy::start_bootstrap(&broker_xds.bootstrap(&rewrites), inbound, admin, 1).await;
    let app = app_sidecar(&app_xds, &mesh.app, Some(inbound)).await;

    // Other port-80 traffic passes through, and never enters the filter.
    let elsewhere = Req::get("/index.html").host("example.com").send(app.envoy.addr).await;
    assert_eq!((elsewhere.status, app.upstream.requests().len()), (200, 1));

    let credentials = SdkClient::python("boto3_credentials.py", &app.envoy).through_sidecar(app.metadata).run().await;
    assert_eq!(credentials["method"], "iam-role");
    assert!(credentials["access_key"].as_str().is_some_and(|k| k.starts_with("ASIA")), "not from STS: {credentials}");
    assert_eq!(api.token_request_count(), 1);

    app.envoy.wait_for_stat("imds_mesh.requests.credentials.2xx", 1).await;
    let passed_on = app.envoy.stats().await.get("imds_mesh.passed_on").copied();
    assert_eq!(passed_on, Some(0), "passthrough entered the wasm VM");
    app.assert_node_untouched();
}

#[tokio::test]
async fn a_pod_without_the_label_never_reaches_the_nodes_imds() {
    let (_, plain_xds, _) = generate();
    let pod = plain();
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let sidecar = app_sidecar(&plain_xds, &mesh.app, None).await;

    // By name, to any address: the fail-closed route.
    for authority in metadata::authorities() {
        let reply = Req::get(CREDENTIALS).host(&authority).send(sidecar.envoy.addr).await;
        assert_eq!(reply.status, 404, "{authority}: {}", reply.body_text());
    }
    // To the metadata address, whatever the name: its own chain refuses it.
    for authority in ["169.254.169.254", "example.com"] {
        let reply = Req::get(CREDENTIALS).host(authority).send(sidecar.metadata).await;
        assert_eq!(reply.status, 403, "{authority}: {}", reply.body_text());
    }
    // Not HTTP at all: without the metadata chain this would be Istio's TCP
    // passthrough to the node.
    let mut stream = tokio::net::TcpStream::connect(sidecar.metadata).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::io::AsyncWriteExt::write_all(&mut stream, b"\x16\x03\x01\x00\x05hello\r\n\r\n").await.ok();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait::PATIENCE, tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer)).await;
    assert_eq!(sidecar.upstream.connections(), 0, "non-HTTP bytes to the metadata address were passed through");
    sidecar.assert_node_untouched();
}

#[tokio::test]
async fn a_spoofed_host_to_the_metadata_address_never_leaves_an_enabled_pods_sidecar() {
    let (app_xds, _, _) = generate();
    let pod = enabled();
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let sidecar = app_sidecar(&app_xds, &mesh.app, None).await;
    // In a pod the filter answers it (it recognises the destination,
    // `filter.rs` shows it in a network namespace); here the destination is
    // the loopback stand-in, so the guard in the metadata chain refuses it.
    let reply = Req::get(CREDENTIALS).host("example.com").send(sidecar.metadata).await;
    assert_eq!(reply.status, 403, "{}", reply.body_text());
    assert_eq!(sidecar.upstream.connections(), 0);
    sidecar.assert_node_untouched();
}
