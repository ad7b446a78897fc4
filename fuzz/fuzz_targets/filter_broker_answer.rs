//! The broker's answer as the filter reads it: `broker::read_answer`
//! (status, `Retry-After`, body), `Credential::from_broker`,
//! `parse_retry_after` and `error_summary`.
//!
//! Invariants: a credential comes only from a 200 whose body is the
//! contract's document (Code `Success`, Type `AWS-HMAC`, every field
//! present, non-empty and within its bound, both times RFC 3339 UTC), and
//! its expiry is the document's `Expiration`; the served body is the same
//! document (re-reading it gives the same credential) and its `Debug` shows
//! no secret; any other status is a failure, with `Retry-After` read only as
//! delta-seconds; an error summary stays within 300 characters.
#![no_main]

use imds_filter::broker::{self, Answer};
use imds_filter::credentials::{
    Credential, MAX_ACCESS_KEY_ID_LEN, MAX_DOCUMENT_LEN, MAX_SECRET_ACCESS_KEY_LEN, MAX_TIME_LEN, MAX_TOKEN_LEN,
};
use imds_filter::policy::Failure;
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `<status>[ <Retry-After>]\n<body>`: a status that is not a number is
/// "no response"; the body is the rest, newlines included.
struct Input<'a> {
    status: Option<u32>,
    retry_after: Option<&'a [u8]>,
    body: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Self {
        let (head, body) = match data.iter().position(|&b| b == b'\n') {
            Some(at) => (&data[..at], &data[at + 1..]),
            None => (data, &b""[..]),
        };
        let (status, retry_after) = match head.iter().position(|&b| b == b' ') {
            Some(at) => (&head[..at], Some(&head[at + 1..])),
            None => (head, None),
        };
        let status = std::str::from_utf8(status).ok().and_then(|s| s.parse().ok());
        Self { status, retry_after, body }
    }
}

fn utc_ms(text: &str) -> Option<u64> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok().filter(|_| text.ends_with('Z'))?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let status = input.status;
    let answer = Answer { status, retry_after: input.retry_after, body: input.body };
    match broker::read_answer(answer) {
        Ok(credential) => {
            assert_eq!(status, Some(200));
            assert!(input.body.len() <= MAX_DOCUMENT_LEN);
            let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(input.body).unwrap();
            let field = |name: &str| doc.get(name).and_then(|v| v.as_str()).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(field("Code"), "Success");
            assert_eq!(field("Type"), "AWS-HMAC");
            for (name, max) in [
                ("AccessKeyId", MAX_ACCESS_KEY_ID_LEN),
                ("SecretAccessKey", MAX_SECRET_ACCESS_KEY_LEN),
                ("Token", MAX_TOKEN_LEN),
                ("LastUpdated", MAX_TIME_LEN),
                ("Expiration", MAX_TIME_LEN),
            ] {
                assert!((1..=max).contains(&field(name).len()), "{name} of {} bytes", field(name).len());
            }
            assert!(utc_ms(field("LastUpdated")).is_some());
            assert_eq!(Some(credential.expires_at_ms), utc_ms(field("Expiration")));
            // What is served reads back as the same credential.
            assert_eq!(Credential::from_broker(&credential.body), Ok(credential.clone()));
            let served: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&credential.body).unwrap();
            let keys: Vec<&str> = served.keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 7, "served document has fields {keys:?}");
            for key in keys {
                assert_eq!(served.get(key), doc.get(key), "served {key} differs from the broker's");
            }
            // A secret of a few characters can appear in any text; longer
            // ones must not appear in the Debug output.
            let debug = format!("{credential:?}");
            for secret in [field("SecretAccessKey"), field("Token")] {
                assert!(secret.len() < 8 || !debug.contains(secret), "{debug}");
            }
            assert_eq!(Credential::decode(&credential.encode()), Some(credential));
        }
        Err((failure, retry_after_ms)) => match status.and_then(Failure::from_status) {
            None => {
                assert!(status.is_none() || failure == Failure::Malformed, "{status:?} gave {failure:?}");
                assert_eq!(retry_after_ms, None);
            }
            Some(expected) => {
                assert_eq!(failure, expected);
                let delta = input
                    .retry_after
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|t| t.trim_matches([' ', '\t', '\n', '\x0c', '\r']).parse::<u64>().ok());
                assert_eq!(retry_after_ms, delta.map(|s| s.saturating_mul(1000)));
            }
        },
    }
    if let Some(value) = input.retry_after {
        let _ = broker::parse_retry_after(value);
    }
    let summary = broker::error_summary(input.body);
    assert!(summary.chars().count() <= 300 || summary.starts_with("non-contract body"), "{} chars", summary.len());
});
