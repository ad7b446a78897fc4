//! Unit tests of `cache.rs`, kept apart so the cache reads in one screen or
//! two: its pure decisions, then the cache over a scripted fake upstream on
//! tokio's paused clock (no sleeps), checking each guarantee the module
//! promises.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::sts::Credentials;

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn key(role: &str, namespace: &str, service_account: &str) -> CacheKey {
    CacheKey {
        role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
    }
}

fn nth_key(n: usize) -> CacheKey {
    key("app", &format!("ns-{n}"), "default")
}

/// A wall clock that moves with tokio's (paused) clock.
fn test_clock() -> WallClock {
    let start = Instant::now();
    let wall = OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap();
    Arc::new(move || wall + start.elapsed())
}

fn config() -> CacheConfig {
    CacheConfig { wall_clock: test_clock(), ..CacheConfig::default() }
}

/// What the fake upstream does for one call.
struct Reply {
    /// How long the call takes.
    after: Duration,
    /// If set, the call also waits for a permit from here.
    gate: Option<Arc<Semaphore>>,
    /// The credential's lifetime, or the error.
    result: Result<Duration, FetchError>,
}

fn ok(lifetime: Duration) -> Reply {
    Reply { after: Duration::ZERO, gate: None, result: Ok(lifetime) }
}

fn err(kind: FetchErrorKind, retry_after: Option<Duration>) -> Reply {
    Reply {
        after: Duration::ZERO,
        gate: None,
        result: Err(FetchError { kind, retry_after, failed_at: FailedAt::Cache, detail: "scripted".into() }),
    }
}

