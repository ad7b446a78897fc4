//! Istio's own translation as the judge of what `mesh-config` renders.
//!
//! [`Cluster`] is what istiod would see: the rendered objects, the pods and
//! EndpointSlices a test adds, extra Istio config (a namespace `Sidecar`)
//! and the mesh config. [`Cluster::generate`]
//! runs `istio-xds` (`integration/istio-xds`: Istio's xDS server, fed those
//! objects, with each sidecar connected over ADS under its real node id and
//! metadata) and returns what istiod sends each sidecar ([`SidecarXds`]).
//!
//! [`SidecarXds::bootstrap`] turns that into a bootstrap Envoy 1.40 runs on
//! this machine, with these rewrites and no others ([`Rewrites`]):
//! 1. RDS -> each HTTP connection manager's route configuration inline.
//! 2. ECDS -> each discovered filter's configuration inline; a wasm module's
//!    `remote` code (the WasmPlugin URL, which istio-agent downloads) becomes
//!    the built `.wasm` file.
//! 3. EDS -> static endpoints; each pod address a test serves is mapped to
//!    its loopback address, and the others are left out.
//! 4. SDS -> certificate files: the `default` secret is the workload
//!    certificate and key, `ROOTCA` the mesh root.
//! 5. Listeners: without iptables there is no capture on 15001/15006, so
//!    only the listeners a test names are kept, each bound to a loopback
//!    address of its own ([`loopback_port`]) with the port istiod gave it,
//!    so every filter chain and policy that matches the destination port
//!    sees the port it was written for.
//! 6. Original-destination clusters (`PassthroughCluster`, the metadata
//!    `ServiceEntry`'s cluster, inbound clusters) would dial the listener
//!    itself on loopback: each becomes a static cluster to the address the
//!    test says the original destination stands for.
//! 7. The metadata service's IPv4 address is a loopback address of the
//!    test's ([`Rewrites::metadata_at`]): every destination match on
//!    169.254.169.254 (filter chain prefix ranges, RBAC `destination_ip`)
//!    matches it instead, and the port-80 listener also listens there, so a
//!    connection to it is, to Envoy, a connection to the metadata service.
//! 8. An app pod's address is a loopback address, and its sidecar's
//!    outbound connections leave from it ([`Rewrites::pod_ip`]:
//!    `upstream_bind_config` on each `outbound|...` cluster), as they leave
//!    the pod's network namespace: the broker's sidecar sees the caller at
//!    the address the API server has for the pod.
//!
//! istiod's own switches keep out the filters only Istio's Envoy build has
//! (`PILOT_ENABLE_METADATA_EXCHANGE=false`, `PILOT_ENABLE_ALPN_FILTER=false`,
//! no telemetry provider).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use imds_filter::config::METADATA_PORT;
use k8s_openapi::api::core::v1::Pod as KubePod;
use mesh_config::metadata::METADATA_SERVICES;
use mesh_config::render::{self, Object, Options};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::envoy::Ports;
use crate::pki::WorkloadFiles;
use crate::{Envoy, Pod, Upstream, kube_cluster, paths};

/// The Istio release whose translation `istio-xds` runs (its module's
/// `VERSION`; `integration/istio-xds/go.mod` pins the module).
pub const ISTIO_VERSION: &str = "1.31";

/// The default rendering, for the release whose translation `istio-xds`
/// runs.
pub fn translated_options() -> Options {
    let version = ISTIO_VERSION.parse().unwrap_or_else(|e| panic!("{e}"));
    Options { istio_version: version, ..Options::default() }
}

/// What istiod would see: rendered objects, the test's pods and endpoint
/// slices, extra Istio config and the mesh config.
#[derive(Debug, Clone)]
pub struct Cluster {
    rendered: Vec<Object>,
    extra_config: Vec<String>,
    kube: Vec<Value>,
    mesh: String,
}

impl Cluster {
    /// The rendering of `options`, with no pods yet and a mesh config that
    /// names no telemetry provider.
    pub fn rendered(options: &Options) -> Self {
        Self { rendered: render::render(options), extra_config: Vec::new(), kube: Vec::new(), mesh: String::new() }
    }

    /// Adds a Kubernetes object (a pod, an EndpointSlice, a namespace).
    pub fn object(mut self, object: impl serde::Serialize) -> Self {
        self.kube.push(serde_json::to_value(object).unwrap_or_else(|e| panic!("{e}")));
        self
    }

