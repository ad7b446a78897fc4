//! A mesh PKI for tests, made with `rcgen`: a root CA standing in for the
//! mesh's (Istio's `istio-ca-root-cert`), workload certificates shaped like
//! X.509-SVIDs (a SPIFFE URI SAN, client and server auth), written to files
//! as Envoy and the broker read them, and rustls client configurations for
//! talking to a TLS listener directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The SPIFFE ID of a workload in the harness's trust domain.
pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
}

/// The broker's SPIFFE ID in the default rendering.
pub fn broker_id() -> String {
    mesh_config::render::Options::default().broker_spiffe_id()
}

/// A mesh CA with the broker's and one app's workload certificates, written
/// to a directory that lives as long as this.
pub struct Mesh {
    pub ca: MeshCa,
    pub broker: WorkloadFiles,
    pub app: WorkloadFiles,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Certificates for the broker and for the app running as
    /// `namespace/service_account`.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        let ca = MeshCa::new("mesh");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let broker = ca.workload(&[&broker_id()]).write(dir.path(), "broker");
        let app = ca.workload(&[&spiffe_id(namespace, service_account)]).write(dir.path(), "app");
        Self { ca, broker, app, _dir: dir }
    }
}

/// A root CA that signs workload certificates.
pub struct MeshCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl MeshCa {
    /// A new self-signed root named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.distinguished_name.push(DnType::OrganizationName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        Self { issuer: CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| panic!("{e}")) }
    }

    /// The root certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A workload certificate with these URI SANs (usually one SPIFFE ID),
    /// also valid as a server certificate for `localhost` and `127.0.0.1`.
    pub fn workload(&self, uris: &[&str]) -> Workload {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap_or_else(|e| panic!("{e}"));
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        for uri in uris {
            params.subject_alt_names.push(SanType::URI((*uri).try_into().unwrap_or_else(|e| panic!("{uri}: {e}"))));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.signed_by(&key, &self.issuer).unwrap_or_else(|e| panic!("{e}"));
        Workload { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: self.cert_pem() }
    }

    /// A TLS client that trusts this root and presents `identity` (or no
    /// certificate).
    pub fn client(&self, identity: Option<&Workload>) -> TlsClient {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let root = CertificateDer::from_pem_slice(self.cert_pem().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        roots.add(root).unwrap_or_else(|e| panic!("{e}"));
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(roots);
        let config = match identity {
            Some(workload) => {
                let chain = vec![
                    CertificateDer::from_pem_slice(workload.cert_pem.as_bytes()).unwrap_or_else(|e| panic!("{e}")),
                ];
                let key = PrivateKeyDer::from_pem_slice(workload.key_pem.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
                builder.with_client_auth_cert(chain, key).unwrap_or_else(|e| panic!("{e}"))
            }
            None => builder.with_no_client_auth(),
        };
        TlsClient(TlsConnector::from(Arc::new(config)))
    }
}

/// A workload's certificate, key and the root it chains to, all PEM.
#[derive(Clone)]
pub struct Workload {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// Where [`Workload::write`] put the files.
#[derive(Debug, Clone)]
pub struct WorkloadFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Workload {
    /// Writes `<name>.crt`, `<name>.key` and `<name>-ca.crt` into `dir`
    /// (replacing what is there, as a rotation does).
    pub fn write(&self, dir: &Path, name: &str) -> WorkloadFiles {
        let files = WorkloadFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join(format!("{name}-ca.crt")),
        };
        for (path, pem) in [(&files.cert, &self.cert_pem), (&files.key, &self.key_pem), (&files.ca, &self.ca_pem)] {
            std::fs::write(path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        files
    }
}

/// Connects over TLS to a listener on loopback (server name `localhost`).
#[derive(Clone)]
pub struct TlsClient(TlsConnector);

impl TlsClient {
    /// Connects and completes the client side of the handshake. With TLS 1.3
    /// a server that refuses the client certificate says so only afterwards:
    /// the first read fails.
    pub async fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        self.connect_from(addr, None).await
    }

    /// [`Self::connect`] from the local address `source` (a pod's loopback
    /// IP), if given.
    pub async fn connect_from(
        &self,
        addr: std::net::SocketAddr,
        source: Option<std::net::IpAddr>,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = crate::http::connect(addr, source).await?;
        let name = ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
        self.0.connect(name, tcp).await
    }
}
