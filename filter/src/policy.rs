//! When to serve, refresh or refetch a credential, and how to treat each
//! broker answer: pure functions of (now, expiry, state).

/// Refresh once a credential has less than this left. botocore refetches on
/// every call below 15 minutes; 25 keeps a 10-minute cushion for broker
/// trouble before apps notice.
pub const REFRESH_BEFORE_MS: u64 = 25 * 60 * 1000;
/// A credential with less than this left is never served: the app would sign
/// a request that expires in flight.
pub const MIN_SERVED_LIFETIME_MS: u64 = 60 * 1000;
/// The longest life STS gives a credential: `AssumeRoleWithWebIdentity`
/// caps `DurationSeconds` at 12 hours.
pub const MAX_CREDENTIAL_LIFETIME_MS: u64 = 12 * 60 * 60 * 1000;
/// How far the broker's clock may run ahead of this node's.
pub const CLOCK_SKEW_ALLOWANCE_MS: u64 = 5 * 60 * 1000;
/// Floor between two successful fetches, for a broker that keeps handing out
/// credentials already inside the refresh window.
pub const MIN_REFRESH_INTERVAL_MS: u64 = 5 * 1000;
/// How long a fetch may hold the lease beyond its own timeout, before another
/// worker may assume it was lost.
pub const LEASE_MARGIN_MS: u64 = 1000;
/// Exponential backoff for transient failures: first step and ceiling.
pub const BACKOFF_BASE_MS: u64 = 1000;
pub const BACKOFF_MAX_MS: u64 = 60 * 1000;
/// Bounds applied to a broker's `Retry-After`.
pub const RETRY_AFTER_MAX_MS: u64 = 5 * 60 * 1000;

/// How a fetch from the broker failed, one per row of the v1 contract plus
/// the transport failures Envoy reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 400 InvalidRequest: our request is wrong; retrying will not help soon.
    Invalid,
    /// 401 Unauthenticated: the broker could not verify our mesh identity.
    Unauthenticated,
    /// 403 AccessDenied: this pod may not use the role.
    Denied,
    /// 404 PodNotFound: the broker has not seen this pod yet.
    PodNotFound,
    /// 429 Throttled.
    Throttled,
    /// 503, or any status the contract does not name: broker unavailable.
    Unavailable,
    /// 502 StsError: STS refused or failed.
    StsError,
    /// 504, or the call timed out.
    Timeout,
    /// 200 with a body that is not a servable credential.
    Malformed,
}

impl Failure {
    /// Every failure, in declaration order, so `failure as usize` is its
    /// index here: [`FetchState::encode`] and the metrics use it.
    pub const ALL: [Self; 9] = [
        Self::Invalid,
        Self::Unauthenticated,
        Self::Denied,
        Self::PodNotFound,
        Self::Throttled,
        Self::Unavailable,
        Self::StsError,
        Self::Timeout,
        Self::Malformed,
    ];

    /// The failure a broker status stands for (`None` for 200).
    pub fn from_status(status: u32) -> Option<Self> {
        Some(match status {
            200 => return None,
            400 => Self::Invalid,
            401 => Self::Unauthenticated,
            403 => Self::Denied,
            404 => Self::PodNotFound,
            429 => Self::Throttled,
            502 => Self::StsError,
            504 => Self::Timeout,
            _ => Self::Unavailable,
        })
    }

    /// The metrics label and log word for this failure.
    pub fn label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Unauthenticated => "unauthenticated",
            Self::Denied => "denied",
            Self::PodNotFound => "pod_not_found",
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
            Self::StsError => "sts_error",
            Self::Timeout => "timeout",
            Self::Malformed => "malformed",
        }
    }

    /// What the app is answered while this failure stands and no credential
    /// is cached: 404 where IMDS would have no credentials for the role (the
    /// SDK moves on), 503 where a retry may succeed.
    pub fn app_status(self) -> u32 {
        match self {
            Self::Invalid | Self::Unauthenticated | Self::Denied => 404,
            _ => 503,
        }
    }

    /// Whether this answer withdraws a cached credential at once. Only an
    /// explicit denial does: the broker says this pod may no longer use the
    /// role. An outage (5xx, timeouts, throttling) keeps serving the cache
    /// while it is valid.
    pub fn withdraws_credential(self) -> bool {
        matches!(self, Self::Denied)
    }

    /// How long to wait before the next fetch after `failures` consecutive
    /// failures (this one included).
    pub fn backoff_ms(self, failures: u32, retry_after_ms: Option<u64>) -> u64 {
        let exponential =
            BACKOFF_BASE_MS.saturating_mul(1 << failures.clamp(1, 7).saturating_sub(1)).min(BACKOFF_MAX_MS);
        match self {
            Self::Invalid => 60_000,
            Self::Unauthenticated | Self::Denied => 30_000,
            Self::PodNotFound => (BACKOFF_BASE_MS * u64::from(failures.clamp(1, 5))).min(5_000),
            Self::Throttled | Self::Unavailable => {
                retry_after_ms.map_or(exponential, |ms| ms.clamp(BACKOFF_BASE_MS, RETRY_AFTER_MAX_MS))
            }
            Self::StsError | Self::Timeout | Self::Malformed => exponential,
        }
    }
}