    /// The rendering of `options` with the harness's pods: [`Pod::enabled`]
    /// at [`APP_IP`], [`plain_pod`] at [`PLAIN_IP`], and `brokers` broker
    /// replicas at [`broker_ip`]s.
    pub fn harness(options: &Options, brokers: usize) -> Self {
        let ips: Vec<String> = (0..brokers).map(broker_ip).collect();
        Self::rendered(options)
            .object(kube_cluster::namespace("default"))
            .object(kube_cluster::namespace(&options.root_namespace))
            .app_pod(&Pod::enabled(), APP_IP)
            .app_pod(&plain_pod(), PLAIN_IP)
            .broker_pods(&ips.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Adds the pod behind an app sidecar (its labels and annotations as
    /// the sidecar's node metadata has them), running at `ip`.
    pub fn app_pod(self, pod: &Pod, ip: &str) -> Self {
        self.pod(kube_pod(pod), ip)
    }

    /// Adds `pod`, running at `ip`.
    pub fn pod(self, mut pod: KubePod, ip: &str) -> Self {
        let status = pod.status.get_or_insert_default();
        status.phase = Some("Running".into());
        status.pod_ip = Some(ip.into());
        status.pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP { ip: ip.into() }]);
        status.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]);
        self.object(pod)
    }

    /// Adds the broker's pods at `ips` (its Deployment's template) and the
    /// EndpointSlice that makes them its Service's endpoints.
    pub fn broker_pods(mut self, ips: &[&str]) -> Self {
        let options = self.options_namespace();
        let template = self
            .rendered
            .iter()
            .find_map(|object| match object {
                Object::Deployment(deployment) => deployment.spec.as_ref().map(|s| s.template.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("the rendering has no broker Deployment"));
        let mut endpoints = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let name = broker_pod_name(i);
            let mut metadata = template.metadata.clone().unwrap_or_default();
            metadata.name = Some(name.clone());
            metadata.namespace = Some(options.clone());
            let pod = KubePod { metadata, spec: template.spec.clone(), ..KubePod::default() };
            self = self.pod(pod, ip);
            endpoints.push(json!({
                "addresses": [ip],
                "conditions": { "ready": true },
                "targetRef": { "kind": "Pod", "name": name, "namespace": options },
            }));
        }
        self.object(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{}-slice", render::BROKER),
                "namespace": options,
                "labels": { "kubernetes.io/service-name": render::BROKER },
            },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": render::BROKER_PORT, "protocol": "TCP" }],
            "endpoints": endpoints,
        }))
    }

    /// Adds Istio objects (YAML) beside the rendered ones.
    pub fn config(mut self, yaml: &str) -> Self {
        self.extra_config.push(yaml.to_owned());
        self
    }

    /// Sets the mesh config (MeshConfig YAML).
    pub fn mesh(mut self, yaml: &str) -> Self {
        self.mesh = yaml.to_owned();
        self
    }

    fn options_namespace(&self) -> String {
        self.rendered
            .iter()
            .find_map(|object| match object {
                Object::Deployment(d) => d.metadata.namespace.clone(),
                _ => None,
            })
            .unwrap_or_else(|| Options::default().namespace)
    }

    /// Runs Istio's translation; each of `proxies` (`namespace/pod`) gets
    /// what istiod sends its sidecar. Panics with Istio's message when
    /// Istio refuses the configuration.
    pub fn generate(&self, proxies: &[&str]) -> BTreeMap<String, SidecarXds> {
        match self.try_generate(proxies) {
            Ok(generated) => generated,
            Err(message) => panic!("{message}"),
        }
    }

    /// [`Self::generate`], returning Istio's refusal as an error.
    pub fn try_generate(&self, proxies: &[&str]) -> Result<BTreeMap<String, SidecarXds>, String> {
        let dir = tempfile::Builder::new().prefix("imds-mesh-istio-").tempdir().map_err(|e| e.to_string())?;
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        let (istio, core): (Vec<Object>, Vec<Object>) = self.rendered.iter().cloned().partition(Object::is_istio);
        let mut config = render::to_yaml(&istio)?;
        for extra in &self.extra_config {
            config.push_str("\n---\n");
            config.push_str(extra);
        }
        let mut kube = render::to_yaml(&core)?;
        for object in &self.kube {
            kube.push_str("\n---\n");
            kube.push_str(&serde_json::to_string(object).map_err(|e| e.to_string())?);
        }
        let out = dir.path().join("xds.json");
        let mut command = Command::new(paths::istio_xds());
        command
            .env("PILOT_ENABLE_METADATA_EXCHANGE", "false")
            .env("PILOT_ENABLE_ALPN_FILTER", "false")
            .arg("--mesh")
            .arg(write("mesh.yaml", &self.mesh))
            .arg("--config")
            .arg(write("config.yaml", &config))
            .arg("--kube")
            .arg(write("kube.yaml", &kube))
            .arg("--out")
            .arg(&out);
        for proxy in proxies {
            command.args(["--proxy", proxy]);
        }
        let output = command.output().map_err(|e| format!("run istio-xds: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr.lines().filter(|l| l.starts_with("istio-xds:")).collect::<Vec<_>>().join("\n");
            return Err(if message.is_empty() { stderr.into_owned() } else { message });
        }
        let text = std::fs::read(&out).map_err(|e| e.to_string())?;
        serde_json::from_slice(&text).map_err(|e| format!("istio-xds output: {e}"))
    }
}

