//! The credential cache: one entry per role in proxy-wasm shared data, seen
//! by every Envoy worker, plus each worker's local copy of it.
//!
//! Shared data holds two keys per role: the credential (written only by the
//! worker holding the fetch lease) and the [`FetchState`] (updated by
//! compare-and-swap). The request path reads only the local copy; workers
//! pull a newer version on their tick or when their copy is unusable.

use crate::arn::RoleArn;
use crate::credentials::Credential;
use crate::policy::{self, Failure, FetchState};

/// The few shared-data calls the cache needs, so it runs natively in tests.
pub trait SharedStore {
    /// The value under `key` and its version, if any.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Stores `value`; with `Some(version)`, only if the stored version still
    /// matches. Returns whether it was stored.
    fn set(&self, key: &str, value: &[u8], version: Option<u32>) -> bool;
}

/// What the cache can do for a credential request right now.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Serve these bytes.
    Hit(&'a [u8]),
    /// A fetch is running or about to start: hold the request.
    Wait,
    /// The broker's last answer stands and no credential can be served.
    Fail(Failure),
}

/// The result of one broker call, as the shell hands it over.
pub type FetchResult = Result<Credential, (Failure, Option<u64>)>;

/// One worker's view of the shared cache for one role.
pub struct CredentialCache {
    credential_key: String,
    state_key: String,
    local: Option<Credential>,
    version: u32,
}

/// Shared-data keys, a role's ARN after each. The `v2` is the encoding's:
/// shared data belongs to the Envoy process, not to a VM, so a filter
/// updated in a running sidecar finds what the previous build stored, and
/// must not read it in its own encoding (v1 held the fetch state as JSON and
/// the expiry big-endian).
pub const CREDENTIAL_KEY_PREFIX: &str = "imds-mesh/v2/credential/";
pub const STATE_KEY_PREFIX: &str = "imds-mesh/v2/fetch/";

/// The shared credential's value once a denial withdrew it: no credential
/// (shared data has no delete).
const WITHDRAWN: &[u8] = &[];

/// CAS retries before a state update gives up (the lease then runs out).
const CAS_ATTEMPTS: usize = 8;

impl CredentialCache {
    /// The cache for `role`; creates its shared fetch state if absent.
    pub fn new(role: &RoleArn, store: &impl SharedStore) -> Self {
        let cache = Self {
            credential_key: format!("{CREDENTIAL_KEY_PREFIX}{role}"),
            state_key: format!("{STATE_KEY_PREFIX}{role}"),
            local: None,
            version: 0,
        };
        // Created once, before any CAS: Envoy's compare-and-swap cannot
        // express "only if absent", so racing creators would both win.
        if store.get(&cache.state_key).is_none() {
            store.set(&cache.state_key, &FetchState::default().encode(), None);
        }
        cache
    }

    /// The request path: the local copy if it may be served now.
    #[inline]
    pub fn serve(&self, now_ms: u64) -> Option<&[u8]> {
        match &self.local {
            Some(c) if policy::servable(now_ms, c.expires_at_ms) => Some(&c.body),
            _ => None,
        }
    }

