//! A real Kubernetes API server on loopback: etcd and `kube-apiserver`, both
//! built from their Go modules by `just kube-apiserver`
//! (`integration/kube-apiserver`). RBAC is on; the server signs
//! service-account tokens with a key of its own; the harness acts as an
//! admin (`system:masters`, a static token). There is no kubelet: a pod is
//! created through the API and its status (`podIP`, `Ready`) patched in.
//! Objects are applied server-side, for real or as a dry run the server
//! judges without storing anything ([`KubeCluster::dry_run`]); CRDs
//! (Istio's) are installed with [`KubeCluster::install_crds`].
//!
//! ```no_run
//! # async fn story() {
//! use integration::kube_cluster::KubeCluster;
//! let cluster = KubeCluster::start().await;
//! let admin = cluster.admin();
//! # }
//! ```

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use imds_filter::config::{ENABLE_LABEL, ENABLED_VALUE, ROLE_ANNOTATION};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use mesh_config::render::{self, Object, Options};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tempfile::TempDir;

use crate::{paths, wait};

/// The issuer and default audience of the tokens the server signs.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The broker's user name at the API server, in the default rendering.
pub const BROKER_USER: &str = "system:serviceaccount:imds-mesh:token-broker";

/// etcd and the API server; both stopped on drop.
pub struct KubeCluster {
    etcd: Child,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    dir: Option<TempDir>,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    admin_token: String,
    ca: Vec<Vec<u8>>,
    /// Pod IPs handed out by [`Self::add_pod`] so far.
    pods_added: std::sync::atomic::AtomicU8,
}

