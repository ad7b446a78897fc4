//! The broker's credential cache: one entry per (role ARN, namespace,
//! service account), filled by a fetch function the server supplies
//! (TokenRequest then STS `AssumeRoleWithWebIdentity`). It knows nothing of
//! either; it decides when to serve, when to fetch, and how hard upstream may
//! be pushed. What it holds is any [`Expiring`] value: the server stores each
//! credential with its response already rendered, so a hit costs no
//! serialization.
//!
//! What it guarantees:
//! - A credential cached for one [`CacheKey`] is only ever served for that key.
//! - Single flight: concurrent [`Cache::get`]s for a key share one fetch and
//!   all receive its result, success or error. The fetch runs in its own task,
//!   so a caller that gives up (a client disconnect) does not cancel it for
//!   the others.
//! - Refresh ahead: a background task refreshes keys requested within
//!   [`IDLE_EVICT_AFTER`] once they have less than [`REFRESH_BEFORE`] left,
//!   while the current credential keeps being served. A credential with
//!   [`MIN_SERVED_LIFETIME`] or less left is never served, whatever upstream
//!   is doing.
//! - Failures back off per key (exponential with jitter, capped, never before
//!   upstream's `retry_after`); a get during backoff with nothing servable
//!   gets the remembered error at once instead of another upstream call.
//! - Upstream load is bounded: at most `max_concurrent_fetches` fetches run at
//!   once, and fetches start at most `fetches_per_second` (with a burst) on
//!   average, so a cold start of thousands of pods queues here instead of
//!   storming STS and the Kubernetes API.
//! - Memory is bounded: idle keys are evicted, and beyond `max_keys` the
//!   least recently used key goes.
//!
//! Time: every decision is made on the monotonic [`tokio::time::Instant`], so
//! tests drive it with `tokio::time::pause`/`advance`. STS states expiry as a
//! wall-clock time; it is converted once, when the credential is stored, into
//! a monotonic deadline (`now + (expiration - wall_clock())`), using the
//! injectable [`CacheConfig::wall_clock`]. After that a step of the system
//! clock cannot make a stored credential look fresher or staler than it is.
//! The decisions themselves are pure functions ([`is_servable`],
//! [`refresh_due`], [`is_idle`], [`backoff`]) of durations.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::hash::RandomState;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Refresh a credential once it has less than this left. The filter refreshes
/// its own copy with 25 minutes left (`filter::policy::REFRESH_BEFORE_MS`),
/// so what the broker hands out must have more than that: 35 minutes leaves a
/// 10-minute margin for a refresh that fails and has to back off.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(35 * 60);

/// A credential with this much left or less is never served: the filter and
/// the SDK behind it would refetch at once, or sign requests that expire in
/// flight.
pub const MIN_SERVED_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// Credentials upstream hands out must live longer than this: anything
/// shorter is inside [`REFRESH_BEFORE`] with at most [`MIN_SERVED_LIFETIME`]
/// of useful life, so every key in use would be refetched every
/// [`MIN_REFRESH_INTERVAL`]. The broker refuses to start with an STS session
/// duration this short (40 minutes).
pub const MIN_UPSTREAM_LIFETIME: Duration =
    Duration::from_secs(REFRESH_BEFORE.as_secs() + MIN_SERVED_LIFETIME.as_secs());

/// Floor between a successful fetch and the refresh of its result, for an
/// upstream that hands out credentials already inside the refresh window
/// (a role whose session duration is under [`REFRESH_BEFORE`]).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// A key not requested for this long is evicted, and is no longer refreshed.
/// Longer than the longest gap between a filter's requests for a one-hour
/// credential (it gets one with up to 60 minutes left and comes back at 25,
/// so after up to 35 minutes): with a shorter window the default session
/// length would always come back to a cold key and never benefit from
/// refresh ahead.
pub const IDLE_EVICT_AFTER: Duration = Duration::from_secs(45 * 60);

/// Default bound on the number of keys held. An entry holds a role ARN, two
/// Kubernetes names and one credential (the session token is about 1 KiB),
/// so this is a few tens of MiB at most.
pub const MAX_KEYS: usize = 10_000;

