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

/// Why a broker's 200 body was not a credential we can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadCredential {
    NotJson(String),
    NotSuccess,
    WrongType,
    Empty(&'static str),
    BadTimestamp(&'static str),
}

impl fmt::Display for BadCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson(e) => write!(f, "credential document is not valid JSON: {e}"),
            Self::NotSuccess => f.write_str("credential document Code is not \"Success\""),
            Self::WrongType => f.write_str("credential document Type is not \"AWS-HMAC\""),
            Self::Empty(field) => write!(f, "credential document field {field} is empty"),
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
        let doc: Document = serde_json::from_slice(body).map_err(|e| BadCredential::NotJson(e.to_string()))?;
        if doc.code != "Success" {
            return Err(BadCredential::NotSuccess);
        }
        if doc.kind != "AWS-HMAC" {
            return Err(BadCredential::WrongType);
        }
        for (field, value) in
            [("AccessKeyId", &doc.access_key_id), ("SecretAccessKey", &doc.secret_access_key), ("Token", &doc.token)]
        {
            if value.is_empty() {
                return Err(BadCredential::Empty(field));
            }
        }
        parse_utc(&doc.last_updated).ok_or(BadCredential::BadTimestamp("LastUpdated"))?;
        let expires_at_ms = parse_utc(&doc.expiration).ok_or(BadCredential::BadTimestamp("Expiration"))?;
        let body = serde_json::to_vec_pretty(&doc).map_err(|e| BadCredential::NotJson(e.to_string()))?;
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
            ("not json".to_owned(), "not valid JSON"),
            (ok.replace("\"Success\"", "\"Failure\""), "Code"),
            (ok.replace("AWS-HMAC", "AWS-OTHER"), "Type"),
            (ok.replace("ASIAEXAMPLE", ""), "AccessKeyId"),
            (ok.replace("secret/key", ""), "SecretAccessKey"),
            (ok.replace("session+token", ""), "Token"),
            (ok.replace("2027-01-15T11:00:00Z", "2027-01-15T11:00:00+01:00"), "Expiration"),
            (ok.replace("2027-01-15T11:00:00Z", "tomorrow"), "Expiration"),
            (ok.replace("2027-01-15T10:00:00Z", ""), "LastUpdated"),
            (ok.replace(r#""Token":"session+token","#, ""), "missing field `Token`"),
        ] {
            let err = Credential::from_broker(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
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