impl KubeCluster {
    /// Starts etcd, then the API server, and waits until it is ready.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("imds-mesh-kube-").tempdir().unwrap_or_else(|e| panic!("{e}"));
        let [client, peer, secure] = free_ports();
        let etcd = spawn(
            &paths::target_binary("etcd"),
            &[
                "--name=default".into(),
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
                "--log-level=warn".into(),
                // A cluster lives as long as one test: durability buys
                // nothing, and fsync on a shared CI disk costs seconds.
                "--unsafe-no-fsync".into(),
            ],
            &dir.path().join("etcd.log"),
        );
        // The service-account signing key (ES256) and its public half.
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let (signing_key, public_key) = (dir.path().join("sa.key"), dir.path().join("sa.pub"));
        write(&signing_key, &key.serialize_pem());
        write(&public_key, &key.public_key_pem());
        // Every request, with its user and answer, for tests that need to
        // know what the server refused; TokenRequests with their spec
        // (audiences, lifetime, bound pod; the token is in the response,
        // which is not logged). TokenReviews carry a token in the request:
        // metadata only.
        let audit_policy = dir.path().join("audit-policy.yaml");
        write(&audit_policy, AUDIT_POLICY);
        let admin_token = hex_token();
        let tokens = dir.path().join("tokens.csv");
        write(&tokens, &format!("{admin_token},admin,admin,\"system:masters\"\n"));
        let apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{client}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={secure}"),
            format!("--cert-dir={}", dir.path().join("certs").display()),
            format!("--service-account-issuer={ISSUER}"),
            format!("--service-account-key-file={}", public_key.display()),
            format!("--service-account-signing-key-file={}", signing_key.display()),
            "--authorization-mode=RBAC".into(),
            format!("--token-auth-file={}", tokens.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // The `kubernetes` Service's endpoint would be the loopback
            // address, which the API refuses for an endpoint.
            "--endpoint-reconciler-type=none".into(),
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", dir.path().join("audit.log").display()),
            "--audit-log-mode=blocking".into(),
            "--profiling=false".into(),
        ];
        let mut cluster = Self {
            etcd,
            apiserver: None,
            apiserver_args,
            dir: Some(dir),
            url: format!("https://127.0.0.1:{secure}"),
            admin_token,
            ca: Vec::new(),
            pods_added: Default::default(),
        };
        cluster.start_apiserver().await;
        cluster
    }

    /// Stops the API server (etcd keeps the data), as in a control-plane
    /// outage: clients are refused connections until [`Self::start_apiserver`].
    pub fn stop_apiserver(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            let _ = apiserver.kill();
            let _ = apiserver.wait();
        }
    }

    /// Freezes the API server (SIGSTOP): a hung control plane. Unlike
    /// [`Self::stop_apiserver`], connections are still accepted (by the
    /// kernel) and open ones stay open, but nothing is answered until
    /// [`Self::resume_apiserver`]. Returns once every thread of the server
    /// has stopped: `kill` returns when the signal is sent, and a thread
    /// busy in the kernel (writing the audit log, say) stops only when it
    /// leaves it, so a request sent at once could still be answered.
    pub async fn pause_apiserver(&self) {
        let pid = self.signal_apiserver("-STOP");
        wait::until("every API server thread to stop", || {
            let stopped = thread_states(pid).iter().all(|state| matches!(state, 'T' | 't'));
            async move { stopped.then_some(()) }
        })
        .await;
    }

    /// Lets a [`Self::pause_apiserver`]d server run again (SIGCONT).
    pub fn resume_apiserver(&self) {
        self.signal_apiserver("-CONT");
    }

    /// Sends `signal` to the API server; returns its pid.
    fn signal_apiserver(&self, signal: &str) -> u32 {
        let pid = self.apiserver.as_ref().map(Child::id).unwrap_or_else(|| panic!("the API server is not running"));
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill {signal} {pid}: {e}"));
        assert!(status.success(), "kill {signal} {pid}: {status}");
        pid
    }

    /// Starts the API server (again), on the same port with the same keys,
    /// and waits until it is ready.
    pub async fn start_apiserver(&mut self) {
        self.stop_apiserver();
        let log = self.dir().join("kube-apiserver.log");
        self.apiserver = Some(spawn(&paths::target_binary("kube-apiserver"), &self.apiserver_args, &log));
        self.await_ready().await;
    }

    /// Waits for the serving certificate, then for `/readyz`.
    async fn await_ready(&mut self) {
        let certificate = self.dir().join("certs/apiserver.crt");
        let log = self.dir().join("kube-apiserver.log");
        let ca = wait::until("the API server's serving certificate", || {
            let exited = self.apiserver.as_mut().and_then(|a| a.try_wait().ok().flatten());
            assert!(exited.is_none(), "kube-apiserver exited: {}", std::fs::read_to_string(&log).unwrap_or_default());
            let certificates: Vec<Vec<u8>> = CertificateDer::pem_file_iter(&certificate)
                .map(|certs| certs.filter_map(Result::ok).map(|c| c.to_vec()).collect())
                .unwrap_or_default();
            async move { (certificates.len() == 2).then_some(certificates) }
        })
        .await;
        self.ca = ca;
        let client = self.admin();
        wait::until("the API server to be ready", || {
            let client = client.clone();
            async move {
                let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
                client.request_text(request).await.ok().filter(|body| body == "ok")
            }
        })
        .await;
    }

    /// Where the server keeps its keys, certificates, logs
    /// (`etcd.log`, `kube-apiserver.log`, `audit.log`) and etcd's data.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map_or_else(|| Path::new("."), TempDir::path)
    }

    /// A client configuration presenting `token`, trusting the server.
    pub fn config(&self, token: &str) -> kube::Config {
        let mut config = kube::Config::new(self.url.parse().unwrap_or_else(|e| panic!("{e}")));
        config.root_cert = Some(self.ca.clone());
        let bearer = format!("Bearer {token}").parse().unwrap_or_else(|e| panic!("{e}"));
        config.headers.push((http::header::AUTHORIZATION, bearer));
        config
    }

    /// A kubeconfig (JSON) for this server, presenting `token`.
    pub fn kubeconfig(&self, token: &str) -> String {
        use base64::Engine;
        let ca = std::fs::read(self.dir().join("certs/apiserver.crt")).unwrap_or_default();
        let ca = base64::engine::general_purpose::STANDARD.encode(ca);
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "imds-mesh", "cluster": { "server": self.url, "certificate-authority-data": ca } }],
            "users": [{ "name": "imds-mesh", "user": { "token": token } }],
            "contexts": [{ "name": "imds-mesh", "context": { "cluster": "imds-mesh", "user": "imds-mesh" } }],
            "current-context": "imds-mesh",
        })
        .to_string()
    }

    /// The admin's token (`system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The cluster admin.
    pub fn admin(&self) -> kube::Client {
        kube::Client::try_from(self.config(&self.admin_token)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Creates namespace `name` (if absent).
    pub async fn namespace(&self, name: &str) {
        let _ = Api::<Namespace>::all(self.admin()).create(&PostParams::default(), &namespace(name)).await;
    }

    /// Creates service account `namespace/name` (and its namespace).
    pub async fn service_account(&self, namespace: &str, name: &str) {
        self.namespace(namespace).await;
        let account: ServiceAccount =
            serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap_or_default();
        let _ =
            Api::<ServiceAccount>::namespaced(self.admin(), namespace).create(&PostParams::default(), &account).await;
    }

    /// Creates `pod` (its namespace and service account first, a container
    /// added if it has none) and patches in what a kubelet would report:
    /// running at `ip`, ready. Returns the pod as the server has it. The
    /// broker serves a caller only from the pod's address: give a pod that
    /// calls a loopback address (127.0.0.0/8 but `127.0.0.1` and the
    /// broker sidecar's `127.0.0.6`) and connect from it
    /// ([`crate::Req::source`], [`crate::EnvoyBuilder::pod_ip`]).
    pub async fn create_pod(&self, mut pod: Pod, ip: &str) -> Pod {
        let namespace = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let spec = pod.spec.get_or_insert_default();
        let account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
        if spec.containers.is_empty() {
            spec.containers =
                vec![serde_json::from_value(json!({ "name": "app", "image": "app" })).unwrap_or_default()];
        }
        self.service_account(&namespace, &account).await;
        let pods = Api::<Pod>::namespaced(self.admin(), &namespace);
        let created = pods.create(&PostParams::default(), &pod).await.unwrap_or_else(|e| panic!("create pod: {e}"));
        let name = created.metadata.name.clone().unwrap_or_default();
        let status = json!({ "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "conditions": [{ "type": "Ready", "status": "True" }],
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("patch pod status: {e}"))
    }

    /// [`Self::create_pod`] at the next free pod IP, a loopback address
    /// (`127.244.0.<n>`, as if the pod network were `10.244.0.0/16`) a
    /// test can connect from as the pod ([`pod_ip`]).
    pub async fn add_pod(&self, pod: Pod) -> Pod {
        let n = self.pods_added.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.create_pod(pod, &format!("127.244.0.{}", n.wrapping_add(10))).await
    }

    /// Deletes pod `namespace/name` at once (no grace period: there is no
    /// kubelet to confirm it stopped).
    pub async fn delete_pod(&self, namespace: &str, name: &str) {
        let pods = Api::<Pod>::namespaced(self.admin(), namespace);
        pods.delete(name, &kube::api::DeleteParams::default().grace_period(0))
            .await
            .unwrap_or_else(|e| panic!("delete pod {namespace}/{name}: {e}"));
    }

    /// The `events.k8s.io/v1` Events of `namespace`, oldest first.
    pub async fn events(&self, namespace: &str) -> Vec<Event> {
        let events = Api::<Event>::namespaced(self.admin(), namespace);
        let mut list = events.list(&Default::default()).await.unwrap_or_else(|e| panic!("list events: {e}")).items;
        list.sort_by(|a, b| a.metadata.creation_timestamp.cmp(&b.metadata.creation_timestamp));
        list
    }

    /// A client configuration for the token broker: its rendered namespace,
    /// service account, ClusterRole and ClusterRoleBinding applied (from
    /// `options`), and a token of that service account.
    pub async fn broker_config(&self, options: &Options) -> kube::Config {
        self.apply(&broker_identity(options)).await;
        let token = self.token(&options.namespace, mesh_config::render::BROKER).await;
        self.config(&token)
    }

    /// The specs of the TokenRequests the server granted `user`, in order
    /// (from its audit log).
    pub fn token_requests(&self, user: &str) -> Vec<TokenRequestSpec> {
        self.audit_events()
            .filter(|event| event["user"]["username"] == user && event["responseStatus"]["code"] == 201)
            .filter(|event| event["objectRef"]["subresource"] == "token")
            // The spec only: the logged request has an empty status whose
            // `expirationTimestamp` is null, which k8s-openapi refuses.
            .map(|event| {
                serde_json::from_value::<TokenRequestSpec>(event["requestObject"]["spec"].clone())
                    .unwrap_or_else(|e| panic!("{e}: {event}"))
            })
            .collect()
    }

    /// The request URIs `user` sent, in order (from the audit log).
    pub fn requests(&self, user: &str) -> Vec<String> {
        self.audit_events()
            .filter(|event| event["user"]["username"] == user)
            .filter_map(|event| event["requestURI"].as_str().map(str::to_owned))
            .collect()
    }

    fn audit_events(&self) -> impl Iterator<Item = serde_json::Value> {
        let log = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        log.lines().filter_map(|line| serde_json::from_str(line).ok()).collect::<Vec<_>>().into_iter()
    }

    /// A token for service account `namespace/name`, minted by the server
    /// (TokenRequest, its default audience): how a pod of that account
    /// talks to the API.
    pub async fn token(&self, namespace: &str, name: &str) -> String {
        let request = TokenRequest {
            spec: TokenRequestSpec { audiences: vec![ISSUER.into()], ..TokenRequestSpec::default() },
            ..TokenRequest::default()
        };
        let accounts = Api::<ServiceAccount>::namespaced(self.admin(), namespace);
        let issued = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"));
        issued.status.map(|s| s.token).unwrap_or_default()
    }

    /// Applies `objects` (as `kubectl apply --server-side` would) as admin.
    pub async fn apply(&self, objects: &[serde_json::Value]) {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for verdict in self.server_side_apply(objects, &params).await {
            if let Err(refusal) = verdict.outcome {
                panic!("apply {}: {refusal}", verdict.object);
            }
        }
    }

    /// Server-side applies each of `objects` as admin with `dryRun=All`:
    /// the server decodes, defaults, validates (strict field validation: an
    /// unknown field is an error) and admits each one as it would for real,
    /// and stores nothing. One verdict per object, in order; a refusal holds
    /// the server's message. A dry-run Namespace is not created, and objects
    /// in a namespace are refused until it exists.
    pub async fn dry_run(&self, objects: &[serde_json::Value]) -> Vec<Verdict> {
        let params = PatchParams::apply(FIELD_MANAGER).force().dry_run().validation_strict();
        self.server_side_apply(objects, &params).await
    }

    async fn server_side_apply(&self, objects: &[serde_json::Value], params: &PatchParams) -> Vec<Verdict> {
        let client = self.admin();
        let discovery = kube::Discovery::new(client.clone()).run().await.unwrap_or_else(|e| panic!("discovery: {e}"));
        let mut verdicts = Vec::with_capacity(objects.len());
        for object in objects {
            let outcome = apply_one(&client, &discovery, object, params).await;
            verdicts.push(Verdict { object: describe(object), outcome });
        }
        verdicts
    }

    /// Installs the CustomResourceDefinitions in the YAML file `crds` and
    /// waits until each is Established and discovery lists its kinds at
    /// every served version, so objects of them can be applied. Returns
    /// their names.
    pub async fn install_crds(&self, crds: &Path) -> Vec<String> {
        let yaml = std::fs::read_to_string(crds).unwrap_or_else(|e| panic!("{}: {e}", crds.display()));
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&yaml).unwrap_or_else(|e| panic!("{}: {e}", crds.display()));
        let documents: Vec<serde_json::Value> =
            documents.into_iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect();
        let definitions: Vec<CustomResourceDefinition> = documents
            .iter()
            .map(|d| serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{}: {e}", crds.display())))
            .collect();
        self.apply(&documents).await;
        let api = Api::<CustomResourceDefinition>::all(self.admin());
        for definition in &definitions {
            let name = definition.metadata.name.clone().unwrap_or_default();
            wait::until(&format!("CRD {name} to be established"), || async {
                let conditions = api.get(&name).await.ok()?.status?.conditions?;
                conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
            })
            .await;
        }
        let kinds: Vec<kube::api::GroupVersionKind> = definitions
            .iter()
            .flat_map(|d| {
                d.spec
                    .versions
                    .iter()
                    .filter(|v| v.served)
                    .map(|v| kube::api::GroupVersionKind::gvk(&d.spec.group, &v.name, &d.spec.names.kind))
            })
            .collect();
        let client = self.admin();
        wait::until("the CRDs' kinds in discovery", || {
            let (client, kinds) = (client.clone(), &kinds);
            async move {
                let discovery = kube::Discovery::new(client).run().await.ok()?;
                kinds.iter().all(|gvk| discovery.resolve_gvk(gvk).is_some()).then_some(())
            }
        })
        .await;
        definitions.into_iter().filter_map(|d| d.metadata.name).collect()
    }

    /// The server's audit log (every request, its user and its answer).
    pub fn audit_log(&self) -> PathBuf {
        self.dir().join("audit.log")
    }

    /// What the server has refused (403) `user`, by its audit log: one
    /// `"<verb> <resource>[/<subresource>]"` per refusal.
    pub fn refusals(&self, user: &str) -> Vec<String> {
        self.audit_events()
            .filter(|event| event["user"]["username"] == user && event["responseStatus"]["code"] == 403)
            .map(|event| {
                let object = &event["objectRef"];
                let resource = object["resource"].as_str().unwrap_or_default();
                match object["subresource"].as_str() {
                    Some(sub) => format!("{} {resource}/{sub}", event["verb"].as_str().unwrap_or_default()),
                    None => format!("{} {resource}", event["verb"].as_str().unwrap_or_default()),
                }
            })
            .collect()
    }
}

/// The field manager of the harness's server-side applies.
const FIELD_MANAGER: &str = "imds-mesh-harness";

/// What the server said to one object of [`KubeCluster::dry_run`].
#[derive(Debug, Clone)]
pub struct Verdict {
    /// `Kind namespace/name`, or `Kind name` for a cluster-scoped object.
    pub object: String,
    /// Accepted, or refused with the server's status code, reason (if it
    /// gave one) and message.
    pub outcome: Result<(), String>,
}

/// Server-side applies `object` with `params`; the server's refusal as
/// `"<code> <reason>: <message>"` (`"<code>: <message>"` without a reason).
async fn apply_one(
    client: &kube::Client,
    discovery: &kube::Discovery,
    object: &serde_json::Value,
    params: &PatchParams,
) -> Result<(), String> {
    let object: DynamicObject = serde_json::from_value(object.clone()).map_err(|e| format!("not an object: {e}"))?;
    let types = object.types.clone().ok_or("no apiVersion or kind")?;
    let gvk = kube::api::GroupVersionKind::try_from(&types).map_err(|e| e.to_string())?;
    let (resource, capabilities) = discovery
        .resolve_gvk(&gvk)
        .ok_or_else(|| format!("the server does not serve {} {}", types.api_version, types.kind))?;
    let api: Api<DynamicObject> = match (capabilities.scope, object.metadata.namespace.as_deref()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    match api.patch(&name, params, &Patch::Apply(&object)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.reason.is_empty() => {
            Err(format!("{}: {}", status.code, status.message))
        }
        Err(kube::Error::Api(status)) => Err(format!("{} {}: {}", status.code, status.reason, status.message)),
        Err(e) => Err(e.to_string()),
    }
}

/// `Kind namespace/name`, or `Kind name`.
fn describe(object: &serde_json::Value) -> String {
    let kind = object["kind"].as_str().unwrap_or("?");
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(namespace) => format!("{kind} {namespace}/{name}"),
        None => format!("{kind} {name}"),
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.stop_apiserver();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        // A failed test keeps the directory for its logs; etcd's data (a
        // 64 MB write-ahead log) is no use then.
        let _ = std::fs::remove_dir_all(self.dir().join("etcd"));
        crate::process::stop(&mut self.etcd, &mut self.dir, "kube-apiserver.log", "kube-apiserver");
    }
}

/// The IP of `pod` as the API server has it (`status.podIP`).
pub fn pod_ip(pod: &Pod) -> std::net::IpAddr {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
    ip.and_then(|ip| ip.parse().ok()).unwrap_or_else(|| panic!("pod without an IP: {:?}", pod.metadata.name))
}

/// A namespace object named `name`.
pub fn namespace(name: &str) -> Namespace {
    serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap_or_default()
}

/// A pod `namespace/name` running as `service_account`, opted in (the
/// enable label `True`) and annotated with `role_arn`.
pub fn enabled_pod(namespace: &str, name: &str, service_account: &str, role_arn: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { ENABLE_LABEL: ENABLED_VALUE },
            "annotations": { ROLE_ANNOTATION: role_arn },
        },
        "spec": { "serviceAccountName": service_account, "containers": [{ "name": "app", "image": "app" }] },
    }))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The rendered objects the broker's permissions come from: its namespace,