/// How often the background task looks for keys to refresh or evict. Small
/// against [`REFRESH_BEFORE`] - [`MIN_SERVED_LIFETIME`] (30 minutes), so a
/// refresh never starts meaningfully late.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Exponential backoff after consecutive failures: first step and ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Upstream's `retry_after` is honoured up to this; beyond it a typo or a
/// hostile value would lock a key out for too long.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(5 * 60);
/// A denial is remembered at least this long: retrying will not change STS's
/// mind soon, and the filter caches denials similarly.
pub const DENIED_BACKOFF: Duration = Duration::from_secs(30);

/// Default upstream limits: fetches in flight, fetch starts per second and
/// the burst allowed above that rate. One fetch is one TokenRequest plus one
/// STS call. STS's per-account request quotas are in the hundreds per
/// second, shared with everything else in the account; these defaults keep
/// one broker replica well below that.
pub const MAX_CONCURRENT_FETCHES: usize = 16;
pub const FETCHES_PER_SECOND: u32 = 20;
pub const FETCH_BURST: u32 = 40;

/// Default time one fetch may take once it has its permit and rate slot.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// What credentials are cached under. A credential fetched for one key is
/// never served for another: the key is the whole identity STS sees (the
/// role, and the token subject `system:serviceaccount:<ns>:<sa>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub role_arn: String,
    pub namespace: String,
    pub service_account: String,
}

/// What the cache can hold: a value that stops being usable at a wall-clock
/// time. The server caches credentials together with their rendered
/// response, so a hit serves bytes built once per fetch.
pub trait Expiring: Send + Sync + 'static {
    /// When upstream says the value stops working.
    fn expiration(&self) -> OffsetDateTime;
}

/// How a fetch failed, as far as the cache's scheduling cares. The server
/// maps these to the v1 contract (Throttled 429, Denied 403, Failed 502/503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorKind {
    /// Upstream asked us to slow down.
    Throttled,
    /// Upstream refused this identity the role.
    Denied,
    /// Anything else: upstream down, a malformed answer, a timeout.
    Failed,
}

/// Where a fetch failed. The cache schedules by [`FetchErrorKind`] alone; the
/// server answers each place differently (an STS refusal is the caller's
/// 502, a Kubernetes outage the broker's 503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailedAt {
    /// STS, with its error code.
    Sts { code: String },
    /// The Kubernetes API (the TokenRequest).
    Kubernetes,
    /// The cache itself: a timeout, credentials too short to serve.
    Cache,
}

/// A failed fetch. Cloned to every waiter of the fetch and remembered for the
/// backoff, so `detail` must never carry a secret (an STS error code and
/// fixed text are fine; a token is not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct FetchError {
    pub kind: FetchErrorKind,
    /// Upstream's own "not before" hint (STS throttling, HTTP `Retry-After`).
    pub retry_after: Option<Duration>,
    pub failed_at: FailedAt,
    pub detail: String,
}

impl FetchError {
    /// A [`FetchErrorKind::Failed`] error of the cache's own, without a
    /// retry hint.
    pub fn failed(detail: impl Into<String>) -> Self {
        Self::failed_at(FailedAt::Cache, detail)
    }

    /// A [`FetchErrorKind::Failed`] error at `failed_at`, without a retry hint.
    pub fn failed_at(failed_at: FailedAt, detail: impl Into<String>) -> Self {
        Self { kind: FetchErrorKind::Failed, retry_after: None, failed_at, detail: detail.into() }
    }
}

/// The future a fetch returns.
pub type FetchFuture<T> = Pin<Box<dyn Future<Output = Result<T, FetchError>> + Send>>;

