//! The metadata service itself: every IMDS request in, one answer out.

use std::borrow::Cow;

use crate::arn::RoleArn;
use crate::broker::{self, Answer};
use crate::cache::{CredentialCache, Lookup, SharedStore};
use crate::config::{Config, Enablement, HttpTokens};
use crate::metrics::{Counters, RouteKind};
use crate::route::{self, Route};
use crate::token::{self, BadTtl, KEY_LEN, TokenSigner};

/// Header carrying an IMDSv2 session token on GET requests.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Header carrying the requested token TTL on `PUT /latest/api/token`.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// IMDS refuses token requests that went through a proxy.
pub const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

/// The request's headers, pseudo-headers included (`:method`, `:path`),
/// names in lower case as Envoy hands them over.
pub trait RequestHeaders {
    /// The first value of header `name`.
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// Whether header `name` appears more than once.
    fn repeated(&self, name: &str) -> bool;
}

/// Time for one request. Cache decisions may use the worker's last tick
/// time, at most a tick old: a credential is withdrawn
/// [`MIN_SERVED_LIFETIME_MS`](crate::policy::MIN_SERVED_LIFETIME_MS) before
/// it expires, far more than a tick. Tokens expire to the millisecond and read
/// the precise time.
pub trait Clock {
    /// Unix milliseconds as of the last tick.
    fn coarse_ms(&self) -> u64;
    /// Unix milliseconds now.
    fn now_ms(&self) -> u64;
}

/// A complete local answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub status: u32,
    pub content_type: &'static str,
    /// Echoed as [`TTL_HEADER`] on a token answer.
    pub token_ttl: Option<u64>,
    pub body: Cow<'a, [u8]>,
}

/// What to do with an IMDS request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    Respond(Response<'a>),
    /// No credential yet but one is on its way: hold the request and call
    /// [`Responder::resume`] after the next fetch or tick.
    Wait,
}

/// A broker call to make: the lease is held until its answer is passed to
/// [`Responder::finish_fetch`].
#[derive(Debug, PartialEq, Eq)]
pub struct FetchRequest {
    pub path: String,
    /// The role's name under the broker's ([`broker::request_authority`]).
    pub authority: String,
    pub timeout_ms: u64,
}

/// The filter's state on one worker.
pub struct Responder {
    config: Config,
    served: Option<Served>,
    signer: TokenSigner,
    /// Counts since the last flush to Envoy stats.
    pub counters: Counters,
}

struct Served {
    role: RoleArn,
    pod: String,
    cache: CredentialCache,
    /// `/latest/meta-data/iam/security-credentials/<role name>`: the path
    /// nearly every credential request has, routed without the general
    /// parser (it routes there exactly as [`route::route`] would).
    credentials_path: String,
}

const TEXT: &str = "text/plain";
const JSON: &str = "application/json";

