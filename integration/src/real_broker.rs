//! The real token broker (`token_broker::server`) in this process, on
//! loopback, against a real API server and an STS endpoint (moto or
//! scripted): what the broker tests and the filter-to-broker tests run.
//!
//! ```no_run
//! # async fn story() {
//! use integration::kube_cluster::KubeCluster;
//! use integration::{RealBroker, Sts};
//! let cluster = KubeCluster::start().await;
//! let sts = Sts::trusting(&cluster).await;
//! let broker = RealBroker::on(&cluster, sts.endpoint()).await.start().await;
//! # }
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use token_broker::app::{App, AppConfig};
use token_broker::identity::{self, IdentityMode};
use token_broker::server;
use token_broker::shutdown::Shutdown;
use token_broker::sts::{StsClient, StsConfig};
use token_broker::tls::{MtlsFiles, MtlsListener};

use crate::kube_cluster::KubeCluster;
use crate::{Req, wait};

/// `GET /v1/credentials` for `role_arn` on behalf of `pod`, encoded as the
/// filter encodes it (`imds_filter::broker::request_path`), to the broker's
/// service host.
pub fn credentials_request(role_arn: &str, pod: &str) -> Req {
    let role = imds_filter::arn::RoleArn::parse(role_arn).unwrap_or_else(|e| panic!("{role_arn}: {e:?}"));
    Req::get(imds_filter::broker::request_path(&role, pod)).host("token-broker")
}

/// [`credentials_request`] from the `insecure-dev` caller
/// `namespace/service_account`.
pub fn dev_credentials_request(namespace: &str, service_account: &str, role_arn: &str, pod: &str) -> Req {
    credentials_request(role_arn, pod)
        .header(identity::DEV_NAMESPACE_HEADER, namespace)
        .header(identity::DEV_SERVICE_ACCOUNT_HEADER, service_account)
}

/// The trust domain of every harness identity.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Where the broker's sidecar connects to the broker from (Istio's inbound
/// passthrough address): a test that stands in for the sidecar in front of
/// an `xfcc` broker connects from here ([`Req::source`]) and states the
/// caller's address in [`token_broker::peer::PEER_ADDRESS_HEADER`].
pub const SIDECAR_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

/// A broker serving on loopback; shut down (gracefully) on drop.
#[derive(Debug)]
pub struct RealBroker {
    /// Credentials, health and metrics: HTTP, or HTTPS in mtls mode.
    pub addr: SocketAddr,
    /// Health and metrics only, always plain HTTP.
    pub admin_addr: SocketAddr,
    app: Arc<App>,
    shutdown: Shutdown,
}

impl Drop for RealBroker {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Configures a [`RealBroker`]; `insecure-dev` identity unless told
/// otherwise.
#[derive(Debug)]
pub struct RealBrokerBuilder {
    kube: kube::Config,
    sts_endpoint: String,
    config: AppConfig,
    mtls: Option<(MtlsFiles, Duration)>,
}

impl RealBroker {
    /// A broker on the real API server `cluster` as deployed: its own
    /// service account with the rendered RBAC (default options); STS at
    /// `sts_endpoint`. To configure and start.
    pub async fn on(cluster: &KubeCluster, sts_endpoint: String) -> RealBrokerBuilder {
        Self::with_kube(cluster.broker_config(&mesh_config::render::Options::default()).await, sts_endpoint)
    }

    /// [`RealBroker::on`] with the namespace policy on: the RBAC rendered
    /// for it (the broker may list and watch namespaces) and the broker
    /// reading each namespace's `annotation`.
    pub async fn with_namespace_policy(
        cluster: &KubeCluster,
        sts_endpoint: String,
        annotation: &str,
    ) -> RealBrokerBuilder {
        let options = mesh_config::render::Options {
            namespace_policy_annotation: Some(annotation.to_owned()),
            ..Default::default()
        };
        let policy = token_broker::authz::NamespacePolicy { annotation: annotation.to_owned() };
        Self::with_kube(cluster.broker_config(&options).await, sts_endpoint)
            .tune(|config| config.namespace_policy = Some(policy))
    }

    /// A broker whose Kubernetes client uses `kube` (a real API server, as
    /// some service account), to configure and start.
    pub fn with_kube(kube: kube::Config, sts_endpoint: String) -> RealBrokerBuilder {
        RealBrokerBuilder {
            kube,
            sts_endpoint,
            config: AppConfig::new(IdentityMode::InsecureDev { trust_domain: TRUST_DOMAIN.into() }),
            mtls: None,
        }
    }

    /// `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> crate::Reply {
        Req::get(path).host("token-broker").send(self.admin_addr).await
    }

    /// Whether the broker's pod watch holds pod `namespace/name`.
    pub fn watches_pod(&self, namespace: &str, name: &str) -> bool {
        self.app.watches_pod(namespace, name)
    }

    /// Whether the pod watch has synced. `/readyz` says so too, but an
    /// `insecure-dev` broker (the harness's default) is never ready.
    pub fn is_synced(&self) -> bool {
        self.app.is_synced()
    }
}

impl RealBrokerBuilder {
    /// Changes the service's configuration.
    pub fn tune(mut self, edit: impl FnOnce(&mut AppConfig)) -> Self {
        edit(&mut self.config);
        self
    }

    /// Identifies callers by the XFCC element its own sidecar appends (the
    /// broker's SPIFFE ID as `By`), as deployed.
    pub fn xfcc(mut self) -> Self {
        let own_id =
            token_broker::identity::SpiffeId::parse(&crate::pki::broker_id()).unwrap_or_else(|e| panic!("{e:?}"));
        self.config.identity =
            IdentityMode::Xfcc(token_broker::identity::XfccVerifier { own_id, trust_domain: TRUST_DOMAIN.into() });
        self
    }

    /// Terminates TLS with `files` (re-read every `reload`) and identifies
    /// callers by their client certificates.
    pub fn mtls(mut self, files: MtlsFiles, reload: Duration) -> Self {
        self.config.identity = IdentityMode::Mtls { trust_domain: TRUST_DOMAIN.into() };
        self.mtls = Some((files, reload));
        self
    }

    /// Starts the broker without waiting for its pod watch to sync.
    pub async fn start_unsynced(self) -> RealBroker {
        let client = token_broker::kube::client(self.kube).unwrap_or_else(|e| panic!("kube client: {e}"));
        let sts = StsClient::new(StsConfig {
            endpoint_url: Some(self.sts_endpoint),
            operation_timeout: Duration::from_secs(5),
            ..StsConfig::new("us-east-1")
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let app = Arc::new(App::new(self.config, client, sts, "broker-test-0"));
        let shutdown = Shutdown::default();

        let listener = bind().await;
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        match self.mtls {
            Some((files, reload)) => {
                let listener = MtlsListener::new(listener, files, reload).unwrap_or_else(|e| panic!("mtls: {e}"));
                tokio::spawn(server::run_mtls(listener, Arc::clone(&app), shutdown.signal()));
            }
            None => {
                tokio::spawn(server::run(listener, Arc::clone(&app), shutdown.signal()));
            }
        }
        let admin = bind().await;
        let admin_addr = admin.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(server::run_admin(admin, Arc::clone(&app), shutdown.signal()));
        RealBroker { addr, admin_addr, app, shutdown }
    }

    /// [`Self::start_unsynced`], then waits for the pod watch to sync.
    pub async fn start(self) -> RealBroker {
        let broker = self.start_unsynced().await;
        wait::until("the broker's pod watch to sync", || {
            let synced = broker.is_synced();
            async move { synced.then_some(()) }
        })
        .await;
        broker
    }
}

async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"))
}
