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
/// Fetch outcomes: success, then each failure at `1 + failure as usize`.
const FETCH_OUTCOMES: usize = 1 + Failure::ALL.len();
/// Counters in all: requests by route and class, five singles, fetches.
pub const COUNTERS: usize = ROUTES.len() * CLASSES.len() + 5 + FETCH_OUTCOMES;

/// Counts since the last flush, in [`names`] order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counters {
    requests: [[u64; 3]; 5],
    tokens_issued: u64,
    tokens_rejected: u64,
    cache_hits: u64,
    cache_misses: u64,
    passed_on: u64,
    fetches: [u64; FETCH_OUTCOMES],
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
        self.fetches[failure.map_or(0, |f| f as usize + 1)] += 1;
    }

    /// The counts in [`names`] order, resetting them to zero.
    pub fn take(&mut self) -> [u64; COUNTERS] {
        let taken = std::mem::take(self);
        let mut counts = [0; COUNTERS];
        let singles =
            [taken.tokens_issued, taken.tokens_rejected, taken.cache_hits, taken.cache_misses, taken.passed_on];
        let all = taken.requests.as_flattened().iter().chain(&singles).chain(&taken.fetches);
        for (slot, count) in counts.iter_mut().zip(all) {
            *slot = *count;
        }
        counts
    }
}

/// Envoy stat names, in the order [`Counters::take`] yields counts. Envoy
/// shows them prefixed with `wasmcustom.`.
pub fn names() -> Vec<String> {
    let mut names = Vec::with_capacity(COUNTERS);
    for route in ROUTES {
        for class in CLASSES {
            names.push(format!("imds_mesh.requests.{route}.{class}"));
        }
    }
    for name in ["tokens.issued", "tokens.rejected", "cache.hits", "cache.misses", "passed_on"] {
        names.push(format!("imds_mesh.{name}"));
    }
    for outcome in std::iter::once("success").chain(Failure::ALL.map(Failure::label)) {
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
        let counts = counters.take();
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
        assert!(counters.take().iter().all(|c| *c == 0));
    }

    #[test]
    fn every_fetch_outcome_counts_under_its_own_name() {
        let names = names();
        for failure in std::iter::once(None).chain(Failure::ALL.map(Some)) {
            let mut counters = Counters::default();
            counters.fetch(failure);
            let counts = counters.take();
            let counted: Vec<&String> = names.iter().zip(&counts).filter(|(_, c)| **c > 0).map(|(n, _)| n).collect();
            let label = failure.map_or("success", Failure::label);
            assert_eq!(counted, [&format!("imds_mesh.broker_fetches.{label}")]);
        }
    }
}