/// The istio.io/api releases whose CRDs `just istio-xds` puts beside the
/// generator: those of the oldest and the newest Istio `mesh-config`
/// renders for.
pub const SCHEMA_RELEASES: [&str; 2] = ["1.24.2", "1.32.0"];

/// Checks the custom resources in `yaml` against Istio `release`'s CRDs
/// (one of [`SCHEMA_RELEASES`]) as a Kubernetes API server with them
/// installed would: served version, OpenAPI schema, CEL rules, no unknown
/// fields. `Err` holds one line per refusal.
pub fn check_against_crds(yaml: &str, release: &str) -> Result<(), String> {
    let crds = paths::istio_crds(release);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let objects = dir.path().join("objects.yaml");
    std::fs::write(&objects, yaml).map_err(|e| e.to_string())?;
    let output = Command::new(paths::istio_xds())
        .arg("--crds")
        .arg(&crds)
        .arg("--config")
        .arg(&objects)
        .output()
        .map_err(|e| format!("run istio-xds: {e}"))?;
    if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).into_owned()) }
}

/// The metadata service's IPv4 address, as Istio's output carries it.
const METADATA_IPV4: &str = imds_filter::config::METADATA_ADDRESSES[0].ip;

/// The name of the broker's `i`th pod.
pub fn broker_pod_name(i: usize) -> String {
    format!("{}-{i}", render::BROKER)
}

// ---------------------------------------------------------------------------
// The harness's pods on Istio's output

/// The enabled pod's address in [`Cluster::harness`]: a loopback address,
/// which its sidecar connects from (rewrite 8), as if the pod network were
/// `10.244.0.0/16`. Pod addresses are never dialled: every endpoint a test
/// serves is rewritten to loopback.
pub const APP_IP: &str = "127.244.1.10";
/// The plain pod's address in [`Cluster::harness`].
pub const PLAIN_IP: &str = "127.244.1.11";

/// The `i`th broker pod's address.
pub fn broker_ip(i: usize) -> String {
    format!("10.244.2.{}", 10 + i)
}

/// A pod without the label, beside [`Pod::enabled`].
pub fn plain_pod() -> Pod {
    Pod { name: "plain-5c8d7f9b4-q7w2e".into(), ..Pod::plain() }
}

/// The Kubernetes pod behind a sidecar's [`Pod`]: its name, namespace,
/// service account, labels and annotations.
pub fn kube_pod(pod: &Pod) -> KubePod {
    let mut object = KubePod::default();
    object.metadata.name = Some(pod.name.clone());
    object.metadata.namespace = Some(pod.namespace.clone());
    object.metadata.labels = Some(pod.labels.clone());
    object.metadata.annotations = Some(pod.annotations.clone());
    object.spec = Some(k8s_openapi::api::core::v1::PodSpec {
        service_account_name: Some(pod.service_account.clone()),
        ..Default::default()
    });
    object
}

