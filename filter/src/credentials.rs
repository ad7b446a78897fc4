//! The IMDS credential document: validated once when it arrives from the
//! broker, then kept as the exact bytes every request is answered with.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A credential ready to serve: its expiry and the response body, built once
/// per refresh so the request path only copies bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// Unix milliseconds at which AWS stops accepting the credential.
    pub expires_at_ms: u64,
    /// The IMDS JSON document, as served.
    pub body: Vec<u8>,
}

/// The longest broker body read as a credential document: the largest
/// fields below plus the JSON around them, with room to spare.
pub const MAX_DOCUMENT_LEN: usize = 32 * 1024;
/// `AccessKeyId`: STS documents 16 to 128 characters (today's are 20).
pub const MAX_ACCESS_KEY_ID_LEN: usize = 128;
/// `SecretAccessKey`: 40 characters today; STS documents no bound, so a
/// generous one.
pub const MAX_SECRET_ACCESS_KEY_LEN: usize = 256;
/// `Token`: STS session tokens are a few hundred bytes to a few KB (session
/// policies and tags make them longer; STS names no fixed size). 16 KiB is
/// four times the longest seen, and bounds what every worker copies.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// `LastUpdated` and `Expiration`: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` is 30
/// characters, the longest RFC 3339 UTC time with nanoseconds.
pub const MAX_TIME_LEN: usize = 30;

/// Why a broker's 200 body was not a credential we can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadCredential {
    /// The body was not the document; only the kind of error is kept, as
    /// `serde_json`'s message can quote the body (and so a secret).
    NotJson(&'static str),
    TooLarge,
    NotSuccess,
    WrongType,
    Empty(&'static str),
    TooLong(&'static str),
    BadTimestamp(&'static str),
}

impl fmt::Display for BadCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson(kind) => write!(f, "credential document is not the contract's JSON ({kind} error)"),
            Self::TooLarge => write!(f, "credential document is over {MAX_DOCUMENT_LEN} bytes"),
            Self::NotSuccess => f.write_str("credential document Code is not \"Success\""),
            Self::WrongType => f.write_str("credential document Type is not \"AWS-HMAC\""),
            Self::Empty(field) => write!(f, "credential document field {field} is empty"),
            Self::TooLong(field) => write!(f, "credential document field {field} is longer than allowed"),
            Self::BadTimestamp(field) => {
                write!(f, "credential document field {field} is not an RFC 3339 UTC time ending in Z")
            }
        }
    }
}

/// The document's fields in the order IMDS prints them.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Document {
    code: String,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: String,
    access_key_id: String,
    secret_access_key: String,
    token: String,
    expiration: String,
}

impl Credential {
    /// Validates a broker response body and renders the body apps receive.
    pub fn from_broker(body: &[u8]) -> Result<Self, BadCredential> {
        if body.len() > MAX_DOCUMENT_LEN {
            return Err(BadCredential::TooLarge);
        }
        let doc: Document = serde_json::from_slice(body).map_err(|e| BadCredential::NotJson(json_error_kind(&e)))?;
        if doc.code != "Success" {
            return Err(BadCredential::NotSuccess);
        }
        if doc.kind != "AWS-HMAC" {
            return Err(BadCredential::WrongType);
        }
        // Code and Type must equal one value each, which bounds them too.
        for (field, value, max) in [
            ("AccessKeyId", &doc.access_key_id, MAX_ACCESS_KEY_ID_LEN),
            ("SecretAccessKey", &doc.secret_access_key, MAX_SECRET_ACCESS_KEY_LEN),
            ("Token", &doc.token, MAX_TOKEN_LEN),
            ("LastUpdated", &doc.last_updated, MAX_TIME_LEN),
            ("Expiration", &doc.expiration, MAX_TIME_LEN),
        ] {
            if value.is_empty() {
                return Err(BadCredential::Empty(field));
            }
            if value.len() > max {
                return Err(BadCredential::TooLong(field));
            }
        }
        parse_utc(&doc.last_updated).ok_or(BadCredential::BadTimestamp("LastUpdated"))?;
        let expires_at_ms = parse_utc(&doc.expiration).ok_or(BadCredential::BadTimestamp("Expiration"))?;
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| BadCredential::NotJson(json_error_kind(&e)))?;
        Ok(Self { expires_at_ms, body })
    }

    /// Encodes for proxy-wasm shared data: expiry, then the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.body.len());
        out.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes what [`Credential::encode`] wrote; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (expiry, body) = bytes.split_first_chunk::<8>()?;
        Some(Self { expires_at_ms: u64::from_be_bytes(*expiry), body: body.to_vec() })
    }
}

/// The kind of a `serde_json` error, never its message (which can quote
/// the input).
fn json_error_kind(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Io => "io",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "eof",
    }
}

