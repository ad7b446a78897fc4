//! The local stack `just demo` runs and `just up` keeps running: every piece
//! real except the nodes.
//! - a real Kubernetes API server (etcd, kube-apiserver) holding one
//!   opted-in pod, created through the API;
//! - AWS STS (PyPI `moto`) behind the token checks AWS makes, with the API
//!   server as identity provider ([`crate::sts_oidc`]);
//! - Istio's own xDS generator translating the default rendering for the
//!   pod's sidecar and the broker's, as istiod would send it to them;
//! - the `token-broker` binary, as its own service account with the
//!   rendered RBAC, in `xfcc` mode behind its Envoy sidecar;
//! - the pod's Envoy sidecar with the filter on the metadata chain. Without
//!   iptables, the app reaches it as an HTTP proxy, on a loopback address
//!   standing for 169.254.169.254 ([`crate::istio`] lists every rewrite).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::Pod as KubePod;
use mesh_config::render::{BROKER, BROKER_PORT};

use crate::istio::{self, AppSidecar, Cluster};
use crate::kube_cluster::{self, KubeCluster};
use crate::pki::{self, MeshCa};
use crate::{Envoy, Pod, ROLE_ARN, Sts, paths, process};

/// Everything the stack started; all of it stops on drop.
pub struct Stack {
    /// The opted-in pod, as the harness names it.
    pub pod: Pod,
    /// The pod as the API server has it.
    pub kube_pod: KubePod,
    pub ca: MeshCa,
    pub kube: KubeCluster,
    pub sts: Sts,
    pub broker: BrokerProcess,
    pub broker_sidecar: Envoy,
    pub app: AppSidecar,
    /// Metadata-chain filters of the app sidecar, as Istio generated them.
    pub metadata_chain: Vec<String>,
    /// Where the stack keeps its files (certificates, kubeconfigs, logs).
    pub dir: PathBuf,
}

