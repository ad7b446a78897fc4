//! The proxy-wasm shell: translates Envoy's callbacks into calls on the
//! host-free core and the core's answers back into host calls. No decision
//! is made here.
//!
//! Each Envoy worker (and the main thread) has one root context; the HTTP
//! contexts of a worker share its [`Worker`] through an `Rc`, since a worker
//! runs on one thread. Broker calls are made only by root contexts (from
//! `on_tick`), so no request's lifetime can cut a fetch short.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::broker::Answer;
use crate::cache::SharedStore;
use crate::config::{self, Config, Enablement, PodMetadata};
use crate::imds::{self, FetchRequest, Reply, RequestHeaders as _, Responder, Response};
use crate::metrics;
use crate::token::{self, KEY_LEN};

/// Tick while nothing waits: refresh-ahead checks, stats flush, pulling
/// credentials other workers fetched.
const SLOW_TICK: Duration = Duration::from_millis(1000);
/// Tick while requests wait for a fetch (and at start-up, to prefetch).
const FAST_TICK: Duration = Duration::from_millis(20);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| Box::new(Root { context_id, ..Root::default() }));
}}

/// Shared data through proxy-wasm host calls.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(version))) => Some((value, version)),
            // An empty value comes back without data.
            Ok((None, Some(version))) => Some((Vec::new(), version)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], version: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), version).is_ok()
    }
}

/// All request headers, read in one host call: an IMDS request needs
/// several, and each host call costs more than a scan of a short list.
struct HeaderPairs(Vec<(String, Vec<u8>)>);

impl HeaderPairs {
    fn read() -> Self {
        Self(hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default())
    }
}

impl imds::RequestHeaders for HeaderPairs {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    fn repeated(&self, name: &str) -> bool {
        self.0.iter().filter(|(n, _)| n == name).nth(1).is_some()
    }
}

/// The worker's last tick time, and the host's clock when precision counts.
struct HostClock {
    tick_ms: u64,
}

impl imds::Clock for HostClock {
    fn coarse_ms(&self) -> u64 {
        self.tick_ms
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs().saturating_mul(1000).saturating_add(u64::from(d.subsec_millis())))
}

/// What one worker's contexts share.
struct Worker {
    responder: Responder,
    waiters: Vec<Waiter>,
    /// The tick period last set for this worker's root context.
    tick: Option<Duration>,
    /// When this worker's root context last ticked (Unix ms).
    tick_ms: u64,
}

impl Worker {
    /// Sets the root context's tick period (a host call from any context of
    /// the worker sets its root's period) unless it already is `period`.
    fn set_tick(&mut self, period: Duration) {
        if self.tick != Some(period) && hostcalls::set_tick_period(period).is_ok() {
            self.tick = Some(period);
        }
    }
}

/// A request held until a credential lands or its deadline passes.
struct Waiter {
    context_id: u32,
    deadline_ms: u64,
}

