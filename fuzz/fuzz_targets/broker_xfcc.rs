//! The broker's `X-Forwarded-Client-Cert` verification
//! (`XfccVerifier::verify`), on headers built from elements rendered as
//! Envoy writes them, with lines of raw client bytes mixed in.
//!
//! Invariants: with every line well formed, the verdict is the model's: the
//! caller is the one `URI` of the last element, accepted only if that
//! element has exactly one `By` equal to the broker's own ID and the URI is
//! a workload SPIFFE ID in the trust domain; whatever raw bytes a client
//! puts before the broker sidecar's element, an accepted identity is that
//! element's URI and never anything the client wrote.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use token_broker::identity::{MAX_XFCC_LEN, SpiffeId, XfccVerifier};

const OWN_ID: &str = "spiffe://cluster.local/ns/imds-mesh/sa/token-broker";
const TRUST_DOMAIN: &str = "cluster.local";

#[derive(Arbitrary, Debug)]
enum Key {
    By,
    ByUpper,
    Uri,
    UriLower,
    Hash,
    Subject,
    Cert,
    Dns,
    Other(u8),
}

#[derive(Arbitrary, Debug)]
enum Value {
    OwnId,
    Caller,
    OtherCaller,
    ForeignDomain,
    Raw(String),
}

#[derive(Arbitrary, Debug)]
struct Pair {
    key: Key,
    value: Value,
    quote: bool,
    /// Escape every character inside quotes, not only `"` and `\`.
    escape_all: bool,
}

#[derive(Arbitrary, Debug)]
enum Line {
    Elements(Vec<Vec<Pair>>),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    lines: Vec<Line>,
    /// The broker sidecar's own element, appended last when present.
    sidecar: Option<Vec<Pair>>,
}

fn key(key: &Key) -> String {
    match key {
        Key::By => "By".into(),
        Key::ByUpper => "BY".into(),
        Key::Uri => "URI".into(),
        Key::UriLower => "uri".into(),
        Key::Hash => "Hash".into(),
        Key::Subject => "Subject".into(),
        Key::Cert => "Cert".into(),
        Key::Dns => "DNS".into(),
        // One to three ASCII letters: any other key.
        Key::Other(n) => (0..=n % 3).map(|i| char::from(b'a' + (n.wrapping_mul(7).wrapping_add(i) % 26))).collect(),
    }
}

fn value(value: &Value) -> String {
    match value {
        Value::OwnId => OWN_ID.into(),
        Value::Caller => "spiffe://cluster.local/ns/team/sa/app".into(),
        Value::OtherCaller => "spiffe://cluster.local/ns/other/sa/intruder".into(),
        Value::ForeignDomain => "spiffe://evil.example/ns/team/sa/app".into(),
        Value::Raw(s) => s.clone(),
    }
}

fn bare_ok(v: &str) -> bool {
    v.chars().all(|c| c.is_ascii_graphic() && !",;\"\\=".contains(c))
}