/// The fetch bookkeeping for one role, shared by every worker (in proxy-wasm
/// shared data, updated by compare-and-swap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchState {
    /// A fetch is in flight until this time (the lease); 0 when none.
    pub lease_until_ms: u64,
    /// No fetch starts before this time (refresh schedule or backoff).
    pub next_attempt_ms: u64,
    /// Consecutive failures so far.
    pub failures: u32,
    /// The last failure, while it stands.
    pub last_failure: Option<Failure>,
}

impl FetchState {
    /// The length of [`encode`](Self::encode)'s output.
    pub const ENCODED_LEN: usize = 21;

    /// The shared-data form: both times and the failure count little-endian
    /// (as the VM stores them), then the last failure as 1 + its index in
    /// [`Failure::ALL`] (0 for none).
    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.lease_until_ms.to_le_bytes());
        out[8..16].copy_from_slice(&self.next_attempt_ms.to_le_bytes());
        out[16..20].copy_from_slice(&self.failures.to_le_bytes());
        out[20] = self.last_failure.map_or(0, |f| f as u8 + 1);
        out
    }

    /// Reads what [`encode`](Self::encode) wrote; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.try_into().ok()?;
        let (lease, rest) = bytes.split_first_chunk::<8>()?;
        let (next, rest) = rest.split_first_chunk::<8>()?;
        let (failures, [failure]) = rest.split_first_chunk::<4>()? else { return None };
        let last_failure = match failure {
            0 => None,
            n => Some(*Failure::ALL.get(usize::from(*n) - 1)?),
        };
        Some(Self {
            lease_until_ms: u64::from_le_bytes(*lease),
            next_attempt_ms: u64::from_le_bytes(*next),
            failures: u32::from_le_bytes(*failures),
            last_failure,
        })
    }

    /// Whether a fetch is in flight (its lease has not run out).
    pub fn fetching(&self, now_ms: u64) -> bool {
        now_ms < self.lease_until_ms
    }

    /// Whether a worker may start a fetch now.
    pub fn fetch_due(&self, now_ms: u64) -> bool {
        !self.fetching(now_ms) && now_ms >= self.next_attempt_ms
    }

    /// The state once a worker holds the lease for a fetch with `timeout_ms`.
    pub fn leased(self, now_ms: u64, timeout_ms: u64) -> Self {
        Self { lease_until_ms: now_ms + timeout_ms + LEASE_MARGIN_MS, ..self }
    }

    /// The state after a credential expiring at `expires_at_ms` arrived.
    pub fn succeeded(now_ms: u64, expires_at_ms: u64) -> Self {
        let refresh_at = expires_at_ms.saturating_sub(REFRESH_BEFORE_MS);
        Self { next_attempt_ms: refresh_at.max(now_ms + MIN_REFRESH_INTERVAL_MS), ..Self::default() }
    }

    /// The state after a fetch failed.
    pub fn failed(self, now_ms: u64, failure: Failure, retry_after_ms: Option<u64>) -> Self {
        let failures = self.failures.saturating_add(1);
        Self {
            lease_until_ms: 0,
            next_attempt_ms: now_ms + failure.backoff_ms(failures, retry_after_ms),
            failures,
            last_failure: Some(failure),
        }
    }
}

/// Whether a credential expiring at `expires_at_ms` may be served at `now_ms`.
pub fn servable(now_ms: u64, expires_at_ms: u64) -> bool {
    now_ms.saturating_add(MIN_SERVED_LIFETIME_MS) < expires_at_ms
}

