//! The filter's request router: `route::route` on any path, and
//! `Responder::respond` on any request to a pod that has a credential.
//!
//! Invariants: the router agrees with a model written from the IMDS paths
//! (no spelling but the canonical one reaches a route); a credential body
//! (200, JSON) is answered only to GET/HEAD of exactly
//! `/<version>/meta-data/iam/security-credentials/<configured role name>`,
//! and with `http_tokens: required` only with a token minted by this
//! responder's key; a token is issued only to `PUT /latest/api/token`
//! without `X-Forwarded-For` and with one TTL in 1..=21600.
#![no_main]

use imds_filter::arn::RoleArn;
use imds_filter::broker::Answer;
use imds_filter::config::{Config, Enablement, HttpTokens};
use imds_filter::imds::{Reply, Responder, TOKEN_HEADER, TTL_HEADER};
use imds_filter::route::{self, MAX_PATH, Route};
use imds_filter::token::TokenSigner;
use imds_mesh_fuzz::{At, Headers, MemoryStore, NOW_MS, ROLE_ARN, ROLE_NAME, broker_body, is_printable_path_byte};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];
const OTHER_KEY: [u8; 32] = [8; 32];

/// `<method>\n<options>\n<path>`: options are space-separated words,
/// `token` (a valid minted token), `expired`, `foreign` (another key's),
/// `raw=<bytes>` (a token as given), `ttl=<bytes>` (a TTL header), `xff`
/// (`X-Forwarded-For`), `required` (`http_tokens: required`). The path is
/// the rest, newlines included. Seeds stay readable (`fuzz/seeds/`).
struct Input<'a> {
    method: &'a [u8],
    options: Vec<&'a [u8]>,
    path: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Self {
        let mut parts = data.splitn(3, |&b| b == b'\n');
        let method = parts.next().unwrap_or_default();
        let options = parts.next().unwrap_or_default().split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
        Self { method, options, path: parts.next().unwrap_or_default() }
    }

    fn has(&self, word: &[u8]) -> bool {
        self.options.contains(&word)
    }

    fn values(&self, prefix: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.options.iter().filter_map(move |w| w.strip_prefix(prefix))
    }
}

fn is_version(v: &str) -> bool {
    v == "latest"
        || (v.len() == 10
            && v.char_indices().all(|(i, c)| if i == 4 || i == 7 { c == '-' } else { c.is_ascii_digit() }))
}