/// Renders a pair as Envoy would; quoted whenever bare would be ambiguous.
fn render_pair(pair: &Pair, out: &mut String) {
    let v = value(&pair.value);
    out.push_str(&key(&pair.key));
    out.push('=');
    if bare_ok(&v) && !pair.quote {
        out.push_str(&v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        if pair.escape_all || c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

fn render_element(pairs: &[Pair]) -> String {
    let mut out = String::new();
    for (i, pair) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        render_pair(pair, &mut out);
    }
    out
}

/// The verdict for the last element: the accepted caller URI, or `None`.
fn model(pairs: &[Pair]) -> Option<String> {
    let by: Vec<String> =
        pairs.iter().filter(|p| key(&p.key).eq_ignore_ascii_case("by")).map(|p| value(&p.value)).collect();
    if by != [OWN_ID] {
        return None;
    }
    let uris: Vec<String> =
        pairs.iter().filter(|p| key(&p.key).eq_ignore_ascii_case("uri")).map(|p| value(&p.value)).collect();
    let [uri] = uris.as_slice() else { return None };
    let id = SpiffeId::parse(uri).ok()?;
    (id.trust_domain() == TRUST_DOMAIN).then(|| uri.clone())
}

/// A real element as the broker's sidecar appends it (Envoy's
/// `APPEND_FORWARD` with `set_current_client_cert_details` URI and Subject).
const SIDECAR_ELEMENT: &str = "By=spiffe://cluster.local/ns/imds-mesh/sa/token-broker;\
Hash=5f7a3bd5e1a3c2b8d0c4f1e2a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0;Subject=\"\";\
URI=spiffe://cluster.local/ns/team/sa/app";

// `client\n<lines>`: header lines a client sent (one per line), then the
// sidecar's real element; `bypass\n<lines>`: the lines alone (a request
// that did not come through the sidecar); anything else: elements built
// by `arbitrary` ([`Input`]).
fuzz_target!(|data: &[u8]| {
    let verifier = XfccVerifier { own_id: SpiffeId::parse(OWN_ID).unwrap(), trust_domain: TRUST_DOMAIN.to_owned() };
    if let Some(rest) = data.strip_prefix(b"client\n") {
        let mut lines: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
        lines.push(SIDECAR_ELEMENT.as_bytes());
        if let Ok(caller) = verifier.verify(&lines) {
            assert_eq!(caller.spiffe_id.as_str(), "spiffe://cluster.local/ns/team/sa/app", "from {lines:?}");
        }
        if lines.iter().all(|l| l.is_empty() || *l == SIDECAR_ELEMENT.as_bytes()) {
            assert!(verifier.verify(&lines).is_ok(), "the sidecar's own element refused");
        }
        return;
    }
    if let Some(rest) = data.strip_prefix(b"bypass\n") {
        let lines: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
        let _ = verifier.verify(&lines);
        return;
    }
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut well_formed = true;
    let mut last: Option<&[Pair]> = None;
    for line in input.lines.iter().take(8) {
        match line {
            Line::Elements(elements) => {
                let elements: Vec<&Vec<Pair>> = elements.iter().take(8).collect();
                // An element with no pair renders as nothing: a malformed
                // header, so the model only covers non-empty ones.
                if elements.iter().any(|e| e.is_empty()) {
                    well_formed = false;
                }
                if let Some(e) = elements.last() {
                    last = Some(e);
                }
                lines.push(elements.iter().map(|e| render_element(e)).collect::<Vec<_>>().join(",").into_bytes());
            }
            Line::Raw(bytes) => {
                well_formed = false;
                lines.push(bytes.clone());
            }
        }
    }
    // An element with no pair renders as an empty line, which Envoy's join
    // skips: that is no sidecar element at all.
    let sidecar = input.sidecar.as_ref().filter(|s| !s.is_empty());
    if let Some(sidecar) = sidecar {
        last = Some(sidecar);
        lines.push(render_element(sidecar).into_bytes());
    }
    let values: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
    let verdict = verifier.verify(&values);
    let joined_len: usize = lines.iter().filter(|l| !l.is_empty()).map(|l| l.len() + 1).sum();
    let any_control = lines.iter().any(|l| String::from_utf8_lossy(l).chars().any(char::is_control));

    let shown: Vec<_> = lines.iter().map(|l| String::from_utf8_lossy(l)).collect();
    if let Ok(caller) = &verdict {
        let uri = caller.spiffe_id.as_str();
        assert_eq!(format!("spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}", caller.namespace, caller.service_account), uri);
        if let Some(sidecar) = sidecar {
            // Whatever came before, only the sidecar's element names the caller.
            assert_eq!(
                model(sidecar).as_deref(),
                Some(uri),
                "accepted {uri} not from the sidecar's element: {shown:?}"
            );
        }
    }
    if well_formed && joined_len <= MAX_XFCC_LEN + 1 && !any_control {
        let expected = last.and_then(model);
        assert_eq!(
            verdict.as_ref().ok().map(|c| c.spiffe_id.as_str().to_owned()),
            expected,
            "verdict {verdict:?} of {shown:?}"
        );
    }
});
