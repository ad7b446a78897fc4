//! Who is calling: the caller's SPIFFE ID, read from the
//! `X-Forwarded-Client-Cert` (XFCC) element that the broker's own Istio
//! sidecar adds after it has checked the caller's mTLS certificate.
//!
//! Why only the last element can be trusted (DESIGN.md, "Trust model"): with
//! `forward_client_cert_details: APPEND_FORWARD`, Envoy removes XFCC from
//! requests that did not come over mTLS. On mTLS requests it appends one
//! element for the current connection to whatever XFCC the client sent. So
//! only the last element was written by our sidecar. Everything before it is
//! client-controlled and is never read for identity. The last element is
//! trusted only if its `By` is exactly the broker's own SPIFFE ID, which is the
//! URI in our sidecar's certificate.
//!
//! The whole header is parsed strictly, not just split at the last comma. A
//! client can end its part with an open quote (`Hash="`) so that our sidecar's
//! element falls inside a quoted value. A strict parse then fails instead of
//! guessing. The sidecar's element is either unquoted to the end (so the quote
//! is never closed), or its first `"` opens `Subject="`/`Cert="`. That `"`
//! would close the client's quote and be followed by a character that is not
//! a separator. Either way the header is refused. Whenever the parse succeeds,
//! its last element is the one our sidecar wrote.
//!
//! Grammar, from Envoy's `x-forwarded-client-cert` documentation and its
//! `ConnectionManagerUtility::mutateXfccRequestHeader`: elements are separated
//! by `,`, `key=value` pairs by `;`. Keys are case-insensitive (`By`, `Hash`,
//! `Cert`, `Chain`, `Subject`, `URI`, `DNS`). A value is either bare or
//! double-quoted, and inside quotes a backslash makes the next character
//! literal (`\"`, `\,`, `\;`, `\\`).
//!
//! Which source of identity the broker believes is its [`IdentityMode`]: its
//! own sidecar's XFCC element, the client certificate of its own TLS listener
//! ([`crate::tls`]), or, for local development only, plain headers.

use std::fmt;
use std::str::FromStr;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::error::BrokerError;
use crate::tls::ClientCertificate;

/// Largest XFCC header accepted, all lines together. Our sidecar's element is
/// about 200 bytes (`By`, `Hash`, `Subject=""`, `URI`). Anything near this
/// size is padding from a client, so it is refused before any work is done.
pub const MAX_XFCC_LEN: usize = 16 * 1024;

/// Longest SPIFFE ID the SPIFFE spec allows (SPIFFE-ID §2.4: 2048 bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest attacker-supplied value quoted in an error message, in characters.
const ECHO_LIMIT: usize = 100;

/// The SPIFFE ID of a Kubernetes workload in an Istio mesh:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parsing is strict and never normalises, so two IDs are equal exactly when
/// their URIs are equal byte for byte, and [`fmt::Display`] gives back the
/// parsed text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    /// End of the trust domain in `uri` (it starts after `spiffe://`).
    trust_domain_end: usize,
    /// Where the namespace is in `uri`.
    namespace: (usize, usize),
    /// Where the service account starts in `uri` (it runs to the end).
    service_account_start: usize,
}

/// Why a string is not a workload SPIFFE ID. The message does not repeat the
/// string, so the error can be logged without quoting attacker input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}")]
pub struct InvalidSpiffeId {
    reason: &'static str,
}