/// `namespace/name`, as [`Cluster::generate`] takes a pod.
pub fn proxy_of(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// The `i`th broker pod, as [`Cluster::generate`] takes it.
pub fn broker_proxy(options: &Options, i: usize) -> String {
    format!("{}/{}", options.namespace, broker_pod_name(i))
}

/// The broker pod's sidecar running Istio's output `xds`: its inbound
/// listener at `inbound` (port 8080 on a loopback address of its own,
/// [`loopback_port`]), forwarding to the broker at `broker` (from
/// `127.0.0.6`: Istio's inbound cluster binds its passthrough address, and
/// no rewrite touches that).
pub async fn start_broker_sidecar(
    xds: &SidecarXds,
    inbound: SocketAddr,
    broker: SocketAddr,
    certificates: &WorkloadFiles,
) -> Envoy {
    let admin = SocketAddr::from(([127, 0, 0, 1], Ports::free(false, false).admin));
    let rewrites = Rewrites::new(admin)
        .inbound(inbound)
        .original_destination(&format!("inbound|{}||", render::BROKER_PORT), broker)
        .certificates(certificates);
    Envoy::start_bootstrap(&xds.bootstrap(&rewrites), inbound, admin, 1).await
}

/// An app pod's sidecar running Istio's output: port 80 on `envoy.addr`
/// for other destinations and on `metadata`, standing for the metadata
/// service; what would reach the node's IMDS lands on `node_imds`, other
/// passthrough on `upstream`.
pub struct AppSidecar {
    pub envoy: Envoy,
    pub metadata: SocketAddr,
    pub node_imds: Upstream,
    pub upstream: Upstream,
}

impl AppSidecar {
    /// Starts `xds` with the workload certificate `certificates` and the
    /// broker pods' endpoints (`ip:port`) served at the given addresses; its
    /// outbound connections leave from the pod's IP ([`SidecarXds::pod_ip`],
    /// a loopback address).
    pub async fn start(
        xds: &SidecarXds,
        certificates: &WorkloadFiles,
        brokers: &[(String, SocketAddr)],
        workers: u32,
    ) -> Self {
        Self::start_at(xds, certificates, brokers, workers, loopback_port(METADATA_PORT)).await
    }

    /// [`Self::start`], the metadata service standing at `metadata`.
    pub async fn start_at(
        xds: &SidecarXds,
        certificates: &WorkloadFiles,
        brokers: &[(String, SocketAddr)],
        workers: u32,
        metadata: SocketAddr,
    ) -> Self {
        let (node_imds, upstream) = (Upstream::start().await, Upstream::start().await);
        let outbound = loopback_port(METADATA_PORT);
        let admin = SocketAddr::from(([127, 0, 0, 1], Ports::free(false, false).admin));
        let mut rewrites = METADATA_SERVICES
            .iter()
            .fold(Rewrites::new(admin), |r, s| {
                r.original_destination(&format!("outbound|{METADATA_PORT}||{}", s.host), node_imds.addr())
            })
            .pod_ip(xds.pod_ip())
            .original_destination("PassthroughCluster", upstream.addr())
            .listener("0.0.0.0_80", outbound)
            .metadata_at("0.0.0.0_80", metadata)
            .certificates(certificates)
            .wasm(&paths::filter_wasm());
        for (endpoint, address) in brokers {
            rewrites = rewrites.endpoint(endpoint, *address);
        }
        let envoy = Envoy::start_bootstrap(&xds.bootstrap(&rewrites), outbound, admin, workers).await;
        Self { envoy, metadata, node_imds, upstream }
    }

    /// Waits until the filter serves `role`'s credentials (its start-up
    /// fetch is done), so an SDK's first request, which gives IMDS about a
    /// second, does not depend on how fast the broker and STS are.
    pub async fn wait_for_credentials(&self, role: &str) {
        let request = crate::Req::get(format!("/latest/meta-data/iam/security-credentials/{role}"));
        crate::wait::until(&format!("the sidecar to serve {role}'s credentials"), || async {
            (request.clone().send(self.metadata).await.status == 200).then_some(())
        })
        .await;
    }

    /// Panics if anything reached the node's IMDS.
    pub fn assert_node_untouched(&self) {
        assert_eq!(self.node_imds.connections(), 0, "a connection reached the node's IMDS");
    }
}

/// What istiod sends one sidecar.
#[derive(Debug, Clone, Deserialize)]
pub struct SidecarXds {
    /// The Envoy node (id, cluster, metadata) its bootstrap carries.
    pub node: Value,
    pub listeners: Vec<Value>,
    pub routes: Vec<Value>,
    pub clusters: Vec<Value>,
    pub endpoints: Vec<Value>,
    /// ECDS: the filters the listeners leave to discovery.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub extension_configs: Vec<Value>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<Value>, D::Error> {
    Ok(Option::<Vec<Value>>::deserialize(deserializer)?.unwrap_or_default())
}

fn named<'a>(items: &'a [Value], key: &str, name: &str) -> Option<&'a Value> {
    items.iter().find(|item| item[key] == name)
}

