//! The broker's Prometheus metrics, in one room so every name and label is
//! found together. Labels are fixed vocabularies: outcome codes, rule names,
//! STS codes through `StsError::metric_label`, `KubeError::label`, so no
//! caller-supplied value can grow a series. The cache's and the watches'
//! numbers are read at scrape time by collectors, not pushed on every request.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::Cache;
use crate::fetch::Served;
use crate::kube::{KubeError, WatchHealth};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CodeLabel {
    pub(crate) code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RuleLabel {
    pub(crate) rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabel {
    pub(crate) error: &'static str,
}

/// Latency buckets from 0.5 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub(crate) struct Metrics {
    pub(crate) requests: Family<OutcomeLabel, Counter>,
    /// `requests` for outcome `Success`, looked up once: the hot path then
    /// skips the family's lock and label hashing.
    pub(crate) successes: Counter,
    pub(crate) request_duration: Histogram,
    pub(crate) denials: Family<RuleLabel, Counter>,
    pub(crate) unauthenticated: Family<ReasonLabel, Counter>,
    pub(crate) sts_calls: Counter,
    pub(crate) sts_errors: Family<CodeLabel, Counter>,
    pub(crate) sts_duration: Histogram,
    pub(crate) sts_in_flight: Gauge,
    kube_errors: Family<ErrorLabel, Counter>,
    /// By [`crate::prefetch::Outcome::label`].
    pub(crate) prefetches: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<OutcomeLabel, Counter>::default();
        let successes = requests.get_or_create(&OutcomeLabel { outcome: "Success" }).clone();
        Self {
            requests,
            successes,
            request_duration: latency_histogram(),
            denials: Family::default(),
            unauthenticated: Family::default(),
            sts_calls: Counter::default(),
            sts_errors: Family::default(),
            sts_duration: latency_histogram(),
            sts_in_flight: Gauge::default(),
            kube_errors: Family::default(),
            prefetches: Family::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "credential_requests",
            "Credential requests by outcome (Success or the contract's error Code)",
            self.requests.clone(),
        );
        registry.register(
            "credential_request_duration_seconds",
            "Time to answer a credential request",
            self.request_duration.clone(),
        );
        registry.register("denials", "Credential requests denied, by authorization rule", self.denials.clone());
        registry.register(
            "unauthenticated",
            "Credential requests without a verifiable caller, by reason",
            self.unauthenticated.clone(),
        );
        registry.register("sts_calls", "AssumeRoleWithWebIdentity calls made", self.sts_calls.clone());
        registry.register("sts_errors", "Failed STS calls by STS error code", self.sts_errors.clone());
        registry.register("sts_call_duration_seconds", "Time of one STS call", self.sts_duration.clone());
        registry.register("sts_calls_in_flight", "STS calls running now", self.sts_in_flight.clone());
        registry.register("kube_api_errors", "Failed Kubernetes API calls by kind", self.kube_errors.clone());
        registry.register(
            "prefetches",
            "Pods the watch saw appear, by what their prefetch did (started, cached, refused)",
            self.prefetches.clone(),
        );
    }

    pub(crate) fn kube_error(&self, error: &KubeError) {
        self.kube_errors.get_or_create(&ErrorLabel { error: error.label() }).inc();
    }
}

/// Exports [`Cache::stats`] at scrape time.
#[derive(Debug)]
pub(crate) struct CacheCollector(pub(crate) Arc<Cache<Served>>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let counters = [
            ("cache_hits", "Credential gets answered from the cache", stats.hits),
            ("cache_misses", "Credential gets with nothing servable cached", stats.misses),
            ("cache_fetches", "Upstream fetches started (TokenRequest plus STS)", stats.fetches),
            ("cache_refreshes", "Fetches started while a servable credential existed", stats.refreshes),
            ("cache_fetch_errors", "Fetches that failed", stats.fetch_errors),
            ("cache_evictions", "Cache keys evicted", stats.evictions),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let gauges = [
            ("cache_keys", "Keys held in the cache", stats.keys),
            ("cache_fetches_in_flight", "Fetches holding a concurrency permit", stats.fetches_in_flight),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Exports each watch's [`WatchHealth`] at scrape time, labelled `watch`.
#[derive(Debug)]
pub(crate) struct WatchCollector(pub(crate) Vec<Arc<WatchHealth>>);

impl Collector for WatchCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let help = "Errors of the pod (and namespace) watch, each retried with backoff";
        let mut family = encoder.encode_descriptor("watch_errors", help, None, MetricType::Counter)?;
        for health in &self.0 {
            let counter = ConstCounter::new(health.errors());
            counter.encode(family.encode_family(&WatchLabel { watch: health.what() })?)?;
        }
        let help = "Seconds since the watch last showed it works (an event or a completed relist)";
        let mut family = encoder.encode_descriptor("watch_unconfirmed_seconds", help, None, MetricType::Gauge)?;
        let now = tokio::time::Instant::now();
        for health in &self.0 {
            let gauge = ConstGauge::new(health.unconfirmed_for(now).as_secs_f64());
            gauge.encode(family.encode_family(&WatchLabel { watch: health.what() })?)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabel {
    watch: &'static str,
}