    /// The answer for a credential request. The local copy answers without
    /// touching shared data; only when it is unusable is the shared copy
    /// pulled, and then a request waits only if a fetch is running or will
    /// start within `max_wait_ms`.
    pub fn lookup(&mut self, now_ms: u64, max_wait_ms: u64, store: &impl SharedStore) -> Lookup<'_> {
        if self.serve(now_ms).is_none() {
            self.sync(store);
        }
        if let Some(credential) = &self.local
            && policy::servable(now_ms, credential.expires_at_ms)
        {
            return Lookup::Hit(&credential.body);
        }
        let state = self.state(store).map_or_else(FetchState::default, |(s, _)| s);
        match state.last_failure {
            Some(failure) if !state.fetching(now_ms) && state.next_attempt_ms > now_ms + max_wait_ms => {
                Lookup::Fail(failure)
            }
            _ => Lookup::Wait,
        }
    }

    /// Pulls the shared credential if another worker stored a newer one, or
    /// drops the local copy if it was withdrawn.
    pub fn sync(&mut self, store: &impl SharedStore) {
        if let Some((bytes, version)) = store.get(&self.credential_key)
            && version != self.version
        {
            self.local = Credential::decode(&bytes);
            self.version = version;
        }
    }

    /// Takes the fetch lease if a fetch is due and nobody holds it. `true`
    /// means this worker must now call the broker and then
    /// [`finish_fetch`](Self::finish_fetch).
    pub fn begin_fetch(&mut self, now_ms: u64, timeout_ms: u64, store: &impl SharedStore) -> bool {
        match self.state(store) {
            Some((state, version)) if state.fetch_due(now_ms) => {
                store.set(&self.state_key, &state.leased(now_ms, timeout_ms).encode(), Some(version))
            }
            _ => false,
        }
    }

    /// Records a broker answer: publishes a credential to every worker, or
    /// the failure and its backoff. Returns the failure that stands, if any.
    pub fn finish_fetch(&mut self, now_ms: u64, result: FetchResult, store: &impl SharedStore) -> Option<Failure> {
        let result = result.and_then(|credential| {
            if policy::acceptable(now_ms, credential.expires_at_ms) {
                Ok(credential)
            } else {
                log::warn!(
                    "broker credential expires at {} ms: nearly expired or later than STS issues",
                    credential.expires_at_ms
                );
                Err((Failure::Malformed, None))
            }
        });
        match result {
            Ok(credential) => {
                store.set(&self.credential_key, &credential.encode(), None);
                self.update_state(store, |_| FetchState::succeeded(now_ms, credential.expires_at_ms));
                self.sync(store);
                None
            }
            Err((failure, retry_after_ms)) => {
                if failure.withdraws_credential() {
                    // Every worker drops its copy when it next syncs (each
                    // tick); this one at once.
                    store.set(&self.credential_key, WITHDRAWN, None);
                    self.sync(store);
                }
                self.update_state(store, |s| s.failed(now_ms, failure, retry_after_ms));
                Some(failure)
            }
        }
    }

    /// Expiry of the local copy, for logs and tests.
    pub fn expires_at_ms(&self) -> Option<u64> {
        self.local.as_ref().map(|c| c.expires_at_ms)
    }

    fn state(&self, store: &impl SharedStore) -> Option<(FetchState, u32)> {
        let (bytes, version) = store.get(&self.state_key)?;
        Some((FetchState::decode(&bytes).unwrap_or_default(), version))
    }

    fn update_state(&self, store: &impl SharedStore, change: impl Fn(FetchState) -> FetchState) {
        for _ in 0..CAS_ATTEMPTS {
            let (state, version) = self.state(store).map_or((FetchState::default(), None), |(s, v)| (s, Some(v)));
            if store.set(&self.state_key, &change(state).encode(), version) {
                return;
            }
        }
        log::warn!("fetch state update lost to concurrent writers; the lease will run out");
    }
}

/// An in-memory [`SharedStore`] with Envoy's versioning rules, for tests
/// (and, with the feature `test-support`, other crates' tests and the fuzz
/// targets).
#[cfg(any(test, feature = "test-support"))]
pub mod memory {
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::SharedStore;

    /// Shared data as Envoy keeps it: every write bumps a global version;
    /// a versioned write to a missing key succeeds.
    #[derive(Default)]
    pub struct MemoryStore {
        entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next: Cell<u32>,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.entries.borrow().get(key).cloned()
        }

