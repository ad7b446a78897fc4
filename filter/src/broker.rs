//! The filter's side of the broker contract (v1): the request it sends and
//! how it reads every answer.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use crate::arn::RoleArn;
use crate::cache::FetchResult;
use crate::credentials::Credential;
use crate::policy::Failure;

/// Query values keep only RFC 3986 unreserved characters unescaped.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `:path` of the credential request for `role` on behalf of `pod`. The
/// namespace and service account are never sent: the broker takes them from
/// the caller's verified mesh identity.
pub fn request_path(role: &RoleArn, pod: &str) -> String {
    format!(
        "/v1/credentials?role_arn={}&pod={}",
        utf8_percent_encode(role.as_str(), QUERY_VALUE),
        utf8_percent_encode(pod, QUERY_VALUE)
    )
}

/// `:authority` of the credential request for `role`: a name for the role
/// under the broker's own (`r-<16 hex digits of SHA-256(role ARN)>.<broker
/// authority>`). Envoy hashes a wasm `httpCall` on its `:authority` (it has
/// no route, so no route hash policy applies; Envoy's
/// `source/extensions/common/wasm/context.cc`): with the broker cluster's
/// ring hash, every sidecar's fetches for one role reach one replica, and
/// roles spread over the replicas. The broker's sidecar accepts any host.
pub fn request_authority(role: &RoleArn, broker_authority: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let digest = Sha256::digest(role.as_str().as_bytes());
    let mut authority = String::with_capacity(19 + broker_authority.len());
    authority.push_str("r-");
    for byte in &digest[..8] {
        let _ = write!(authority, "{byte:02x}");
    }
    authority.push('.');
    authority.push_str(broker_authority);
    authority
}

/// The broker's answer, as the host reports it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// `:status`; `None` when the call produced no response.
    pub status: Option<u32>,
    pub retry_after: Option<&'a [u8]>,
    pub body: &'a [u8],
}

/// Reads a broker answer per the contract table.
pub fn read_answer(answer: Answer<'_>) -> FetchResult {
    let Some(status) = answer.status else {
        return Err((Failure::Unavailable, None));
    };
    match Failure::from_status(status) {
        None => Credential::from_broker(answer.body).map_err(|e| {
            log::warn!("broker sent an unusable credential: {e}");
            (Failure::Malformed, None)
        }),
        Some(failure) => {
            let retry_after_ms = answer.retry_after.and_then(parse_retry_after);
            log::warn!("broker answered {status} ({}): {}", failure.label(), error_summary(answer.body));
            Err((failure, retry_after_ms))
        }
    }
}

/// `Retry-After` in delta-seconds, as milliseconds. The HTTP-date form is
/// not used by the broker and is ignored (the default backoff applies).
pub fn parse_retry_after(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let seconds: u64 = text.parse().ok()?;
    Some(seconds.saturating_mul(1000))
}

/// `Code: Message` of a contract error body, bounded for a log line and kept
/// on it (control characters, line breaks included, become spaces, so a body
/// cannot forge log lines). Error bodies carry no secrets by contract;
/// anything else is not echoed.
pub fn error_summary(body: &[u8]) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct ErrorBody {
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => {
            let mut text: String =
                format!("{}: {}", e.code, e.message).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            if let Some((cut, _)) = text.char_indices().nth(300) {
                text.truncate(cut);
            }
            text
        }
        Err(_) => format!("non-contract body of {} bytes", body.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::tests::broker_body;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn answer(status: u32, body: &[u8]) -> FetchResult {
        read_answer(Answer { status: Some(status), retry_after: Some(b"7"), body })
    }

    #[test]
    fn each_role_has_an_authority_of_its_own_under_the_brokers() {
        let role = |arn: &str| RoleArn::parse(arn).unwrap();
        let broker = "token-broker.imds-mesh.svc.cluster.local";
        let app = request_authority(&role("arn:aws:iam::123456789012:role/app"), broker);
        assert!(app.starts_with("r-") && app.ends_with(&format!(".{broker}")), "{app}");
        assert_eq!(app.len(), "r-".len() + 16 + 1 + broker.len());
        assert!(app[2..18].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{app}");
        // Stable for a role, different across roles.
        assert_eq!(app, request_authority(&role("arn:aws:iam::123456789012:role/app"), broker));
        assert_ne!(app, request_authority(&role("arn:aws:iam::123456789012:role/other"), broker));
    }

    #[test]
    fn request_names_role_and_pod_percent_encoded() {
        let role = RoleArn::parse("arn:aws:iam::123456789012:role/team/app+x").unwrap();
        assert_eq!(
            request_path(&role, "web-0"),
            "/v1/credentials?role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fteam%2Fapp%2Bx&pod=web-0"
        );
    }

    #[test]
    fn every_contract_status_maps_to_its_failure() {
        let error = br#"{"Code":"AccessDenied","Message":"no"}"#;
        assert!(answer(200, &broker_body("2027-01-15T11:00:00Z")).is_ok());
        assert_eq!(answer(200, b"{}").unwrap_err(), (Failure::Malformed, None));
        assert_eq!(answer(400, error).unwrap_err(), (Failure::Invalid, Some(7000)));
        assert_eq!(answer(401, error).unwrap_err().0, Failure::Unauthenticated);
        assert_eq!(answer(403, error).unwrap_err().0, Failure::Denied);
        assert_eq!(answer(404, error).unwrap_err().0, Failure::PodNotFound);
        assert_eq!(answer(429, error).unwrap_err(), (Failure::Throttled, Some(7000)));
        assert_eq!(answer(502, error).unwrap_err().0, Failure::StsError);
        assert_eq!(answer(503, b"upstream connect error").unwrap_err().0, Failure::Unavailable);
        assert_eq!(answer(504, b"").unwrap_err().0, Failure::Timeout);
        assert_eq!(
            read_answer(Answer { status: None, retry_after: None, body: b"" }).unwrap_err().0,
            Failure::Unavailable
        );
    }

    #[test]
    fn retry_after_takes_delta_seconds_only() {
        assert_eq!(parse_retry_after(b"30"), Some(30_000));
        assert_eq!(parse_retry_after(b" 2 "), Some(2000));
        assert_eq!(parse_retry_after(b"Wed, 21 Oct 2026 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(b"-1"), None);
    }

    #[test]
    fn error_summary_is_bounded_and_ignores_foreign_bodies() {
        assert_eq!(
            error_summary(br#"{"Code":"StsError","Message":"InvalidIdentityToken"}"#),
            "StsError: InvalidIdentityToken"
        );
        let long = format!(r#"{{"Code":"X","Message":"{}"}}"#, "m".repeat(1000));
        assert_eq!(error_summary(long.as_bytes()).len(), 300);
        assert_eq!(error_summary(b"<html>secret</html>"), "non-contract body of 19 bytes");
    }

    #[test]
    fn an_error_body_cannot_break_the_log_line() {
        let forged = br#"{"Code":"Unavailable","Message":"retry\n[critical] forged line\r\u001b[2J"}"#;
        assert_eq!(error_summary(forged), "Unavailable: retry [critical] forged line  [2J");
    }
}