impl InvalidSpiffeId {
    /// What is wrong, in a few words.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

fn invalid(reason: &'static str) -> InvalidSpiffeId {
    InvalidSpiffeId { reason }
}

impl SpiffeId {
    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    ///
    /// - The trust domain is lowercase DNS-style: `a-z 0-9 . - _`, at most 253
    ///   characters, no empty dot-separated label.
    /// - The namespace is a DNS-1123 label, as Kubernetes requires for
    ///   namespace names.
    /// - The service account is a DNS-1123 subdomain, as Kubernetes requires
    ///   for ServiceAccount names.
    ///
    /// Anything else is refused, not repaired: uppercase letters, userinfo,
    /// ports, percent-encoding, `.`/`..` segments, extra or empty segments, a
    /// trailing slash, a query or a fragment. Two spellings of one identity
    /// would let one caller look like two (or two look like one) in caches
    /// and logs.
    pub fn parse(uri: &str) -> Result<Self, InvalidSpiffeId> {
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        // The scheme must be lowercase. SPIFFE-ID §2.1 allows no other spelling.
        let rest = uri.strip_prefix("spiffe://").ok_or(invalid("scheme is not spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or(invalid("no path after the trust domain"))?;
        check_trust_domain(trust_domain)?;

        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) =
            (segments.next(), segments.next(), segments.next(), segments.next(), segments.next())
        else {
            return Err(invalid("path is not exactly /ns/<namespace>/sa/<service-account>"));
        };
        if !is_dns1123_label(namespace) {
            return Err(invalid("namespace is not a Kubernetes name (DNS-1123 label)"));
        }
        if !is_dns1123_subdomain(service_account) {
            return Err(invalid("service account is not a Kubernetes name (DNS-1123 subdomain)"));
        }

        let trust_domain_end = "spiffe://".len() + trust_domain.len();
        let namespace_start = trust_domain_end + "/ns/".len();
        let namespace_end = namespace_start + namespace.len();
        Ok(Self {
            uri: uri.to_owned(),
            trust_domain_end,
            namespace: (namespace_start, namespace_end),
            service_account_start: namespace_end + "/sa/".len(),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.trust_domain_end]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[self.namespace.0..self.namespace.1]
    }

    /// The Kubernetes service account name.
    pub fn service_account(&self) -> &str {
        &self.uri[self.service_account_start..]
    }

    /// The full URI, exactly as parsed.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SpiffeId").field(&self.uri).finish()
    }
}

/// SPIFFE-ID §2.1 allows `a-z 0-9 . - _` in a trust domain. We also refuse
/// empty labels (`a..b`, a leading or trailing dot) and cap the length at the
/// DNS limit, because Istio trust domains are DNS names.
fn check_trust_domain(td: &str) -> Result<(), InvalidSpiffeId> {
    if td.is_empty() {
        return Err(invalid("empty trust domain"));
    }
    if td.len() > 253 {
        return Err(invalid("trust domain longer than 253 characters"));
    }
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
        return Err(invalid("trust domain has a character other than a-z 0-9 . - _"));
    }
    if td.split('.').any(str::is_empty) {
        return Err(invalid("trust domain has an empty label"));
    }
    Ok(())
}

/// Kubernetes `IsDNS1123Label`: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, 1..=63.
fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len())
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// Kubernetes `IsDNS1123Subdomain`: dot-separated DNS-1123 labels, 1..=253
/// in total. Each label must start and end with a letter or digit, so `.`,
/// `..` and `a.-b` are all refused.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    (1..=253).contains(&s.len()) && s.split('.').all(is_dns1123_label)
}

/// A verified caller: the mesh identity its sidecar presented to ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CallerIdentity {
    /// The caller's namespace, from its SPIFFE ID.
    pub namespace: String,
    /// The caller's service account, from its SPIFFE ID.
    pub service_account: String,
    /// The full SPIFFE ID, for logs.
    pub spiffe_id: SpiffeId,
}

