//! The STS client: `AssumeRoleWithWebIdentity` with a Kubernetes
//! service-account token, through `aws-sdk-sts`.
//!
//! The operation is unsigned (the token is the proof), so the client has no
//! AWS credentials at all: the SDK's model gives this operation only the
//! `noAuth` scheme (`DefaultAuthSchemeResolver`'s operation overrides in
//! `aws-sdk-sts`), and with no credentials provider configured nothing could
//! sign by accident either. HTTPS is rustls on ring; aws-lc is never built.
//!
//! Errors are [`StsError`]: a pure mapping ([`StsError::from_code`]) from
//! the STS error code to what the v1 contract answers (denied 403,
//! throttled 429, anything else 502 naming the code), plus transport
//! failures under codes of our own (`Timeout`, `Unreachable`, ...).
//!
//! Secrecy: the web identity token is never part of an error (messages are
//! scrubbed of it and bounded), and [`Credentials`] redacts itself. The SDK's
//! `trace` output describes each request it transmits; nothing promises that
//! stays free of the form body (which holds the token), so the broker caps the
//! SDK's crates below `trace` whatever its log filter says.

use std::fmt;
use std::time::Duration;

use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::config::retry::RetryConfig;
use aws_sdk_sts::config::timeout::TimeoutConfig;
use aws_sdk_sts::config::{BehaviorVersion, Region};
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role_with_web_identity::{
    AssumeRoleWithWebIdentityError, AssumeRoleWithWebIdentityOutput,
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use time::OffsetDateTime;

use crate::cache::{Expiring, FailedAt, FetchError, FetchErrorKind};
use crate::session::{self, InvalidRequest};

/// Default time to set up a TCP and TLS connection to STS.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Default time one STS call may take, connection included. STS answers in
/// well under a second; this leaves the rest of the cache's
/// [`FETCH_TIMEOUT`](crate::cache::FETCH_TIMEOUT) (30 s) to the TokenRequest
/// and makes "STS down" an error the filter sees quickly.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest error message kept from STS or the transport. STS messages are a
/// sentence; anything longer is not worth a log line or a 502 body.
const MAX_MESSAGE: usize = 256;

/// Longest error code taken as is; a longer or odd one becomes `Unknown`.
const MAX_CODE: usize = 64;

/// How to reach STS and what to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsConfig {
    /// The STS region (regional endpoints: `sts.<region>.amazonaws.com`).
    pub region: String,
    /// Overrides the endpoint, e.g. `http://127.0.0.1:5000` for moto.
    pub endpoint_url: Option<String>,
    /// `DurationSeconds` of every session, 900..=43200.
    pub duration_seconds: u32,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_OPERATION_TIMEOUT`].
    pub operation_timeout: Duration,
}

impl StsConfig {
    /// A config for `region` with one-hour sessions, the default endpoint and
    /// the default timeouts.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            duration_seconds: 3600,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        }
    }
}

/// An STS client that exchanges web identity tokens for role credentials.
/// Cheap to clone; clones share one connection pool.
#[derive(Debug, Clone)]
pub struct StsClient {
    client: aws_sdk_sts::Client,
    duration_seconds: i32,
}

impl StsClient {
    /// Builds the client; fails only if `duration_seconds` is outside what
    /// STS allows. The endpoint URL is checked by the SDK on the first call.
    pub fn new(config: StsConfig) -> Result<Self, InvalidRequest> {
        let duration = session::validate_duration(config.duration_seconds)?;
        // validate_duration bounds it to 43200, well inside i32.
        let duration_seconds = i32::try_from(duration).map_err(|_| InvalidRequest::Duration(duration))?;

        let http_client =
            aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .operation_timeout(config.operation_timeout)
            .build();
        let mut builder = aws_sdk_sts::Config::builder()
            // Pinned rather than `latest()`, so an SDK upgrade cannot change
            // defaults (retries, timeouts) under us silently.
            .behavior_version(BehaviorVersion::v2026_01_12())
            .region(Region::new(config.region))
            .http_client(http_client)
            .timeout_config(timeouts)
            // No SDK retries: the cache is the one place that retries, with
            // per-key jittered backoff, Retry-After and a global rate limit.
            // SDK retries beneath it would multiply STS load exactly when
            // STS throttles, and hide the throttle from the cache.
            .retry_config(RetryConfig::disabled());
        // Deliberately no credentials provider: see the module docs.
        if let Some(url) = config.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        Ok(Self { client: aws_sdk_sts::Client::from_conf(builder.build()), duration_seconds })
    }

    /// The configured `DurationSeconds`.
    pub fn duration_seconds(&self) -> u32 {
        self.duration_seconds.unsigned_abs()
    }

    /// Exchanges `web_identity_token` for credentials of `role_arn`. The ARN
    /// is checked first, so a malformed one costs no STS call.
    pub async fn assume_role_with_web_identity(
        &self,
        role_arn: &str,
        session_name: &str,
        web_identity_token: &str,
    ) -> Result<Credentials, StsError> {
        session::validate_role_arn(role_arn)?;
        let output = self
            .client
            .assume_role_with_web_identity()
            .role_arn(role_arn)
            .role_session_name(session_name)
            .web_identity_token(web_identity_token)
            .duration_seconds(self.duration_seconds)
            .send()
            .await
            .map_err(|error| StsError::from_sdk(&error, web_identity_token))?;
        credentials(&output).map_err(|message| StsError::Failed { code: "InvalidResponse".into(), message })
    }
}

/// Temporary AWS credentials as STS returned them.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// When STS says they stop working.
    pub expiration: OffsetDateTime,
    /// When the broker received them: the IMDS document's `LastUpdated`.
    pub last_updated: OffsetDateTime,
}

impl fmt::Debug for Credentials {
    // All three strings are redacted: the secret and token are secrets, and
    // the key ID is kept out too so the log test's rule ("no key, secret or
    // token in any line") needs no exceptions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &"<redacted>")
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .field("last_updated", &self.last_updated)
            .finish()
    }
}

impl Expiring for Credentials {
    fn expiration(&self) -> OffsetDateTime {
        self.expiration
    }
}

/// The credentials in a successful answer. Public for the fuzz targets
/// (`fuzz/`), which feed it the SDK's parse of arbitrary STS answers.
pub fn credentials(output: &AssumeRoleWithWebIdentityOutput) -> Result<Credentials, String> {
    let Some(sts) = output.credentials() else {
        return Err("the answer holds no Credentials".into());
    };
    // The SDK fills a required field the XML lacks with "": such a key could
    // sign nothing, and the filter refuses a document with an empty field.
    for (field, value) in [
        ("AccessKeyId", sts.access_key_id()),
        ("SecretAccessKey", sts.secret_access_key()),
        ("SessionToken", sts.session_token()),
    ] {
        if value.is_empty() {
            return Err(format!("the answer's Credentials have no {field}"));
        }
    }
    let expiration = OffsetDateTime::from_unix_timestamp_nanos(sts.expiration().as_nanos())
        .map_err(|_| "Expiration is out of range".to_owned())?;
    Ok(Credentials {
        access_key_id: sts.access_key_id().to_owned(),
        secret_access_key: sts.secret_access_key().to_owned(),
        session_token: sts.session_token().to_owned(),
        expiration,
        last_updated: OffsetDateTime::now_utc(),
    })
}

/// Why an exchange failed. `Display` and `Debug` never contain the web
/// identity token or credentials: messages are scrubbed and bounded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// The role's trust policy refuses this identity (`AccessDenied`): the
    /// pod asked for a role that does not trust it. Answered 403.
    #[error("STS denied the role: {code}: {message}")]
    AccessDenied { code: String, message: String },
    /// STS asks us to slow down. Answered 429 with `Retry-After`.
    #[error("STS throttled the request: {code}: {message}")]
    Throttled { code: String, message: String, retry_after: Option<Duration> },
    /// Anything else: an STS error that is not the pod's doing (a token STS
    /// cannot verify, an unreachable identity provider), STS unreachable, a
    /// timeout, an unreadable answer. Answered 502 naming `code`.
    #[error("STS call failed: {code}: {message}")]
    Failed { code: String, message: String },
    /// A parameter STS would refuse, caught before calling it. The server
    /// checks requests before they reach the cache, so this is a backstop.
    #[error("not sent to STS: {0}")]
    InvalidRequest(#[from] InvalidRequest),
}

/// Codes that mean "this identity may not use this role": the role's trust
/// policy (its `sub`/`aud` conditions or its federated principal) said no.
/// That is a fact about the pod's request, so it is the pod's 403.
///
/// Deliberately not here:
/// - `InvalidIdentityToken`: STS could not verify the token (no OIDC
///   provider for the cluster's issuer in the account, wrong audience, bad
///   signature). The broker minted that token; the pod cannot fix it, and
///   the operator must, so it is a 502 naming the code.
/// - `ExpiredTokenException`: the token the broker just minted expired
///   (clock skew, a stalled call); retrying with a new one can succeed.
/// - `IDPRejectedClaim`, `IDPCommunicationError`: about the identity
///   provider, not the role; the latter is transient.
const DENIED_CODES: &[&str] = &["AccessDenied", "AccessDeniedException"];

/// Codes that mean "slow down" (the query protocol's `Throttling`, and the
/// spellings other AWS protocols and the SDK's retry classifier use).
const THROTTLING_CODES: &[&str] =
    &["Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"];

/// Every code [`StsError::metric_label`] passes through; anything else is
/// `Other`. STS's own codes for this operation, then ours.
const KNOWN_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "InvalidIdentityToken",
    "ExpiredTokenException",
    "IDPRejectedClaim",
    "IDPCommunicationError",
    "RegionDisabledException",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "ValidationError",
    "InvalidParameterValue",
    "InternalFailure",
    "ServiceUnavailable",
    // Ours: failures without an STS code.
    "Timeout",
    "Unreachable",
    "ResponseError",
    "ConstructionFailure",
    "InvalidResponse",
    "InvalidRequest",
    "Unknown",
];

impl StsError {
    /// Maps an STS error code to its meaning (pure; see [`DENIED_CODES`]
    /// for why each code lands where it does). `message` should already be
    /// scrubbed of secrets; it is bounded here.
    pub fn from_code(code: &str, message: &str, retry_after: Option<Duration>) -> Self {
        let code = clean_code(code);
        let message = bounded(message);
        if DENIED_CODES.contains(&code.as_str()) {
            Self::AccessDenied { code, message }
        } else if THROTTLING_CODES.contains(&code.as_str()) {
            Self::Throttled { code, message, retry_after }
        } else {
            Self::Failed { code, message }
        }
    }

    /// The STS error code (or one of ours for failures without one):
    /// what the 502 contract message names. Not bounded in variety; use
    /// [`Self::metric_label`] for metrics.
    pub fn code(&self) -> &str {
        match self {
            Self::AccessDenied { code, .. } | Self::Throttled { code, .. } | Self::Failed { code, .. } => code,
            Self::InvalidRequest(_) => "InvalidRequest",
        }
    }

    /// [`Self::code`] if it is one we know, else `Other`: a metrics label
    /// whose values are bounded whatever an endpoint answers.
    pub fn metric_label(&self) -> &'static str {
        let code = self.code();
        KNOWN_CODES.iter().find(|known| **known == code).copied().unwrap_or("Other")
    }

    /// What the cache records and schedules by.
    pub fn fetch_error(&self) -> FetchError {
        let (kind, retry_after) = match self {
            Self::AccessDenied { .. } => (FetchErrorKind::Denied, None),
            Self::Throttled { retry_after, .. } => (FetchErrorKind::Throttled, *retry_after),
            Self::Failed { .. } | Self::InvalidRequest(_) => (FetchErrorKind::Failed, None),
        };
        FetchError {
            kind,
            retry_after,
            failed_at: FailedAt::Sts { code: self.code().to_owned() },
            detail: self.to_string(),
        }
    }

    /// What a failed SDK call means, its messages scrubbed of `token` and
    /// bounded. Public for the fuzz targets (`fuzz/`).
    pub fn from_sdk(error: &SdkError<AssumeRoleWithWebIdentityError, HttpResponse>, token: &str) -> Self {
        let failed = |code: &str| {
            let message = scrub(&DisplayErrorContext(error).to_string(), token);
            Self::Failed { code: code.into(), message: bounded(&message) }
        };
        match error {
            SdkError::ServiceError(context) => {
                let service = context.err();
                let retry_after = retry_after(context.raw());
                match service.code() {
                    Some(code) => Self::from_code(code, &scrub(service.message().unwrap_or(""), token), retry_after),
                    None => failed("Unknown"),
                }
            }
            SdkError::TimeoutError(_) => failed("Timeout"),
            SdkError::DispatchFailure(dispatch) if dispatch.is_timeout() => failed("Timeout"),
            SdkError::DispatchFailure(_) => failed("Unreachable"),
            SdkError::ResponseError(_) => failed("ResponseError"),
            SdkError::ConstructionFailure(_) => failed("ConstructionFailure"),
            _ => failed("Unknown"),
        }
    }
}

/// The `Retry-After` of a raw response, in seconds (STS itself does not
/// send one today; a proxy in front of it may).
fn retry_after(response: &HttpResponse) -> Option<Duration> {
    let value = response.headers().get("retry-after")?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// `code` if it looks like an error code, else `Unknown`, so an endpoint
/// cannot put arbitrary text where a code belongs.
fn clean_code(code: &str) -> String {
    let plausible = !code.is_empty()
        && code.len() <= MAX_CODE
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if plausible { code.to_owned() } else { "Unknown".to_owned() }
}

/// `text` without any copy of `token`.
fn scrub(text: &str, token: &str) -> String {
    if token.is_empty() { text.to_owned() } else { text.replace(token, "<redacted>") }
}

/// At most [`MAX_MESSAGE`] characters on one line.
fn bounded(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_MESSAGE).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if text.chars().nth(MAX_MESSAGE).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_an_empty_credential_field_is_refused() {
        // What the SDK makes of `<Credentials>` missing `<AccessKeyId>`
        // (found by `fuzz/fuzz_targets/broker_sts_response.rs`).
        let answer = |key: &str, secret: &str, token: &str| {
            let sts = aws_sdk_sts::types::Credentials::builder()
                .access_key_id(key)
                .secret_access_key(secret)
                .session_token(token)
                .expiration(aws_sdk_sts::primitives::DateTime::from_secs(1_800_000_000))
                .build()
                .expect("all fields set");
            AssumeRoleWithWebIdentityOutput::builder().credentials(sts).build()
        };
        assert!(credentials(&answer("ASIAEXAMPLE", "secret", "token")).is_ok());
        for (key, secret, token, field) in [
            ("", "secret", "token", "AccessKeyId"),
            ("ASIAEXAMPLE", "", "token", "SecretAccessKey"),
            ("ASIAEXAMPLE", "secret", "", "SessionToken"),
        ] {
            let error = credentials(&answer(key, secret, token)).expect_err("kept an empty field");
            assert!(error.contains(field), "{error}");
        }
    }

    #[test]
    fn access_denied_is_the_pods_denial() {
        let error =
            StsError::from_code("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity", None);
        assert!(matches!(error, StsError::AccessDenied { .. }), "{error:?}");
        assert_eq!(error.code(), "AccessDenied");
        assert_eq!(error.metric_label(), "AccessDenied");
        let fetch = error.fetch_error();
        assert_eq!((fetch.kind, fetch.retry_after), (FetchErrorKind::Denied, None));
        assert_eq!(
            fetch.detail,
            "STS denied the role: AccessDenied: Not authorized to perform sts:AssumeRoleWithWebIdentity"
        );
    }

    #[test]
    fn throttling_codes_are_throttled_and_keep_retry_after() {
        for code in ["Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"] {
            let error = StsError::from_code(code, "Rate exceeded", Some(Duration::from_secs(7)));
            assert!(matches!(error, StsError::Throttled { .. }), "{error:?}");
            assert_eq!(error.code(), code);
            assert_eq!(error.metric_label(), code);
            let fetch = error.fetch_error();
            assert_eq!((fetch.kind, fetch.retry_after), (FetchErrorKind::Throttled, Some(Duration::from_secs(7))));
        }
    }

    #[test]
    fn token_and_identity_provider_errors_are_failures_not_denials() {
        for code in [
            "InvalidIdentityToken",
            "ExpiredTokenException",
            "IDPRejectedClaim",
            "IDPCommunicationError",
            "RegionDisabledException",
            "ValidationError",
        ] {
            let error = StsError::from_code(code, "message", None);
            assert!(matches!(error, StsError::Failed { .. }), "{code}: {error:?}");
            assert_eq!(error.code(), code);
            assert_eq!(error.metric_label(), code);
            assert_eq!(error.fetch_error().kind, FetchErrorKind::Failed);
        }
    }

    #[test]
    fn unknown_codes_fail_and_are_labelled_other() {
        let error = StsError::from_code("SomethingNew", "message", None);
        assert_eq!(error.code(), "SomethingNew");
        assert_eq!(error.metric_label(), "Other");
        assert_eq!(error.fetch_error().kind, FetchErrorKind::Failed);
    }

    #[test]
    fn implausible_codes_become_unknown() {
        for code in ["", "Access Denied", "<script>", &"A".repeat(65), "Denied\nInjected"] {
            let error = StsError::from_code(code, "message", None);
            assert_eq!(error.code(), "Unknown", "{code:?}");
            assert_eq!(error.metric_label(), "Unknown");
        }
    }

    #[test]
    fn messages_are_bounded_to_one_line() {
        let error = StsError::from_code("InvalidIdentityToken", &format!("line\nbreak {}", "x".repeat(10_000)), None);
        let shown = error.to_string();
        assert!(shown.len() < MAX_MESSAGE + 64, "{}", shown.len());
        assert!(!shown.contains('\n') && shown.ends_with("..."), "{shown}");
    }

    #[test]
    fn scrub_removes_every_copy_of_the_token() {
        assert_eq!(scrub("a TOKEN b TOKEN", "TOKEN"), "a <redacted> b <redacted>");
        assert_eq!(scrub("nothing", ""), "nothing");
    }

    #[test]
    fn invalid_request_is_a_local_failure() {
        let error = StsError::from(InvalidRequest::RoleArn("unknown partition"));
        assert_eq!(error.code(), "InvalidRequest");
        assert_eq!(error.metric_label(), "InvalidRequest");
        assert_eq!(error.fetch_error().kind, FetchErrorKind::Failed);
        assert_eq!(error.to_string(), "not sent to STS: role_arn is not an IAM role ARN: unknown partition");
    }

    #[test]
    fn client_refuses_a_duration_sts_would_refuse() {
        let config = StsConfig { duration_seconds: 899, ..StsConfig::new("us-east-1") };
        assert_eq!(StsClient::new(config).unwrap_err(), InvalidRequest::Duration(899));
        let client = StsClient::new(StsConfig { duration_seconds: 43_200, ..StsConfig::new("us-east-1") }).unwrap();
        assert_eq!(client.duration_seconds(), 43_200);
    }

    #[test]
    fn credentials_debug_never_shows_the_strings() {
        let credentials = Credentials {
            access_key_id: "ASIAEXAMPLEKEYID".into(),
            secret_access_key: "wJalrXUtnFEMIsecret".into(),
            session_token: "FwoGZXIvYXdzEtoken".into(),
            expiration: OffsetDateTime::UNIX_EPOCH,
            last_updated: OffsetDateTime::UNIX_EPOCH,
        };
        let shown = format!("{credentials:?} {credentials:#?}");
        for secret in ["ASIAEXAMPLEKEYID", "wJalrXUtnFEMIsecret", "FwoGZXIvYXdzEtoken"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("expiration"));
    }
}
