//! imds-mesh on the configuration Istio itself generates from the rendering:
//! `istio-xds` (Istio's xDS server) translates the rendered objects for an
//! enabled pod, a pod without the label and a broker pod, and the sidecars
//! here run what istiod would send them, with only the rewrites
//! `integration::istio` lists.

use imds_filter::config::METADATA_ADDRESSES;
use integration::clients::SdkClient;
use integration::istio::{self, AppSidecar, Cluster, SidecarXds, proxy_of};
use integration::kube_cluster::{BROKER_USER, KubeCluster};
use integration::pki::Mesh;
use integration::real_broker::SIDECAR_SOURCE;
use integration::real_broker::credentials_request;
use integration::{Pod, ROLE_ARN, RealBroker, Req, Sts, wait};
use mesh_config::metadata;
use mesh_config::render::BROKER_PORT;
use token_broker::kube::DENIAL_EVENT_REASON;
use token_broker::peer::PEER_ADDRESS_HEADER;

const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";
/// Istio's name for the WasmPlugin's filter (master since April 2026).
const FILTER: &str = "extensions.istio.io/trafficextension/istio-system.imds-mesh~istio-translated-wasmplugin";

fn broker_proxy() -> String {
    istio::broker_proxy(&istio::translated_options(), 0)
}

/// The default rendering with the harness's enabled pod, plain pod and one
/// broker.
fn cluster() -> Cluster {
    Cluster::harness(&istio::translated_options(), 1)
}

fn generate() -> (SidecarXds, SidecarXds, SidecarXds) {
    let (app, plain) = (proxy_of(&Pod::enabled()), proxy_of(&istio::plain_pod()));
    let mut xds = cluster().generate(&[&app, &plain, &broker_proxy()]);
    let mut take = |name: &str| xds.remove(name).unwrap_or_else(|| panic!("no config for {name}"));
    (take(&app), take(&plain), take(&broker_proxy()))
}

#[test]
fn istio_runs_the_filter_first_in_the_metadata_chain_of_enabled_pods_only() {
    let (app, plain, broker) = generate();
    let chain = Some(metadata::METADATA_CHAIN);
    let listener = "0.0.0.0_80";
    let filters = app.http_filters(listener, chain);
    assert_eq!(filters.first().map(String::as_str), Some(FILTER), "{filters:?}");
    // The name mesh-config uses for this release (in the per-route switch
    // and the metadata chain) is the one Istio gave the filter.
    assert_eq!(istio::translated_options().wasm_filter_name(), FILTER);
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
        app.endpoint_addresses(&istio::translated_options().plugin_config().broker_cluster),
        [format!("{}:{BROKER_PORT}", istio::broker_ip(0))]
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
        let managers = broker_inbound_managers(&broker);
        assert!(!managers.is_empty(), "no HTTP chain for port {BROKER_PORT}");
        for config in &managers {
            assert_eq!(config["forward_client_cert_details"], "APPEND_FORWARD", "mesh default {default:?}");
            assert_eq!(config["set_current_client_cert_details"]["uri"], true);
        }
    }
}

/// The HTTP connection managers of the broker sidecar's inbound chains for
/// the broker's port.
fn broker_inbound_managers(broker: &SidecarXds) -> Vec<serde_json::Value> {
    let inbound = broker.listener("virtualInbound").unwrap_or_else(|| panic!("no virtualInbound"));
    inbound["filter_chains"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|chain| chain["filter_chain_match"]["destination_port"] == BROKER_PORT)
        .flat_map(|chain| chain["filters"].as_array().into_iter().flatten())
        .filter(|filter| filter["name"] == "envoy.filters.network.http_connection_manager")
        .map(|filter| filter["typed_config"].clone())
        .collect()
}