fn text(status: u32, body: &'static str) -> Response<'static> {
    Response { status, content_type: TEXT, token_ttl: None, body: Cow::Borrowed(body.as_bytes()) }
}

impl Responder {
    /// A responder for this pod; `key` is the process-wide token key.
    pub fn new(config: Config, enablement: Enablement, key: &[u8; KEY_LEN], store: &impl SharedStore) -> Self {
        let served = match enablement {
            Enablement::Enabled { role, pod } => Some(Served {
                cache: CredentialCache::new(&role, store),
                credentials_path: format!("/latest/meta-data/iam/security-credentials/{}", role.name()),
                role,
                pod,
            }),
            Enablement::Disabled { .. } => None,
        };
        Self { config, served, signer: TokenSigner::new(key), counters: Counters::default() }
    }

    /// The parsed configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Answers one IMDS request.
    pub fn respond(
        &mut self,
        headers: &impl RequestHeaders,
        clock: &impl Clock,
        store: &impl SharedStore,
    ) -> Reply<'_> {
        let Self { config, served, signer, counters } = self;
        let method = headers.header(":method").unwrap_or_default();
        let (kind, reply) = route_request(config, served, signer, counters, method, headers, clock, store);
        if let Reply::Respond(response) = &reply {
            counters.request(kind, response.status);
        }
        match reply {
            Reply::Respond(response) if method == b"HEAD" => {
                Reply::Respond(Response { body: Cow::Borrowed(&[]), ..response })
            }
            other => other,
        }
    }

    /// Answers a held request once a fetch landed or the tick came round;
    /// `None` means keep waiting. `timed_out` ends the wait with 503.
    pub fn resume(&mut self, now_ms: u64, timed_out: bool, store: &impl SharedStore) -> Option<Response<'_>> {
        let served = self.served.as_mut()?;
        let response = match credential_reply(served.cache.lookup(now_ms, 0, store)) {
            Reply::Respond(response) => response,
            Reply::Wait if timed_out => text(503, "Service Unavailable"),
            Reply::Wait => return None,
        };
        self.counters.request(RouteKind::Credentials, response.status);
        Some(response)
    }

    /// The periodic work of one worker: pull credentials other workers
    /// fetched, and start a fetch if one is due and nobody else runs it.
    pub fn tick(&mut self, now_ms: u64, store: &impl SharedStore) -> Option<FetchRequest> {
        let served = self.served.as_mut()?;
        served.cache.sync(store);
        let timeout_ms = self.config.broker_timeout_ms;
        served.cache.begin_fetch(now_ms, timeout_ms, store).then(|| FetchRequest {
            path: broker::request_path(&served.role, &served.pod),
            authority: broker::request_authority(&served.role, &self.config.broker_authority),
            timeout_ms,
        })
    }

    /// Records the broker's answer to the fetch [`tick`](Self::tick) started.
    pub fn finish_fetch(&mut self, now_ms: u64, answer: Answer<'_>, store: &impl SharedStore) {
        let Some(served) = self.served.as_mut() else { return };
        let failure = served.cache.finish_fetch(now_ms, broker::read_answer(answer), store);
        self.counters.fetch(failure);
        match (failure, served.cache.expires_at_ms()) {
            (None, Some(expiry)) => log::info!("credentials for {} refreshed; they expire at {expiry} ms", served.role),
            (Some(f), _) => log::warn!("credentials for {} not fetched: {}", served.role, f.label()),
            (None, None) => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn route_request<'a>(
    config: &Config,
    served: &'a mut Option<Served>,
    signer: &mut TokenSigner,
    counters: &mut Counters,
    method: &[u8],
    headers: &impl RequestHeaders,
    clock: &impl Clock,
    store: &impl SharedStore,
) -> (RouteKind, Reply<'a>) {
    let respond = |kind, response| (kind, Reply::Respond(response));
    let Some(served) = served else {
        return respond(RouteKind::Other, text(404, "Not Found"));
    };
    let path = headers.header(":path").unwrap_or_default();
    let route = if path == served.credentials_path.as_bytes() {
        Ok(Route::Credentials(served.role.name()))
    } else {
        route::route(path)
    };
    let route = match route {
        Ok(route) => route,
        Err(route::BadPath(reason)) => {
            log::debug!("IMDS request refused: {reason}");
            return respond(RouteKind::Invalid, text(400, "Bad Request"));
        }
    };
    let kind = match route {
        Route::Token | Route::DatedToken => RouteKind::Token,
        Route::RoleList => RouteKind::RoleList,
        Route::Credentials(_) => RouteKind::Credentials,
        Route::Other => RouteKind::Other,
    };
    if route == Route::DatedToken {
        if method != b"PUT" {
            return respond(kind, text(405, "Method Not Allowed"));
        }
        counters.token_rejected();
        return respond(kind, text(403, "Forbidden"));
    }
    if route == Route::Token {
        if method != b"PUT" {
            return respond(kind, text(405, "Method Not Allowed"));
        }
        if headers.header(FORWARDED_FOR_HEADER).is_some() {
            counters.token_rejected();
            return respond(kind, text(403, "Forbidden"));
        }
        // Two TTLs are ambiguous: refused as a bad TTL, never first-wins.
        let ttl = if headers.repeated(TTL_HEADER) {
            Err(BadTtl::NotANumber)
        } else {
            token::parse_ttl(headers.header(TTL_HEADER))
        };
        return match ttl {
            Ok(ttl) => {
                counters.token_issued();
                let token = signer.issue(clock.now_ms(), ttl);
                respond(
                    kind,
                    Response { status: 200, content_type: TEXT, token_ttl: Some(ttl), body: token.into_bytes().into() },
                )
            }
            Err(BadTtl::Missing | BadTtl::NotANumber | BadTtl::OutOfRange) => {
                counters.token_rejected();
                respond(kind, text(400, "Bad Request"))
            }
        };
    }
    if method != b"GET" && method != b"HEAD" {
        return respond(kind, text(405, "Method Not Allowed"));
    }
    match headers.header(TOKEN_HEADER) {
        // Two tokens are a malformed token (IMDS answers 401), whichever is
        // valid.
        Some(_) if headers.repeated(TOKEN_HEADER) => {
            counters.token_rejected();
            return respond(kind, text(401, "Unauthorized"));
        }
        Some(token) if signer.verify(token, clock.now_ms()).is_err() => {
            counters.token_rejected();
            return respond(kind, text(401, "Unauthorized"));
        }
        None if config.http_tokens == HttpTokens::Required => {
            return respond(kind, text(401, "Unauthorized"));
        }
        _ => {}
    }
    match route {
        Route::RoleList => respond(
            kind,
            Response { status: 200, content_type: TEXT, token_ttl: None, body: served.role.name().as_bytes().into() },
        ),
        Route::Credentials(name) if name == served.role.name() => {
            let reply = credential_reply(served.cache.lookup(clock.coarse_ms(), config.max_wait_ms, store));
            match &reply {
                Reply::Respond(Response { status: 200, .. }) => counters.cache_hit(),
                _ => counters.cache_miss(),
            }
            (kind, reply)
        }
        _ => respond(kind, text(404, "Not Found")),
    }
}

fn credential_reply(lookup: Lookup<'_>) -> Reply<'_> {
    match lookup {
        Lookup::Hit(body) => {
            Reply::Respond(Response { status: 200, content_type: JSON, token_ttl: None, body: body.into() })
        }
        Lookup::Wait => Reply::Wait,
        Lookup::Fail(failure) if failure.app_status() == 404 => Reply::Respond(text(404, "Not Found")),
        Lookup::Fail(_) => Reply::Respond(text(503, "Service Unavailable")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::cache::memory::MemoryStore;
    use crate::config::PodMetadata;
    use crate::credentials::tests::broker_body;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_800_007_200_000; // 2027-01-15T10:00:00Z
    const ARN: &str = "arn:aws:iam::123456789012:role/team/app";

    /// Headers in arrival order; a name may repeat.
    #[derive(Default, Clone)]
    struct Headers(Vec<(&'static str, &'static str)>);

    impl RequestHeaders for Headers {
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_bytes())
        }

        fn repeated(&self, name: &str) -> bool {
            self.0.iter().filter(|(n, _)| *n == name).count() > 1
        }
    }

    /// A clock stopped at one instant.
    struct At(u64);

    impl Clock for At {
        fn coarse_ms(&self) -> u64 {
            self.0
        }
        fn now_ms(&self) -> u64 {
            self.0
        }
    }

    /// `headers` plus the pseudo-headers of `method path`.
    fn request(method: &'static str, path: &'static str, headers: &Headers) -> Headers {
        let mut all = Headers(vec![(":method", method), (":path", path)]);
        all.0.extend(headers.0.iter().copied());
        all
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> Headers {
        Headers(pairs.to_vec())
    }

    fn responder(config: Config, store: &MemoryStore) -> Responder {
        let pod = PodMetadata {
            enable_label: Some(b"True".to_vec()),
            role_annotation: Some(ARN.as_bytes().to_vec()),
            name: Some(b"web-0".to_vec()),
        };
        Responder::new(config.clone(), config.enablement(&pod), &[7; KEY_LEN], store)
    }

    /// A responder whose cache holds a credential valid for an hour.
    fn warm(config: Config, store: &MemoryStore) -> Responder {
        let mut r = responder(config, store);
        let fetch = r.tick(NOW, store).unwrap();
        assert_eq!(
            fetch.path,
            "/v1/credentials?role_arn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fteam%2Fapp&pod=web-0"
        );
        let body = broker_body("2027-01-15T11:00:00Z");
        r.finish_fetch(NOW, Answer { status: Some(200), retry_after: None, body: &body }, store);
        r
    }

    fn status(r: &mut Responder, method: &'static str, path: &'static str, h: &Headers, store: &MemoryStore) -> u32 {
        match r.respond(&request(method, path, h), &At(NOW), store) {
            Reply::Respond(response) => response.status,
            Reply::Wait => 0,
        }
    }

    fn token(r: &mut Responder, store: &MemoryStore) -> String {
        match r.respond(&request("PUT", "/latest/api/token", &headers(&[(TTL_HEADER, "60")])), &At(NOW), store) {
            Reply::Respond(Response { status: 200, token_ttl: Some(60), body, .. }) => {
                String::from_utf8(body.into_owned()).unwrap()
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn role_list_names_the_role_and_credentials_are_served_from_cache() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let none = Headers::default();
        match r.respond(&request("GET", "/latest/meta-data/iam/security-credentials/", &none), &At(NOW), &store) {
            Reply::Respond(Response { status: 200, content_type: TEXT, body, .. }) => assert_eq!(&*body, b"app"),
            other => panic!("{other:?}"),
        }
        match r.respond(&request("GET", "/2016-09-02/meta-data/iam/security-credentials/app", &none), &At(NOW), &store)
        {
            Reply::Respond(Response { status: 200, content_type: JSON, body, .. }) => {
                assert!(String::from_utf8_lossy(&body).contains("\"AccessKeyId\": \"ASIAEXAMPLE\""));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(status(&mut r, "GET", "/latest/meta-data/iam/security-credentials/other", &none, &store), 404);
        assert_eq!(status(&mut r, "GET", "/latest/meta-data/instance-id", &none, &store), 404);
    }

    #[test]
    fn the_canonical_credential_path_routes_as_the_parser_routes_it() {
        let store = MemoryStore::default();
        let r = warm(Config::default(), &store);
        let served = r.served.as_ref().unwrap();
        let path = served.credentials_path.as_bytes();
        assert_eq!(route::route(path), Ok(Route::Credentials(served.role.name())));
        assert_eq!(path, b"/latest/meta-data/iam/security-credentials/app");
    }

    #[test]
    fn head_answers_like_get_without_a_body() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        match r.respond(
            &request("HEAD", "/latest/meta-data/iam/security-credentials/app", &Headers::default()),
            &At(NOW),
            &store,
        ) {
            Reply::Respond(Response { status: 200, body, .. }) => assert!(body.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unsupported_methods_are_refused() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let none = Headers::default();
        assert_eq!(status(&mut r, "POST", "/latest/meta-data/iam/security-credentials/app", &none, &store), 405);
        assert_eq!(status(&mut r, "PUT", "/latest/meta-data/iam/security-credentials/app", &none, &store), 405);
        assert_eq!(status(&mut r, "GET", "/latest/api/token", &none, &store), 405);
        assert_eq!(status(&mut r, "GET", "/latest/meta-data/../api/token", &none, &store), 400);
    }

    #[test]
    fn token_put_rules() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        assert_eq!(status(&mut r, "PUT", "/latest/api/token", &headers(&[(TTL_HEADER, "21600")]), &store), 200);
        for ttl in ["0", "21601", "abc", ""] {
            assert_eq!(
                status(&mut r, "PUT", "/latest/api/token", &headers(&[(TTL_HEADER, ttl)]), &store),
                400,
                "{ttl}"
            );
        }
        assert_eq!(status(&mut r, "PUT", "/latest/api/token", &Headers::default(), &store), 400);
        let proxied = headers(&[(TTL_HEADER, "60"), (FORWARDED_FOR_HEADER, "10.0.0.1")]);
        assert_eq!(status(&mut r, "PUT", "/latest/api/token", &proxied, &store), 403);
    }

    #[test]
    fn token_put_on_a_dated_path_is_forbidden() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let ttl = headers(&[(TTL_HEADER, "60")]);
        assert_eq!(status(&mut r, "PUT", "/2021-03-23/api/token", &ttl, &store), 403);
        assert_eq!(status(&mut r, "PUT", "/latest/api/token", &ttl, &store), 200);
    }

    #[test]
    fn token_put_with_forwarded_for_is_forbidden() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let proxied = headers(&[(TTL_HEADER, "60"), (FORWARDED_FOR_HEADER, "")]);
        assert_eq!(status(&mut r, "PUT", "/latest/api/token", &proxied, &store), 403);
    }

    #[test]
    fn a_repeated_ttl_header_is_a_bad_request() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        for pair in [["60", "abc"], ["60", "60"], ["abc", "60"]] {
            let twice = headers(&[(TTL_HEADER, pair[0]), (TTL_HEADER, pair[1])]);
            assert_eq!(status(&mut r, "PUT", "/latest/api/token", &twice, &store), 400, "{pair:?}");
        }
    }

    #[test]
    fn a_repeated_token_header_is_unauthorized() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let token: &'static str = Box::leak(token(&mut r, &store).into_boxed_str());
        let path = "/latest/meta-data/iam/security-credentials/app";
        assert_eq!(status(&mut r, "GET", path, &headers(&[(TOKEN_HEADER, token)]), &store), 200);
        for pair in [[token, "forged"], ["forged", token], [token, token]] {
            let twice = headers(&[(TOKEN_HEADER, pair[0]), (TOKEN_HEADER, pair[1])]);
            assert_eq!(status(&mut r, "GET", path, &twice, &store), 401, "{pair:?}");
        }
    }

    #[test]
    fn required_tokens_refuse_imdsv1() {
        let store = MemoryStore::default();
        let mut r = warm(Config { http_tokens: HttpTokens::Required, ..Config::default() }, &store);
        let path = "/latest/meta-data/iam/security-credentials/app";
        assert_eq!(status(&mut r, "GET", path, &Headers::default(), &store), 401);
        let token: &'static str = Box::leak(token(&mut r, &store).into_boxed_str());
        assert_eq!(status(&mut r, "GET", path, &headers(&[(TOKEN_HEADER, token)]), &store), 200);
        assert_eq!(status(&mut r, "GET", path, &headers(&[(TOKEN_HEADER, "forged")]), &store), 401);
    }

    #[test]
    fn a_bad_token_is_refused_even_when_tokens_are_optional() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let path = "/latest/meta-data/iam/security-credentials/";
        assert_eq!(status(&mut r, "GET", path, &headers(&[(TOKEN_HEADER, "AAAA")]), &store), 401);
    }

    #[test]
    fn cold_cache_waits_then_resumes_with_the_credential() {
        let store = MemoryStore::default();
        let mut r = responder(Config::default(), &store);
        let path = "/latest/meta-data/iam/security-credentials/app";
        assert_eq!(status(&mut r, "GET", path, &Headers::default(), &store), 0, "waits");
        assert!(r.resume(NOW, false, &store).is_none());
        assert!(r.tick(NOW, &store).is_some());
        let body = broker_body("2027-01-15T11:00:00Z");
        r.finish_fetch(NOW + 50, Answer { status: Some(200), retry_after: None, body: &body }, &store);
        assert_eq!(r.resume(NOW + 50, false, &store).map(|resp| resp.status), Some(200));
    }

    #[test]
    fn a_wait_that_times_out_answers_503() {
        let store = MemoryStore::default();
        let mut r = responder(Config::default(), &store);
        assert_eq!(r.resume(NOW + 800, true, &store).map(|resp| resp.status), Some(503));
    }

    #[test]
    fn a_denied_role_answers_404() {
        let store = MemoryStore::default();
        let mut r = responder(Config::default(), &store);
        r.tick(NOW, &store).unwrap();
        let body = br#"{"Code":"AccessDenied","Message":"pod does not carry the annotation"}"#;
        r.finish_fetch(NOW, Answer { status: Some(403), retry_after: None, body }, &store);
        let path = "/latest/meta-data/iam/security-credentials/app";
        assert_eq!(status(&mut r, "GET", path, &Headers::default(), &store), 404);
    }

    #[test]
    fn a_denial_withdraws_a_served_credential_at_once() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        let path = "/latest/meta-data/iam/security-credentials/app";
        assert_eq!(status(&mut r, "GET", path, &Headers::default(), &store), 200);
        let refresh_at = NOW + 35 * 60_000;
        r.tick(refresh_at, &store).unwrap();
        let body = br#"{"Code":"AccessDenied","Message":"pod no longer carries the annotation"}"#;
        r.finish_fetch(refresh_at, Answer { status: Some(403), retry_after: None, body }, &store);
        assert_eq!(status(&mut r, "GET", path, &Headers::default(), &store), 404);
    }

    #[test]
    fn a_disabled_pod_answers_404_to_everything() {
        let store = MemoryStore::default();
        let config = Config::default();
        let disabled = config.enablement(&PodMetadata::default());
        let mut r = Responder::new(config, disabled, &[7; KEY_LEN], &store);
        assert!(r.tick(NOW, &store).is_none(), "never calls the broker");
        for (method, path) in [("GET", "/latest/meta-data/iam/security-credentials/"), ("PUT", "/latest/api/token")] {
            assert_eq!(status(&mut r, method, path, &headers(&[(TTL_HEADER, "60")]), &store), 404);
        }
    }

    #[test]
    fn answered_requests_are_counted_by_route_and_class() {
        let store = MemoryStore::default();
        let mut r = warm(Config::default(), &store);
        status(&mut r, "GET", "/latest/meta-data/iam/security-credentials/app", &Headers::default(), &store);
        status(&mut r, "GET", "/latest/meta-data/a/../b", &Headers::default(), &store);
        let names = crate::metrics::names();
        let counts: HashMap<String, u64> = names.into_iter().zip(r.counters.take()).collect();
        assert_eq!(counts["imds_mesh.requests.credentials.2xx"], 1);
        assert_eq!(counts["imds_mesh.requests.invalid.4xx"], 1);
        assert_eq!(counts["imds_mesh.cache.hits"], 1);
        assert_eq!(counts["imds_mesh.broker_fetches.success"], 1);
    }
}