/// Why the caller's identity could not be verified. The server answers every
/// variant with `401 Unauthenticated`. Messages quote at most
/// 100 characters of anything the request carried, escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No XFCC header (or only empty lines). Envoy removes it from requests
    /// that did not arrive over mTLS, so this is a plaintext or unmeshed
    /// caller, or a broker whose sidecar does not forward client certificates.
    #[error("no X-Forwarded-Client-Cert header: the caller did not come through the broker's sidecar over mTLS")]
    Missing,

    /// The header is larger than [`MAX_XFCC_LEN`].
    #[error("X-Forwarded-Client-Cert header is {len} bytes, more than the {MAX_XFCC_LEN} accepted")]
    TooLarge {
        /// Total length of all lines, joined.
        len: usize,
    },

    /// The header does not follow the XFCC grammar.
    #[error("malformed X-Forwarded-Client-Cert header: {0}")]
    Malformed(&'static str),

    /// The last element was not written by the broker's own sidecar: its `By`
    /// is missing or is not exactly the broker's SPIFFE ID.
    #[error("the last X-Forwarded-Client-Cert element was not added by the broker's own sidecar (By={})", echo_opt(.by))]
    NotFromOwnSidecar {
        /// The `By` value found, clipped.
        by: Option<String>,
    },

    /// The client certificate has no URI SAN (in xfcc mode: the sidecar's
    /// element names no `URI`).
    #[error("the caller's certificate names no URI")]
    NoUri,

    /// The client certificate has more than one URI SAN (in xfcc mode: the
    /// sidecar's element has several `URI`s), and we cannot tell which one
    /// is the caller.
    #[error("the caller's certificate names more than one URI")]
    AmbiguousUri,

    /// mtls mode: the request did not arrive on a connection whose client
    /// certificate the broker verified (a plain listener).
    #[error("no verified client certificate on this connection")]
    NoClientCertificate,

    /// mtls mode: the verified client certificate could not be read.
    #[error("the caller's certificate cannot be parsed: {0}")]
    BadCertificate(&'static str),

    /// The client URI is not a workload SPIFFE ID.
    #[error("caller URI {} is not a workload SPIFFE ID: {reason}", echo(.uri))]
    NotSpiffe {
        /// The URI found, clipped.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The caller is in another trust domain than the one configured.
    #[error("caller is in trust domain {}, not the configured one", echo(.trust_domain))]
    ForeignTrustDomain {
        /// The caller's trust domain, clipped.
        trust_domain: String,
    },
}

impl IdentityError {
    /// A stable, low-cardinality name for metrics. Never carries input.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::NotFromOwnSidecar { .. } => "not_own_sidecar",
            Self::NoUri => "no_uri",
            Self::AmbiguousUri => "ambiguous_uri",
            Self::NoClientCertificate => "no_client_certificate",
            Self::BadCertificate(_) => "bad_certificate",
            Self::NotSpiffe { .. } => "not_spiffe",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
        }
    }
}

/// Clips `s` to [`ECHO_LIMIT`] characters for an error message.
fn clip(s: &str) -> String {
    match s.char_indices().nth(ECHO_LIMIT) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// A clipped value, quoted and escaped so it stays on one line.
fn echo(s: &str) -> String {
    format!("{s:?}")
}

fn echo_opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "absent".to_owned(), echo)
}

/// Verifies callers in `xfcc` mode: the identity comes from the XFCC element
/// that the broker's own sidecar appended.
///
/// This is sound only if every request reaches the broker through its
/// sidecar. The sidecar must use `APPEND_FORWARD`, and the broker's port
/// must not be excluded from inbound capture. A request that bypasses the
/// sidecar can carry any XFCC header it likes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfccVerifier {
    /// The broker's own SPIFFE ID: the URI in its sidecar's certificate,
    /// which the sidecar writes as `By`.
    pub own_id: SpiffeId,
    /// The only trust domain callers may come from, e.g. `cluster.local`.
    pub trust_domain: String,
}

impl XfccVerifier {
    /// Verifies the caller from the values of every `X-Forwarded-Client-Cert`
    /// header line, in the order received.
    ///
    /// The lines are joined with `,`, as Envoy does. Empty lines are skipped,
    /// as Envoy does when it joins them. The whole header must parse. Only the
    /// last element is read, and only if its one `By` equals [`Self::own_id`]
    /// byte for byte. That element must then have exactly one `URI`, a
    /// workload SPIFFE ID in [`Self::trust_domain`].
    pub fn verify(&self, header_values: &[&[u8]]) -> Result<CallerIdentity, IdentityError> {
        let header = join_lines(header_values)?;
        let element = parse_last_element(&header).map_err(IdentityError::Malformed)?;

        let mut by = element.iter().filter(|p| p.key.eq_ignore_ascii_case("By"));
        match (by.next(), by.next()) {
            (Some(by), None) if by.value == self.own_id.as_str() => {}
            (_, Some(_)) => return Err(IdentityError::Malformed("more than one By in the last element")),
            (by, None) => return Err(IdentityError::NotFromOwnSidecar { by: by.map(|p| clip(&p.value)) }),
        }

        let uris = element.iter().filter(|p| p.key.eq_ignore_ascii_case("URI")).map(|p| p.value.as_str());
        caller_from_uris(uris, &self.trust_domain)
    }
}