        fn set(&self, key: &str, value: &[u8], version: Option<u32>) -> bool {
            let mut entries = self.entries.borrow_mut();
            if let (Some(want), Some((_, have))) = (version, entries.get(key))
                && want != *have
            {
                return false;
            }
            self.next.set(self.next.get() + 1);
            entries.insert(key.to_owned(), (value.to_vec(), self.next.get()));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;
    use crate::credentials::tests::broker_body;
    use crate::policy::REFRESH_BEFORE_MS;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_800_007_200_000; // 2027-01-15T10:00:00Z
    const TIMEOUT: u64 = 2000;
    const HOUR: u64 = 3_600_000;

    fn role() -> RoleArn {
        RoleArn::parse("arn:aws:iam::123456789012:role/app").unwrap()
    }

    /// A credential expiring at 11:00, an hour after NOW.
    fn credential() -> Credential {
        Credential::from_broker(&broker_body("2027-01-15T11:00:00Z")).unwrap()
    }

    #[test]
    fn only_one_worker_fetches_at_a_time() {
        let store = MemoryStore::default();
        let mut a = CredentialCache::new(&role(), &store);
        let mut b = CredentialCache::new(&role(), &store);
        assert!(a.begin_fetch(NOW, TIMEOUT, &store));
        assert!(!b.begin_fetch(NOW, TIMEOUT, &store));
        assert!(!a.begin_fetch(NOW, TIMEOUT, &store));
        assert_eq!(b.lookup(NOW, 800, &store), Lookup::Wait);
        assert_eq!(a.finish_fetch(NOW + 10, Ok(credential()), &store), None);
        // The other worker sees it on its next look.
        assert_eq!(b.serve(NOW), None);
        assert!(matches!(b.lookup(NOW + 20, 800, &store), Lookup::Hit(_)));
        assert_eq!(b.serve(NOW + 20), Some(credential().body.as_slice()));
        assert!(!b.begin_fetch(NOW + 20, TIMEOUT, &store), "fresh credential needs no fetch");
    }

    #[test]
    fn a_lost_fetch_lets_another_worker_take_over() {
        let store = MemoryStore::default();
        let mut a = CredentialCache::new(&role(), &store);
        let mut b = CredentialCache::new(&role(), &store);
        assert!(a.begin_fetch(NOW, TIMEOUT, &store));
        assert!(!b.begin_fetch(NOW + TIMEOUT, TIMEOUT, &store));
        assert!(b.begin_fetch(NOW + TIMEOUT + 1000, TIMEOUT, &store));
    }

    #[test]
    fn refresh_starts_25_minutes_before_expiry() {
        let store = MemoryStore::default();
        let mut cache = CredentialCache::new(&role(), &store);
        assert!(cache.begin_fetch(NOW, TIMEOUT, &store));
        cache.finish_fetch(NOW, Ok(credential()), &store);
        let refresh_at = NOW + HOUR - REFRESH_BEFORE_MS;
        assert!(!cache.begin_fetch(refresh_at - 1, TIMEOUT, &store));
        assert!(cache.begin_fetch(refresh_at, TIMEOUT, &store));
        // The old credential is served while the refresh runs.
        assert!(cache.serve(refresh_at).is_some());
    }

    #[test]
    fn cached_credential_outlives_broker_failures_but_not_its_expiry() {
        let store = MemoryStore::default();
        let mut cache = CredentialCache::new(&role(), &store);
        cache.begin_fetch(NOW, TIMEOUT, &store);
        cache.finish_fetch(NOW, Ok(credential()), &store);
        let later = NOW + 50 * 60_000;
        assert!(cache.begin_fetch(later, TIMEOUT, &store));
        assert_eq!(cache.finish_fetch(later, Err((Failure::Unavailable, None)), &store), Some(Failure::Unavailable));
        assert!(cache.serve(later).is_some(), "still valid: keep serving");
        let expired = NOW + HOUR - 60_000;
        assert_eq!(cache.serve(expired), None);
        assert_ne!(
            cache.lookup(expired, 800, &store).clone_hit(),
            Some(credential().body),
            "an expired credential is never served"
        );
    }

    #[test]
    fn a_denial_is_answered_at_once_while_it_stands() {
        let store = MemoryStore::default();
        let mut cache = CredentialCache::new(&role(), &store);
        cache.begin_fetch(NOW, TIMEOUT, &store);
        cache.finish_fetch(NOW, Err((Failure::Denied, None)), &store);
        assert_eq!(cache.lookup(NOW + 1, 800, &store), Lookup::Fail(Failure::Denied));
        assert!(!cache.begin_fetch(NOW + 29_999, TIMEOUT, &store));
        assert!(cache.begin_fetch(NOW + 30_000, TIMEOUT, &store));
    }

    #[test]
    fn a_denial_withdraws_the_cached_credential_on_every_worker() {
        let store = MemoryStore::default();
        let mut a = CredentialCache::new(&role(), &store);
        let mut b = CredentialCache::new(&role(), &store);
        a.begin_fetch(NOW, TIMEOUT, &store);
        a.finish_fetch(NOW, Ok(credential()), &store);
        b.sync(&store);
        let refresh_at = NOW + HOUR - REFRESH_BEFORE_MS;
        assert!(a.begin_fetch(refresh_at, TIMEOUT, &store));
        assert_eq!(a.finish_fetch(refresh_at, Err((Failure::Denied, None)), &store), Some(Failure::Denied));
        // Still 25 minutes of life, but the broker said no: not served.
        assert_eq!(a.serve(refresh_at), None, "withdrawn at once on the worker that fetched");
        assert_eq!(a.lookup(refresh_at, 800, &store), Lookup::Fail(Failure::Denied));
        assert!(b.serve(refresh_at).is_some(), "the other worker's copy, until its tick");
        b.sync(&store);
        assert_eq!(b.serve(refresh_at), None, "withdrawn on the other worker at its next tick");
        assert_eq!(b.lookup(refresh_at, 800, &store), Lookup::Fail(Failure::Denied));
        // A later grant is served again.
        assert!(a.begin_fetch(refresh_at + 30_000, TIMEOUT, &store));
        let fresh = Credential::from_broker(&broker_body("2027-01-15T12:00:00Z")).unwrap();
        assert_eq!(a.finish_fetch(refresh_at + 30_000, Ok(fresh), &store), None);
        assert!(matches!(b.lookup(refresh_at + 30_000, 800, &store), Lookup::Hit(_)));
    }

    #[test]
    fn pod_not_found_is_retried_within_the_wait() {
        let store = MemoryStore::default();
        let mut cache = CredentialCache::new(&role(), &store);
        cache.begin_fetch(NOW, TIMEOUT, &store);
        cache.finish_fetch(NOW, Err((Failure::PodNotFound, None)), &store);
        assert_eq!(cache.lookup(NOW + 300, 800, &store), Lookup::Wait);
        assert_eq!(cache.lookup(NOW + 100, 800, &store), Lookup::Fail(Failure::PodNotFound));
    }

    #[test]
    fn a_credential_that_arrives_nearly_expired_is_refused() {
        let store = MemoryStore::default();
        let mut cache = CredentialCache::new(&role(), &store);
        cache.begin_fetch(NOW, TIMEOUT, &store);
        let late = NOW + HOUR - 30_000;
        assert_eq!(cache.finish_fetch(late, Ok(credential()), &store), Some(Failure::Malformed));
        assert_eq!(cache.serve(late), None);
        assert!(!cache.begin_fetch(late + 999, TIMEOUT, &store), "backs off like any failure");
    }

    #[test]
    fn a_credential_expiring_beyond_what_sts_issues_is_refused() {
        let store = MemoryStore::default();
        let mut cache = CredentialCache::new(&role(), &store);
        assert!(cache.begin_fetch(NOW, TIMEOUT, &store));
        let forever = Credential::from_broker(&broker_body("9999-12-31T23:59:59Z")).unwrap();
        assert_eq!(cache.finish_fetch(NOW, Ok(forever), &store), Some(Failure::Malformed));
        assert_eq!(cache.serve(NOW), None);
        assert_eq!(cache.lookup(NOW, 0, &store), Lookup::Fail(Failure::Malformed));
        // Retried like any failure, not in year 9999.
        assert!(cache.begin_fetch(NOW + policy::BACKOFF_BASE_MS, TIMEOUT, &store));
        let twelve_hours = Credential::from_broker(&broker_body("2027-01-15T22:00:00Z")).unwrap();
        assert_eq!(cache.finish_fetch(NOW + 1000, Ok(twelve_hours), &store), None, "STS's longest is fine");
    }

    impl Lookup<'_> {
        fn clone_hit(&self) -> Option<Vec<u8>> {
            match self {
                Lookup::Hit(b) => Some(b.to_vec()),
                _ => None,
            }
        }
    }
}
