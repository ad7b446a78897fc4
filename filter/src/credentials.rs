//! The IMDS credential document: validated once when it arrives from the
//! broker, then kept as the exact bytes every request is answered with.

use std::fmt;

use time::{Date, Month, PrimitiveDateTime, Time};

use crate::json::{self, Value};

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
    /// The body was not JSON. The error says where, never quotes the body
    /// (which holds secrets).
    NotJson(json::Error),
    NotAnObject,
    TooLarge,
    Missing(&'static str),
    /// A field given twice: which one counts would be a guess.
    Duplicate(&'static str),
    NotAString(&'static str),
    NotSuccess,
    WrongType,
    Empty(&'static str),
    TooLong(&'static str),
    BadTimestamp(&'static str),
}

impl fmt::Display for BadCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (field, problem) = match self {
            Self::NotJson(e) => return write!(f, "credential document: {e}"),
            Self::NotAnObject => return f.write_str("credential document is not a JSON object"),
            Self::TooLarge => return write!(f, "credential document is over {MAX_DOCUMENT_LEN} bytes"),
            Self::NotSuccess => ("Code", "is not \"Success\""),
            Self::WrongType => ("Type", "is not \"AWS-HMAC\""),
            Self::Missing(field) => (*field, "is missing"),
            Self::Duplicate(field) => (*field, "appears more than once"),
            Self::NotAString(field) => (*field, "is not a string"),
            Self::Empty(field) => (*field, "is empty"),
            Self::TooLong(field) => (*field, "is longer than allowed"),
            Self::BadTimestamp(field) => (*field, "is not an RFC 3339 UTC time ending in Z"),
        };
        write!(f, "credential document field {field} {problem}")
    }
}

/// The document's fields in the order IMDS prints them.
const FIELDS: [&str; 7] = ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"];

impl Credential {
    /// Validates a broker response body and renders the body apps receive.
    pub fn from_broker(body: &[u8]) -> Result<Self, BadCredential> {
        if body.len() > MAX_DOCUMENT_LEN {
            return Err(BadCredential::TooLarge);
        }
        let Value::Object(members) = json::parse(body).map_err(BadCredential::NotJson)? else {
            return Err(BadCredential::NotAnObject);
        };
        // Fields other than these seven are ignored, as SDKs ignore them.
        let mut doc = [""; FIELDS.len()];
        for (slot, field) in doc.iter_mut().zip(FIELDS) {
            *slot = string_field(&members, field)?;
        }
        let [code, last_updated, kind, access_key_id, secret_access_key, token, expiration] = doc;
        if code != "Success" {
            return Err(BadCredential::NotSuccess);
        }
        if kind != "AWS-HMAC" {
            return Err(BadCredential::WrongType);
        }
        // Code and Type must equal one value each, which bounds them too.
        for (field, value, max) in [
            ("AccessKeyId", access_key_id, MAX_ACCESS_KEY_ID_LEN),
            ("SecretAccessKey", secret_access_key, MAX_SECRET_ACCESS_KEY_LEN),
            ("Token", token, MAX_TOKEN_LEN),
            ("LastUpdated", last_updated, MAX_TIME_LEN),
            ("Expiration", expiration, MAX_TIME_LEN),
        ] {
            if value.is_empty() {
                return Err(BadCredential::Empty(field));
            }
            if value.len() > max {
                return Err(BadCredential::TooLong(field));
            }
        }
        parse_utc(last_updated).ok_or(BadCredential::BadTimestamp("LastUpdated"))?;
        let expires_at_ms = parse_utc(expiration).ok_or(BadCredential::BadTimestamp("Expiration"))?;
        Ok(Self { expires_at_ms, body: render(&doc) })
    }

    /// Encodes for proxy-wasm shared data: expiry (little-endian, as the
    /// VM stores it), then the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.body.len());
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes what [`Credential::encode`] wrote; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (expiry, body) = bytes.split_first_chunk::<8>()?;
        Some(Self { expires_at_ms: u64::from_le_bytes(*expiry), body: body.to_vec() })
    }
}

/// The one string value of `field` among the document's members.
fn string_field<'a>(members: &'a [(String, Value)], field: &'static str) -> Result<&'a str, BadCredential> {
    let mut values = members.iter().filter(|(name, _)| name == field).map(|(_, value)| value);
    let value = values.next().ok_or(BadCredential::Missing(field))?;
    if values.next().is_some() {
        return Err(BadCredential::Duplicate(field));
    }
    value.as_str().ok_or(BadCredential::NotAString(field))
}

/// The document as IMDS serves it: pretty-printed, in IMDS's field order.
fn render(values: &[&str; FIELDS.len()]) -> Vec<u8> {
    let mut body = Vec::with_capacity(128 + values.iter().map(|v| v.len()).sum::<usize>());
    body.push(b'{');
    for (i, (field, value)) in FIELDS.iter().zip(values).enumerate() {
        body.extend_from_slice(if i == 0 { b"\n  " } else { b",\n  " });
        json::push_string(&mut body, field);
        body.extend_from_slice(b": ");
        json::push_string(&mut body, value);
    }
    body.extend_from_slice(b"\n}");
    body
}

/// Unix milliseconds of a UTC time as IMDS and the broker contract write
/// it: RFC 3339's `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (the fraction 1 to 9
/// digits), from 1970 on. `time` checks the calendar; the fixed layout is
/// read here, as `time`'s general RFC 3339 parser (offsets, leap seconds,
/// lowercase separators) cost the module 8 KB for forms no STS answer has.
fn parse_utc(text: &str) -> Option<u64> {
    let text = text.strip_suffix('Z')?;
    let (date_time, fraction) = match text.split_once('.') {
        Some((date_time, fraction)) => (date_time, Some(fraction)),
        None => (text, None),
    };
    let [y1, y2, y3, y4, b'-', m1, m2, b'-', d1, d2, b'T', h1, h2, b':', n1, n2, b':', s1, s2] = *date_time.as_bytes()
    else {
        return None;
    };
    let number = |digits: &[u8]| -> Option<u32> {
        digits.iter().try_fold(0, |n, &d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    };
    let nanos = match fraction {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) => number(f.as_bytes())? * 10u32.pow(9 - f.len() as u32),
        Some(_) => return None,
    };
    let month = Month::try_from(u8::try_from(number(&[m1, m2])?).ok()?).ok()?;
    let year = i32::try_from(number(&[y1, y2, y3, y4])?).ok()?;
    let date = Date::from_calendar_date(year, month, u8::try_from(number(&[d1, d2])?).ok()?).ok()?;
    let [hour, minute, second] = [[h1, h2], [n1, n2], [s1, s2]].map(|d| number(&d).and_then(|n| u8::try_from(n).ok()));
    let time = Time::from_hms_nano(hour?, minute?, second?, nanos).ok()?;
    let seconds = u64::try_from(PrimitiveDateTime::new(date, time).assume_utc().unix_timestamp()).ok()?;
    Some(seconds * 1000 + u64::from(nanos / 1_000_000))
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
    fn the_served_document_is_pretty_printed_and_escaped_where_json_needs_it() {
        let body = broker_body("2027-01-15T11:00:00Z");
        let escaped = String::from_utf8(body).unwrap().replace("secret/key", r"secret\/key\u0041\\");
        let credential = Credential::from_broker(escaped.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(credential.body).unwrap(),
            "{\n  \"Code\": \"Success\",\n  \"LastUpdated\": \"2027-01-15T10:00:00Z\",\n  \"Type\": \"AWS-HMAC\",\n  \
             \"AccessKeyId\": \"ASIAEXAMPLE\",\n  \"SecretAccessKey\": \"secret/keyA\\\\\",\n  \
             \"Token\": \"session+token\",\n  \"Expiration\": \"2027-01-15T11:00:00Z\"\n}"
        );
    }

    #[test]
    fn invalid_documents_are_refused_with_the_reason() {
        let ok = String::from_utf8(broker_body("2027-01-15T11:00:00Z")).unwrap();
        for (body, want) in [
            ("not json".to_owned(), "not JSON at byte 1"),
            (ok.replace("\"Success\"", "\"Failure\""), "Code"),
            (ok.replace("AWS-HMAC", "AWS-OTHER"), "Type"),
            (ok.replace("ASIAEXAMPLE", ""), "AccessKeyId"),
            (ok.replace("secret/key", ""), "SecretAccessKey"),
            (ok.replace("session+token", ""), "Token"),
            (ok.replace("2027-01-15T11:00:00Z", "2027-01-15T11:00:00+01:00"), "Expiration"),
            (ok.replace("2027-01-15T11:00:00Z", "tomorrow"), "Expiration"),
            (ok.replace("2027-01-15T10:00:00Z", ""), "LastUpdated"),
            (ok.replace(r#""Token":"session+token","#, ""), "Token is missing"),
            (ok.replace(r#""Token":"session+token","#, r#""Token":"a","Token":"b","#), "Token appears more than once"),
            (ok.replace(r#""session+token""#, "null"), "Token is not a string"),
            ("[]".to_owned(), "not a JSON object"),
        ] {
            let err = Credential::from_broker(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }

    #[test]
    fn a_json_error_names_its_kind_never_the_body() {
        let ok = String::from_utf8(broker_body("2027-01-15T11:00:00Z")).unwrap();
        let numeric = ok.replace(r#""secret/key""#, "12345678901234");
        let err = Credential::from_broker(numeric.as_bytes()).unwrap_err();
        assert_eq!(err, BadCredential::NotAString("SecretAccessKey"));
        assert!(!err.to_string().contains("12345678901234"), "{err}");
        let truncated = &ok.as_bytes()[..ok.len() / 2];
        let err = Credential::from_broker(truncated).unwrap_err();
        assert!(matches!(err, BadCredential::NotJson(json::Error { kind: json::ErrorKind::Eof, .. })), "{err:?}");
        let syntax = ok.replace(r#""secret/key""#, "secret-in-the-clear");
        let err = Credential::from_broker(syntax.as_bytes()).unwrap_err();
        assert!(matches!(err, BadCredential::NotJson(json::Error { kind: json::ErrorKind::Syntax, .. })), "{err:?}");
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
    fn times_are_read_in_the_contracts_utc_form_only() {
        use time::OffsetDateTime;
        use time::format_description::well_known::Rfc3339;
        let rfc3339_ms = |text: &str| {
            let at = OffsetDateTime::parse(text, &Rfc3339).unwrap();
            u64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap()
        };
        for ok in [
            "2027-01-15T11:00:00Z",
            "1970-01-01T00:00:00Z",
            "2028-02-29T23:59:59Z",
            "2027-01-15T11:00:00.5Z",
            "2027-01-15T11:00:00.123456789Z",
            "9999-12-31T23:59:59.999Z",
        ] {
            assert_eq!(parse_utc(ok), Some(rfc3339_ms(ok)), "{ok}");
        }
        assert_eq!(parse_utc("2027-01-15T11:00:00.0019Z"), Some(1_800_010_800_001));
        for bad in [
            "2027-02-29T00:00:00Z",
            "2027-13-01T00:00:00Z",
            "2027-00-01T00:00:00Z",
            "2027-01-32T00:00:00Z",
            "2027-01-15T24:00:00Z",
            "2027-01-15T23:60:00Z",
            "2027-01-15T23:59:60Z",
            "1969-12-31T23:59:59Z",
            "2027-01-15t11:00:00Z",
            "2027-01-15T11:00:00z",
            "2027-01-15T11:00:00+00:00",
            "2027-01-15 11:00:00Z",
            "2027-01-15T11:00:00.Z",
            "2027-01-15T11:00:00.1234567890Z",
            "2027-01-15T11:00:00.-1Z",
            "+027-01-15T11:00:00Z",
            "2027-1-15T11:00:00Z",
            "2027-01-15T11:00Z",
            "",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
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