/// The caller named by a client certificate's URI SANs (as listed by XFCC
/// `URI` keys, or read from the certificate itself in mtls mode): exactly
/// one, a workload SPIFFE ID in `trust_domain`. An X.509-SVID carries exactly
/// one URI SAN (SPIFFE X509-SVID §2); with several we cannot tell which one
/// is the caller.
pub fn caller_from_uris<'a>(
    mut uris: impl Iterator<Item = &'a str>,
    trust_domain: &str,
) -> Result<CallerIdentity, IdentityError> {
    let uri = match (uris.next(), uris.next()) {
        (Some(uri), None) => uri,
        (None, _) => return Err(IdentityError::NoUri),
        (Some(_), Some(_)) => return Err(IdentityError::AmbiguousUri),
    };
    let spiffe_id =
        SpiffeId::parse(uri).map_err(|e| IdentityError::NotSpiffe { uri: clip(uri), reason: e.reason() })?;
    if spiffe_id.trust_domain() != trust_domain {
        return Err(IdentityError::ForeignTrustDomain { trust_domain: clip(spiffe_id.trust_domain()) });
    }
    Ok(CallerIdentity {
        namespace: spiffe_id.namespace().to_owned(),
        service_account: spiffe_id.service_account().to_owned(),
        spiffe_id,
    })
}

/// Joins the header lines as Envoy does (`,` between non-empty lines). The
/// size is checked before anything is copied. The result must be UTF-8 and
/// free of control characters, even inside quotes: Envoy never writes them,
/// and they could split a log line.
fn join_lines(lines: &[&[u8]]) -> Result<String, IdentityError> {
    let mut present = lines.iter().filter(|line| !line.is_empty());
    let count = present.clone().count();
    if count == 0 {
        return Err(IdentityError::Missing);
    }
    let len = present.clone().fold(count - 1, |len, line| len.saturating_add(line.len()));
    if len > MAX_XFCC_LEN {
        return Err(IdentityError::TooLarge { len });
    }
    let mut joined = Vec::with_capacity(len);
    if let Some(first) = present.next() {
        joined.extend_from_slice(first);
    }
    for line in present {
        joined.push(b',');
        joined.extend_from_slice(line);
    }
    let joined = String::from_utf8(joined).map_err(|_| IdentityError::Malformed("not UTF-8"))?;
    if joined.chars().any(char::is_control) {
        return Err(IdentityError::Malformed("control character"));
    }
    Ok(joined)
}

/// One `key=value` pair of an element, with the value unescaped.
#[derive(Debug, PartialEq, Eq)]
struct Pair<'a> {
    key: &'a str,
    value: String,
}

/// Parses the whole header and returns the pairs of its last element.
/// Earlier elements are checked for syntax only, and then discarded.
fn parse_last_element(header: &str) -> Result<Vec<Pair<'_>>, &'static str> {
    let mut cursor = Cursor { input: header, pos: 0 };
    let mut element = Vec::new();
    loop {
        let key = cursor.key();
        if key.is_empty() {
            return Err(match cursor.peek() {
                None | Some(',') if element.is_empty() => "empty element",
                None | Some(',' | ';') => "empty key=value pair",
                Some(_) => "key is not a word of ASCII letters",
            });
        }
        if cursor.bump() != Some('=') {
            return Err("key without '='");
        }
        let value = if cursor.peek() == Some('"') {
            cursor.bump();
            cursor.quoted()?
        } else {
            cursor.bare()?
        };
        element.push(Pair { key, value });
        match cursor.bump() {
            None => return Ok(element),
            Some(';') => {}
            Some(',') => element.clear(),
            // Only after a closing quote, e.g. `a="x"y` or `a="x""`. This is
            // what refuses a client's open quote that tries to swallow the
            // sidecar's element (module docs).
            Some(_) => return Err("character after a closing quote"),
        }
    }
}

struct Cursor<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// A key: ASCII letters, possibly none.
    fn key(&mut self) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
            self.pos += 1;
        }
        &self.input[start..self.pos]
    }

    /// The rest of a quoted value, after its opening quote, up to and
    /// including the closing quote.
    ///
    /// Any character may be escaped, not only `"` `,` `;` `\`. Envoy writes
    /// `Subject` as its RFC 2253 form inside quotes without escaping it again,
    /// and RFC 2253 escapes `+ < > #` with a backslash as well. Refusing those
    /// would refuse genuine sidecar elements. Structurally a backslash always
    /// just consumes the next character.
    fn quoted(&mut self) -> Result<String, &'static str> {
        let mut value = String::new();
        loop {
            match self.bump() {
                None => return Err("unterminated quoted value"),
                Some('"') => return Ok(value),
                Some('\\') => value.push(self.bump().ok_or("unterminated quoted value")?),
                Some(c) => value.push(c),
            }
        }
    }

    /// A bare value, up to the next `;`, `,` or the end. Envoy quotes any
    /// value that has `,`, `;` or `=` in it. A bare value with one of those,
    /// a quote, a backslash, a space or a non-ASCII character is something
    /// Envoy never writes, and is refused.
    fn bare(&mut self) -> Result<String, &'static str> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            match c {
                ',' | ';' => break,
                '"' | '\\' | '=' => return Err("'\"', '\\' or '=' in a bare value (must be quoted)"),
                c if c.is_ascii_graphic() => self.pos += 1,
                _ => return Err("space or non-ASCII character in a bare value"),
            }
        }
        Ok(self.input[start..self.pos].to_owned())
    }
}

