//! The `mtls` identity mode: the broker terminates TLS itself, requires a
//! client certificate that chains to a configured CA bundle, and takes the
//! caller from the certificate's one URI SAN (a SPIFFE ID). For meshes where
//! the broker runs without a sidecar that forwards client certificates, or
//! where callers reach it directly with their own X.509-SVIDs.
//!
//! [`MtlsListener`] is an [`axum::serve::Listener`]: it accepts TCP, runs
//! each TLS handshake in its own task (bounded in number and time, so a slow
//! or silent client holds up nobody) and hands finished connections to
//! axum. The handshake checks the chain (rustls' WebPKI verifier, ring
//! provider); the URI SANs are read once per connection into
//! [`ClientCertificate`], which each request gets as `ConnectInfo`.
//!
//! Certificates rotate (cert-manager, Istio, SPIRE all reissue well before
//! expiry), so the listener re-reads its three files periodically and
//! switches to a new configuration when they change. A change that does not
//! load (a half-written file, a key that does not match) is logged and the
//! running configuration stays.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::identity::{self, CallerIdentity, IdentityError};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes running at once; further connections wait in the kernel's
/// accept queue.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 1024;

/// How often the certificate files are checked for changes by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// Pause after a failed `accept` (e.g. out of file descriptors) before the
/// next one, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Finished handshakes waiting for axum to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// Where the broker's TLS material lives, all PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsFiles {
    /// The broker's certificate, then its intermediates.
    pub certificate_chain: PathBuf,
    /// The private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// The CAs a client certificate must chain to (the mesh's roots).
    pub client_ca_bundle: PathBuf,
}

/// Why the TLS material cannot be used. Never quotes file contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no usable PEM {what}: {source}", .path.display())]
    Pem { path: PathBuf, what: &'static str, source: rustls::pki_types::pem::Error },
    #[error("{}: no certificate in it", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("client CA bundle {}: {source}", .path.display())]
    ClientCa { path: PathBuf, source: rustls::server::VerifierBuilderError },
    #[error("the TCP listener: {0}")]
    Listener(io::Error),
    #[error("certificate chain and private key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The three files' bytes, to tell when they changed.
#[derive(PartialEq, Eq)]
struct Material {
    chain: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

impl MtlsFiles {
    fn read(&self) -> Result<Material, TlsError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source });
        Ok(Material {
            chain: read(&self.certificate_chain)?,
            key: read(&self.private_key)?,
            client_ca: read(&self.client_ca_bundle)?,
        })
    }

    /// Reads the files into a server configuration: TLS 1.2 and 1.3 on ring,
    /// HTTP/1.1, client certificates required and verified against the
    /// bundle.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.config(&self.read()?)
    }

    fn config(&self, material: &Material) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certificates(&self.certificate_chain, &material.chain)?;
        let key = PrivateKeyDer::from_pem_slice(&material.key).map_err(|source| TlsError::Pem {
            path: self.private_key.clone(),
            what: "private key",
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certificates(&self.client_ca_bundle, &material.client_ca)? {
            roots.add(ca)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|source| TlsError::ClientCa { path: self.client_ca_bundle.clone(), source })?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem { path: path.to_owned(), what: "certificate", source };
    let chain = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(pem_error)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(chain)
}

/// The verified client certificate of one connection, reduced to what the
/// broker reads from it: its URI SANs; and the connection's TCP peer, which
/// the broker checks against the addresses of the pod the caller names.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    uris: Arc<Result<Vec<String>, IdentityError>>,
    peer: Option<SocketAddr>,
}

impl ClientCertificate {
    /// From the leaf of a chain the handshake has verified.
    pub fn from_der(leaf: &[u8]) -> Self {
        Self { uris: Arc::new(uri_sans(leaf)), peer: None }
    }

