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

use std::fmt;
use std::str::FromStr;

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

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: &str = "spiffe://cluster.local/ns/imds-mesh/sa/token-broker";
    const CALLER: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
    const ADMIN: &str = "spiffe://cluster.local/ns/kube-system/sa/admin";
    const HASH: &str = "2a1fc2d5c1b2e0bb0b4dd5a7e0b6b2e5c3b1f1d9e8a7c6b5a4f3e2d1c0b9a8f7";

    fn verifier() -> XfccVerifier {
        XfccVerifier { own_id: SpiffeId::parse(OWN).unwrap(), trust_domain: "cluster.local".to_owned() }
    }

    /// The element Istio's sidecar appends with its default
    /// `set_current_client_cert_details` (subject, dns, uri). A workload
    /// certificate has an empty subject and no DNS SAN.
    fn sidecar_element(uri: &str) -> String {
        format!("By={OWN};Hash={HASH};Subject=\"\";URI={uri}")
    }

    fn verify(header: &str) -> Result<CallerIdentity, IdentityError> {
        verifier().verify(&[header.as_bytes()])
    }

    fn assert_caller(result: Result<CallerIdentity, IdentityError>, namespace: &str, service_account: &str) {
        let caller = result.expect("caller should be verified");
        assert_eq!(caller.namespace, namespace);
        assert_eq!(caller.service_account, service_account);
        assert_eq!(caller.spiffe_id.as_str(), format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}"));
    }

    fn assert_malformed(result: Result<CallerIdentity, IdentityError>) {
        match result {
            Err(IdentityError::Malformed(_)) => {}
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn assert_not_own_sidecar(result: Result<CallerIdentity, IdentityError>) {
        match result {
            Err(IdentityError::NotFromOwnSidecar { .. }) => {}
            other => panic!("expected NotFromOwnSidecar, got {other:?}"),
        }
    }

    // --- XFCC: what Istio really sends ---

    #[test]
    fn istio_default_sidecar_element_yields_the_caller() {
        assert_caller(verify(&sidecar_element(CALLER)), "shop", "checkout");
    }

    #[test]
    fn sidecar_element_with_only_by_hash_uri_yields_the_caller() {
        assert_caller(verify(&format!("By={OWN};Hash={HASH};URI={CALLER}")), "shop", "checkout");
    }

    #[test]
    fn sidecar_element_with_escaped_rfc2253_subject_yields_the_caller() {
        // Envoy quotes Subject without re-escaping; RFC 2253 escapes `,` `+` `"`.
        let header = format!(r#"By={OWN};Hash={HASH};Subject="CN=a\,b\+c\"d,O=x";URI={CALLER}"#);
        assert_caller(verify(&header), "shop", "checkout");
    }

    #[test]
    fn keys_are_case_insensitive() {
        assert_caller(verify(&format!("by={OWN};HASH={HASH};uri={CALLER}")), "shop", "checkout");
    }

    #[test]
    fn quoted_by_and_uri_are_read_unquoted() {
        assert_caller(verify(&format!("By=\"{OWN}\";URI=\"{CALLER}\"")), "shop", "checkout");
    }

    // --- XFCC: only the sidecar's (last) element counts ---

    #[test]
    fn client_supplied_element_is_ignored_when_sidecar_appends_its_own() {
        let header = format!("By={OWN};URI={ADMIN},{}", sidecar_element(CALLER));
        assert_caller(verify(&header), "shop", "checkout");
    }

    #[test]
    fn several_client_supplied_elements_are_all_ignored() {
        let header = format!("By={OWN};URI={ADMIN},Hash=00;DNS=x.example,{}", sidecar_element(CALLER));
        assert_caller(verify(&header), "shop", "checkout");
    }

    #[test]
    fn client_forged_header_without_sidecar_element_is_refused() {
        let header = format!("By=spiffe://cluster.local/ns/shop/sa/checkout;Hash={HASH};URI={ADMIN}");
        assert_not_own_sidecar(verify(&header));
    }

    #[test]
    fn last_element_without_by_is_refused() {
        assert_eq!(verify(&format!("Hash={HASH};URI={CALLER}")), Err(IdentityError::NotFromOwnSidecar { by: None }));
    }

    #[test]
    fn sidecar_element_followed_by_a_forged_one_is_refused() {
        // Cannot come from Envoy, which appends at the very end.
        let header = format!("{},By=spiffe://evil.example/ns/x/sa/y;URI={ADMIN}", sidecar_element(CALLER));
        assert_not_own_sidecar(verify(&header));
    }

    #[test]
    fn by_matching_own_id_only_by_prefix_is_refused() {
        for by in [
            format!("{OWN}-evil"),
            format!("{OWN}/x"),
            format!("{OWN}.example"),
            OWN[..OWN.len() - 1].to_owned(),
            "spiffe://cluster.local/ns/imds-mesh/sa/TOKEN-BROKER".to_owned(),
            format!("{OWN} "),
        ] {
            let header = format!("By=\"{by}\";URI={CALLER}");
            assert_not_own_sidecar(verify(&header));
        }
    }

    #[test]
    fn two_by_keys_are_refused_even_if_one_matches() {
        assert_malformed(verify(&format!("By={OWN};By=spiffe://evil.example/ns/a/sa/b;URI={CALLER}")));
        assert_malformed(verify(&format!("By=spiffe://evil.example/ns/a/sa/b;By={OWN};URI={CALLER}")));
    }

    #[test]
    fn two_uris_are_refused() {
        assert_eq!(verify(&format!("By={OWN};URI={CALLER};URI={ADMIN}")), Err(IdentityError::AmbiguousUri));
        assert_eq!(verify(&format!("By={OWN};uri={CALLER};URI={CALLER}")), Err(IdentityError::AmbiguousUri));
    }

    #[test]
    fn sidecar_element_without_uri_is_refused() {
        assert_eq!(verify(&format!("By={OWN};Hash={HASH};Subject=\"\"")), Err(IdentityError::NoUri));
    }

    #[test]
    fn uri_from_another_trust_domain_is_refused() {
        assert_eq!(
            verify(&sidecar_element("spiffe://other.example/ns/shop/sa/checkout")),
            Err(IdentityError::ForeignTrustDomain { trust_domain: "other.example".to_owned() })
        );
    }

    #[test]
    fn non_spiffe_uri_is_refused() {
        for uri in [
            "https://cluster.local/ns/shop/sa/checkout",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/workload/checkout",
            "SPIFFE://cluster.local/ns/shop/sa/checkout",
        ] {
            match verify(&sidecar_element(uri)) {
                Err(IdentityError::NotSpiffe { uri: found, .. }) => assert_eq!(found, uri),
                other => panic!("{uri}: expected NotSpiffe, got {other:?}"),
            }
        }
    }

    // --- XFCC: quoting cannot change the structure ---

    #[test]
    fn quoted_values_unescape_comma_semicolon_quote_and_backslash() {
        let pairs = parse_last_element(r#"A=1,Subject="a\,b\;c\"d\\e=f";DNS=x"#).unwrap();
        assert_eq!(
            pairs,
            vec![
                Pair { key: "Subject", value: r#"a,b;c"d\e=f"#.to_owned() },
                Pair { key: "DNS", value: "x".to_owned() }
            ]
        );
    }

    #[test]
    fn quoted_comma_cannot_inject_a_second_element() {
        // A client's whole header, no sidecar element: the quoted text must
        // stay one value, not become an element with our By and admin's URI.
        let header = format!("Hash=\"x,By={OWN};URI={ADMIN}\"");
        assert_eq!(verify(&header), Err(IdentityError::NotFromOwnSidecar { by: None }));
    }

    #[test]
    fn escaped_quote_cannot_end_a_value_and_inject_a_key() {
        // If `\"` ended the quote, `;URI=admin` would become a key of this element.
        let header = format!(r#"By={OWN};Subject="x\";URI={ADMIN}""#);
        assert_eq!(verify(&header), Err(IdentityError::NoUri));
    }

    #[test]
    fn escaped_backslash_before_quote_ends_the_value() {
        // `\\` is a literal backslash, so the next `"` closes the value.
        let pairs = parse_last_element(r#"Subject="x\\";URI=u"#).unwrap();
        assert_eq!(pairs[0].value, "x\\");
        assert_eq!(pairs[1], Pair { key: "URI", value: "u".to_owned() });
    }

    #[test]
    fn client_open_quote_cannot_swallow_the_sidecar_element() {
        // Istio's default element has `Subject=""`; the `uri`-only one has no quote.
        for sidecar in [sidecar_element(CALLER), format!("By={OWN};Hash={HASH};URI={CALLER}")] {
            for client in ["Hash=\"", "Hash=\"x\\", "By=a;Subject=\"CN="] {
                assert_malformed(verify(&format!("{client},{sidecar}")));
            }
        }
    }

    #[test]
    fn unterminated_quote_is_refused() {
        assert_eq!(
            verify(&format!("By={OWN};URI=\"{CALLER}")),
            Err(IdentityError::Malformed("unterminated quoted value"))
        );
        assert_eq!(
            verify(&format!("By={OWN};URI={CALLER};Subject=\"x\\")),
            Err(IdentityError::Malformed("unterminated quoted value"))
        );
    }

    #[test]
    fn text_after_a_closing_quote_is_refused() {
        let after_quote = Err(IdentityError::Malformed("character after a closing quote"));
        assert_eq!(verify(&format!("By={OWN};Subject=\"x\"y;URI={CALLER}")), after_quote);
        assert_eq!(verify(&format!("By={OWN};Subject=\"x\"\"\";URI={CALLER}")), after_quote);
        // A client's open quote closed by the `"` of the sidecar's `Subject=""`.
        assert_eq!(verify(&format!("Hash=\",{}", sidecar_element(CALLER))), after_quote);
    }

    #[test]
    fn bare_value_with_quote_backslash_equals_or_space_is_refused() {
        for bad in ["a\"b", "a\\b", "a=b", "a b", "caf\u{e9}"] {
            assert_malformed(verify(&format!("Hash={bad},{}", sidecar_element(CALLER))));
        }
    }

    #[test]
    fn empty_elements_and_pairs_are_refused() {
        for header in [
            format!(",{}", sidecar_element(CALLER)),
            format!("Hash=00,,{}", sidecar_element(CALLER)),
            format!("{},", sidecar_element(CALLER)),
            format!("{};", sidecar_element(CALLER)),
            format!("By={OWN};;URI={CALLER}"),
            format!("=x;By={OWN};URI={CALLER}"),
            format!("By={OWN};URI"),
            format!("By={OWN};URI:{CALLER}"),
            format!("By={OWN}; URI={CALLER}"),
        ] {
            assert_malformed(verify(&header));
        }
    }

    // --- XFCC: header lines, size, bytes ---

    #[test]
    fn multiple_header_lines_are_joined_in_order() {
        let client = format!("By={OWN};URI={ADMIN}");
        let sidecar = sidecar_element(CALLER);
        assert_caller(verifier().verify(&[client.as_bytes(), sidecar.as_bytes()]), "shop", "checkout");
        // The last line's last element decides, whatever came before.
        let forged = "By=spiffe://evil.example/ns/a/sa/b;URI=spiffe://evil.example/ns/a/sa/b";
        assert_not_own_sidecar(verifier().verify(&[sidecar.as_bytes(), forged.as_bytes()]));
    }

    #[test]
    fn quote_opened_on_one_line_continues_on_the_next() {
        // Joined with `,`: the open quote swallows the next line, like in one line.
        let sidecar = sidecar_element(CALLER);
        assert_malformed(verifier().verify(&[b"Hash=\"", sidecar.as_bytes()]));
    }

    #[test]
    fn empty_header_is_missing() {
        assert_eq!(verifier().verify(&[]), Err(IdentityError::Missing));
        assert_eq!(verifier().verify(&[b""]), Err(IdentityError::Missing));
        assert_eq!(verifier().verify(&[b"", b""]), Err(IdentityError::Missing));
    }

    #[test]
    fn empty_header_lines_are_skipped_like_envoy_does() {
        let sidecar = sidecar_element(CALLER);
        assert_caller(verifier().verify(&[b"", sidecar.as_bytes(), b""]), "shop", "checkout");
    }

    #[test]
    fn whitespace_only_line_is_refused() {
        let sidecar = sidecar_element(CALLER);
        assert_malformed(verifier().verify(&[b" ", sidecar.as_bytes()]));
    }

    /// A header of exactly `len` bytes: client padding, then the sidecar's element.
    fn padded_header(len: usize) -> String {
        let sidecar = sidecar_element(CALLER);
        let padding = len - sidecar.len() - "Hash=,".len();
        format!("Hash={},{sidecar}", "a".repeat(padding))
    }

    #[test]
    fn header_at_the_size_bound_is_accepted() {
        let header = padded_header(MAX_XFCC_LEN);
        assert_eq!(header.len(), MAX_XFCC_LEN);
        assert_caller(verify(&header), "shop", "checkout");
    }

    #[test]
    fn header_over_the_size_bound_is_refused() {
        let header = padded_header(MAX_XFCC_LEN + 1);
        assert_eq!(verify(&header), Err(IdentityError::TooLarge { len: MAX_XFCC_LEN + 1 }));
        let huge = "a".repeat(10 * MAX_XFCC_LEN);
        assert!(matches!(verify(&huge), Err(IdentityError::TooLarge { .. })));
    }

    #[test]
    fn size_bound_counts_the_commas_that_join_lines() {
        let sidecar = sidecar_element(CALLER);
        let client = format!("Hash={}", "a".repeat(MAX_XFCC_LEN - sidecar.len() - "Hash=".len()));
        // The two lines add up to the bound; the joining comma makes one more.
        assert_eq!(client.len() + sidecar.len(), MAX_XFCC_LEN);
        assert_eq!(
            verifier().verify(&[client.as_bytes(), sidecar.as_bytes()]),
            Err(IdentityError::TooLarge { len: MAX_XFCC_LEN + 1 })
        );
    }

    #[test]
    fn non_utf8_header_is_refused() {
        let mut header = sidecar_element(CALLER).into_bytes();
        header.extend_from_slice(b";Subject=\"\xff\"");
        assert_eq!(verifier().verify(&[&header]), Err(IdentityError::Malformed("not UTF-8")));
    }

    #[test]
    fn control_characters_are_refused_even_inside_quotes() {
        for control in ["\n", "\r", "\t", "\0", "\u{7f}", "\u{85}"] {
            let header = format!("Subject=\"a{control}b\",{}", sidecar_element(CALLER));
            assert_eq!(verify(&header), Err(IdentityError::Malformed("control character")), "{control:?}");
        }
    }

    // --- errors ---

    #[test]
    fn error_messages_clip_and_escape_echoed_input() {
        let long_by = format!("spiffe://evil.example/ns/a/sa/{}", "b".repeat(10_000));
        let err = verify(&format!("By={long_by};URI={CALLER}")).unwrap_err();
        let message = err.to_string();
        assert!(message.len() < 300, "message is {} bytes", message.len());
        assert!(message.contains("spiffe://evil.example/ns/a/sa/bbb"), "{message}");

        let err = verify(&format!(r#"By={OWN};URI="https://x/\"quoted\"""#)).unwrap_err();
        assert!(err.to_string().contains(r#""https://x/\"quoted\"""#), "{err}");
    }

    #[test]
    fn labels_are_stable_and_distinct() {
        let errors = [
            (IdentityError::Missing, "missing"),
            (IdentityError::TooLarge { len: 1 }, "too_large"),
            (IdentityError::Malformed("x"), "malformed"),
            (IdentityError::NotFromOwnSidecar { by: None }, "not_own_sidecar"),
            (IdentityError::NoUri, "no_uri"),
            (IdentityError::AmbiguousUri, "ambiguous_uri"),
            (IdentityError::NoClientCertificate, "no_client_certificate"),
            (IdentityError::BadCertificate("x"), "bad_certificate"),
            (IdentityError::NotSpiffe { uri: "u".into(), reason: "r" }, "not_spiffe"),
            (IdentityError::ForeignTrustDomain { trust_domain: "t".into() }, "foreign_trust_domain"),
        ];
        for (error, label) in &errors {
            assert_eq!(error.label(), *label);
        }
        let mut labels: Vec<_> = errors.iter().map(|(e, _)| e.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), errors.len());
    }

    // --- SpiffeId ---

    #[test]
    fn spiffe_id_parts_and_display_round_trip() {
        let id: SpiffeId = "spiffe://prod.example-1_x/ns/a-1/sa/build.bot-2".parse().unwrap();
        assert_eq!(id.trust_domain(), "prod.example-1_x");
        assert_eq!(id.namespace(), "a-1");
        assert_eq!(id.service_account(), "build.bot-2");
        assert_eq!(id.to_string(), "spiffe://prod.example-1_x/ns/a-1/sa/build.bot-2");
        assert_eq!(format!("{id:?}"), "SpiffeId(\"spiffe://prod.example-1_x/ns/a-1/sa/build.bot-2\")");
    }

    #[test]
    fn spiffe_id_accepts_names_at_kubernetes_length_limits() {
        let ns = "n".repeat(63);
        let sa = ["s".repeat(63), "s".repeat(63), "s".repeat(63), "s".repeat(61)].join(".");
        assert_eq!(sa.len(), 253);
        let id = SpiffeId::parse(&format!("spiffe://td/ns/{ns}/sa/{sa}")).unwrap();
        assert_eq!(id.namespace(), ns);
        assert_eq!(id.service_account(), sa);
    }

    #[test]
    fn spiffe_id_refuses_names_over_kubernetes_length_limits() {
        let long_ns = format!("spiffe://td/ns/{}/sa/a", "n".repeat(64));
        let long_sa = format!("spiffe://td/ns/a/sa/{}.{}", "s".repeat(63), vec!["s".repeat(63); 3].join("."));
        assert_eq!(long_sa.len() - "spiffe://td/ns/a/sa/".len(), 255);
        let long_td = format!("spiffe://{}/ns/a/sa/b", vec!["t".repeat(63); 4].join("."));
        for uri in [long_ns, long_sa, long_td] {
            assert!(SpiffeId::parse(&uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn spiffe_id_refuses_uppercase() {
        for uri in [
            "SPIFFE://cluster.local/ns/shop/sa/checkout",
            "spiffe://Cluster.local/ns/shop/sa/checkout",
            "spiffe://cluster.local/NS/shop/sa/checkout",
            "spiffe://cluster.local/ns/Shop/sa/checkout",
            "spiffe://cluster.local/ns/shop/SA/checkout",
            "spiffe://cluster.local/ns/shop/sa/Checkout",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn spiffe_id_refuses_dot_segments() {
        for uri in [
            "spiffe://cluster.local/ns/../sa/checkout",
            "spiffe://cluster.local/ns/shop/sa/..",
            "spiffe://cluster.local/ns/shop/sa/.",
            "spiffe://cluster.local/ns/shop/../kube-system/sa/admin",
            "spiffe://cluster.local/./ns/shop/sa/checkout",
            "spiffe://cluster..local/ns/shop/sa/checkout",
            "spiffe://.cluster.local/ns/shop/sa/checkout",
            "spiffe://cluster.local./ns/shop/sa/checkout",
            "spiffe://cluster.local/ns/shop/sa/a..b",
            "spiffe://cluster.local/ns/shop/sa/.a",
            "spiffe://cluster.local/ns/shop/sa/a.",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn spiffe_id_refuses_extra_missing_or_empty_segments() {
        for uri in [
            "spiffe://cluster.local/ns/shop/sa/checkout/",
            "spiffe://cluster.local/ns/shop/sa/checkout/extra",
            "spiffe://cluster.local/ns//sa/checkout",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop/sa",
            "spiffe://cluster.local//ns/shop/sa/checkout",
            "spiffe://cluster.local/ns/shop//sa/checkout",
            "spiffe://cluster.local/sa/checkout/ns/shop",
            "spiffe://cluster.local/namespace/shop/sa/checkout",
            "spiffe:///ns/shop/sa/checkout",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn spiffe_id_refuses_query_fragment_percent_userinfo_and_port() {
        for uri in [
            "spiffe://cluster.local/ns/shop/sa/checkout?x=1",
            "spiffe://cluster.local/ns/shop/sa/checkout#frag",
            "spiffe://cluster.local/ns/shop/sa/check%6Fut",
            "spiffe://cluster.local/ns/sh%2Fop/sa/checkout",
            "spiffe://user@cluster.local/ns/shop/sa/checkout",
            "spiffe://cluster.local:443/ns/shop/sa/checkout",
            "spiffe://cluster.local/ns/shop/sa/check out",
            "spiffe://cluster.local/ns/sh_op/sa/checkout",
            "spiffe://cluster.local/ns/-shop/sa/checkout",
            "spiffe://cluster.local/ns/shop-/sa/checkout",
            "spiffe://cluster.local/ns/shop/sa/a.-b",
            "spiffe://cluster.local/ns/shop/sa/che\u{301}ckout",
        ] {
            assert!(SpiffeId::parse(uri).is_err(), "{uri}");
        }
    }

    #[test]
    fn spiffe_id_error_does_not_echo_the_input() {
        let err = SpiffeId::parse("spiffe://cluster.local/ns/secret-looking-value/sa/X").unwrap_err();
        assert!(!err.to_string().contains("secret-looking-value"), "{err}");
        assert_eq!(err.reason(), "service account is not a Kubernetes name (DNS-1123 subdomain)");
    }

    #[test]
    fn spiffe_id_over_2048_bytes_is_refused() {
        let uri = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(SpiffeId::parse(&uri).unwrap_err().reason(), "longer than 2048 bytes");
    }
}