/// Plain-header identity in `insecure-dev` mode.
pub const DEV_NAMESPACE_HEADER: &str = "x-imds-mesh-namespace";
/// Plain-header identity in `insecure-dev` mode.
pub const DEV_SERVICE_ACCOUNT_HEADER: &str = "x-imds-mesh-service-account";

/// The caller-identity header in `xfcc` mode. The headers are looked up by
/// `HeaderName`, not `&str`, so no request pays for parsing the name.
const XFCC_HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const DEV_NAMESPACE: HeaderName = HeaderName::from_static(DEV_NAMESPACE_HEADER);
const DEV_SERVICE_ACCOUNT: HeaderName = HeaderName::from_static(DEV_SERVICE_ACCOUNT_HEADER);

/// How the broker learns who is calling.
#[derive(Debug, Clone)]
pub enum IdentityMode {
    /// From the `X-Forwarded-Client-Cert` element the broker's own sidecar
    /// appended (the production mode).
    Xfcc(XfccVerifier),
    /// From the plain headers [`DEV_NAMESPACE_HEADER`] and
    /// [`DEV_SERVICE_ACCOUNT_HEADER`], which any caller can set: for local
    /// development only. The caller is given a SPIFFE ID in `trust_domain`.
    InsecureDev { trust_domain: String },
    /// From the URI SAN of the client certificate the broker's own TLS
    /// listener verified ([`crate::tls`]); served by [`crate::server::run_mtls`].
    Mtls { trust_domain: String },
}

impl IdentityMode {
    /// The caller, from the request headers or, in mtls mode, the
    /// connection's client certificate.
    pub(crate) fn verify(
        &self,
        headers: &HeaderMap,
        peer: Option<&ClientCertificate>,
    ) -> Result<CallerIdentity, BrokerError> {
        let unauthenticated = |error: IdentityError| {
            tracing::debug!(%error, "caller not authenticated");
            BrokerError::Unauthenticated { label: error.label() }
        };
        match self {
            Self::Xfcc(verifier) => {
                let values: Vec<&[u8]> = headers.get_all(XFCC_HEADER).iter().map(HeaderValue::as_bytes).collect();
                verifier.verify(&values).map_err(unauthenticated)
            }
            Self::Mtls { trust_domain } => peer
                .ok_or(IdentityError::NoClientCertificate)
                .and_then(|p| p.caller(trust_domain))
                .map_err(unauthenticated),
            Self::InsecureDev { trust_domain } => {
                let one = |name: &HeaderName| {
                    let mut values = headers.get_all(name).iter();
                    match (values.next(), values.next()) {
                        (Some(value), None) => value.to_str().ok(),
                        _ => None,
                    }
                };
                let (Some(namespace), Some(service_account)) = (one(&DEV_NAMESPACE), one(&DEV_SERVICE_ACCOUNT)) else {
                    return Err(BrokerError::Unauthenticated { label: "missing" });
                };
                // Parsing the SPIFFE ID checks both names as Kubernetes would.
                let spiffe_id =
                    SpiffeId::parse(&format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"))
                        .map_err(|_| BrokerError::Unauthenticated { label: "not_spiffe" })?;
                Ok(CallerIdentity {
                    namespace: spiffe_id.namespace().to_owned(),
                    service_account: spiffe_id.service_account().to_owned(),
                    spiffe_id,
                })
            }
        }
    }

    pub(crate) fn is_insecure(&self) -> bool {
        matches!(self, Self::InsecureDev { .. })
    }
}

#[cfg(test)]
mod tests;