/// Unix milliseconds of an RFC 3339 timestamp in UTC (`...Z`), as IMDS and
/// the broker contract write them.
fn parse_utc(text: &str) -> Option<u64> {
    if !text.ends_with('Z') {
        return None;
    }
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

impl fmt::Debug for Credential {
    // The body holds the secret key and session token: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential").field("expires_at_ms", &self.expires_at_ms).field("body", &"<redacted>").finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// A broker body as the v1 contract specifies it.
    pub(crate) fn broker_body(expiration: &str) -> Vec<u8> {
        format!(
            r#"{{"Code":"Success","LastUpdated":"2027-01-15T10:00:00Z","Type":"AWS-HMAC",
                "AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"secret/key","Token":"session+token",
                "Expiration":"{expiration}","Extra":"ignored"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn broker_document_is_served_in_imds_field_order() {
        let credential = Credential::from_broker(&broker_body("2027-01-15T11:00:00Z")).unwrap();
        assert_eq!(credential.expires_at_ms, 1_800_010_800_000);
        let text = String::from_utf8(credential.body).unwrap();
        let order: Vec<usize> =
            ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"]
                .iter()
                .map(|k| text.find(&format!("\"{k}\"")).unwrap())
                .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(!text.contains("Extra"));
    }

    #[test]
    fn invalid_documents_are_refused_with_the_reason() {
        let ok = String::from_utf8(broker_body("2027-01-15T11:00:00Z")).unwrap();
        for (body, want) in [
            ("not json".to_owned(), "syntax error"),
            (ok.replace("\"Success\"", "\"Failure\""), "Code"),
            (ok.replace("AWS-HMAC", "AWS-OTHER"), "Type"),
            (ok.replace("ASIAEXAMPLE", ""), "AccessKeyId"),
            (ok.replace("secret/key", ""), "SecretAccessKey"),
            (ok.replace("session+token", ""), "Token"),
            (ok.replace("2027-01-15T11:00:00Z", "2027-01-15T11:00:00+01:00"), "Expiration"),
            (ok.replace("2027-01-15T11:00:00Z", "tomorrow"), "Expiration"),
            (ok.replace("2027-01-15T10:00:00Z", ""), "LastUpdated"),
            (ok.replace(r#""Token":"session+token","#, ""), "data error"),
        ] {
            let err = Credential::from_broker(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }

    #[test]
    fn a_json_error_names_its_kind_never_the_body() {
        // serde_json's own message would quote the value: "invalid type:
        // integer `12345678901234`, expected a string".
        let ok = String::from_utf8(broker_body("2027-01-15T11:00:00Z")).unwrap();
        let numeric = ok.replace(r#""secret/key""#, "12345678901234");
        let err = Credential::from_broker(numeric.as_bytes()).unwrap_err();
        assert_eq!(err, BadCredential::NotJson("data"));
        assert!(!err.to_string().contains("12345678901234"), "{err}");
        let truncated = &ok.as_bytes()[..ok.len() / 2];
        assert_eq!(Credential::from_broker(truncated).unwrap_err(), BadCredential::NotJson("eof"));
        let syntax = ok.replace(r#""secret/key""#, "secret-in-the-clear");
        let err = Credential::from_broker(syntax.as_bytes()).unwrap_err();
        assert_eq!(err, BadCredential::NotJson("syntax"));
        assert!(!err.to_string().contains("secret-in-the-clear"), "{err}");
    }

    #[test]
    fn fields_longer_than_sts_issues_are_refused() {
        let ok = String::from_utf8(broker_body("2027-01-15T11:00:00Z")).unwrap();
        let long = |n| "A".repeat(n);
        for (from, field, max) in [
            ("ASIAEXAMPLE", "AccessKeyId", MAX_ACCESS_KEY_ID_LEN),
            ("secret/key", "SecretAccessKey", MAX_SECRET_ACCESS_KEY_LEN),
            ("session+token", "Token", MAX_TOKEN_LEN),
        ] {
            let at_max = ok.replace(from, &long(max));
            assert!(Credential::from_broker(at_max.as_bytes()).is_ok(), "{field} of {max} bytes is fine");
            let over = ok.replace(from, &long(max + 1));
            assert_eq!(Credential::from_broker(over.as_bytes()).unwrap_err(), BadCredential::TooLong(field));
        }
        let nanos = ok.replace("2027-01-15T11:00:00Z", "2027-01-15T11:00:00.123456789Z");
        assert!(Credential::from_broker(nanos.as_bytes()).is_ok(), "the longest RFC 3339 UTC time");
        let padded = ok.replace("2027-01-15T11:00:00Z", "2027-01-15T11:00:00.1234567890000Z");
        assert_eq!(Credential::from_broker(padded.as_bytes()).unwrap_err(), BadCredential::TooLong("Expiration"));
        let padded = ok.replace("2027-01-15T10:00:00Z", "2027-01-15T10:00:00.1234567890000Z");
        assert_eq!(Credential::from_broker(padded.as_bytes()).unwrap_err(), BadCredential::TooLong("LastUpdated"));
        let huge = ok.replace(r#""Extra":"ignored""#, &format!(r#""Extra":"{}""#, long(MAX_DOCUMENT_LEN)));
        assert_eq!(Credential::from_broker(huge.as_bytes()).unwrap_err(), BadCredential::TooLarge);
    }

    #[test]
    fn shared_data_encoding_round_trips() {
        let credential = Credential::from_broker(&broker_body("2027-01-15T11:00:00Z")).unwrap();
        assert_eq!(Credential::decode(&credential.encode()), Some(credential));
        assert_eq!(Credential::decode(b"short"), None);
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let credential = Credential::from_broker(&broker_body("2027-01-15T11:00:00Z")).unwrap();
        let printed = format!("{credential:?}");
        assert!(!printed.contains("secret/key") && !printed.contains("session+token"), "{printed}");
    }
}