    /// Where the connection comes from.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The caller: the one URI SAN, a workload SPIFFE ID in `trust_domain`.
    pub fn caller(&self, trust_domain: &str) -> Result<CallerIdentity, IdentityError> {
        match &*self.uris {
            Ok(uris) => identity::caller_from_uris(uris.iter().map(String::as_str), trust_domain),
            Err(error) => Err(error.clone()),
        }
    }
}

fn uri_sans(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let certificate = Certificate::from_der(der).map_err(|_| IdentityError::BadCertificate("not DER X.509"))?;
    let san = certificate
        .tbs_certificate
        .get::<SubjectAltName>()
        .map_err(|_| IdentityError::BadCertificate("malformed subjectAltName"))?;
    let names = san.map(|(_critical, san)| san.0).unwrap_or_default();
    Ok(names
        .into_iter()
        .filter_map(|name| match name {
            GeneralName::UniformResourceIdentifier(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

impl ClientCertificate {
    /// The certificate of the connection `stream` from `peer`, as the
    /// [`MtlsListener`] handed it over.
    pub fn of_connection(stream: &TlsStream<TcpStream>, peer: SocketAddr) -> Self {
        let (_, connection) = stream.get_ref();
        let peer = Some(peer);
        match connection.peer_certificates().and_then(<[_]>::first) {
            Some(leaf) => Self { peer, ..Self::from_der(leaf) },
            // The verifier requires a certificate, so this cannot happen;
            // if it did, every request on the connection answers 401.
            None => Self { uris: Arc::new(Err(IdentityError::NoClientCertificate)), peer },
        }
    }
}

impl Connected<IncomingStream<'_, MtlsListener>> for ClientCertificate {
    fn connect_info(stream: IncomingStream<'_, MtlsListener>) -> Self {
        Self::of_connection(stream.io(), *stream.remote_addr())
    }
}

/// A TCP listener that hands axum only connections whose TLS handshake,
/// client certificate included, succeeded. Dropping it stops accepting.
#[derive(Debug)]
pub struct MtlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    tasks: [JoinHandle<()>; 2],
}

impl MtlsListener {
    /// Serves TLS from `files` on `tcp`, re-reading them every
    /// `reload_interval`. Fails if the files do not load now. Must be called
    /// inside a tokio runtime.
    pub fn new(tcp: TcpListener, files: MtlsFiles, reload_interval: Duration) -> Result<Self, TlsError> {
        let local_addr = tcp.local_addr().map_err(TlsError::Listener)?;
        let material = files.read()?;
        let current = Arc::new(RwLock::new(files.config(&material)?));
        let (send, accepted) = mpsc::channel(ACCEPTED_BACKLOG);
        let tasks = [
            tokio::spawn(accept_loop(tcp, Arc::clone(&current), send)),
            tokio::spawn(reload_loop(files, material, current, reload_interval)),
        ];
        Ok(Self { accepted, local_addr, tasks })
    }
}

impl Drop for MtlsListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl axum::serve::Listener for MtlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

type SharedConfig = Arc<RwLock<Arc<ServerConfig>>>;

async fn accept_loop(
    tcp: TcpListener,
    current: SharedConfig,
    accepted: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { return };
        let (stream, remote) = match tcp.accept().await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Small request, small answer: do not wait to coalesce segments.
        let _ = stream.set_nodelay(true);
        let acceptor = TlsAcceptor::from(Arc::clone(&current.read().unwrap_or_else(PoisonError::into_inner)));
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the server has stopped taking connections.
                    let _ = accepted.send((tls, remote)).await;
                }
                // Debug, not info: scanners and plain-HTTP probes would
                // otherwise fill the log at the rate they connect.
                Ok(Err(error)) => tracing::debug!(%remote, %error, "TLS handshake refused"),
                Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
            }
        });
    }
}