impl SidecarXds {
    /// The pod's IP, as its node id carries it (`sidecar~<ip>~<pod>.<ns>~...`).
    pub fn pod_ip(&self) -> IpAddr {
        let id = self.node["id"].as_str().unwrap_or_default();
        let ip = id.split('~').nth(1).and_then(|ip| ip.parse().ok());
        ip.unwrap_or_else(|| panic!("no pod IP in node id {id:?}"))
    }

    pub fn listener(&self, name: &str) -> Option<&Value> {
        named(&self.listeners, "name", name)
    }

    pub fn route(&self, name: &str) -> Option<&Value> {
        named(&self.routes, "name", name)
    }

    pub fn cluster(&self, name: &str) -> Option<&Value> {
        named(&self.clusters, "name", name)
    }

    /// The endpoints (`ip:port`) istiod gives `cluster`.
    pub fn endpoint_addresses(&self, cluster: &str) -> Vec<String> {
        let Some(assignment) = named(&self.endpoints, "cluster_name", cluster) else { return Vec::new() };
        lb_endpoints(assignment).iter().filter_map(endpoint_address).collect()
    }

    /// The HTTP filter names, in order, of listener `listener`'s filter
    /// chain `chain` (`None`: the first chain with an HTTP connection
    /// manager, Istio's own).
    pub fn http_filters(&self, listener: &str, chain: Option<&str>) -> Vec<String> {
        self.listener(listener)
            .and_then(|l| connection_manager(l, chain))
            .and_then(|m| m["http_filters"].as_array())
            .map(|filters| filters.iter().filter_map(|f| f["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// The bootstrap Envoy 1.40 runs for this sidecar (see the module's
    /// list of rewrites).
    pub fn bootstrap(&self, rewrites: &Rewrites) -> Value {
        let mut listeners = Vec::new();
        for (name, address) in &rewrites.listeners {
            let mut listener = self.listener(name).cloned().unwrap_or_else(|| panic!("istiod sent no listener {name}"));
            listener["address"] = mesh_config::envoy::socket(*address);
            if let Some(map) = listener.as_object_mut() {
                map.remove("bind_to_port");
                map.remove("use_original_dst");
            }
            if let Some((metadata_listener, stand_in)) = &rewrites.metadata {
                if metadata_listener == name {
                    listener["additional_addresses"] = json!([{ "address": mesh_config::envoy::socket(*stand_in) }]);
                }
                let ip = stand_in.ip().to_string();
                visit(&mut listener, &mut |object| {
                    if object.get("address_prefix").and_then(Value::as_str) == Some(METADATA_IPV4) {
                        object.insert("address_prefix".into(), json!(ip));
                    }
                });
            }
            self.inline(&mut listener, rewrites);
            listeners.push(listener);
        }
        let clusters: Vec<Value> = self.clusters.iter().map(|c| self.static_cluster(c, rewrites)).collect();
        json!({
            "node": self.node,
            "admin": { "address": mesh_config::envoy::socket(rewrites.admin) },
            "static_resources": { "listeners": listeners, "clusters": clusters },
        })
    }

    /// Rewrites 1, 2 and 4 inside `value`.
    fn inline(&self, value: &mut Value, rewrites: &Rewrites) {
        visit(value, &mut |object| {
            if let Some(name) = object.get("rds").and_then(|r| r["route_config_name"].as_str()).map(str::to_owned) {
                let route = self.route(&name).cloned().unwrap_or_else(|| panic!("istiod sent no route {name}"));
                object.remove("rds");
                object.insert("route_config".into(), route);
            }
            if object.contains_key("config_discovery")
                && let Some(name) = object.get("name").and_then(Value::as_str).map(str::to_owned)
            {
                let extension = named(&self.extension_configs, "name", &name)
                    .unwrap_or_else(|| panic!("istiod sent no extension config {name}"));
                let mut typed_config = extension["typed_config"].clone();
                let code = &mut typed_config["config"]["vm_config"]["code"];
                if code.get("remote").is_some() {
                    let wasm = rewrites.wasm.as_ref().unwrap_or_else(|| panic!("{name} needs the filter's .wasm"));
                    *code = json!({ "local": { "filename": wasm.display().to_string() } });
                }
                object.remove("config_discovery");
                object.insert("typed_config".into(), typed_config);
            }
            secrets_to_files(object, rewrites.certificates.as_ref());
        });
    }

    /// Rewrites 3, 4 and 6 for one cluster.
    fn static_cluster(&self, cluster: &Value, rewrites: &Rewrites) -> Value {
        let mut cluster = cluster.clone();
        let name = cluster["name"].as_str().unwrap_or_default().to_owned();
        match cluster["type"].as_str() {
            Some("EDS") => {
                let mut assignment = named(&self.endpoints, "cluster_name", &name)
                    .cloned()
                    .unwrap_or_else(|| json!({ "cluster_name": name }));
                map_endpoints(&mut assignment, &rewrites.endpoints);
                if let Some(map) = cluster.as_object_mut() {
                    map.remove("eds_cluster_config");
                    map.insert("type".into(), "STATIC".into());
                    map.insert("load_assignment".into(), assignment);
                }
            }
            Some("ORIGINAL_DST") => {
                if let Some(address) = rewrites.original_destinations.get(&name)
                    && let Some(map) = cluster.as_object_mut()
                {
                    map.remove("original_dst_lb_config");
                    map.insert("type".into(), "STATIC".into());
                    map.insert("lb_policy".into(), "ROUND_ROBIN".into());
                    map.insert(
                        "load_assignment".into(),
                        json!({
                            "cluster_name": name,
                            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": mesh_config::envoy::socket(*address) } }] }],
                        }),
                    );
                }
            }
            _ => {}
        }
        if let Some(source) = rewrites.pod_ip
            && name.starts_with("outbound|")
            && let Some(map) = cluster.as_object_mut()
        {
            let source = mesh_config::envoy::socket(SocketAddr::new(source, 0));
            map.insert("upstream_bind_config".into(), json!({ "source_address": source["socket_address"] }));
        }
        visit(&mut cluster, &mut |object| secrets_to_files(object, rewrites.certificates.as_ref()));
        cluster
    }
}

/// How one sidecar's generated configuration is made to run here.
#[derive(Debug, Clone)]
pub struct Rewrites {
    /// Envoy's admin listener.
    pub admin: SocketAddr,
    /// The listeners kept, by istiod's name, and where each is bound.
    pub listeners: BTreeMap<String, SocketAddr>,
    /// Pod endpoints (`ip:port`) and where they are served here.
    pub endpoints: BTreeMap<String, SocketAddr>,
    /// Original-destination clusters and what their destination stands for.
    pub original_destinations: BTreeMap<String, SocketAddr>,
    /// The workload certificate (SDS `default`) and mesh root (`ROOTCA`).
    pub certificates: Option<WorkloadFiles>,
    /// The filter's `.wasm` for ECDS wasm filters.
    pub wasm: Option<PathBuf>,
    /// The listener that also listens where the metadata service is, and
    /// that address.
    pub metadata: Option<(String, SocketAddr)>,
    /// The pod's address, which outbound connections leave from.
    pub pod_ip: Option<IpAddr>,
}

impl Rewrites {
    pub fn new(admin: SocketAddr) -> Self {
        Self {
            admin,
            listeners: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            original_destinations: BTreeMap::new(),
            certificates: None,
            wasm: None,
            metadata: None,
            pod_ip: None,
        }
    }

    pub fn listener(mut self, name: &str, address: SocketAddr) -> Self {
        self.listeners.insert(name.to_owned(), address);
        self
    }

    /// Keeps istiod's `virtualInbound`, bound at `address` (whose port is
    /// the captured port its chains match).
    pub fn inbound(self, address: SocketAddr) -> Self {
        self.listener("virtualInbound", address)
    }

    pub fn endpoint(mut self, pod_endpoint: &str, address: SocketAddr) -> Self {
        self.endpoints.insert(pod_endpoint.to_owned(), address);
        self
    }

    pub fn original_destination(mut self, cluster: &str, address: SocketAddr) -> Self {
        self.original_destinations.insert(cluster.to_owned(), address);
        self
    }

    pub fn certificates(mut self, files: &WorkloadFiles) -> Self {
        self.certificates = Some(files.clone());
        self
    }

    /// Listener `name` also listens on `address`, which stands for the
    /// metadata service's IPv4 address (rewrite 7).
    pub fn metadata_at(mut self, name: &str, address: SocketAddr) -> Self {
        self.metadata = Some((name.to_owned(), address));
        self
    }

    pub fn wasm(mut self, wasm: &Path) -> Self {
        self.wasm = Some(wasm.to_owned());
        self
    }

    /// Outbound connections leave from `ip`, the pod's address (rewrite 8).
    pub fn pod_ip(mut self, ip: IpAddr) -> Self {
        self.pod_ip = Some(ip);
        self
    }
}

/// Calls `f` on every JSON object in `value`, outermost first.
fn visit(value: &mut Value, f: &mut impl FnMut(&mut serde_json::Map<String, Value>)) {
    match value {
        Value::Object(map) => {
            f(map);
            for child in map.values_mut() {
                visit(child, f);
            }
        }
        Value::Array(items) => {
            for child in items {
                visit(child, f);
            }
        }
        _ => {}
    }
}

/// Rewrite 4: SDS secrets in a TLS context become files.
fn secrets_to_files(object: &mut serde_json::Map<String, Value>, files: Option<&WorkloadFiles>) {
    let file = |path: &Path| json!({ "filename": path.display().to_string() });
    let Some(files) = files else { return };
    if object.remove("tls_certificate_sds_secret_configs").is_some() {
        object.insert(
            "tls_certificates".into(),
            json!([{ "certificate_chain": file(&files.cert), "private_key": file(&files.key) }]),
        );
    }
    if let Some(combined) = object.remove("combined_validation_context") {
        let mut validation = combined["default_validation_context"].clone();
        if !validation.is_object() {
            validation = json!({});
        }
        validation["trusted_ca"] = file(&files.ca);
        object.insert("validation_context".into(), validation);
    }
}

/// The HTTP connection manager's config in `listener`'s chain named
/// `chain`, or in its first chain that has one.
fn connection_manager<'a>(listener: &'a Value, chain: Option<&str>) -> Option<&'a Value> {
    let chains = listener["filter_chains"].as_array()?;
    chains.iter().filter(|c| chain.is_none_or(|name| c["name"] == name)).find_map(|c| {
        c["filters"]
            .as_array()?
            .iter()
            .find_map(|f| (f["name"] == mesh_config::metadata::HTTP_CONNECTION_MANAGER).then_some(&f["typed_config"]))
    })
}

fn lb_endpoints(assignment: &Value) -> Vec<Value> {
    assignment["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|locality| locality["lb_endpoints"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn endpoint_address(lb_endpoint: &Value) -> Option<String> {
    let socket = &lb_endpoint["endpoint"]["address"]["socket_address"];
    Some(format!("{}:{}", socket["address"].as_str()?, socket["port_value"].as_u64()?))
}

/// Rewrite 3: each endpoint a test serves points at its loopback address;
/// the rest are dropped.
fn map_endpoints(assignment: &mut Value, served: &BTreeMap<String, SocketAddr>) {
    let Some(localities) = assignment["endpoints"].as_array_mut() else { return };
    for locality in localities {
        let Some(endpoints) = locality["lb_endpoints"].as_array_mut() else { continue };
        endpoints.retain_mut(|endpoint| {
            let Some(address) = endpoint_address(endpoint).and_then(|a| served.get(&a).copied()) else {
                return false;
            };
            endpoint["endpoint"]["address"] = mesh_config::envoy::socket(address);
            true
        });
    }
}

/// A loopback address of this test's own (in 127.0.0.0/8) where `port`
/// is free: two sidecars each get port 80 or 8080, as in two pods.
pub fn loopback_port(port: u16) -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 97;
        let [_, b, c, d] = n.to_be_bytes();
        let address = SocketAddr::from(([127, b, c, d.max(2)], port));
        if std::net::TcpListener::bind(address).is_ok() {
            return address;
        }
    }
}
