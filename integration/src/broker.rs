//! A scripted broker speaking the filter-to-broker contract (v1), for
//! tests that need the broker to misbehave on cue. It records every call.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::task::JoinHandle;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Scripted {
    /// A v1 success: the IMDS credential document, expiring `lifetime` from
    /// now, with keys that name the call (`ASIAHARNESS000003` for call 3).
    pub fn credentials_for(lifetime: Duration, call: usize) -> Self {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
        let expiration = now + lifetime;
        let format = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        let body = serde_json::json!({
            "Code": "Success",
            "LastUpdated": format(now),
            "Type": "AWS-HMAC",
            "AccessKeyId": access_key_id(call),
            "SecretAccessKey": format!("harness-secret-{call}"),
            "Token": format!("harness-session-token-{call}"),
            "Expiration": format(expiration),
        });
        Self {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    /// A v1 failure with its JSON body.
    pub fn error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({ "Code": code, "Message": message }).to_string();
        Self { status, headers: vec![("content-type".into(), "application/json".into())], body, delay: Duration::ZERO }
    }

    /// Answer only after `delay`.
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// The access key id of the credential served by call `n`.
pub fn access_key_id(call: usize) -> String {
    format!("ASIAHARNESS{call:06}")
}

/// What the broker saw of one call.
#[derive(Debug, Clone)]
pub struct BrokerCall {
    /// When the call arrived.
    pub at: std::time::Instant,
    pub query: String,
    pub headers: HeaderMap,
}

type Script = Box<dyn FnMut(usize) -> Scripted + Send>;

struct Shared {
    calls: Mutex<Vec<BrokerCall>>,
    script: Mutex<Script>,
}

/// A running scripted broker.
pub struct ScriptedBroker {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ScriptedBroker {
    /// Starts a broker answering call `n` (from 0) with `script(n)`.
    pub async fn start(script: impl FnMut(usize) -> Scripted + Send + 'static) -> Self {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind broker: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let shared = Arc::new(Shared { calls: Mutex::new(Vec::new()), script: Mutex::new(Box::new(script)) });
        let app = Router::new().fallback(answer).with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, shared, task }
    }

    /// Replaces the script; later calls keep their numbering.
    pub fn script(&self, script: impl FnMut(usize) -> Scripted + Send + 'static) {
        if let Ok(mut current) = self.shared.script.lock() {
            *current = Box::new(script);
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Calls received so far.
    pub fn calls(&self) -> Vec<BrokerCall> {
        self.shared.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn call_count(&self) -> usize {
        self.calls().len()
    }
}

impl Drop for ScriptedBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery, headers: HeaderMap) -> Response {
    let scripted = {
        let mut calls = match shared.calls.lock() {
            Ok(calls) => calls,
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        };
        let n = calls.len();
        calls.push(BrokerCall { at: std::time::Instant::now(), query: query.unwrap_or_default(), headers });
        match shared.script.lock() {
            Ok(mut script) => script(n),
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    };
    tokio::time::sleep(scripted.delay).await;
    let mut response =
        (StatusCode::from_u16(scripted.status).unwrap_or(StatusCode::IM_A_TEAPOT), scripted.body).into_response();
    for (name, value) in &scripted.headers {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), axum::http::HeaderValue::from_str(value))
        {
            response.headers_mut().insert(name, value);
        }
    }
    response
}