/// The `token-broker` binary; killed on drop.
pub struct BrokerProcess {
    child: Child,
    pub addr: SocketAddr,
    /// Health and metrics.
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the stack says as it comes up: a stage and its facts.
pub type Narrator<'a> = &'a mut (dyn FnMut(&str, &[(&str, String)]) + Send);

impl Stack {
    /// Starts the stack, files under `dir`, the metadata service standing
    /// at `metadata` (a free loopback address if `None`). Says each stage
    /// to `say`. Panics, naming the piece and showing its log, if one fails.
    pub async fn start(dir: &Path, metadata: Option<SocketAddr>, say: Narrator<'_>) -> Result<Self, String> {
        let pod = Pod::enabled();
        let ca = MeshCa::new("imds-mesh local mesh");
        let (app_id, broker_id) = (pki::spiffe_id(&pod.namespace, &pod.service_account), pki::broker_id());
        let broker_certs = ca.workload(&[&broker_id]).write(dir, "broker");
        let app_certs = ca.workload(&[&app_id]).write(dir, "app");
        say(
            "Mesh identities: a CA and SPIFFE certificates (standing in for Istio's)",
            &[("broker", broker_id.clone()), ("app pod", app_id)],
        );

        let kube = KubeCluster::start().await;
        let options = istio::translated_options();
        let broker_token = {
            kube.apply(&kube_cluster::broker_identity(&options)).await;
            kube.token(&options.namespace, BROKER).await
        };
        let broker_kubeconfig = dir.join("token-broker.kubeconfig");
        write(&broker_kubeconfig, &kube.kubeconfig(&broker_token))?;
        write(&dir.join("admin.kubeconfig"), &kube.kubeconfig(kube.admin_token()))?;
        let kube_pod = kube.create_pod(istio::kube_pod(&pod), istio::APP_IP).await;
        say(
            "Kubernetes API server (etcd, kube-apiserver) with the app pod, opted in as on GKE",
            &[
                ("API server", kube.url.clone()),
                ("pod", format!("{}/{} (service account {})", pod.namespace, pod.name, pod.service_account)),
                ("label", "gkemulticloud.googleapis.com/aws-imds-emulator-enabled: \"True\"".into()),
                ("annotation", format!("gkemulticloud.googleapis.com/aws-imds-emulator-role-arn: {ROLE_ARN}")),
                ("admin kubeconfig", dir.join("admin.kubeconfig").display().to_string()),
            ],
        );

        let sts = Sts::trusting(&kube).await;
        say(
            "AWS STS (moto), checking web identity tokens against the API server's keys",
            &[("endpoint", sts.endpoint())],
        );

        let (app_proxy, broker_proxy) = (istio::proxy_of(&pod), istio::broker_proxy(&options, 0));
        let mut xds = Cluster::harness(&options, 1).try_generate(&[&app_proxy, &broker_proxy])?;
        let app_xds = xds.remove(&app_proxy).ok_or("istiod sent nothing for the app pod")?;
        let broker_xds = xds.remove(&broker_proxy).ok_or("istiod sent nothing for the broker pod")?;
        let metadata_chain = app_xds.http_filters("0.0.0.0_80", Some(mesh_config::metadata::METADATA_CHAIN));
        say(
            "Istio's own translation of the rendering (its xDS generator, as istiod)",
            &[
                ("app sidecar", format!("{} listeners, {} clusters", app_xds.listeners.len(), app_xds.clusters.len())),
                ("metadata chain filters", metadata_chain.join(", ")),
            ],
        );

        let broker = BrokerProcess::start(&sts, &broker_kubeconfig, dir).await?;
        let inbound = istio::loopback_port(BROKER_PORT);
        let broker_sidecar = istio::start_broker_sidecar(&broker_xds, inbound, broker.addr, &broker_certs).await;
        say(
            "token-broker (xfcc mode, its own service account) behind its sidecar",
            &[
                ("broker", format!("{} (ready: pod watch synced)", broker.addr)),
                ("broker sidecar (mTLS)", broker_sidecar.addr.to_string()),
                ("metrics", format!("http://{}/metrics", broker.admin)),
                ("log", broker.log.display().to_string()),
            ],
        );

        let endpoint = (format!("{}:{BROKER_PORT}", istio::broker_ip(0)), inbound);
        let app = match metadata {
            Some(address) => AppSidecar::start_at(&app_xds, &app_certs, &[endpoint], 1, address).await,
            None => AppSidecar::start(&app_xds, &app_certs, &[endpoint], 1).await,
        };
        say("The app pod's sidecar, with the filter", &[("169.254.169.254 stands at", app.metadata.to_string())]);
        Ok(Self { pod, kube_pod, ca, kube, sts, broker, broker_sidecar, app, metadata_chain, dir: dir.to_owned() })
    }

    /// A TLS client with the mesh identity of service account `sa` in the
    /// app's namespace: another workload of the mesh.
    pub fn workload_client(&self, sa: &str) -> pki::TlsClient {
        self.ca.client(Some(&self.ca.workload(&[&pki::spiffe_id(&self.pod.namespace, sa)])))
    }
}

impl BrokerProcess {
    /// Starts the built `token-broker` as the service account of
    /// `kubeconfig`, in `xfcc` mode, and waits until it is ready.
    async fn start(sts: &Sts, kubeconfig: &Path, dir: &Path) -> Result<Self, String> {
        let (addr, admin) = (free_addr()?, free_addr()?);
        let binary = paths::broker_binary();
        let log = dir.join("token-broker.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&binary)
            .args(["--identity-mode", "xfcc", "--own-spiffe-id", &pki::broker_id()])
            .args(["--sts-region", "us-east-1", "--sts-endpoint-url", &sts.endpoint()])
            .args(["--listen", &addr.to_string(), "--admin-listen", &admin.to_string()])
            .args(["--instance", "token-broker-local"])
            // As the rendered Deployment runs it: one JSON object per line,
            // the audit log among them.
            .args(["--log-format", "json"])
            .env_clear()
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e} (`just demo` and `just up` build it)", binary.display()))?;
        let mut broker = Self { child, addr, admin, log };
        process::until_answering(&mut broker.child, "token-broker", &broker.log, admin, "/readyz").await;
        Ok(broker)
    }
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

fn free_addr() -> Result<SocketAddr, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| format!("no free port: {e}"))
}
