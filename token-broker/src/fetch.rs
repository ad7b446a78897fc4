//! The cache's fetch: a TokenRequest bound to the pod that asked, then STS,
//! and the IMDS document rendered once from what STS returned. The cache
//! knows nothing of Kubernetes or STS, so its rules are tested with a fake
//! fetch; this is the one place that knows how its values are made, and why
//! a hit costs no work: the bytes it serves were built here, once per fetch.
//! Errors say where they failed, for [`crate::app::fetch_error_response`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;

use crate::cache::{CacheKey, Expiring, FailedAt, FetchError};
use crate::kube::Cluster;
use crate::metrics::{CodeLabel, Metrics};
use crate::session;
use crate::sts::{Credentials, StsClient};

/// The IMDS credential document, exactly as the filter serves it.
pub fn credential_document(credentials: &Credentials) -> serde_json::Value {
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": imds_time(credentials.last_updated),
        "Type": "AWS-HMAC",
        "AccessKeyId": credentials.access_key_id,
        "SecretAccessKey": credentials.secret_access_key,
        "Token": credentials.session_token,
        "Expiration": imds_time(credentials.expiration),
    })
}

/// RFC 3339 in UTC with `Z` and whole seconds, as IMDS writes times.
pub fn imds_time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    at.replace_nanosecond(0).unwrap_or(at).format(&Rfc3339).unwrap_or_default()
}

/// A credential as the cache holds it: its IMDS document, rendered once per
/// fetch, so a cache hit answers with a reference-counted clone of the same
/// bytes instead of building JSON per request. No `Debug`: the bytes hold
/// the secret and the session token.
pub(crate) struct Served {
    pub(crate) expiration: OffsetDateTime,
    /// Not a secret: what CloudTrail records for each call made with the
    /// credential, and what the audit trail names ([`crate::audit`]).
    pub(crate) access_key_id: String,
    /// [`credential_document`], serialized.
    pub(crate) document: Bytes,
}

impl Served {
    pub(crate) fn new(credentials: Credentials) -> Self {
        let document = credential_document(&credentials).to_string();
        Self {
            expiration: credentials.expiration,
            access_key_id: credentials.access_key_id,
            document: Bytes::from(document),
        }
    }
}

impl Expiring for Served {
    fn expiration(&self) -> OffsetDateTime {
        self.expiration
    }
}

/// Which pod each key's token is bound to: the one that asked last. Bounded
/// like the cache; beyond that the binding used longest ago goes (its key's
/// next request binds it again).
pub(crate) struct Bindings {
    max: usize,
    map: Mutex<HashMap<CacheKey, Binding>>,
}

struct Binding {
    pod: String,
    uid: String,
    at: Instant,
}

impl Bindings {
    pub(crate) fn new(max: usize) -> Self {
        Self { max: max.max(1), map: Mutex::default() }
    }

    pub(crate) fn bind(&self, key: &CacheKey, pod: &str, uid: &str) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // Almost every request re-binds the pod already bound: then only the
        // time moves, and nothing is allocated.
        if let Some(binding) = map.get_mut(key) {
            if binding.pod != pod || binding.uid != uid {
                binding.pod = pod.to_owned();
                binding.uid = uid.to_owned();
            }
            binding.at = now;
            return;
        }
        if map.len() >= self.max {
            let oldest = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(key.clone(), Binding { pod: pod.to_owned(), uid: uid.to_owned(), at: now });
    }

    fn get(&self, key: &CacheKey) -> Option<(String, String)> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key).map(|b| (b.pod.clone(), b.uid.clone()))
    }
}

pub(crate) struct Fetcher {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) sts: StsClient,
    pub(crate) bindings: Arc<Bindings>,
    pub(crate) audience: String,
    pub(crate) lifetime_seconds: i64,
    pub(crate) metrics: Arc<Metrics>,
}

impl Fetcher {
    /// One TokenRequest and one STS call for `key`. Errors say where they
    /// failed, for [`crate::app::fetch_error_response`]; none carries the token.
    pub(crate) async fn fetch(&self, key: CacheKey) -> Result<Credentials, FetchError> {
        let (ns, sa) = (key.namespace.as_str(), key.service_account.as_str());
        let Some((pod, uid)) = self.bindings.get(&key) else {
            return Err(FetchError::failed_at(FailedAt::Kubernetes, "no pod to bind the token to"));
        };
        let token =
            self.cluster.token(ns, sa, &pod, &uid, &self.audience, self.lifetime_seconds).await.map_err(|error| {
                tracing::warn!(%error, namespace = ns, service_account = sa, "TokenRequest failed");
                self.metrics.kube_error(&error);
                FetchError::failed_at(FailedAt::Kubernetes, format!("TokenRequest failed: {}", error.label()))
            })?;

        let session_name = session::role_session_name(ns, sa);
        self.metrics.sts_calls.inc();
        // A guard, not inc/dec around the await: the cache aborts a fetch
        // past its timeout, dropping this future mid-call.
        let in_flight = InFlight::enter(&self.metrics.sts_in_flight);
        let started = std::time::Instant::now();
        let result = self.sts.assume_role_with_web_identity(&key.role_arn, &session_name, token.expose()).await;
        self.metrics.sts_duration.observe(started.elapsed().as_secs_f64());
        drop(in_flight);
        result.map_err(|error| {
            tracing::warn!(%error, role_arn = key.role_arn, namespace = ns, service_account = sa, "STS call failed");
            self.metrics.sts_errors.get_or_create(&CodeLabel { code: error.metric_label() }).inc();
            error.fetch_error()
        })
    }
}

/// One unit of a gauge of things in progress, given back when dropped:
/// on completion or when the future holding it is cancelled.
struct InFlight(Gauge);

impl InFlight {
    fn enter(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const ARN: &str = "arn:aws:iam::123456789012:role/team/app+x";

    #[test]
    fn the_document_is_the_imds_shape_with_whole_second_utc_times() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_800_000_000_123_456_789).expect("time");
        let credentials = Credentials {
            access_key_id: "ASIA".into(),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration: at + Duration::from_secs(3600),
            last_updated: at,
        };
        assert_eq!(
            credential_document(&credentials),
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": "2027-01-15T08:00:00Z",
                "Type": "AWS-HMAC",
                "AccessKeyId": "ASIA",
                "SecretAccessKey": "secret",
                "Token": "token",
                "Expiration": "2027-01-15T09:00:00Z",
            })
        );
        // What a cache hit answers: the same document, rendered at fetch time.
        let served = Served::new(credentials.clone());
        let body: serde_json::Value = serde_json::from_slice(&served.document).expect("JSON");
        assert_eq!(body, credential_document(&credentials));
        assert_eq!(served.expiration(), credentials.expiration);
    }

    #[test]
    fn a_key_is_bound_to_the_pod_that_asked_last() {
        let key = CacheKey { role_arn: ARN.into(), namespace: "ns".into(), service_account: "sa".into() };
        let bindings = Bindings::new(1);
        bindings.bind(&key, "web-0", "uid-0");
        bindings.bind(&key, "web-0", "uid-0");
        assert_eq!(bindings.get(&key), Some(("web-0".into(), "uid-0".into())));
        bindings.bind(&key, "web-1", "uid-1");
        assert_eq!(bindings.get(&key), Some(("web-1".into(), "uid-1".into())));
        // Beyond the bound, the binding used longest ago goes.
        let other = CacheKey { namespace: "other".into(), ..key.clone() };
        bindings.bind(&other, "web-2", "uid-2");
        assert_eq!((bindings.get(&key), bindings.get(&other)), (None, Some(("web-2".into(), "uid-2".into()))));
    }
}
