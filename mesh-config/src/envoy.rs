//! Envoy bootstraps that reproduce, on one machine, what Istio gives the two
//! sidecars involved: the app's (outbound port 80 with the filter, the pod in
//! node metadata, the broker as an `outbound|<port>||<host>` cluster over
//! mesh mTLS) and the broker's (inbound mTLS, XFCC `APPEND_FORWARD` with the
//! caller's URI and its address in a header of its own, forwarded to the
//! broker on loopback from Istio's inbound passthrough address).
//!
//! Istio delivers these over xDS with certificates from SDS; here they are
//! small static bootstraps with certificate files, with the same names and
//! settings where the filter's behaviour depends on them, for running the
//! filter and the broker outside a mesh. They are not Istio's shape: the
//! filter runs on every port-80 route here, and there is no metadata filter
//! chain. What Istio really generates from the rendering is what
//! `integration/tests/istio_translation.rs` runs. The filter's own tests and
//! `just demo` start Envoy on these; `envoy --mode validate` accepts each.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::metadata;

/// The pod a sidecar belongs to, as Istio reports it in node metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Pod name (`NAME`).
    pub name: String,
    /// Pod namespace (`NAMESPACE`).
    pub namespace: String,
    /// The pod's service account (`SERVICE_ACCOUNT`).
    pub service_account: String,
    /// Pod labels (`LABELS`).
    pub labels: BTreeMap<String, String>,
    /// Pod annotations (`ANNOTATIONS`).
    pub annotations: BTreeMap<String, String>,
}

impl Workload {
    /// Istio's node identity and metadata for this pod: `LABELS`,
    /// `ANNOTATIONS`, `NAME`, `NAMESPACE`, `SERVICE_ACCOUNT` (the filter
    /// reads them as `xds.node.metadata.*`).
    pub fn node(&self) -> Value {
        json!({
            "id": format!("sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local", self.name, self.namespace, self.namespace),
            "cluster": format!("{}.{}", self.service_account, self.namespace),
            "metadata": {
                "NAME": self.name,
                "NAMESPACE": self.namespace,
                "SERVICE_ACCOUNT": self.service_account,
                "LABELS": self.labels,
                "ANNOTATIONS": self.annotations,
            },
        })
    }
}

/// A sidecar's workload certificate (an X.509-SVID), its key and the mesh
/// root, all PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The workload certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The mesh root, which peers must chain to.
    pub ca: PathBuf,
}

/// How the app's sidecar reaches the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRoute {
    /// Where the broker (or its sidecar) listens.
    pub address: SocketAddr,
    /// Mesh mTLS: this sidecar's certificate and the SPIFFE ID the broker's
    /// certificate must carry (Istio's secure naming). `None`: plaintext.
    pub mtls: Option<(CertificateFiles, String)>,
    /// Where the connections to the broker leave from: the pod's IP, which
    /// the broker checks against the pod the filter names (in a pod, the
    /// kernel picks it). `None`: the kernel's choice.
    pub source_address: Option<IpAddr>,
}

/// The app's sidecar.
#[derive(Debug, Clone)]
pub struct AppSidecar {
    /// The pod, as node metadata.
    pub pod: Workload,
    /// The listener standing for the pod's outbound port 80.
    pub outbound: SocketAddr,
    /// Envoy's admin listener.
    pub admin: SocketAddr,
    /// The filter's `.wasm`; `None` for a pod the WasmPlugin does not
    /// select (the guard and the fail-closed route still apply).
    pub wasm: Option<PathBuf>,
    /// The filter's `pluginConfig` (its `broker_cluster` names the broker
    /// cluster).
    pub plugin_config: Value,
    /// How the broker is reached.
    pub broker: BrokerRoute,
    /// Where non-IMDS port-80 traffic goes (Istio's passthrough).
    pub upstream: SocketAddr,
}

/// The broker's sidecar, inbound side.
#[derive(Debug, Clone)]
pub struct BrokerSidecar {
    /// The mTLS listener callers reach (the broker's service port).
    pub inbound: SocketAddr,
    /// A plaintext listener on the same route, as in PERMISSIVE mode; `None`
    /// for STRICT.
    pub plaintext: Option<SocketAddr>,
    /// Envoy's admin listener.
    pub admin: SocketAddr,
    /// The broker on loopback.
    pub broker: SocketAddr,
    /// The broker's workload certificate; callers must chain to its `ca`.
    pub certificates: CertificateFiles,
}

/// The broker cluster name in `plugin_config` (the filter's default if it
/// names none).
pub fn broker_cluster(plugin_config: &Value) -> String {
    match plugin_config.get("broker_cluster").and_then(Value::as_str) {
        Some(cluster) => cluster.to_owned(),
        None => imds_filter::config::Config::default().broker_cluster,
    }
}