/// Records every call the cache makes upstream.
#[derive(Default)]
struct Upstream {
    calls: Mutex<Vec<(CacheKey, Instant)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Upstream {
    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
    fn keys(&self) -> Vec<CacheKey> {
        self.calls.lock().unwrap().iter().map(|(key, _)| key.clone()).collect()
    }
}

/// A cache over a fake upstream; `script(key, n)` answers the n-th call
/// (1-based). Credentials name the key and the call number.
fn cache_with(
    config: CacheConfig,
    script: impl Fn(&CacheKey, usize) -> Reply + Send + Sync + 'static,
) -> (Cache<Credentials>, Arc<Upstream>) {
    let upstream = Arc::new(Upstream::default());
    let script = Arc::new(script);
    let clock = Arc::clone(&config.wall_clock);
    let recorder = Arc::clone(&upstream);
    let cache = Cache::new(config, move |key: CacheKey| {
        let upstream = Arc::clone(&recorder);
        let script = Arc::clone(&script);
        let clock = Arc::clone(&clock);
        Box::pin(async move {
            let n = {
                let mut calls = upstream.calls.lock().unwrap();
                calls.push((key.clone(), Instant::now()));
                calls.len()
            };
            let reply = script(&key, n);
            let now_in_flight = upstream.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            upstream.max_in_flight.fetch_max(now_in_flight, Ordering::SeqCst);
            if let Some(gate) = reply.gate {
                gate.acquire().await.unwrap().forget();
            }
            if !reply.after.is_zero() {
                tokio::time::sleep(reply.after).await;
            }
            upstream.in_flight.fetch_sub(1, Ordering::SeqCst);
            reply.result.map(|lifetime| Credentials {
                access_key_id: format!("AK-{}-{}-{}-{n}", key.role_arn, key.namespace, key.service_account),
                secret_access_key: format!("secret-{n}"),
                session_token: format!("token-{n}"),
                expiration: clock() + lifetime,
                last_updated: clock(),
            })
        }) as FetchFuture<Credentials>
    });
    (cache, upstream)
}

/// Lets spawned tasks run to their next wait, without moving the clock.
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

// --- pure decisions -----------------------------------------------------

#[test]
fn refresh_window_leaves_the_filter_its_margin() {
    // The filter refreshes with 25 minutes left; what we serve must
    // outlast that by at least the time we may spend failing to refresh.
    let filter_refresh_before = Duration::from_secs(25 * 60);
    assert!(REFRESH_BEFORE >= filter_refresh_before + Duration::from_secs(10 * 60));
    assert!(MIN_SERVED_LIFETIME < REFRESH_BEFORE);
    assert!(SWEEP_INTERVAL * 10 < REFRESH_BEFORE - MIN_SERVED_LIFETIME);
}

#[test]
fn servable_needs_more_than_min_served_lifetime() {
    assert!(!is_servable(Duration::ZERO));
    assert!(!is_servable(MIN_SERVED_LIFETIME));
    assert!(is_servable(MIN_SERVED_LIFETIME + Duration::from_secs(1)));
}

#[test]
fn refresh_is_due_inside_the_window_but_not_right_after_a_fetch() {
    let due = |age, remaining| refresh_due(age, remaining, REFRESH_BEFORE, MIN_REFRESH_INTERVAL);
    assert!(!due(10 * MINUTE, REFRESH_BEFORE));
    assert!(due(10 * MINUTE, REFRESH_BEFORE - Duration::from_secs(1)));
    assert!(!due(MIN_REFRESH_INTERVAL - Duration::from_secs(1), 10 * MINUTE));
    assert!(due(MIN_REFRESH_INTERVAL, 10 * MINUTE));
}

#[test]
fn idle_after_idle_evict_after() {
    assert!(!is_idle(IDLE_EVICT_AFTER - Duration::from_secs(1)));
    assert!(is_idle(IDLE_EVICT_AFTER));
}

#[test]
fn backoff_doubles_with_jitter_is_capped_and_honours_upstream_floors() {
    use FetchErrorKind::*;
    assert_eq!(backoff(Failed, 1, None, 0.0), BACKOFF_BASE / 2);
    assert!(backoff(Failed, 1, None, 0.999) < BACKOFF_BASE);
    assert_eq!(backoff(Failed, 2, None, 0.0), BACKOFF_BASE);
    assert!(backoff(Failed, 3, None, 0.5) > backoff(Failed, 2, None, 0.5));
    assert!(backoff(Failed, 3, None, 0.0) < backoff(Failed, 3, None, 0.9));
    assert_eq!(backoff(Failed, u32::MAX, None, 0.999_999).max(BACKOFF_MAX), BACKOFF_MAX);
    assert!(backoff(Failed, u32::MAX, None, 0.0) >= BACKOFF_MAX / 2);
    assert_eq!(backoff(Throttled, 1, Some(90 * Duration::from_secs(1)), 0.5), Duration::from_secs(90));
    assert_eq!(backoff(Throttled, 1, Some(HOUR), 0.5), RETRY_AFTER_MAX);
    assert_eq!(backoff(Denied, 1, None, 0.5), DENIED_BACKOFF);
}

#[test]
fn rate_limiter_allows_the_burst_then_the_rate() {
    let mut limiter = RateLimiter::new(5, 3);
    let now = Instant::now();
    let starts: Vec<_> = (0..6).map(|_| limiter.reserve(now) - now).collect();
    let ms = Duration::from_millis;
    assert_eq!(starts, [ms(0), ms(0), ms(0), ms(200), ms(400), ms(600)]);
    // After a quiet period the burst is available again, not more.
    let later = now + Duration::from_secs(10);
    let starts: Vec<_> = (0..4).map(|_| limiter.reserve(later) - later).collect();
    assert_eq!(starts, [ms(0), ms(0), ms(0), ms(200)]);
}

// --- the cache ------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn two_hundred_concurrent_gets_on_five_keys_cause_five_fetches() {
    let (cache, upstream) = cache_with(config(), |_, _| Reply { after: Duration::from_millis(100), ..ok(HOUR) });
    let cache = Arc::new(cache);
    let gets: Vec<_> = (0..200)
        .map(|i| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                let key = nth_key(i % 5);
                (cache.get(&key).await, key)
            })
        })
        .collect();
    for get in gets {
        let (credentials, key) = get.await.unwrap();
        let credentials = credentials.unwrap();
        assert!(credentials.access_key_id.contains(&format!("-{}-", key.namespace)));
    }
    assert_eq!(upstream.calls(), 5);
    let mut keys = upstream.keys();
    keys.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    assert_eq!(keys, (0..5).map(nth_key).collect::<Vec<_>>());
    let stats = cache.stats();
    assert_eq!((stats.fetches, stats.hits + stats.misses, stats.keys), (5, 200, 5));
}