/// The wall clock STS expirations are read against.
pub type WallClock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// Limits and the clock. [`Default`] gives the named constants and the
/// system clock.
#[derive(Clone)]
pub struct CacheConfig {
    /// At most this many keys are held; beyond it the least recently used
    /// key is evicted (idle keys first).
    pub max_keys: usize,
    /// At most this many fetches run at once across all keys.
    pub max_concurrent_fetches: usize,
    /// Fetch starts per second, on average, across all keys.
    pub fetches_per_second: u32,
    /// Fetch starts allowed at once above that rate after a quiet period.
    pub fetch_burst: u32,
    /// Time one fetch may take, counted from when it starts (after its
    /// permit and rate slot), so queueing never makes a fetch time out.
    pub fetch_timeout: Duration,
    /// Reads STS expirations; `OffsetDateTime::now_utc` outside tests.
    pub wall_clock: WallClock,
    /// [`REFRESH_BEFORE`]; service-level tests shorten the refresh timing.
    pub refresh_before: Duration,
    /// [`MIN_REFRESH_INTERVAL`].
    pub min_refresh_interval: Duration,
    /// [`SWEEP_INTERVAL`].
    pub sweep_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_keys: MAX_KEYS,
            max_concurrent_fetches: MAX_CONCURRENT_FETCHES,
            fetches_per_second: FETCHES_PER_SECOND,
            fetch_burst: FETCH_BURST,
            fetch_timeout: FETCH_TIMEOUT,
            wall_clock: Arc::new(OffsetDateTime::now_utc),
            refresh_before: REFRESH_BEFORE,
            min_refresh_interval: MIN_REFRESH_INTERVAL,
            sweep_interval: SWEEP_INTERVAL,
        }
    }
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("max_keys", &self.max_keys)
            .field("max_concurrent_fetches", &self.max_concurrent_fetches)
            .field("fetches_per_second", &self.fetches_per_second)
            .field("fetch_burst", &self.fetch_burst)
            .field("fetch_timeout", &self.fetch_timeout)
            .field("refresh_before", &self.refresh_before)
            .field("min_refresh_interval", &self.min_refresh_interval)
            .field("sweep_interval", &self.sweep_interval)
            .finish_non_exhaustive()
    }
}

/// A snapshot of the cache's counters, for the server's `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Gets answered from a servable credential.
    pub hits: u64,
    /// Gets with nothing servable (they joined a fetch, started one, or got
    /// the remembered error during backoff).
    pub misses: u64,
    /// Upstream fetches started (each one TokenRequest plus one STS call).
    pub fetches: u64,
    /// Of those, refreshes: started while a servable credential existed.
    pub refreshes: u64,
    /// Fetches that failed (including credentials that expire too soon).
    pub fetch_errors: u64,
    /// Keys evicted, idle or over `max_keys`.
    pub evictions: u64,
    /// Keys held now.
    pub keys: usize,
    /// Fetches holding a concurrency permit now.
    pub fetches_in_flight: usize,
}

// ---------------------------------------------------------------------------
// The decisions, as pure functions of durations.

/// May a credential with `remaining` life left be served?
pub fn is_servable(remaining: Duration) -> bool {
    remaining > MIN_SERVED_LIFETIME
}

/// Should a credential fetched `age` ago, with `remaining` left, be
/// refreshed, given `refresh_before` ([`REFRESH_BEFORE`]) and
/// `min_interval` ([`MIN_REFRESH_INTERVAL`])?
pub fn refresh_due(age: Duration, remaining: Duration, refresh_before: Duration, min_interval: Duration) -> bool {
    remaining < refresh_before && age >= min_interval
}

/// Has a key not requested for `unused_for` gone idle?
pub fn is_idle(unused_for: Duration) -> bool {
    unused_for >= IDLE_EVICT_AFTER
}

/// How long a key waits before its next fetch after `failures` consecutive
/// failures (this one included). `jitter` in `[0, 1)` spreads the retries of
/// keys that failed together (an STS outage fails them all at once).
///
/// "Equal jitter": the exponential step is kept at least half, so no retry
/// comes almost immediately, and the other half is random. Upstream's
/// `retry_after` (up to [`RETRY_AFTER_MAX`]) and, for a denial,
/// [`DENIED_BACKOFF`] are floors.
pub fn backoff(kind: FetchErrorKind, failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let doublings = failures.clamp(1, 16) - 1;
    let step = BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX);
    let jittered = step / 2 + step.mul_f64(jitter.clamp(0.0, 1.0)) / 2;
    let floor = match kind {
        FetchErrorKind::Denied => DENIED_BACKOFF,
        FetchErrorKind::Throttled | FetchErrorKind::Failed => Duration::ZERO,
    };
    let upstream = retry_after.map_or(Duration::ZERO, |after| after.min(RETRY_AFTER_MAX));
    jittered.max(floor).max(upstream)
}

