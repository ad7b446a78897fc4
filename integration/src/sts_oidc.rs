//! What AWS STS checks before it answers `AssumeRoleWithWebIdentity`, put
//! in front of moto (which checks no token): the web identity token must be
//! signed by a key the cluster publishes (`/openid/v1/jwks` of the real API
//! server, found through its OIDC discovery document, as STS finds an
//! identity provider's keys), name the cluster's issuer and the audience
//! `sts.amazonaws.com`, be unexpired, and be bound (`kubernetes.io`) to a
//! pod. AWS cannot see a cluster's pods; this side also asks the API server
//! itself (TokenReview) whether the token is still valid, so a token of a
//! deleted pod is refused too, as it would be by the API server.
//!
//! A refused request gets STS's own error (`InvalidIdentityToken` or
//! `ExpiredTokenException`, 400) and never reaches moto. Other actions pass
//! through untouched. Verified claims and refusals are kept for tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde_json::Value;
use tokio::task::JoinHandle;

use crate::Req;

/// The audience AWS STS accepts from an EKS-style identity provider.
pub const AUDIENCE: &str = "sts.amazonaws.com";

/// A verifying front for an STS endpoint; stops serving on drop.
pub struct OidcFront {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// What the front saw: the claims it accepted and why it refused others.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub accepted: Vec<Value>,
    /// `"<STS error code>: <reason>"`, in order.
    pub refused: Vec<String>,
}

struct Shared {
    upstream: SocketAddr,
    issuer: String,
    keys: JwkSet,
    cluster: kube::Client,
    seen: Mutex<Seen>,
}

impl OidcFront {
    /// Serves on a free loopback port in front of the STS at `upstream`,
    /// trusting the issuer and keys that `cluster` (an admin client of the
    /// API server) publishes.
    pub async fn start(cluster: kube::Client, upstream: SocketAddr) -> Self {
        let discovery = get_json(&cluster, "/.well-known/openid-configuration").await;
        let issuer = discovery["issuer"].as_str().unwrap_or_else(|| panic!("no issuer in {discovery}")).to_owned();
        // STS fetches `jwks_uri`; its host is the API server's external
        // address, so the same client reaches it by its path.
        let jwks_uri = discovery["jwks_uri"].as_str().unwrap_or_else(|| panic!("no jwks_uri in {discovery}"));
        let jwks_path = jwks_uri.parse::<http::Uri>().map(|u| u.path().to_owned()).unwrap_or_else(|e| panic!("{e}"));
        let keys: JwkSet =
            serde_json::from_value(get_json(&cluster, &jwks_path).await).unwrap_or_else(|e| panic!("JWKS: {e}"));
        let shared = Arc::new(Shared { upstream, issuer, keys, cluster, seen: Mutex::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let app = Router::new().fallback(handle).with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What has been accepted and refused so far.
    pub fn seen(&self) -> Seen {
        self.shared.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for OidcFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn get_json(client: &kube::Client, path: &str) -> Value {
    let request = http::Request::get(path).body(Vec::new()).unwrap_or_else(|e| panic!("{e}"));
    let text = client.request_text(request).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
}

async fn handle(State(shared): State<Arc<Shared>>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "").into_response();
    };
    let field =
        |name: &str| form_urlencoded::parse(&body).find(|(key, _)| key == name).map(|(_, value)| value.into_owned());
    if field("Action").as_deref() == Some("AssumeRoleWithWebIdentity") {
        let token = field("WebIdentityToken").unwrap_or_default();
        match shared.verify(&token).await {
            Ok(claims) => shared.seen().accepted.push(claims),
            Err(refusal) => {
                shared.seen().refused.push(format!("{}: {}", refusal.code, refusal.message));
                return refusal.into_response();
            }
        }
    }
    forward(shared.upstream, &parts.method, parts.uri.path(), &parts.headers, body).await
}

impl Shared {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The token's claims if STS (and the cluster) would accept it.
    async fn verify(&self, token: &str) -> Result<Value, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| Refusal::invalid(format!("not a JWT: {e}")))?;
        if !matches!(header.alg, Algorithm::ES256 | Algorithm::RS256) {
            return Err(Refusal::invalid(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let jwk = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.find(kid))
            .ok_or_else(|| Refusal::invalid("the token's key is not one the identity provider publishes"))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| Refusal::invalid(format!("unusable key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Refusal::expired(),
                ErrorKind::InvalidAudience => Refusal::invalid("Incorrect token audience"),
                ErrorKind::InvalidIssuer => Refusal::invalid("Incorrect token issuer"),
                _ => Refusal::invalid(format!("the token does not verify: {e}")),
            })?
            .claims;
        let pod = &claims["kubernetes.io"]["pod"];
        if pod["name"].as_str().is_none() || pod["uid"].as_str().is_none() {
            return Err(Refusal::invalid("the token is not bound to a pod"));
        }
        // The cluster's word on the binding: a token of a deleted (or
        // recreated) pod no longer authenticates.
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![AUDIENCE.into()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.cluster.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::invalid(format!("TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::invalid(format!(
                "the cluster no longer accepts the token: {}",
                status.error.unwrap_or_default()
            )));
        }
        Ok(claims)
    }
}

/// An STS error reply.
struct Refusal {
    code: &'static str,
    message: String,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Self {
        Self { code: "InvalidIdentityToken", message: message.into() }
    }

    fn expired() -> Self {
        Self { code: "ExpiredTokenException", message: "Token expired".into() }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let message = self.message.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let xml = format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
             <Code>{}</Code><Message>{message}</Message></Error><RequestId>imds-mesh-oidc-front</RequestId>\
             </ErrorResponse>",
            self.code
        );
        (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/xml")], xml).into_response()
    }
}

/// Sends the request on to the STS at `upstream` unchanged and relays the
/// answer.
async fn forward(
    upstream: SocketAddr,
    method: &http::Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let mut request = Req::new(method.as_str(), path).host(&upstream.to_string());
    for (name, value) in headers {
        if !matches!(*name, header::HOST | header::CONTENT_LENGTH | header::CONNECTION | header::TRANSFER_ENCODING) {
            request = request.header(name.as_str(), value.to_str().unwrap_or_default());
        }
    }
    let reply = request.body(body.to_vec()).send(upstream).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = reply.header("content-type").unwrap_or("text/xml").to_owned();
    (status, [(header::CONTENT_TYPE, content_type)], reply.body).into_response()
}