async fn reload_loop(files: MtlsFiles, mut loaded: Material, current: SharedConfig, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let material = match files.read() {
            Ok(material) if material == loaded => continue,
            Ok(material) => material,
            Err(error) => {
                tracing::warn!(%error, "cannot re-read the TLS files; serving the loaded ones");
                continue;
            }
        };
        match files.config(&material) {
            Ok(config) => {
                *current.write().unwrap_or_else(PoisonError::into_inner) = config;
                loaded = material;
                tracing::info!("TLS certificates reloaded");
            }
            // Often a rotation caught half-way (chain written, key not yet):
            // the next check sees the whole change.
            Err(error) => tracing::warn!(%error, "changed TLS files do not load; serving the loaded ones"),
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    const APP: &str = "spiffe://cluster.local/ns/default/sa/app";

    /// A self-signed certificate (the chain is the handshake's business, not
    /// this parser's) with `dns` and `uris` as SANs.
    fn certificate(dns: &[&str], uris: &[&str]) -> (Vec<u8>, String, String) {
        let mut params = CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params.subject_alt_names.push(SanType::URI((*uri).try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.der().to_vec(), cert.pem(), key.serialize_pem())
    }

    fn caller(dns: &[&str], uris: &[&str]) -> Result<CallerIdentity, IdentityError> {
        ClientCertificate::from_der(&certificate(dns, uris).0).caller("cluster.local")
    }

    #[test]
    fn the_caller_is_the_one_spiffe_uri_san() {
        let caller = caller(&["web-0.default.svc"], &[APP]).unwrap();
        assert_eq!((caller.namespace.as_str(), caller.service_account.as_str()), ("default", "app"));
        assert_eq!(caller.spiffe_id.as_str(), APP);
    }

    #[test]
    fn certificates_naming_no_one_several_or_a_stranger_are_refused() {
        assert_eq!(caller(&["web-0"], &[]), Err(IdentityError::NoUri));
        assert_eq!(caller(&[], &[APP, "spiffe://cluster.local/ns/default/sa/admin"]), Err(IdentityError::AmbiguousUri));
        assert!(matches!(
            caller(&[], &["spiffe://evil.example/ns/default/sa/app"]),
            Err(IdentityError::ForeignTrustDomain { .. })
        ));
        assert!(matches!(caller(&[], &["spiffe://cluster.local/app"]), Err(IdentityError::NotSpiffe { .. })));
        assert_eq!(
            ClientCertificate::from_der(b"\x30\x03\x02\x01\x01").caller("cluster.local"),
            Err(IdentityError::BadCertificate("not DER X.509"))
        );
    }

    #[test]
    fn unusable_files_say_which_file_and_why_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let (_, cert_pem, key_pem) = certificate(&["broker"], &[]);
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let files = MtlsFiles {
            certificate_chain: write("tls.crt", &cert_pem),
            private_key: write("tls.key", &key_pem),
            client_ca_bundle: write("ca.crt", &cert_pem),
        };
        assert!(files.load().is_ok());

        let missing = MtlsFiles { private_key: dir.join("absent.key"), ..files.clone() };
        let error = missing.load().unwrap_err().to_string();
        assert!(error.starts_with("cannot read ") && error.contains("absent.key"), "{error}");

        let no_key = MtlsFiles { private_key: write("cert-as-key.key", &cert_pem), ..files.clone() };
        let error = no_key.load().unwrap_err().to_string();
        assert!(error.contains("cert-as-key.key") && error.contains("private key"), "{error}");
        assert!(!error.contains("BEGIN"), "{error}");

        let empty_bundle = MtlsFiles { client_ca_bundle: write("empty.crt", ""), ..files.clone() };
        assert!(matches!(empty_bundle.load(), Err(TlsError::NoCertificate { .. })));

        let (_, _, other_key) = certificate(&["other"], &[]);
        let mismatched = MtlsFiles { private_key: write("other.key", &other_key), ..files };
        assert!(matches!(mismatched.load(), Err(TlsError::Rustls(_))), "a key that is not the certificate's");
    }
}
