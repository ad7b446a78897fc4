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

/// Lazy access to request headers: the shell fetches one only when a route
/// needs it.
pub trait RequestHeaders {
    fn header(&self, name: &str) -> Option<Vec<u8>>;
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
            Enablement::Enabled { role, pod } => {
                Some(Served { cache: CredentialCache::new(&role, store), role, pod })
            }
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
        method: &[u8],
        path: &[u8],
        headers: &impl RequestHeaders,
        now_ms: u64,
        store: &impl SharedStore,
    ) -> Reply<'_> {
        let Self { config, served, signer, counters } = self;
        let (kind, reply) = route_request(config, served, signer, counters, method, path, headers, now_ms, store);
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
    path: &[u8],
    headers: &impl RequestHeaders,
    now_ms: u64,
    store: &impl SharedStore,
) -> (RouteKind, Reply<'a>) {
    let respond = |kind, response| (kind, Reply::Respond(response));
    let Some(served) = served else {
        return respond(RouteKind::Other, text(404, "Not Found"));
    };
    let route = match route::route(path) {
        Ok(route) => route,
        Err(route::BadPath(reason)) => {
            log::debug!("IMDS request refused: {reason}");
            return respond(RouteKind::Invalid, text(400, "Bad Request"));
        }
    };
    let kind = match route {
        Route::Token => RouteKind::Token,
        Route::RoleList => RouteKind::RoleList,
        Route::Credentials(_) => RouteKind::Credentials,
        Route::Other => RouteKind::Other,
    };
    if route == Route::Token {
        if method != b"PUT" {
            return respond(kind, text(405, "Method Not Allowed"));
        }
        if headers.header(FORWARDED_FOR_HEADER).is_some() {
            counters.token_rejected();
            return respond(kind, text(403, "Forbidden"));
        }
        return match token::parse_ttl(headers.header(TTL_HEADER).as_deref()) {
            Ok(ttl) => {
                counters.token_issued();
                let token = signer.issue(now_ms, ttl);
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
        Some(token) => {
            if signer.verify(&token, now_ms).is_err() {
                counters.token_rejected();
                return respond(kind, text(401, "Unauthorized"));
            }
        }
        None if config.http_tokens == HttpTokens::Required => {
            return respond(kind, text(401, "Unauthorized"));
        }
        None => {}
    }
    match route {
        Route::RoleList => respond(
            kind,
            Response { status: 200, content_type: TEXT, token_ttl: None, body: served.role.name().as_bytes().into() },
        ),
        Route::Credentials(name) if name == served.role.name() => {
            let reply = credential_reply(served.cache.lookup(now_ms, config.max_wait_ms, store));
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
        Lookup::Hit(body) => Reply::Respond(Response { status: 200, content_type: JSON, token_ttl: None, body: body.into() }),
        Lookup::Wait => Reply::Wait,
        Lookup::Fail(failure) if failure.app_status() == 404 => Reply::Respond(text(404, "Not Found")),
        Lookup::Fail(_) => Reply::Respond(text(503, "Service Unavailable")),
    }
}
