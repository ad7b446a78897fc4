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

/// A successful `AssumeRoleWithWebIdentity` answer as STS writes it, for
/// the service account `default/app`: access key `ASIASCRIPTED<call>`
/// (seven digits), an hour to live, sent after `delay`.
pub fn success(call: usize, delay: Duration) -> Scripted {
    use time::format_description::well_known::Rfc3339;
    let expiration = (time::OffsetDateTime::now_utc() + Duration::from_secs(3600)).replace_nanosecond(0);
    let expiration = expiration.map(|t| t.format(&Rfc3339).unwrap_or_default()).unwrap_or_default();
    let body = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <AssumeRoleWithWebIdentityResult>\
         <Credentials><AccessKeyId>ASIASCRIPTED{call:07}</AccessKeyId>\
         <SecretAccessKey>scripted-secret-access-key</SecretAccessKey>\
         <SessionToken>scripted-session-token</SessionToken>\
         <Expiration>{expiration}</Expiration></Credentials>\
         <SubjectFromWebIdentityToken>system:serviceaccount:default:app</SubjectFromWebIdentityToken>\
         <AssumedRoleUser><AssumedRoleId>AROA:default.app</AssumedRoleId>\
         <Arn>arn:aws:sts::123456789012:assumed-role/app/default.app</Arn></AssumedRoleUser>\
         </AssumeRoleWithWebIdentityResult>\
         <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>\
         </AssumeRoleWithWebIdentityResponse>"
    );
    Scripted { status: 200, headers: vec![("content-type".into(), "text/xml".into())], body, delay }
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
