//! STS answers as the broker handles them. The XML is parsed by
//! `aws-sdk-sts` itself (its `AssumeRoleWithWebIdentity` deserializer, run
//! here for real behind an HTTP client that returns the fuzzed answer);
//! what the broker adds is fuzzed on top: `sts::credentials` (what it keeps
//! of a successful answer), `fetch::credential_document` (the IMDS document
//! it serves), and `StsError::from_sdk` (what a failed answer means).
//!
//! Invariants: the web identity token never appears in an error; an error's
//! code is a plausible code or `Unknown`, its message one bounded line, and
//! it is a denial or a throttle only for those codes; a credential the
//! broker keeps renders to a document the filter's own parser accepts with
//! the same key, secret, token and expiry (to the second), unless a field is
//! over the filter's bounds or the expiry is before 1970; no field of a kept
//! credential is empty.
#![no_main]

use std::sync::{Mutex, OnceLock};

use aws_sdk_sts::config::retry::RetryConfig;
use aws_sdk_sts::config::{BehaviorVersion, Region};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use imds_filter::credentials::{Credential, MAX_ACCESS_KEY_ID_LEN, MAX_SECRET_ACCESS_KEY_LEN, MAX_TOKEN_LEN};
use libfuzzer_sys::fuzz_target;
use token_broker::fetch::credential_document;
use token_broker::sts::{self, StsError};

/// The web identity token the broker sends; must never be echoed back.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.fuzz-secret-sig";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/team/app";

/// `<status>[ <Retry-After seconds>]\n<body>`: the HTTP answer STS gives
/// (status 200 when the first line is not a status); the body is the rest.
struct Input {
    status: u16,
    retry_after: Option<u16>,
    body: Vec<u8>,
}

impl Input {
    fn parse(data: &[u8]) -> Self {
        let (head, body) = match data.iter().position(|&b| b == b'\n') {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (&b""[..], data),
        };
        let head = String::from_utf8_lossy(head);
        let mut words = head.split(' ');
        let status = words.next().and_then(|s| s.parse().ok()).filter(|s| (200..600).contains(s)).unwrap_or(200);
        let retry_after = words.next().and_then(|s| s.parse().ok());
        Self { status, retry_after, body: body.to_vec() }
    }
}

/// The answer the next call gets.
static ANSWER: Mutex<Option<Input>> = Mutex::new(None);

#[derive(Debug)]
struct Canned;

impl HttpConnector for Canned {
    fn call(&self, _request: HttpRequest) -> HttpConnectorFuture {
        let Input { status, retry_after, body } = ANSWER.lock().unwrap().take().expect("one answer per call");
        let mut response = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body));
        response.headers_mut().insert("content-type", "text/xml");
        if let Some(seconds) = retry_after {
            response.headers_mut().insert("retry-after", seconds.to_string());
        }
        HttpConnectorFuture::ready(Ok(response))
    }
}

impl HttpClient for Canned {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(Canned)
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    client: aws_sdk_sts::Client,
}

/// One client for the whole run, configured as `StsClient::new` does
/// (pinned behaviour version, no retries, no credentials), but on [`Canned`].
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let config = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::v2026_01_12())
            .region(Region::new("us-east-1"))
            .http_client(SharedHttpClient::new(Canned))
            .retry_config(RetryConfig::disabled())
            .build();
        Harness { runtime, client: aws_sdk_sts::Client::from_conf(config) }
    })
}

fn plausible_code(code: &str) -> bool {
    !code.is_empty() && code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let sent_retry_after = input.retry_after;
    *ANSWER.lock().unwrap() = Some(input);
    let harness = harness();
    let call = harness
        .client
        .assume_role_with_web_identity()
        .role_arn(ROLE_ARN)
        .role_session_name("team-app")
        .web_identity_token(TOKEN)
        .duration_seconds(3600)
        .send();
    match harness.runtime.block_on(call) {
        Ok(output) => {
            let Ok(credentials) = sts::credentials(&output) else { return };
            for field in [&credentials.access_key_id, &credentials.secret_access_key, &credentials.session_token] {
                assert!(!field.is_empty(), "the broker kept a credential with an empty field");
            }
            let document = credential_document(&credentials).to_string();
            let fits = |s: &str, max| s.len() <= max;
            let servable = fits(&credentials.access_key_id, MAX_ACCESS_KEY_ID_LEN)
                && fits(&credentials.secret_access_key, MAX_SECRET_ACCESS_KEY_LEN)
                && fits(&credentials.session_token, MAX_TOKEN_LEN)
                && credentials.expiration.unix_timestamp() >= 0;
            match Credential::from_broker(document.as_bytes()) {
                Ok(served) => {
                    let expiry = u64::try_from(credentials.expiration.unix_timestamp()).unwrap() * 1000;
                    assert_eq!(served.expires_at_ms, expiry);
                    let doc: serde_json::Value = serde_json::from_slice(&served.body).unwrap();
                    assert_eq!(doc["AccessKeyId"], credentials.access_key_id.as_str());
                    assert_eq!(doc["SecretAccessKey"], credentials.secret_access_key.as_str());
                    assert_eq!(doc["Token"], credentials.session_token.as_str());
                }
                Err(e) => assert!(!servable, "the broker kept a credential the filter refuses: {e}"),
            }
        }
        Err(error) => {
            let error = StsError::from_sdk(&error, TOKEN);
            let text = error.to_string();
            assert!(!text.contains(TOKEN), "the token leaked: {text}");
            assert!(!format!("{error:?}").contains(TOKEN), "the token leaked into Debug");
            let code = error.code();
            assert!(plausible_code(code), "code {code:?}");
            assert!(error.metric_label() == code || error.metric_label() == "Other");
            assert!(!text.chars().any(char::is_control), "message not one line: {text:?}");
            match &error {
                StsError::AccessDenied { .. } => assert!(["AccessDenied", "AccessDeniedException"].contains(&code)),
                StsError::Throttled { retry_after, .. } => {
                    assert!(code.contains("Throttl") || code.contains("Limit") || code.contains("TooMany"), "{code}");
                    assert_eq!(*retry_after, sent_retry_after.map(|s| std::time::Duration::from_secs(u64::from(s))));
                }
                StsError::Failed { message, .. } => assert!(message.chars().count() <= 256 + 3),
                StsError::InvalidRequest(_) => panic!("a valid request refused locally"),
            }
        }
    }
});