#[test]
fn the_brokers_sidecar_states_the_callers_own_address_on_istios_output() {
    let (_, _, broker) = generate();
    let managers = broker_inbound_managers(&broker);
    assert!(!managers.is_empty(), "no HTTP chain for port {BROKER_PORT}");
    for manager in &managers {
        // Every chain of the port (mTLS and plaintext) routes with the
        // route configuration the rendered EnvoyFilter patched.
        let route = &manager["route_config"];
        assert_eq!(route["name"], format!("inbound|{BROKER_PORT}||"), "{manager}");
        let added: Vec<&serde_json::Value> = route["request_headers_to_add"].as_array().into_iter().flatten().collect();
        let [header] = &added[..] else { panic!("{route}") };
        assert_eq!(header["header"]["key"], PEER_ADDRESS_HEADER);
        assert_eq!(header["header"]["value"], "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%");
        assert_eq!(header["append_action"], "OVERWRITE_IF_EXISTS_OR_ADD");
    }
    // And the sidecar connects to the broker from the address the broker's
    // default `--sidecar-sources` accepts.
    let cluster = broker.cluster(&format!("inbound|{BROKER_PORT}||")).unwrap_or_else(|| panic!("no inbound cluster"));
    assert_eq!(cluster["upstream_bind_config"]["source_address"]["address"], SIDECAR_SOURCE.to_string());
}

#[test]
fn under_registry_only_the_broker_still_reaches_sts() {
    let (host, port, _) = istio::translated_options().sts_endpoint();
    let sts_cluster = format!("outbound|{port}||{host}");
    let app_id = proxy_of(&Pod::enabled());
    let mut xds = cluster().mesh("outboundTrafficPolicy: {mode: REGISTRY_ONLY}").generate(&[&broker_proxy(), &app_id]);
    let (broker, app) = (xds.remove(&broker_proxy()).unwrap(), xds.remove(&app_id).unwrap());
    assert!(broker.cluster(&sts_cluster).is_some(), "the broker's sidecar has no cluster for STS");
    // TLS to the STS host goes to that cluster, not to the black hole.
    let listener = broker.listener(&format!("0.0.0.0_{port}")).unwrap_or_else(|| panic!("no listener for port {port}"));
    let to_sts = listener["filter_chains"].as_array().into_iter().flatten().any(|chain| {
        chain["filter_chain_match"]["server_names"].as_array().is_some_and(|names| names.iter().any(|n| n == &host))
            && chain["filters"][0]["typed_config"]["cluster"] == sts_cluster.as_str()
    });
    assert!(to_sts, "{listener}");
    // Only the broker's namespace sees it.
    assert!(app.cluster(&sts_cluster).is_none());
}

#[test]
fn a_namespace_sidecar_must_import_the_metadata_services_and_the_broker() {
    let options = istio::translated_options();
    let sidecar = |hosts: &[String]| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: default}}\n\
             spec:\n  egress:\n  - hosts: {hosts:?}\n"
        )
    };
    let app_id = proxy_of(&Pod::enabled());
    let broker_cluster = options.plugin_config().broker_cluster;

    // Its own namespace only: no port-80 HTTP listener for the metadata
    // address (the traffic would leave as TCP), and no broker cluster.
    let narrow = cluster().config(&sidecar(&["./*".to_owned()])).generate(&[&app_id]).remove(&app_id).unwrap();
    assert!(narrow.listener("0.0.0.0_80").is_none());
    assert!(narrow.cluster(&broker_cluster).is_none());

    // With what `sidecar_egress_hosts` names, the filter is back in place.
    let hosts: Vec<String> = ["./*".to_owned()].into_iter().chain(options.sidecar_egress_hosts()).collect();
    let imported = cluster().config(&sidecar(&hosts)).generate(&[&app_id]).remove(&app_id).unwrap();
    let filters = imported.http_filters("0.0.0.0_80", Some(metadata::METADATA_CHAIN));
    assert_eq!(filters.first().map(String::as_str), Some(FILTER), "{filters:?}");
    assert!(imported.cluster(&broker_cluster).is_some());
}

/// What stands behind the enabled pod's sidecar: the API server with the
/// pod (and its plain sibling of the same service account), STS, the mesh's
/// certificates and the broker in `xfcc` mode.
struct Backend {
    kube: KubeCluster,
    pod: Pod,
    mesh: Mesh,
    broker: RealBroker,
    _sts: Sts,
}