#[tokio::test(start_paused = true)]
async fn concurrent_waiters_all_receive_the_one_fetch_error() {
    let (cache, upstream) =
        cache_with(config(), |_, _| Reply { after: Duration::from_millis(100), ..err(FetchErrorKind::Failed, None) });
    let cache = Arc::new(cache);
    let gets: Vec<_> = (0..50)
        .map(|_| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(&nth_key(0)).await })
        })
        .collect();
    for get in gets {
        assert_eq!(get.await.unwrap().unwrap_err().detail, "scripted");
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!(cache.stats().fetch_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn keys_never_cross_namespaces_service_accounts_or_roles() {
    let (cache, upstream) = cache_with(config(), |_, _| ok(HOUR));
    let keys = [key("app", "a", "x"), key("app", "b", "x"), key("app", "a", "y"), key("other", "a", "x")];
    let mut served = Vec::new();
    for key in &keys {
        served.push(cache.get(key).await.unwrap());
    }
    assert_eq!(upstream.keys(), keys);
    for (key, credentials) in keys.iter().zip(&served) {
        let expected_prefix = format!("AK-{}-{}-{}-", key.role_arn, key.namespace, key.service_account);
        assert!(credentials.access_key_id.starts_with(&expected_prefix));
        // Asked again, each key gets its own credential back.
        assert_eq!(&cache.get(key).await.unwrap(), credentials);
    }
    assert_eq!(upstream.calls(), keys.len());
}

#[tokio::test(start_paused = true)]
async fn refresh_runs_in_the_background_and_the_old_credential_is_served_meanwhile() {
    let gate = Arc::new(Semaphore::new(0));
    let refresh_gate = Arc::clone(&gate);
    let (cache, upstream) = cache_with(config(), move |_, n| match n {
        1 => ok(HOUR),
        _ => Reply { gate: Some(Arc::clone(&refresh_gate)), ..ok(HOUR) },
    });
    let first = cache.get(&nth_key(0)).await.unwrap();

    // Not before the window opens (the hour has 35 minutes left at 25)...
    tokio::time::advance(HOUR - REFRESH_BEFORE - SWEEP_INTERVAL).await;
    settle().await;
    assert_eq!(upstream.calls(), 1);
    // ...then without any get.
    tokio::time::advance(2 * SWEEP_INTERVAL).await;
    settle().await;
    assert_eq!(upstream.calls(), 2);
    assert_eq!(cache.stats().refreshes, 1);

    // The refresh is stuck upstream; the current credential is served.
    assert_eq!(cache.get(&nth_key(0)).await.unwrap(), first);
    assert_eq!(upstream.calls(), 2);

    gate.add_permits(1);
    settle().await;
    let second = cache.get(&nth_key(0)).await.unwrap();
    assert_ne!(second, first);
    assert!(second.expiration > first.expiration);
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn expired_credentials_are_never_served_while_refresh_keeps_failing() {
    let (cache, upstream) = cache_with(config(), |_, n| match n {
        1 => ok(HOUR),
        _ => err(FetchErrorKind::Failed, None),
    });
    let first = cache.get(&nth_key(0)).await.unwrap();
    let last_servable = HOUR - MIN_SERVED_LIFETIME - MINUTE;
    let mut elapsed = Duration::ZERO;
    while elapsed < last_servable {
        tokio::time::advance(MINUTE).await;
        elapsed += MINUTE;
        settle().await;
        // Refresh fails, but the credential is still servable.
        assert_eq!(cache.get(&nth_key(0)).await.unwrap(), first, "at {elapsed:?}");
    }
    assert!(upstream.calls() > 2, "refresh was retried");

    // Exactly MIN_SERVED_LIFETIME left: an error, not the stale credential.
    tokio::time::advance(MINUTE).await;
    settle().await;
    let error = cache.get(&nth_key(0)).await.unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::Failed);
    tokio::time::advance(HOUR).await;
    settle().await;
    assert!(cache.get(&nth_key(0)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn get_cached_answers_only_a_servable_credential_of_its_own_key_and_never_fetches() {
    let (cache, upstream) = cache_with(config(), |_, _| ok(HOUR));
    assert!(cache.get_cached(&nth_key(0)).is_none(), "nothing cached yet");
    assert_eq!((upstream.calls(), cache.stats().misses), (0, 0), "a miss starts and counts nothing");

    let fetched = cache.get(&nth_key(0)).await.unwrap();
    assert_eq!(cache.get_cached(&nth_key(0)), Some(Arc::clone(&fetched)));
    assert!(cache.get_cached(&nth_key(1)).is_none(), "another key's credential is not served");
    assert_eq!(cache.stats().hits, 1);

    // Exactly MIN_SERVED_LIFETIME left (no refresh ran: time jumped):
    // not served.
    tokio::time::advance(HOUR - MIN_SERVED_LIFETIME).await;
    assert!(cache.get_cached(&nth_key(0)).is_none());
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_prefetch_fills_the_key_so_the_first_get_is_a_hit_and_never_fetches_twice() {
    let (cache, upstream) = cache_with(config(), |_, _| ok(HOUR));
    assert!(cache.prefetch(&nth_key(0)));
    assert!(!cache.prefetch(&nth_key(0)), "a second prefetch while the first runs started another");
    settle().await;
    assert_eq!(upstream.calls(), 1);
    assert!(!cache.prefetch(&nth_key(0)), "a prefetch of a servable key started a fetch");

    let credentials = cache.get(&nth_key(0)).await.unwrap();
    assert!(credentials.access_key_id.ends_with("-1"), "{credentials:?}");
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.fetches, upstream.calls()), (1, 0, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_prefetch_respects_the_backoff_of_a_failed_key() {
    let (cache, upstream) = cache_with(config(), |_, _| err(FetchErrorKind::Throttled, Some(Duration::from_secs(90))));
    assert!(cache.prefetch(&nth_key(0)));
    settle().await;
    assert_eq!(upstream.calls(), 1);
    assert!(!cache.prefetch(&nth_key(0)), "a prefetch ignored the backoff");
    tokio::time::advance(Duration::from_secs(90)).await;
    assert!(cache.prefetch(&nth_key(0)));
    settle().await;
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn credentials_that_expire_too_soon_are_refused() {
    let (cache, _) = cache_with(config(), |_, _| ok(MIN_SERVED_LIFETIME));
    let error = cache.get(&nth_key(0)).await.unwrap_err();
    assert!(error.detail.contains("expire too soon"));
    assert_eq!(cache.stats().fetch_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_before_the_next_fetch() {
    let (cache, upstream) = cache_with(config(), |_, _| err(FetchErrorKind::Throttled, Some(Duration::from_secs(90))));
    let error = cache.get(&nth_key(0)).await.unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::Throttled);
    assert_eq!(upstream.calls(), 1);

    // During backoff: the remembered error, at once, no upstream call.
    assert_eq!(cache.get(&nth_key(0)).await.unwrap_err(), error);
    tokio::time::advance(Duration::from_secs(89)).await;
    assert_eq!(cache.get(&nth_key(0)).await.unwrap_err(), error);
    assert_eq!(upstream.calls(), 1);

    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(cache.get(&nth_key(0)).await.is_err());
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_evicted() {
    let (cache, upstream) = cache_with(config(), |_, _| ok(12 * HOUR));
    cache.get(&nth_key(0)).await.unwrap();

    tokio::time::advance(IDLE_EVICT_AFTER - SWEEP_INTERVAL).await;
    settle().await;
    assert_eq!(cache.stats().keys, 1);

    tokio::time::advance(2 * SWEEP_INTERVAL).await;
    settle().await;
    let stats = cache.stats();
    assert_eq!((stats.keys, stats.evictions), (0, 1));

    cache.get(&nth_key(0)).await.unwrap();
    assert_eq!(upstream.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn memory_stays_bounded_at_max_keys_evicting_the_least_recently_used() {
    let (cache, upstream) = cache_with(CacheConfig { max_keys: 8, ..config() }, |_, _| ok(12 * HOUR));
    for n in 0..20 {
        cache.get(&nth_key(n)).await.unwrap();
        assert!(cache.stats().keys <= 8);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let stats = cache.stats();
    assert_eq!((stats.keys, stats.evictions), (8, 12));

    // The 8 most recent are still cached; the oldest is not.
    for n in 12..20 {
        cache.get(&nth_key(n)).await.unwrap();
    }
    assert_eq!(upstream.calls(), 20);
    cache.get(&nth_key(0)).await.unwrap();
    assert_eq!(upstream.calls(), 21);
    assert_eq!(cache.stats().keys, 8);
}

#[tokio::test(start_paused = true)]
async fn upstream_concurrency_never_exceeds_the_limit() {
    let limits = CacheConfig { max_concurrent_fetches: 4, fetches_per_second: 1000, fetch_burst: 1000, ..config() };
    let (cache, upstream) = cache_with(limits, |_, _| Reply { after: Duration::from_secs(1), ..ok(HOUR) });
    let cache = Arc::new(cache);
    let start = Instant::now();
    let gets: Vec<_> = (0..40)
        .map(|n| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(&nth_key(n)).await })
        })
        .collect();
    settle().await;
    assert_eq!(cache.stats().fetches_in_flight, 4);
    for get in gets {
        get.await.unwrap().unwrap();
    }
    assert_eq!(upstream.calls(), 40);
    assert_eq!(upstream.max_in_flight.load(Ordering::SeqCst), 4);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn upstream_fetch_rate_never_exceeds_the_token_bucket() {
    let limits = CacheConfig { max_concurrent_fetches: 100, fetches_per_second: 5, fetch_burst: 5, ..config() };
    let (cache, upstream) = cache_with(limits, |_, _| ok(HOUR));
    let cache = Arc::new(cache);
    let start = Instant::now();
    let gets: Vec<_> = (0..30)
        .map(|n| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(&nth_key(n)).await })
        })
        .collect();
    for get in gets {
        get.await.unwrap().unwrap();
    }
    let mut started: Vec<_> = upstream.calls.lock().unwrap().iter().map(|(_, at)| *at - start).collect();
    started.sort();
    assert_eq!(started.len(), 30);
    for (i, at) in started.iter().enumerate() {
        // The first 5 at once (the burst), then one per 200 ms.
        let earliest = Duration::from_millis(200) * (i.saturating_sub(4) as u32);
        assert!(*at >= earliest, "fetch {i} started at {at:?}, before {earliest:?}");
    }
    assert_eq!(started[29], Duration::from_millis(200 * 25));
}

#[tokio::test(start_paused = true)]
async fn a_hung_fetch_times_out_and_answers_its_waiters() {
    let (cache, upstream) = cache_with(config(), |_, _| Reply { after: 10 * MINUTE, ..ok(HOUR) });
    let start = Instant::now();
    let error = cache.get(&nth_key(0)).await.unwrap_err();
    assert_eq!(error.detail, "fetch timed out");
    assert_eq!(start.elapsed(), FETCH_TIMEOUT);
    assert_eq!(upstream.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_cache_stops_background_refresh() {
    let (cache, upstream) = cache_with(config(), |_, _| ok(HOUR));
    cache.get(&nth_key(0)).await.unwrap();
    drop(cache);
    tokio::time::advance(HOUR - REFRESH_BEFORE + 2 * SWEEP_INTERVAL).await;
    settle().await;
    assert_eq!(upstream.calls(), 1);
}
