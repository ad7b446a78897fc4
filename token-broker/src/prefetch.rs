//! Prefetch: when the pod watch sees an enabled pod appear (created, or
//! labelled later), the broker fetches the credentials of its (role,
//! namespace, service account) before the pod asks, so the pod's first
//! request is a cache hit rather than a TokenRequest and an STS exchange
//! (`just bench-broker` measures the difference).
//!
//! Only what the pod's own request would be allowed is fetched: the pod
//! rules with the pod as its own caller, then the namespace policy. A pod
//! refused here leaves no Event and no audit record; its own request, if it
//! makes one, is refused and recorded as usual. Best effort throughout: a
//! full arrivals queue or a failed fetch costs only the warm start, and the
//! fetch queues for the cache's permits and rate like any other, so a
//! rollout of many pods cannot storm STS.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::authz::{self, PodFacts};
use crate::cache::{Cache, CacheKey};
use crate::fetch::{Bindings, Served};
use crate::kube::NamespaceWatch;
use crate::metrics::{Metrics, OutcomeLabel};
use crate::session;

/// Pods that appeared and are waiting to be prefetched; beyond this the
/// watch leaves new pods out ([`crate::kube::PodWatch::with_arrivals`]).
/// Each decision is quick (the fetch runs in the cache's own task), so the
/// queue fills only in a burst of thousands of pods at once.
pub const ARRIVALS_QUEUE: usize = 1024;

/// What came of one pod's prefetch, as `prefetches_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A fetch started for the pod's key.
    Started,
    /// Nothing to do: the key is cached, being fetched, or backing off.
    Cached,
    /// The pod's own request would be refused (the rules, the namespace
    /// policy, a role ARN STS would refuse), or its namespace is not known
    /// yet.
    Refused,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Cached => "cached",
            Self::Refused => "refused",
        }
    }
}

/// Warms the cache for pods the watch hands on.
pub(crate) struct Prefetcher {
    pub(crate) cache: Arc<Cache<Served>>,
    pub(crate) bindings: Arc<Bindings>,
    pub(crate) namespaces: Option<Arc<NamespaceWatch>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Prefetcher {
    /// Handles `arrivals` in order until the watch that sends them is gone.
    pub(crate) fn spawn(self, mut arrivals: mpsc::Receiver<Arc<PodFacts>>) -> JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(pod) = arrivals.recv().await {
                let outcome = self.prefetch(&pod);
                tracing::debug!(pod = pod.name, outcome = outcome.label(), "prefetch");
                self.metrics.prefetches.get_or_create(&OutcomeLabel { outcome: outcome.label() }).inc();
            }
        })
    }

    fn prefetch(&self, pod: &PodFacts) -> Outcome {
        let (Some(namespace), Some(role_arn)) = (pod.namespace.as_deref(), pod.role_arn.as_deref()) else {
            return Outcome::Refused;
        };
        if session::validate_role_arn(role_arn).is_err()
            || authz::authorize(namespace, &pod.service_account, role_arn, pod).is_err()
        {
            return Outcome::Refused;
        }
        if let Some(namespaces) = &self.namespaces {
            let permitted = namespaces.get(namespace).is_some_and(|rule| rule.check(role_arn).is_ok());
            if !permitted {
                return Outcome::Refused;
            }
        }
        let key = CacheKey {
            role_arn: role_arn.to_owned(),
            namespace: namespace.to_owned(),
            service_account: pod.service_account.clone(),
        };
        // The fetch binds its token to the pod that asked last; until one
        // asks, the pod that just appeared.
        self.bindings.bind(&key, &pod.name, &pod.uid);
        if self.cache.prefetch(&key) { Outcome::Started } else { Outcome::Cached }
    }
}