/// A token bucket in its GCRA form: each fetch reserves the next start time,
/// so waiters start in arrival order and nothing polls.
#[derive(Debug)]
struct RateLimiter {
    /// Time between two starts at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained rate a burst may run.
    tolerance: Duration,
    /// The "theoretical arrival time" of the next start at the sustained rate.
    next: Option<Instant>,
}

impl RateLimiter {
    fn new(per_second: u32, burst: u32) -> Self {
        let interval = Duration::from_secs(1) / per_second.max(1);
        Self { interval, tolerance: interval * (burst.max(1) - 1), next: None }
    }

    /// Reserves a start and returns when it is; `now` if there is room.
    fn reserve(&mut self, now: Instant) -> Instant {
        let theoretical = self.next.map_or(now, |next| next.max(now));
        self.next = Some(theoretical + self.interval);
        theoretical.checked_sub(self.tolerance).map_or(now, |start| start.max(now))
    }
}

// ---------------------------------------------------------------------------
// The cache.

type Outcome<T> = Result<Arc<T>, FetchError>;
type FetchFn<T> = Arc<dyn Fn(CacheKey) -> FetchFuture<T> + Send + Sync>;

/// The credential cache. Create it inside a tokio runtime ([`Cache::new`]
/// spawns the refresh task); share it behind an `Arc`. Dropping it stops the
/// refresh task; fetches already running finish and are discarded.
pub struct Cache<T> {
    inner: Arc<Inner<T>>,
    sweeper: JoinHandle<()>,
}

struct Inner<T> {
    config: CacheConfig,
    fetch: FetchFn<T>,
    entries: Mutex<HashMap<CacheKey, Entry<T>>>,
    permits: Semaphore,
    rate: Mutex<RateLimiter>,
    /// Seeds the backoff jitter: `RandomState` is randomly keyed per process,
    /// so replicas decorrelate, and hashing (key, failures) gives each key its
    /// own jitter without a `rand` dependency.
    jitter: RandomState,
    next_fetch_id: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    fetches: AtomicU64,
    refreshes: AtomicU64,
    fetch_errors: AtomicU64,
    evictions: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Entry<T> {
    current: Option<Stored<T>>,
    inflight: Option<InFlight<T>>,
    /// Consecutive failed fetches.
    failures: u32,
    /// The last failure, answered during backoff when nothing is servable.
    last_error: Option<FetchError>,
    /// No fetch starts before this (backoff).
    retry_at: Instant,
    last_used: Instant,
}

struct Stored<T> {
    credentials: Arc<T>,
    fetched_at: Instant,
    /// Monotonic form of `credentials.expiration()`.
    expires_at: Instant,
}

// By hand: a derive would require `T: Clone`, and only the `Arc` is cloned.
impl<T> Clone for Stored<T> {
    fn clone(&self) -> Self {
        Self { credentials: Arc::clone(&self.credentials), fetched_at: self.fetched_at, expires_at: self.expires_at }
    }
}

struct InFlight<T> {
    /// Tells this fetch's result apart from a later one's, should the key be
    /// evicted and re-created while it runs.
    id: u64,
    result: watch::Receiver<Option<Outcome<T>>>,
}

impl<T> Entry<T> {
    fn new(now: Instant) -> Self {
        Self { current: None, inflight: None, failures: 0, last_error: None, retry_at: now, last_used: now }
    }