/// What IMDS paths mean, written from their spelling: `Err` for a refused
/// path, the route otherwise.
fn model(path: &[u8]) -> Result<Route<'_>, ()> {
    if path.len() > MAX_PATH || path.first() != Some(&b'/') || !path[1..].iter().all(|&b| is_printable_path_byte(b)) {
        return Err(());
    }
    let text = std::str::from_utf8(&path[1..]).map_err(drop)?;
    let (text, slash) = text.strip_suffix('/').map_or((text, false), |t| (t, true));
    if text.is_empty() {
        return Ok(Route::Other);
    }
    let segments: Vec<&str> = text.split('/').collect();
    if segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return Err(());
    }
    Ok(match (segments.as_slice(), slash) {
        (["latest", "api", "token"], false) => Route::Token,
        ([v, "api", "token"], false) if is_version(v) => Route::DatedToken,
        ([v, "meta-data", "iam", "security-credentials"], _) if is_version(v) => Route::RoleList,
        ([v, "meta-data", "iam", "security-credentials", name], false) if is_version(v) => Route::Credentials(name),
        _ => Route::Other,
    })
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let path = input.path.to_vec();
    let routed = route::route(&path);
    assert_eq!(routed.map_err(drop), model(&path), "path {:?}", String::from_utf8_lossy(&path));
    if let Ok(Route::Credentials(name)) = routed {
        let text = std::str::from_utf8(&path).unwrap();
        let version = text[1..].split('/').next().unwrap();
        assert_eq!(text, format!("/{version}/meta-data/iam/security-credentials/{name}"));
    }
    if let Ok(Route::Token) = routed {
        assert_eq!(path, b"/latest/api/token");
    }

    // The same request to a responder that holds a credential.
    let store = MemoryStore::default();
    let role = RoleArn::parse(ROLE_ARN).unwrap();
    let required = input.has(b"required");
    let http_tokens = if required { HttpTokens::Required } else { HttpTokens::Optional };
    let config = Config { http_tokens, ..Config::default() };
    let enablement = Enablement::Enabled { role, pod: "web-0".to_owned() };
    let mut responder = Responder::new(config, enablement, &KEY, &store);
    assert!(responder.tick(NOW_MS, &store).is_some());
    let body = broker_body("2027-01-15T11:00:00Z");
    responder.finish_fetch(NOW_MS, Answer { status: Some(200), retry_after: None, body: &body }, &store);

    let method = input.method;
    let signer = TokenSigner::new(&KEY);
    let mut headers = Headers(vec![(":method".into(), method.to_vec()), (":path".into(), path.clone())]);
    let mut valid = Vec::new();
    for word in &input.options {
        let token = match *word {
            b"token" => {
                let token = signer.issue(NOW_MS - 1000, 60).into_bytes();
                valid.push(token.clone());
                token
            }
            b"expired" => signer.issue(NOW_MS - 61_000, 60).into_bytes(),
            b"foreign" => TokenSigner::new(&OTHER_KEY).issue(NOW_MS, 60).into_bytes(),
            _ => match word.strip_prefix(b"raw=") {
                Some(raw) => raw.to_vec(),
                None => continue,
            },
        };
        headers.0.push((TOKEN_HEADER.into(), token));
    }
    for ttl in input.values(b"ttl=") {
        headers.0.push((TTL_HEADER.into(), ttl.to_vec()));
    }
    let forwarded_for = input.has(b"xff");
    if forwarded_for {
        headers.0.push(("x-forwarded-for".into(), b"10.0.0.1".to_vec()));
    }
    let tokens: Vec<&[u8]> = headers.0.iter().filter(|(n, _)| n == TOKEN_HEADER).map(|(_, v)| v.as_slice()).collect();
    let ttls: Vec<&[u8]> = headers.0.iter().filter(|(n, _)| n == TTL_HEADER).map(|(_, v)| v.as_slice()).collect();

    let reply = responder.respond(&headers, &At(NOW_MS), &store);
    let Reply::Respond(response) = reply else {
        panic!("a responder holding a fresh credential made a request wait");
    };
    // Independent of the router: the version, then exactly the role's path.
    let credential_path = |p: &[u8]| {
        let rest = std::str::from_utf8(p).ok().and_then(|t| t.strip_prefix('/'));
        rest.and_then(|r| r.split_once('/'))
            .is_some_and(|(v, r)| is_version(v) && r == format!("meta-data/iam/security-credentials/{ROLE_NAME}"))
    };
    if response.status == 200 && response.content_type == "application/json" {
        assert!(method == b"GET" || method == b"HEAD", "credential answered to {:?}", String::from_utf8_lossy(method));
        assert!(credential_path(&path), "credential answered for {:?}", String::from_utf8_lossy(&path));
        assert!(tokens.len() <= 1, "credential answered with two tokens");
        if let Some(token) = tokens.first() {
            assert!(valid.iter().any(|t| t == token), "credential answered with a token not minted here");
        } else {
            assert!(!required, "credential answered without a token in required mode");
        }
        if method == b"GET" {
            assert!(!response.body.is_empty());
        }
    }
    if response.token_ttl.is_some() {
        assert_eq!(response.status, 200);
        assert_eq!(method, b"PUT");
        assert_eq!(path, b"/latest/api/token");
        assert!(!forwarded_for);
        assert_eq!(ttls.len(), 1);
        let ttl: u64 = std::str::from_utf8(ttls[0]).unwrap().parse().unwrap();
        assert_eq!(response.token_ttl, Some(ttl));
        assert!((1..=21_600).contains(&ttl));
        // The token it issued verifies with the same key until its expiry.
        let mut verifier = TokenSigner::new(&KEY);
        assert_eq!(verifier.verify(&response.body, NOW_MS + ttl * 1000 - 1), Ok(()));
        assert!(verifier.verify(&response.body, NOW_MS + ttl * 1000).is_err());
    }
    assert!(matches!(response.status, 200 | 400 | 401 | 403 | 404 | 405), "status {}", response.status);
});
