//! AWS STS from PyPI `moto` in server mode: the real STS query protocol and
//! XML, on loopback. moto accepts unsigned requests and validates little
//! (no trust policy, any token); [`Sts::trusting`] puts the token checks
//! AWS makes in front of it ([`crate::sts_oidc`]), against a real API
//! server's published keys.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::http::Req;
use crate::kube_cluster::KubeCluster;
use crate::paths;
use crate::sts_oidc::{OidcFront, Seen};

/// The STS API version every query-protocol request names.
pub const STS_VERSION: &str = "2011-06-15";

/// A running moto server; killed on drop, its log printed if the test
/// panics.
pub struct Sts {
    child: Child,
    dir: Option<TempDir>,
    addr: SocketAddr,
    front: Option<OidcFront>,
}

impl Sts {
    /// Starts moto on a free loopback port and waits until it answers.
    pub async fn start() -> Self {
        let moto = paths::venv().join("bin/moto_server");
        assert!(moto.exists(), "{} is missing: run `just setup`", moto.display());
        let dir = tempfile::Builder::new().prefix("imds-mesh-sts-").tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap_or_else(|e| panic!("{e}"));
        let log_err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let port = free_port();
        let child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", moto.display()));
        let mut sts = Self { child, dir: Some(dir), addr: SocketAddr::from(([127, 0, 0, 1], port)), front: None };
        // moto's own API answers 200 once the WSGI app is up.
        let log = sts.log_path().unwrap_or_default();
        crate::process::until_answering(&mut sts.child, "moto (STS)", &log, sts.addr, "/moto-api/").await;
        sts
    }

    /// moto behind the checks AWS STS makes of a web identity token, with
    /// `cluster` as the identity provider (its issuer and published keys).
    pub async fn trusting(cluster: &KubeCluster) -> Self {
        let mut sts = Self::start().await;
        sts.front = Some(OidcFront::start(cluster.admin(), sts.addr).await);
        sts
    }

    /// `http://127.0.0.1:<port>`: the endpoint URL to give an STS client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Where STS clients connect: the token checks if any, else moto.
    pub fn addr(&self) -> SocketAddr {
        self.front.as_ref().map_or(self.addr, OidcFront::addr)
    }

    /// The web identity tokens accepted and refused so far (none without
    /// [`Self::trusting`]).
    pub fn seen(&self) -> Seen {
        self.front.as_ref().map(OidcFront::seen).unwrap_or_default()
    }

    /// Sends an unsigned `AssumeRoleWithWebIdentity` (query protocol, as
    /// the SDKs send it) and returns the raw reply.
    pub async fn assume_role_with_web_identity(&self, role_arn: &str, session_name: &str, token: &str) -> crate::Reply {
        let addr = self.addr();
        assume_role_with_web_identity(role_arn, session_name, token).host(&addr.to_string()).send(addr).await
    }

    /// Everything moto has logged so far.
    pub fn log(&self) -> String {
        self.log_path().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Where moto logs.
    pub fn log_path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.path().join("moto.log"))
    }
}

impl Drop for Sts {
    fn drop(&mut self) {
        crate::process::stop(&mut self.child, &mut self.dir, "moto.log", "moto (STS)");
    }
}

/// An unsigned `AssumeRoleWithWebIdentity` request in the STS query
/// protocol: a form-encoded POST to `/`.
pub fn assume_role_with_web_identity(role_arn: &str, session_name: &str, token: &str) -> Req {
    let body = form(&[
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", STS_VERSION),
        ("RoleArn", role_arn),
        ("RoleSessionName", session_name),
        ("WebIdentityToken", token),
    ]);
    Req::new("POST", "/").header("Content-Type", "application/x-www-form-urlencoded; charset=utf-8").body(body)
}

/// The text of the first `<name>` element in an STS XML reply (enough for
/// the flat, namespace-free elements STS answers with).
pub fn xml_element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(&xml[start..end])
}

fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

pub(crate) fn free_port() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    socket.local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("{e}"))
}