    /// Drops a credential that may no longer be served, so it can be neither
    /// served nor kept in memory.
    fn forget_unservable(&mut self, now: Instant) {
        if self.current.as_ref().is_some_and(|stored| !is_servable(stored.expires_at.saturating_duration_since(now))) {
            self.current = None;
        }
    }

    /// Is a servable credential here due for a refresh that may start now?
    fn wants_refresh(&self, now: Instant, config: &CacheConfig) -> bool {
        self.inflight.is_none()
            && now >= self.retry_at
            && !is_idle(now.saturating_duration_since(self.last_used))
            && self.current.as_ref().is_some_and(|stored| {
                refresh_due(
                    now.saturating_duration_since(stored.fetched_at),
                    stored.expires_at.saturating_duration_since(now),
                    config.refresh_before,
                    config.min_refresh_interval,
                )
            })
    }
}

impl<T: Expiring> Cache<T> {
    /// A cache that fills itself with `fetch`. Must be called inside a tokio
    /// runtime.
    pub fn new<F>(config: CacheConfig, fetch: F) -> Self
    where
        F: Fn(CacheKey) -> FetchFuture<T> + Send + Sync + 'static,
    {
        let inner = Arc::new(Inner {
            permits: Semaphore::new(config.max_concurrent_fetches.max(1)),
            rate: Mutex::new(RateLimiter::new(config.fetches_per_second, config.fetch_burst)),
            config,
            fetch: Arc::new(fetch),
            entries: Mutex::new(HashMap::new()),
            jitter: RandomState::new(),
            next_fetch_id: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let sweeper = tokio::spawn(sweep_forever(Arc::downgrade(&inner), inner.config.sweep_interval));
        Self { inner, sweeper }
    }

    /// Credentials for `key`: the cached ones while servable, else the result
    /// of a fetch (joining one already running), else, during backoff, the
    /// last error. Waiting for a fetch has no time limit of its own here
    /// (the fetch has [`CacheConfig::fetch_timeout`] once it starts; queueing
    /// for a permit or rate slot is not counted), so the server puts its own
    /// deadline around this call.
    pub async fn get(&self, key: &CacheKey) -> Result<Arc<T>, FetchError> {
        let mut result = {
            let now = Instant::now();
            let mut entries = self.inner.lock_entries();
            // Hits first, by lookup alone: only a key that is not there yet
            // is cloned into the map.
            if let Some(entry) = entries.get_mut(key)
                && let Some(credentials) = self.inner.serve(key, entry, now)
            {
                return Ok(credentials);
            }
            if !entries.contains_key(key) {
                self.inner.make_room(&mut entries, now);
            }
            let entry = entries.entry(key.clone()).or_insert_with(|| Entry::new(now));
            entry.last_used = now;
            Counters::bump(&self.inner.counters.misses);
            match (&entry.inflight, &entry.last_error) {
                (Some(inflight), _) => inflight.result.clone(),
                (None, Some(error)) if now < entry.retry_at => return Err(error.clone()),
                (None, _) => self.inner.start_fetch(key, entry),
            }
        };
        match result.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or_else(|| Err(FetchError::failed("fetch ended without a result"))),
            // The fetch task went away without answering (runtime shutdown).
            Err(_) => Err(FetchError::failed("fetch abandoned")),
        }
    }

    /// The hit half of [`Cache::get`]: credentials for `key` if servable
    /// ones are cached (counted as a hit, and refreshed if due), else `None`
    /// with nothing counted or started. Lets a caller answer hits without
    /// setting up a deadline for the wait a miss may need.
    pub fn get_cached(&self, key: &CacheKey) -> Option<Arc<T>> {
        let now = Instant::now();
        let mut entries = self.inner.lock_entries();
        let entry = entries.get_mut(key)?;
        self.inner.serve(key, entry, now)
    }

    /// Starts a fetch for `key` ahead of any request (prefetch), unless a
    /// servable credential is cached, a fetch is running, or the key is
    /// backing off after a failure; returns whether it started one. Counts
    /// no hit or miss. The key counts as used now, so it is kept and
    /// refreshed like a key a pod asked for, and evicted like one if no pod
    /// ever does. The fetch queues for the same permits and rate as any
    /// other.
    pub fn prefetch(&self, key: &CacheKey) -> bool {
        let now = Instant::now();
        let mut entries = self.inner.lock_entries();
        if !entries.contains_key(key) {
            self.inner.make_room(&mut entries, now);
        }
        let entry = entries.entry(key.clone()).or_insert_with(|| Entry::new(now));
        entry.last_used = now;
        entry.forget_unservable(now);
        if entry.current.is_some() || entry.inflight.is_some() || now < entry.retry_at {
            return false;
        }
        self.inner.start_fetch(key, entry);
        true
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        let counters = &self.inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            hits: load(&counters.hits),
            misses: load(&counters.misses),
            fetches: load(&counters.fetches),
            refreshes: load(&counters.refreshes),
            fetch_errors: load(&counters.fetch_errors),
            evictions: load(&counters.evictions),
            keys: self.inner.lock_entries().len(),
            fetches_in_flight: self
                .inner
                .config
                .max_concurrent_fetches
                .max(1)
                .saturating_sub(self.inner.permits.available_permits()),
        }
    }
}

impl<T> Drop for Cache<T> {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl<T: Expiring> fmt::Debug for Cache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache").field("config", &self.inner.config).field("stats", &self.stats()).finish()
    }
}