/// Whether a credential the broker sent at `now_ms`, expiring at
/// `expires_at_ms`, may be stored: servable now, and expiring no later than
/// STS could have made it. A later expiry (say `9999-12-31T23:59:59Z`) is
/// not a credential STS issued: it would schedule the next refresh past
/// the credential's real end, and it is refused as malformed.
pub fn acceptable(now_ms: u64, expires_at_ms: u64) -> bool {
    servable(now_ms, expires_at_ms)
        && expires_at_ms <= now_ms.saturating_add(MAX_CREDENTIAL_LIFETIME_MS + CLOCK_SKEW_ALLOWANCE_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW: u64 = 1_800_000_000_000;
    const MIN: u64 = 60_000;

    #[test]
    fn every_failure_sits_at_its_own_index() {
        for (i, failure) in Failure::ALL.into_iter().enumerate() {
            assert_eq!(failure as usize, i, "{failure:?}");
        }
    }

    #[test]
    fn fetch_state_round_trips_through_shared_data() {
        for last_failure in std::iter::once(None).chain(Failure::ALL.map(Some)) {
            let state = FetchState { lease_until_ms: NOW, next_attempt_ms: u64::MAX, failures: 7, last_failure };
            assert_eq!(FetchState::decode(&state.encode()), Some(state));
        }
        let mut unknown = FetchState::default().encode();
        unknown[FetchState::ENCODED_LEN - 1] = Failure::ALL.len() as u8 + 1;
        assert_eq!(FetchState::decode(&unknown), None);
        assert_eq!(FetchState::decode(b"{}"), None);
    }

    #[test]
    fn expired_or_nearly_expired_credentials_are_never_served() {
        assert!(servable(NOW, NOW + 61 * 1000));
        assert!(!servable(NOW, NOW + MIN_SERVED_LIFETIME_MS));
        assert!(!servable(NOW, NOW));
        assert!(!servable(NOW, NOW - 1));
        assert!(!servable(u64::MAX, u64::MAX));
    }

    #[test]
    fn credentials_expiring_beyond_what_sts_issues_are_not_acceptable() {
        let latest = NOW + MAX_CREDENTIAL_LIFETIME_MS + CLOCK_SKEW_ALLOWANCE_MS;
        assert!(acceptable(NOW, NOW + 60 * MIN));
        assert!(acceptable(NOW, latest));
        assert!(!acceptable(NOW, latest + 1));
        assert!(!acceptable(NOW, 253_402_300_799_000), "9999-12-31T23:59:59Z");
        assert!(!acceptable(NOW, NOW + MIN_SERVED_LIFETIME_MS), "nor nearly expired");
    }

    #[test]
    fn hour_long_credentials_are_refreshed_with_25_minutes_left() {
        let state = FetchState::succeeded(NOW, NOW + 60 * MIN);
        assert!(!state.fetch_due(NOW + 35 * MIN - 1));
        assert!(state.fetch_due(NOW + 35 * MIN));
    }

    #[test]
    fn short_credentials_are_not_refetched_in_a_loop() {
        let state = FetchState::succeeded(NOW, NOW + 10 * MIN);
        assert!(!state.fetch_due(NOW + MIN_REFRESH_INTERVAL_MS - 1));
        assert!(state.fetch_due(NOW + MIN_REFRESH_INTERVAL_MS));
    }

    #[test]
    fn a_lease_blocks_other_fetches_until_it_runs_out() {
        let state = FetchState::default().leased(NOW, 2000);
        assert!(state.fetching(NOW) && !state.fetch_due(NOW + 2999));
        assert!(state.fetch_due(NOW + 3000), "a lost fetch must not block forever");
    }

    #[test]
    fn each_broker_status_backs_off_as_the_contract_says() {
        let after = |status, failures: u32, retry_after| {
            let failure = Failure::from_status(status).unwrap();
            let state = FetchState { failures: failures - 1, ..FetchState::default() };
            state.failed(NOW, failure, retry_after).next_attempt_ms - NOW
        };
        assert_eq!(Failure::from_status(200), None);
        assert_eq!(after(404, 1, None), 1000, "pod not found: retry soon");
        assert_eq!(after(404, 9, None), 5000);
        assert_eq!(after(403, 1, None), 30_000, "denial remembered briefly");
        assert_eq!(after(401, 1, None), 30_000);
        assert_eq!(after(400, 1, None), 60_000);
        assert_eq!(after(429, 1, Some(7000)), 7000, "Retry-After honoured");
        assert_eq!(after(503, 1, Some(10 * 60 * 1000)), RETRY_AFTER_MAX_MS);
        assert_eq!(after(503, 1, Some(0)), BACKOFF_BASE_MS);
        assert_eq!([1, 2, 3, 4].map(|n| after(502, n, None)), [1000, 2000, 4000, 8000]);
        assert_eq!(after(504, 40, None), BACKOFF_MAX_MS);
        assert_eq!(after(500, 1, None), 1000);
    }

    #[test]
    fn success_clears_failures_and_lease() {
        let failed = FetchState::default().leased(NOW, 1000).failed(NOW, Failure::Denied, None);
        assert_eq!(failed.last_failure, Some(Failure::Denied));
        let ok = FetchState::succeeded(NOW, NOW + 60 * MIN);
        assert_eq!((ok.failures, ok.last_failure, ok.lease_until_ms), (0, None, 0));
    }

    #[test]
    fn only_a_denial_withdraws_a_cached_credential() {
        for status in [400, 401, 404, 429, 500, 502, 503, 504] {
            assert!(!Failure::from_status(status).unwrap().withdraws_credential(), "{status}");
        }
        assert!(Failure::Denied.withdraws_credential());
        assert!(!Failure::Malformed.withdraws_credential());
    }

    #[test]
    fn permanent_failures_answer_404_and_transient_ones_503() {
        assert_eq!(Failure::Denied.app_status(), 404);
        assert_eq!(Failure::Invalid.app_status(), 404);
        assert_eq!(Failure::Unavailable.app_status(), 503);
        assert_eq!(Failure::PodNotFound.app_status(), 503);
    }
}