async fn backend() -> Backend {
    let kube = KubeCluster::start().await;
    let sts = Sts::trusting(&kube).await;
    let pod = Pod::enabled();
    kube.create_pod(istio::kube_pod(&pod), istio::APP_IP).await;
    kube.create_pod(istio::kube_pod(&istio::plain_pod()), istio::PLAIN_IP).await;
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    let broker = RealBroker::on(&kube, sts.endpoint()).await.xfcc().start().await;
    Backend { kube, pod, mesh, broker, _sts: sts }
}

#[tokio::test]
async fn boto3_gets_sts_credentials_on_the_sidecars_istio_generates() {
    let Backend { kube, mesh, broker, _sts, pod: _pod } = backend().await;
    let (app_xds, _, broker_xds) = generate();

    let inbound = istio::loopback_port(BROKER_PORT);
    let _broker_sidecar = istio::start_broker_sidecar(&broker_xds, inbound, broker.addr, &mesh.broker).await;
    let broker_endpoint = format!("{}:{BROKER_PORT}", istio::broker_ip(0));
    // One worker: a flush of the filter's counters then covers every
    // request sent before it.
    let app = AppSidecar::start(&app_xds, &mesh.app, &[(broker_endpoint, inbound)], 1).await;

    // Other port-80 traffic passes through, and never enters the filter.
    let elsewhere = Req::get("/index.html").host("example.com").send(app.envoy.addr).await;
    assert_eq!((elsewhere.status, app.upstream.requests().len()), (200, 1));

    app.wait_for_credentials(integration::ROLE_NAME).await;
    let credentials = SdkClient::python("boto3_credentials.py", &app.envoy).through_sidecar(app.metadata).run().await;
    assert_eq!(credentials["method"], "iam-role");
    assert!(credentials["access_key"].as_str().is_some_and(|k| k.starts_with("ASIA")), "not from STS: {credentials}");
    assert_eq!(kube.token_requests(BROKER_USER).len(), 1);

    app.envoy.wait_for_stat("imds_mesh.requests.credentials.2xx", 2).await;
    let passed_on = app.envoy.stats().await.get("imds_mesh.passed_on").copied();
    assert_eq!(passed_on, Some(0), "passthrough entered the wasm VM");
    app.assert_node_untouched();
}

#[tokio::test]
async fn only_the_brokers_own_sidecar_vouches_for_a_caller_on_istios_output() {
    let Backend { pod, mesh, broker, _sts, kube: _kube } = backend().await;
    // What the mesh default would otherwise forward as sent.
    let broker_xds = cluster()
        .mesh("defaultConfig: {proxyHeaders: {forwardedClientCert: ALWAYS_FORWARD_ONLY}}")
        .generate(&[&broker_proxy()])
        .remove(&broker_proxy())
        .unwrap_or_else(|| panic!("no broker config"));
    let inbound = istio::loopback_port(BROKER_PORT);
    let _sidecar = istio::start_broker_sidecar(&broker_xds, inbound, broker.addr, &mesh.broker).await;

    let app_id = integration::pki::spiffe_id(&pod.namespace, &pod.service_account);
    let request = credentials_request(ROLE_ARN, &pod.name);
    // Another workload, with a valid mesh certificate, claims to be the app.
    let forged = request
        .clone()
        .header("x-forwarded-client-cert", &format!("By={};URI={app_id}", integration::pki::broker_id()));
    let other = mesh.ca.client(Some(&mesh.ca.workload(&[&integration::pki::spiffe_id(&pod.namespace, "admin")])));
    let reply = forged.send_tls(&other, inbound).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((reply.status, reply.json()["Code"].as_str()), (403, Some("AccessDenied")), "{}", reply.body_text());
    // Past the sidecar (a port-forward, a process reaching the broker's
    // port directly), the forged element and a stated address are refused.
    let app_ip = istio::APP_IP.parse().unwrap_or_else(|e| panic!("{e}"));
    let bypass = forged.clone().header(PEER_ADDRESS_HEADER, istio::APP_IP).source(app_ip).send(broker.addr).await;
    assert_eq!(
        (bypass.status, bypass.json()["Code"].as_str()),
        (401, Some("Unauthenticated")),
        "{}",
        bypass.body_text()
    );
    assert!(bypass.body_text().contains("not_through_sidecar"), "{}", bypass.body_text());
    // The app itself is served, from its pod's address.
    let app = mesh.ca.client(Some(&mesh.ca.workload(&[&app_id])));
    let reply = request.source(app_ip).send_tls(&app, inbound).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
}