impl AppSidecar {
    /// The bootstrap: one outbound HTTP listener with the filter before the
    /// router, a fail-closed route for the IMDS authorities, everything else
    /// to `upstream`; the broker cluster; the pod in node metadata.
    pub fn bootstrap(&self) -> Value {
        let broker_cluster = broker_cluster(&self.plugin_config);
        let filters = self.wasm.iter().map(|wasm| wasm_filter(wasm, &self.plugin_config)).collect();
        let mut broker = cluster(&broker_cluster, self.broker.address);
        if let Some((certificates, broker_id)) = &self.broker.mtls {
            broker["transport_socket"] = upstream_mtls(certificates, broker_id, &broker_cluster);
        }
        if let Some(source) = self.broker.source_address {
            // A bare SocketAddress, not an Address.
            broker["upstream_bind_config"] =
                json!({ "source_address": socket(SocketAddr::new(source, 0))["socket_address"] });
        }
        json!({
            "node": self.pod.node(),
            "admin": { "address": socket(self.admin) },
            "static_resources": {
                "listeners": [outbound_listener("0.0.0.0_80", self.outbound, filters)],
                "clusters": [cluster(PASSTHROUGH_CLUSTER, self.upstream), broker],
            },
        })
    }
}

impl BrokerSidecar {
    /// The bootstrap: inbound mTLS (client certificate required, chaining to
    /// the mesh root) with Istio's XFCC settings and the caller's address in
    /// [`PEER_ADDRESS_HEADER`] (as the rendered EnvoyFilter adds it), an
    /// optional plaintext listener, both routed to the broker from
    /// [`INBOUND_PASSTHROUGH_SOURCE`], as Istio's inbound cluster connects.
    pub fn bootstrap(&self) -> Value {
        let inbound_chain = json!({
            "filters": [inbound_manager("inbound_mtls")],
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    "require_client_certificate": true,
                    "common_tls_context": common_tls_context(&self.certificates, None),
                },
            },
        });
        let mut listeners = vec![json!({
            "name": "virtualInbound_mtls",
            "address": socket(self.inbound),
            "filter_chains": [inbound_chain],
        })];
        if let Some(plaintext) = self.plaintext {
            listeners.push(json!({
                "name": "virtualInbound_plaintext",
                "address": socket(plaintext),
                "filter_chains": [{ "filters": [inbound_manager("inbound_plaintext")] }],
            }));
        }
        let mut inbound = cluster(INBOUND_CLUSTER, self.broker);
        inbound["upstream_bind_config"] =
            json!({ "source_address": { "address": INBOUND_PASSTHROUGH_SOURCE, "port_value": 0 } });
        json!({
            "node": {
                "id": "sidecar~127.0.0.1~token-broker-0.imds-mesh~imds-mesh.svc.cluster.local",
                "cluster": "token-broker.imds-mesh",
            },
            "admin": { "address": socket(self.admin) },
            "static_resources": {
                "listeners": listeners,
                "clusters": [inbound],
            },
        })
    }
}

/// Istio's name for the original-destination passthrough; here a static
/// upstream.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// Istio's name for the broker's inbound cluster on port 8080.
const INBOUND_CLUSTER: &str = "inbound|8080||";

/// Where Istio's sidecar connects to its application from for inbound
/// traffic (the `upstream_bind_config` of every `inbound|<port>||` cluster;
/// `::6` for IPv6): the broker's default `--sidecar-sources`
/// (`token_broker::peer::DEFAULT_SIDECAR_SOURCES`).
pub const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6";

/// The header in which the broker's sidecar states the address of the
/// caller's connection (`token_broker::peer::PEER_ADDRESS_HEADER`).
pub const PEER_ADDRESS_HEADER: &str = "x-imds-mesh-peer-address";

/// The broker sidecar's `request_headers_to_add` entry that states the
/// caller's address: the direct peer of the connection the sidecar
/// accepted, never an address Envoy inferred from `X-Forwarded-For` (which
/// the caller writes), replacing any value the caller sent.
pub fn peer_address_header() -> Value {
    json!({
        "header": { "key": PEER_ADDRESS_HEADER, "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%" },
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    })
}

