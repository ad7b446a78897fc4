//! Unit tests of `identity.rs`, kept apart so the parser reads in one
//! screen: the XFCC grammar edge cases a client could use to smuggle an
//! identity, and SPIFFE ID parsing.

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
        vec![Pair { key: "Subject", value: r#"a,b;c"d\e=f"#.to_owned() }, Pair { key: "DNS", value: "x".to_owned() }]
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
    assert_eq!(verify(&format!("By={OWN};URI=\"{CALLER}")), Err(IdentityError::Malformed("unterminated quoted value")));
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