/// service account, ClusterRole and ClusterRoleBinding.
pub fn broker_identity(options: &Options) -> Vec<serde_json::Value> {
    render::render(options)
        .into_iter()
        .filter(|o| {
            matches!(
                o,
                Object::Namespace(_)
                    | Object::ServiceAccount(_)
                    | Object::ClusterRole(_)
                    | Object::ClusterRoleBinding(_)
            )
        })
        .map(|o| serde_json::to_value(o).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Request bodies of TokenRequests, metadata of everything else.
const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Request
  resources: [{ group: \"\", resources: [serviceaccounts/token] }]
- level: Metadata
";

fn spawn(binary: &PathBuf, args: &[String], log: &Path) -> Child {
    // Appended to, so a restarted server's log follows the first one's.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
    Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e} (run `just kube-apiserver`)", binary.display()))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Three free loopback ports.
fn free_ports() -> [u16; 3] {
    let sockets: Vec<TcpListener> =
        (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"))).collect();
    let port = |i: usize| sockets[i].local_addr().map(|a: SocketAddr| a.port()).unwrap_or_else(|e| panic!("{e}"));
    [port(0), port(1), port(2)]
}

/// An unguessable token for the admin credential (a cluster on loopback
/// that lives as long as one test).
fn hex_token() -> String {
    use std::hash::BuildHasher;
    let seed = std::collections::hash_map::RandomState::new();
    let (a, b) = (seed.hash_one(std::process::id()), seed.hash_one(std::time::SystemTime::now()));
    format!("{a:016x}{b:016x}")
}

/// The scheduler state (`R`, `S`, `D`, `T`...) of every thread of process
/// `pid`, from `/proc/<pid>/task/*/stat`.
fn thread_states(pid: u32) -> Vec<char> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"));
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        // `pid (comm) state ...`: comm may hold spaces and parentheses, so
        // the state follows the last `)`.
        .filter_map(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .collect()
}
