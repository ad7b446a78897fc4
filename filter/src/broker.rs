//! The filter's side of the broker contract (v1): the request it sends and
//! how it reads every answer.

use crate::arn::RoleArn;
use crate::cache::FetchResult;
use crate::credentials::Credential;
use crate::hex;
use crate::json::{self, Value};
use crate::policy::Failure;

/// `:path` of the credential request for `role` on behalf of `pod`. The
/// namespace and service account are never sent: the broker takes them from
/// the caller's verified mesh identity.
pub fn request_path(role: &RoleArn, pod: &str) -> String {
    let mut path = String::with_capacity(48 + role.as_str().len() * 2 + pod.len());
    path.push_str("/v1/credentials?role_arn=");
    push_query_value(&mut path, role.as_str());
    path.push_str("&pod=");
    push_query_value(&mut path, pod);
    path
}

/// Appends `value` percent-encoded for a query: only RFC 3986's unreserved
/// characters stay as they are.
fn push_query_value(out: &mut String, value: &str) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let [high, low] = hex::pair(byte, hex::UPPER);
            out.push('%');
            out.push(char::from(high));
            out.push(char::from(low));
        }
    }
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
    let digest = Sha256::digest(role.as_str().as_bytes());
    let mut authority = String::with_capacity(19 + broker_authority.len());
    authority.push_str("r-");
    hex::push_lower(&mut authority, &digest[..8]);
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
    let seconds: u64 = std::str::from_utf8(value.trim_ascii()).ok()?.parse().ok()?;
    Some(seconds.saturating_mul(1000))
}

/// `Code: Message` of a contract error body, bounded for a log line and kept
/// on it (control characters, line breaks included, become spaces, so a body
/// cannot forge log lines). Error bodies carry no secrets by contract;
/// anything else is not echoed.
pub fn error_summary(body: &[u8]) -> String {
    let member = |members: &[(String, Value)], name: &str| {
        members.iter().find(|(n, _)| n == name).and_then(|(_, value)| value.as_str().map(str::to_owned))
    };
    let (code, message) = match json::parse(body) {
        Ok(Value::Object(members)) => (member(&members, "Code"), member(&members, "Message")),
        _ => (None, None),
    };
    let Some(code) = code else {
        return format!("non-contract body of {} bytes", body.len());
    };
    let mut text: String = format!("{code}: {}", message.unwrap_or_default())
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if let Some((cut, _)) = text.char_indices().nth(300) {
        text.truncate(cut);
    }
    text
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
    fn query_values_are_encoded_as_the_percent_encoding_crate_encodes_them() {
        use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
        const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
        let every_ascii: String = (0..128u8).map(char::from).collect();
        for value in [every_ascii.as_str(), "arn:aws:iam::123456789012:role/team/app+x", "pod é 😀", ""] {
            let mut ours = String::new();
            push_query_value(&mut ours, value);
            assert_eq!(ours, utf8_percent_encode(value, UNRESERVED).to_string(), "{value:?}");
        }
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
