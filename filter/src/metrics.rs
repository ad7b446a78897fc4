//! Counters the filter keeps per worker and adds to Envoy stats on each tick,
//! so the request path never makes a host call to count.

use crate::policy::Failure;

/// Route labels of `imds_mesh.requests.<route>.<class>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Token = 0,
    RoleList = 1,
    Credentials = 2,
    Other = 3,
    Invalid = 4,
}

const ROUTES: [&str; 5] = ["token", "role_list", "credentials", "other", "invalid"];
const CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];
const FETCH_OUTCOMES: [&str; 10] = [
    "success",
    "invalid",
    "unauthenticated",
    "denied",
    "pod_not_found",
    "throttled",
    "unavailable",
    "sts_error",
    "timeout",
    "malformed",
];

/// Counts since the last flush, in [`names`] order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    requests: [[u64; 3]; 5],
    tokens_issued: u64,
    tokens_rejected: u64,
    cache_hits: u64,
    cache_misses: u64,
    passed_on: u64,
    fetches: [u64; 10],
}

impl Counters {
    /// One answered IMDS request.
    #[inline]
    pub fn request(&mut self, route: RouteKind, status: u32) {
        let class = match status {
            ..400 => 0,
            400..500 => 1,
            _ => 2,
        };
        self.requests[route as usize][class] += 1;
    }

    pub fn token_issued(&mut self) {
        self.tokens_issued += 1;
    }

    pub fn token_rejected(&mut self) {
        self.tokens_rejected += 1;
    }

    #[inline]
    pub fn cache_hit(&mut self) {
        self.cache_hits += 1;
    }

    pub fn cache_miss(&mut self) {
        self.cache_misses += 1;
    }

    /// One request that was not for the metadata service, passed on
    /// untouched. Deployed as rendered, the filter runs on the metadata
    /// routes only, so this stays at zero.
    #[inline]
    pub fn passed_on(&mut self) {
        self.passed_on += 1;
    }

    /// One broker call ended: `None` for success.
    pub fn fetch(&mut self, failure: Option<Failure>) {
        let label = failure.map_or("success", Failure::label);
        if let Some(slot) = FETCH_OUTCOMES.iter().position(|o| *o == label) {
            self.fetches[slot] += 1;
        }
    }

    /// The counts in [`names`] order, resetting them to zero.
    pub fn take(&mut self) -> impl Iterator<Item = u64> + use<> {
        let taken = std::mem::take(self);
        let requests = taken.requests.into_iter().flatten();
        requests
            .chain([taken.tokens_issued, taken.tokens_rejected, taken.cache_hits, taken.cache_misses, taken.passed_on])
            .chain(taken.fetches)
    }
}

/// Envoy stat names, in the order [`Counters::take`] yields counts. Envoy
/// shows them prefixed with `wasmcustom.`.
pub fn names() -> Vec<String> {
    let mut names = Vec::new();
    for route in ROUTES {
        for class in CLASSES {
            names.push(format!("imds_mesh.requests.{route}.{class}"));
        }
    }
    for name in ["tokens.issued", "tokens.rejected", "cache.hits", "cache.misses", "passed_on"] {
        names.push(format!("imds_mesh.{name}"));
    }
    for outcome in FETCH_OUTCOMES {
        names.push(format!("imds_mesh.broker_fetches.{outcome}"));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn counts_line_up_with_names_and_reset_on_take() {
        let mut counters = Counters::default();
        counters.request(RouteKind::Credentials, 200);
        counters.request(RouteKind::Invalid, 400);
        counters.cache_hit();
        counters.passed_on();
        counters.fetch(Some(Failure::Denied));
        let names = names();
        let counts: Vec<u64> = counters.take().collect();
        assert_eq!(names.len(), counts.len());
        let counted: Vec<&str> = names.iter().zip(&counts).filter(|(_, c)| **c > 0).map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            counted,
            [
                "imds_mesh.requests.credentials.2xx",
                "imds_mesh.requests.invalid.4xx",
                "imds_mesh.cache.hits",
                "imds_mesh.passed_on",
                "imds_mesh.broker_fetches.denied"
            ]
        );
        assert!(counters.take().all(|c| c == 0));
    }

    #[test]
    fn every_failure_has_a_fetch_outcome() {
        for failure in [
            Failure::Invalid,
            Failure::Unauthenticated,
            Failure::Denied,
            Failure::PodNotFound,
            Failure::Throttled,
            Failure::Unavailable,
            Failure::StsError,
            Failure::Timeout,
            Failure::Malformed,
        ] {
            assert!(FETCH_OUTCOMES.contains(&failure.label()), "{failure:?}");
        }
    }
}