/// An HTTP connection manager on the broker's inbound side, with what Istio
/// sets there for sidecars: `APPEND_FORWARD`, and the subject, DNS and URI
/// of the client certificate in the appended element. Envoy drops any XFCC
/// a plaintext caller sends. Plus what the rendered EnvoyFilter
/// `token-broker-peer-address` adds to Istio's route configuration there:
/// the caller's address in [`PEER_ADDRESS_HEADER`].
fn inbound_manager(stat_prefix: &str) -> Value {
    let route = json!({ "match": { "prefix": "/" }, "route": { "cluster": INBOUND_CLUSTER } });
    let mut manager =
        http_connection_manager(stat_prefix, json!([virtual_host("inbound|http|8080", &["*"], route)]), vec![router()]);
    manager["typed_config"]["route_config"]["request_headers_to_add"] = json!([peer_address_header()]);
    manager["typed_config"]["forward_client_cert_details"] = json!("APPEND_FORWARD");
    manager["typed_config"]["set_current_client_cert_details"] = json!({ "subject": true, "dns": true, "uri": true });
    manager
}

/// The outbound port-80 listener: `filters` (the filter, or none), then
/// the metadata guard and the router. A request no filter answered is
/// refused twice over: one to a metadata address (by original destination)
/// gets 403 from the guard, whatever its `Host`; one naming an IMDS
/// authority gets the route's fixed 404 wherever it was sent. The rest
/// passes through.
pub fn outbound_listener(name: &str, address: SocketAddr, mut filters: Vec<Value>) -> Value {
    filters.extend([metadata::guard(), router()]);
    let fail_closed = json!({
        "match": { "prefix": "/" },
        "direct_response": { "status": 404, "body": { "inline_string": metadata::FAIL_CLOSED_BODY } },
    });
    let passthrough = json!({ "match": { "prefix": "/" }, "route": { "cluster": PASSTHROUGH_CLUSTER } });
    let virtual_hosts = json!([
        virtual_host("instance-metadata:80", &metadata::authorities(), fail_closed),
        virtual_host("allow_any", &["*"], passthrough),
    ]);
    json!({
        "name": name,
        "address": socket(address),
        "filter_chains": [{ "filters": [http_connection_manager(name, virtual_hosts, filters)] }],
    })
}

fn virtual_host(name: &str, domains: &[impl serde::Serialize], route: Value) -> Value {
    json!({ "name": name, "domains": domains, "routes": [route] })
}

/// An HTTP connection manager with `virtual_hosts` and `filters`.
pub fn http_connection_manager(stat_prefix: &str, virtual_hosts: Value, filters: Vec<Value>) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "generate_request_id": false,
            "route_config": { "name": stat_prefix, "virtual_hosts": virtual_hosts },
            "http_filters": filters,
        },
    })
}

/// The router, last in every chain. Envoy's own response headers are
/// suppressed, which keeps passthrough responses byte for byte the
/// upstream's.
pub fn router() -> Value {
    json!({
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": true,
        },
    })
}

/// The filter as Istio's WasmPlugin installs it: V8, `FAIL_RELOAD`, the
/// `pluginConfig` as a JSON string. A `plugin_config` that is itself a JSON
/// string is passed as it is, not quoted (a module that wants raw bytes,
/// such as the benchmark's floor filter).
pub fn wasm_filter(wasm: &Path, plugin_config: &Value) -> Value {
    let configuration = match plugin_config {
        Value::String(raw) => raw.clone(),
        config => config.to_string(),
    };
    json!({
        "name": "imds-mesh",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "imds-mesh",
                "vm_config": {
                    "vm_id": "imds-mesh",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": wasm.display().to_string() } },
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "failure_policy": "FAIL_RELOAD",
            },
        },
    })
}

/// A static cluster of one endpoint.
pub fn cluster(name: &str, address: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": socket(address) } }] }],
        },
    })
}

/// An Envoy `socket_address`.
pub fn socket(address: SocketAddr) -> Value {
    json!({ "socket_address": { "address": address.ip().to_string(), "port_value": address.port() } })
}

/// Client side of mesh mTLS to a peer that must present `peer_id`, with SNI
/// as Istio derives it from the cluster name
/// (`outbound|8080||host` → `outbound_.8080_._.host`).
fn upstream_mtls(certificates: &CertificateFiles, peer_id: &str, cluster: &str) -> Value {
    let sni = cluster.replace('|', "_.");
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls_context(certificates, Some(peer_id)),
            "sni": sni,
        },
    })
}

/// Presents `certificates`; trusts their CA; with `peer_id`, accepts only a
/// peer certificate with that URI SAN.
fn common_tls_context(certificates: &CertificateFiles, peer_id: Option<&str>) -> Value {
    let file = |path: &Path| json!({ "filename": path.display().to_string() });
    let mut validation = json!({ "trusted_ca": file(&certificates.ca) });
    if let Some(peer_id) = peer_id {
        validation["match_typed_subject_alt_names"] = json!([{ "san_type": "URI", "matcher": { "exact": peer_id } }]);
    }
    json!({
        "tls_certificates": [{ "certificate_chain": file(&certificates.cert), "private_key": file(&certificates.key) }],
        "validation_context": validation,
    })
}