/// The background task: refresh and evict every [`SWEEP_INTERVAL`]. It holds
/// the cache only weakly, so it ends once the cache is gone even if the abort
/// in `Drop` were missed.
async fn sweep_forever<T: Expiring>(inner: Weak<Inner<T>>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.sweep();
    }
}

impl<T: Expiring> Inner<T> {
    fn lock_entries(&self) -> MutexGuard<'_, HashMap<CacheKey, Entry<T>>> {
        // Nothing panics while holding the lock; if something ever did, the
        // map is still consistent entry by entry, so keep going.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks `entry` used and answers its credential while servable (a hit),
    /// starting a refresh if one is due.
    fn serve(self: &Arc<Self>, key: &CacheKey, entry: &mut Entry<T>, now: Instant) -> Option<Arc<T>> {
        entry.last_used = now;
        entry.forget_unservable(now);
        let credentials = Arc::clone(&entry.current.as_ref()?.credentials);
        Counters::bump(&self.counters.hits);
        if entry.wants_refresh(now, &self.config) {
            self.start_fetch(key, entry);
        }
        Some(credentials)
    }

    fn sweep(self: &Arc<Self>) {
        let now = Instant::now();
        let mut entries = self.lock_entries();
        let before = entries.len();
        entries.retain(|_, entry| entry.inflight.is_some() || !is_idle(now.saturating_duration_since(entry.last_used)));
        self.counters.evictions.fetch_add((before - entries.len()) as u64, Ordering::Relaxed);
        for (key, entry) in entries.iter_mut() {
            entry.forget_unservable(now);
            if entry.wants_refresh(now, &self.config) {
                self.start_fetch(key, entry);
            }
        }
    }

    /// Makes room for one more key: idle keys first, then the least recently
    /// used, preferring keys with no fetch running (their waiters still get
    /// the result; only the storing is lost). The scan is linear, but only
    /// runs at the bound, and a full map of busy keys is the rare case.
    fn make_room(&self, entries: &mut HashMap<CacheKey, Entry<T>>, now: Instant) {
        let max_keys = self.config.max_keys.max(1);
        if entries.len() < max_keys {
            return;
        }
        let before = entries.len();
        entries.retain(|_, entry| entry.inflight.is_some() || !is_idle(now.saturating_duration_since(entry.last_used)));
        while entries.len() >= max_keys {
            let oldest = entries
                .iter()
                .min_by_key(|(_, entry)| (entry.inflight.is_some(), entry.last_used))
                .map(|(key, _)| key.clone());
            let Some(oldest) = oldest else { break };
            entries.remove(&oldest);
        }
        self.counters.evictions.fetch_add((before - entries.len()) as u64, Ordering::Relaxed);
    }