#[tokio::test]
async fn a_pod_without_the_label_cannot_borrow_its_siblings_role_on_istios_output() {
    let Backend { pod, mesh, broker, _sts, kube } = backend().await;
    let (_, _, broker_xds) = generate();
    let inbound = istio::loopback_port(BROKER_PORT);
    let _sidecar = istio::start_broker_sidecar(&broker_xds, inbound, broker.addr, &mesh.broker).await;
    let (app_ip, plain_ip) = (istio::APP_IP, istio::PLAIN_IP);
    let source = |ip: &str| ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));

    // The plain pod runs as the app's service account: its mTLS identity is
    // the app's. It names the enabled pod and claims the app's address, in
    // the broker's header and in `X-Forwarded-For` (which Istio's inbound
    // side, `use_remote_address: false`, would take as the remote address).
    let request = credentials_request(ROLE_ARN, &pod.name);
    let identity =
        mesh.ca.client(Some(&mesh.ca.workload(&[&integration::pki::spiffe_id(&pod.namespace, &pod.service_account)])));
    let borrowed =
        request.clone().source(source(plain_ip)).header(PEER_ADDRESS_HEADER, app_ip).header("x-forwarded-for", app_ip);
    let reply = borrowed.send_tls(&identity, inbound).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((reply.status, reply.json()["Code"].as_str()), (403, Some("AccessDenied")), "{}", reply.body_text());
    let message = reply.json()["Message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains(&format!("caller at {plain_ip} is not pod \"{}\"", pod.name)), "{message}");
    wait::until("the denial Event on the enabled pod", || async {
        let events = kube.events(&pod.namespace).await;
        events
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(DENIAL_EVENT_REASON)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod.name.as_str())
                    && e.note.as_deref().is_some_and(|note| note.contains(plain_ip))
            })
            .then_some(())
    })
    .await;
    assert!(kube.token_requests(BROKER_USER).is_empty());

    // From the enabled pod's own address it is served, whatever it claims.
    let own = request.source(source(app_ip)).header(PEER_ADDRESS_HEADER, plain_ip);
    let reply = own.send_tls(&identity, inbound).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.status, 200, "{}", reply.body_text());
}

/// `pod`'s sidecar on `xds` with no broker behind it, and the mesh whose
/// certificates it uses (keep it as long as the sidecar).
async fn without_broker(xds: &SidecarXds, pod: &Pod) -> (AppSidecar, Mesh) {
    let mesh = Mesh::new(&pod.namespace, &pod.service_account);
    (AppSidecar::start(xds, &mesh.app, &[], 1).await, mesh)
}

#[tokio::test]
async fn a_pod_without_the_label_never_reaches_the_nodes_imds() {
    let (_, plain_xds, _) = generate();
    let (sidecar, _mesh) = without_broker(&plain_xds, &istio::plain_pod()).await;

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
    let (sidecar, _mesh) = without_broker(&app_xds, &Pod::enabled()).await;
    // In a pod the filter answers it (it recognises the destination,
    // `filter.rs` shows it in a network namespace); here the destination is
    // the loopback stand-in, so the guard in the metadata chain refuses it.
    let reply = Req::get(CREDENTIALS).host("example.com").send(sidecar.metadata).await;
    assert_eq!(reply.status, 403, "{}", reply.body_text());
    assert_eq!(sidecar.upstream.connections(), 0);
    sidecar.assert_node_untouched();
}
