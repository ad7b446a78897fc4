//! A scripted STS endpoint, for what moto will not do on cue: throttle,
//! deny, hang. It answers in the real STS query-protocol error format and
//! counts the requests that reach it.
//!
//! It is the [`ScriptedBroker`] server (any path, scripted status, headers
//! and body, every call recorded) with STS's error bodies.

use std::net::SocketAddr;
use std::time::Duration;

use crate::broker::{BrokerCall, Scripted, ScriptedBroker};

/// A running scripted STS.
pub struct ScriptedSts {
    server: ScriptedBroker,
}

impl ScriptedSts {
    /// Starts an STS answering request `n` (from 0) with `script(n)`.
    pub async fn start(script: impl FnMut(usize) -> Scripted + Send + 'static) -> Self {
        Self { server: ScriptedBroker::start(script).await }
    }

    /// Starts an STS that answers every request with the same error.
    pub async fn always(reply: Scripted) -> Self {
        Self::start(move |_| reply.clone()).await
    }

    /// `http://127.0.0.1:<port>`: the endpoint URL to give an STS client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.server.call_count()
    }

    /// What each request carried (query and headers).
    pub fn requests(&self) -> Vec<BrokerCall> {
        self.server.calls()
    }
}

/// An STS error reply exactly as STS sends one: HTTP 400 (403 for
/// `AccessDenied`, as STS does), `text/xml`, an `ErrorResponse` document
/// with `Type`, `Code`, `Message` and a `RequestId`.
pub fn error(code: &str, message: &str) -> Scripted {
    let status = if code == "AccessDenied" { 403 } else { 400 };
    error_with_status(status, code, message)
}

/// [`error`] with a chosen HTTP status.
pub fn error_with_status(status: u16, code: &str, message: &str) -> Scripted {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
    );
    Scripted { status, headers: vec![("content-type".into(), "text/xml".into())], body, delay: Duration::ZERO }
}