    /// Starts a fetch for `key` in its own task and returns where its result
    /// will appear. The caller holds the entries lock and has checked that
    /// no fetch is running for the key.
    fn start_fetch(self: &Arc<Self>, key: &CacheKey, entry: &mut Entry<T>) -> watch::Receiver<Option<Outcome<T>>> {
        let (sender, result) = watch::channel(None);
        let id = self.next_fetch_id.fetch_add(1, Ordering::Relaxed);
        entry.inflight = Some(InFlight { id, result: result.clone() });
        if entry.current.is_some() {
            Counters::bump(&self.counters.refreshes);
        }
        let inner = Arc::clone(self);
        let key = key.clone();
        tokio::spawn(async move {
            let fetched = inner.call_upstream(&key).await;
            let outcome = inner.store(&key, id, fetched);
            // Receivers may all be gone (a background refresh); keep the value anyway.
            sender.send_replace(Some(outcome));
        });
        result
    }

    /// One upstream call: a concurrency permit, then a rate slot, then the
    /// fetch under its timeout. The permit comes first so that at most
    /// `max_concurrent_fetches` reservations are ever waiting on the rate
    /// limiter, and the fetch starts as soon as its slot comes.
    async fn call_upstream(&self, key: &CacheKey) -> Result<T, FetchError> {
        let Ok(_permit) = self.permits.acquire().await else {
            // The semaphore is never closed.
            return Err(FetchError::failed("fetch limiter closed"));
        };
        let start = self.rate.lock().unwrap_or_else(PoisonError::into_inner).reserve(Instant::now());
        if start > Instant::now() {
            tokio::time::sleep_until(start).await;
        }
        Counters::bump(&self.counters.fetches);
        // Its own task, so a panicking fetch becomes an error for the waiters
        // instead of a key stuck "in flight" forever.
        let mut task = tokio::spawn((self.fetch)(key.clone()));
        match tokio::time::timeout(self.config.fetch_timeout, &mut task).await {
            Ok(Ok(fetched)) => fetched,
            Ok(Err(_)) => Err(FetchError::failed("fetch task failed")),
            Err(_) => {
                task.abort();
                Err(FetchError::failed("fetch timed out"))
            }
        }
    }

    /// Records a fetch's result in its entry (if the entry still exists and
    /// is still waiting for this fetch) and returns what the waiters get.
    fn store(&self, key: &CacheKey, id: u64, fetched: Result<T, FetchError>) -> Outcome<T> {
        let now = Instant::now();
        let outcome = fetched.and_then(|credentials| {
            let left = credentials.expiration() - (self.config.wall_clock)();
            let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
            if is_servable(left) {
                Ok(Stored { credentials: Arc::new(credentials), fetched_at: now, expires_at: now + left })
            } else {
                Err(FetchError::failed("upstream returned credentials that expire too soon to serve"))
            }
        });
        if outcome.is_err() {
            Counters::bump(&self.counters.fetch_errors);
        }
        let mut entries = self.lock_entries();
        let entry =
            entries.get_mut(key).filter(|entry| entry.inflight.as_ref().is_some_and(|inflight| inflight.id == id));
        if let Some(entry) = entry {
            entry.inflight = None;
            match &outcome {
                Ok(stored) => {
                    entry.current = Some(stored.clone());
                    entry.failures = 0;
                    entry.last_error = None;
                    entry.retry_at = now;
                }
                Err(error) => {
                    // The current credential, if any, stays: it is served
                    // while servable.
                    entry.failures = entry.failures.saturating_add(1);
                    let jitter = self.jitter(key, entry.failures);
                    entry.retry_at = now + backoff(error.kind, entry.failures, error.retry_after, jitter);
                    entry.last_error = Some(error.clone());
                }
            }
        }
        outcome.map(|stored| stored.credentials)
    }

    /// A number in `[0, 1)` fixed for (key, failures) in this process.
    fn jitter(&self, key: &CacheKey, failures: u32) -> f64 {
        let hash = self.jitter.hash_one((key, failures));
        // The top 53 bits, exactly representable in an f64.
        (hash >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests;