#[derive(Default)]
struct Root {
    context_id: u32,
    worker: Option<Rc<RefCell<Worker>>>,
    metric_ids: Vec<u32>,
    fetch_in_flight: Option<u32>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if self.fetch_in_flight != Some(token_id) {
            return;
        }
        self.fetch_in_flight = None;
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u64>().ok())
            .and_then(|s| u32::try_from(s).ok());
        let retry_after =
            hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, "retry-after").ok().flatten();
        let body =
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
        if let Some(worker) = &self.worker {
            let answer = Answer { status, retry_after: retry_after.as_deref(), body: &body };
            worker.borrow_mut().responder.finish_fetch(now_ms(), answer, &HostStore);
        }
        self.answer_waiters();
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw =
            hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten().unwrap_or_default();
        let config = match Config::from_json(&raw) {
            Ok(config) => config,
            Err(e) => {
                log::error!("imds-mesh: {e}");
                return false;
            }
        };
        let Some(key) = token_key() else {
            log::error!("imds-mesh: no randomness for the IMDSv2 token key");
            return false;
        };
        let enablement = config.enablement(&pod_metadata());
        match &enablement {
            Enablement::Enabled { role, pod } => log::info!("imds-mesh: serving role {role} for pod {pod}"),
            Enablement::Disabled { reason } => {
                log::info!("imds-mesh: disabled for this pod ({reason}); IMDS answers 404")
            }
        }
        let responder = Responder::new(config, enablement, &key, &HostStore);
        let mut worker = Worker { responder, waiters: Vec::new(), tick: None, tick_ms: now_ms() };
        worker.set_tick(FAST_TICK); // prefetch promptly
        self.worker = Some(Rc::new(RefCell::new(worker)));
        self.metric_ids = metrics::names()
            .iter()
            .filter_map(|name| hostcalls::define_metric(MetricType::Counter, name).ok())
            .collect();
        true
    }

    fn on_tick(&mut self) {
        let Some(worker) = self.worker.clone() else { return };
        let now = now_ms();
        worker.borrow_mut().tick_ms = now;
        if self.fetch_in_flight.is_none() {
            let request = worker.borrow_mut().responder.tick(now, &HostStore);
            if let Some(request) = request {
                self.dispatch(&worker, &request);
            }
        }
        self.answer_waiters();
        let counts = worker.borrow_mut().responder.counters.take();
        for (id, count) in self.metric_ids.iter().zip(counts) {
            if count > 0 {
                let _ = hostcalls::increment_metric(*id, i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let worker = self.worker.clone()?;
        Some(Box::new(Request { context_id, worker, answered_here: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    fn dispatch(&mut self, worker: &Rc<RefCell<Worker>>, request: &FetchRequest) {
        let cluster = worker.borrow().responder.config().broker_cluster.clone();
        let headers = vec![
            (":method", "GET"),
            (":path", request.path.as_str()),
            (":authority", request.authority.as_str()),
            ("accept", "application/json"),
        ];
        let timeout = Duration::from_millis(request.timeout_ms);
        match hostcalls::dispatch_http_call(&cluster, headers, None, vec![], timeout) {
            Ok(token) => self.fetch_in_flight = Some(token),
            Err(status) => {
                log::warn!("imds-mesh: cannot call broker cluster {cluster}: {status:?}");
                let answer = Answer { status: None, retry_after: None, body: &[] };
                worker.borrow_mut().responder.finish_fetch(now_ms(), answer, &HostStore);
            }
        }
    }

    /// Answers every held request that can be answered now, and picks the
    /// tick period: fast while any request waits.
    fn answer_waiters(&mut self) {
        let Some(worker) = self.worker.clone() else { return };
        let mut w = worker.borrow_mut();
        let now = now_ms();
        let Worker { responder, waiters, .. } = &mut *w;
        waiters.retain(|waiter| {
            let Some(response) = responder.resume(now, now >= waiter.deadline_ms, &HostStore) else {
                return true;
            };
            if hostcalls::set_effective_context(waiter.context_id).is_ok() {
                send(&response);
            }
            false
        });
        let _ = hostcalls::set_effective_context(self.context_id);
        let period = if waiters.is_empty() { SLOW_TICK } else { FAST_TICK };
        w.set_tick(period);
    }
}

/// One HTTP stream on a worker.
struct Request {
    context_id: u32,
    worker: Rc<RefCell<Worker>>,
    /// The filter answers this request (at once or once a fetch lands): its
    /// body and trailers must never let it continue upstream.
    answered_here: bool,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut w = self.worker.borrow_mut();
        // Each host call that returns data re-enters the VM (the host calls
        // back to allocate) and dominates a request's cost. Deployed as
        // rendered, only requests on the metadata filter chain come here, so
        // the full header list, which an IMDS answer needs anyway, is read
        // first and the `:authority` taken from it: one call per request.
        // Where the filter runs on all port-80 traffic (other meshes, the
        // local bootstraps), a request for another host pays for a second
        // call, its original destination.
        let headers = HeaderPairs::read();
        let is_imds = headers.header(":authority").is_some_and(|a| w.responder.config().is_imds_authority(a))
            || hostcalls::get_property(vec!["destination", "address"])
                .ok()
                .flatten()
                .is_some_and(|d| config::is_imds_destination(&d));
        if !is_imds {
            w.responder.counters.passed_on();
            return Action::Continue;
        }
        self.answered_here = true;
        let clock = HostClock { tick_ms: w.tick_ms };
        let max_wait_ms = w.responder.config().max_wait_ms;
        let Worker { responder, waiters, .. } = &mut *w;
        match responder.respond(&headers, &clock, &HostStore) {
            Reply::Respond(response) => send(&response),
            Reply::Wait => {
                let now = now_ms();
                if max_wait_ms == 0 {
                    if let Some(response) = responder.resume(now, true, &HostStore) {
                        send(&response);
                    }
                } else {
                    waiters.push(Waiter { context_id: self.context_id, deadline_ms: now + max_wait_ms });
                    w.set_tick(FAST_TICK);
                }
            }
        }
        Action::Pause
    }

    // A request the filter answers must never continue, whatever arrives
    // after its headers (a body by Content-Length, chunked or HTTP/2 DATA;
    // trailers), above all while it is held for a fetch. Envoy's
    // proxy-wasm host turns a Pause at the headers into
    // StopAllIterationAndWatermark (proxy-wasm-cpp-host's
    // `convertVmCallResultToFilterHeadersStatus`), so today these calls do
    // not come while a request is held; a host that kept plain
    // StopIteration would make them, and the SDK's default Continue would
    // then send the request on to the router and upstream.
    fn on_http_request_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        if self.answered_here { Action::Pause } else { Action::Continue }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.answered_here { Action::Pause } else { Action::Continue }
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        // A client that hung up while waiting must not be answered later.
        if let Ok(mut w) = self.worker.try_borrow_mut() {
            let id = self.context_id;
            w.waiters.retain(|waiter| waiter.context_id != id);
        }
    }
}

fn send(response: &Response<'_>) {
    let ttl = response.token_ttl.map(|t| t.to_string());
    let mut headers = vec![("content-type", response.content_type)];
    if let Some(ttl) = &ttl {
        headers.push((imds::TTL_HEADER, ttl.as_str()));
    }
    let body = (!response.body.is_empty()).then_some(&*response.body);
    let _ = hostcalls::send_http_response(response.status, headers, body);
}

/// The pod's label, annotation and name from node metadata: `xds.node.*`
/// on current Envoy, `node.*` on builds older than the xds attributes.
fn pod_metadata() -> PodMetadata {
    let read = |path: &[&str]| {
        ["xds", ""].iter().find_map(|root| {
            let mut full: Vec<&str> = if root.is_empty() { vec![] } else { vec![root] };
            full.extend(["node", "metadata"]);
            full.extend(path);
            hostcalls::get_property(full).ok().flatten().filter(|v| !v.is_empty())
        })
    };
    PodMetadata {
        enable_label: read(&["LABELS", config::ENABLE_LABEL]),
        role_annotation: read(&["ANNOTATIONS", config::ROLE_ANNOTATION]),
        name: read(&["NAME"]),
    }
}

/// The process-wide token key ([`token::shared_key`]), with a random one
/// offered in case this root context is the first.
fn token_key() -> Option<[u8; KEY_LEN]> {
    let mut fresh = [0u8; KEY_LEN];
    getrandom::fill(&mut fresh).ok()?;
    token::shared_key(&HostStore, &fresh)
}
