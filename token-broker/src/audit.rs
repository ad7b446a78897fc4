//! The audit trail: one structured log event for every credential the
//! broker hands a caller and for every caller it refuses, so a SIEM can
//! answer "which pod held this role, and when" without the broker's debug
//! logs. The events go to the target [`TARGET`] at `INFO`, and
//! [`crate::telemetry::log_filter`] keeps that target on whatever `--log`
//! says unless the operator names it (`token_broker::audit=off`). With
//! `--log-format json` each event is one JSON object on one line; the
//! fields are listed in `token-broker/README.md` ("Audit log").
//!
//! An event says who asked (the SPIFFE ID the mesh vouched for), for which
//! pod (namespace/name and uid), which role, and what came of it. A
//! credential issued also carries its access key ID, which is not a secret:
//! CloudTrail records it with every call made with the credential, so it
//! joins the two logs. The secret key, the session token and the
//! service-account tokens never appear.
//!
//! Requests that are neither (malformed 400s, unknown pods, throttled or
//! unavailable answers) are not audit events: the metrics count them by
//! outcome.

use std::fmt::Display;
use std::net::IpAddr;

use time::OffsetDateTime;

use crate::authz::PodFacts;
use crate::fetch::imds_time;
use crate::identity::SpiffeId;

/// The log target of every audit event.
pub const TARGET: &str = "token_broker::audit";

/// `outcome` of a credential handed to the caller.
pub const ISSUED: &str = "issued";
/// `outcome` of a caller refused by the rules, the namespace policy, the
/// pod address check or STS.
pub const DENIED: &str = "denied";
/// `outcome` of a caller the broker could not identify.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Credentials for `role_arn` were answered to `caller` for `pod`, from the
/// cache or a fresh fetch alike.
pub fn issued(caller: &SpiffeId, pod: &PodFacts, role_arn: &str, access_key_id: &str, expiration: OffsetDateTime) {
    tracing::info!(
        target: TARGET,
        outcome = ISSUED,
        spiffe_id = %caller,
        pod = %PodName(pod),
        pod_uid = pod.uid,
        role_arn,
        access_key_id,
        expiration = imds_time(expiration),
        "credentials issued"
    );
}

/// `caller` was refused `role_arn` for `pod` by `rule` (a
/// [`crate::authz::Denial`] label, or STS's refusal); `reason` is what the
/// caller and the pod's Event are told.
pub fn denied(caller: &SpiffeId, pod: &PodFacts, role_arn: &str, rule: &str, reason: &str) {
    tracing::info!(
        target: TARGET,
        outcome = DENIED,
        spiffe_id = %caller,
        pod = %PodName(pod),
        pod_uid = pod.uid,
        role_arn,
        rule,
        reason,
        "credentials denied"
    );
}

/// A request came without an identity the broker can verify: `reason` is
/// the stable label (also in `unauthenticated_total`); `peer` is the
/// connection's source (the broker's sidecar in `xfcc` mode, the caller
/// itself in `mtls` mode).
pub fn unauthenticated(reason: &str, peer: Option<IpAddr>) {
    tracing::info!(
        target: TARGET,
        outcome = UNAUTHENTICATED,
        reason,
        peer = peer.map(tracing::field::display),
        "caller not authenticated"
    );
}

/// `namespace/name`, as `kubectl` names a pod.
struct PodName<'a>(&'a PodFacts);

impl Display for PodName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.namespace.as_deref().unwrap_or_default(), self.0.name)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, PoisonError};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::telemetry;

    /// The JSON lines a subscriber with the broker's own filter and format
    /// wrote while `f` ran.
    fn json_lines(directives: &str, f: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::registry()
            .with(telemetry::log_filter(directives).unwrap())
            .with(tracing_subscriber::fmt::layer().json().with_writer(move || writer.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    fn pod() -> PodFacts {
        PodFacts {
            name: "app-7d4b9".into(),
            namespace: Some("shop".into()),
            uid: "2f1c".into(),
            service_account: "app".into(),
            enabled_label: Some("True".into()),
            role_arn: Some("arn:aws:iam::123456789012:role/app".into()),
            finished: None,
            terminating: false,
            ips: vec![],
        }
    }

    fn caller() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/app").unwrap()
    }

    #[test]
    fn an_issued_credential_is_one_json_line_naming_who_which_pod_role_key_and_expiry() {
        let expiration = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let lines = json_lines("info", || {
            issued(&caller(), &pod(), "arn:aws:iam::123456789012:role/app", "ASIAEXAMPLE", expiration)
        });
        let [line] = lines.as_slice() else { panic!("{lines:?}") };
        assert_eq!(line["target"], TARGET);
        assert_eq!(line["level"], "INFO");
        let fields = &line["fields"];
        assert_eq!(fields["message"], "credentials issued");
        assert_eq!(fields["outcome"], "issued");
        assert_eq!(fields["spiffe_id"], "spiffe://cluster.local/ns/shop/sa/app");
        assert_eq!(fields["pod"], "shop/app-7d4b9");
        assert_eq!(fields["pod_uid"], "2f1c");
        assert_eq!(fields["role_arn"], "arn:aws:iam::123456789012:role/app");
        assert_eq!(fields["access_key_id"], "ASIAEXAMPLE");
        assert_eq!(fields["expiration"], "2027-01-15T08:00:00Z");
    }

    #[test]
    fn a_denial_names_the_rule_and_the_reason() {
        let lines = json_lines("info", || {
            denied(&caller(), &pod(), "arn:aws:iam::123456789012:role/admin", "role_mismatch", "not this pod's role")
        });
        let [line] = lines.as_slice() else { panic!("{lines:?}") };
        let fields = &line["fields"];
        assert_eq!(fields["outcome"], "denied");
        assert_eq!(fields["role_arn"], "arn:aws:iam::123456789012:role/admin");
        assert_eq!(fields["rule"], "role_mismatch");
        assert_eq!(fields["reason"], "not this pod's role");
        assert_eq!(fields["pod"], "shop/app-7d4b9");
    }

    #[test]
    fn an_unauthenticated_caller_is_recorded_with_its_peer() {
        let peer = Some(IpAddr::from([10, 0, 0, 7]));
        let lines = json_lines("info", || unauthenticated("missing", peer));
        let [line] = lines.as_slice() else { panic!("{lines:?}") };
        let fields = &line["fields"];
        assert_eq!(fields["outcome"], "unauthenticated");
        assert_eq!(fields["reason"], "missing");
        assert_eq!(fields["peer"], "10.0.0.7");
    }

    #[test]
    fn audit_events_survive_a_quieter_log_level_until_the_operator_names_the_target() {
        let expiration = OffsetDateTime::now_utc();
        let emit = || {
            tracing::info!(target: "token_broker::app", "an ordinary info line");
            issued(&caller(), &pod(), "arn:aws:iam::123456789012:role/app", "ASIAEXAMPLE", expiration);
        };
        let targets = |lines: Vec<serde_json::Value>| -> Vec<String> {
            lines.iter().map(|line| line["target"].as_str().unwrap_or_default().to_owned()).collect()
        };
        assert_eq!(targets(json_lines("warn", emit)), [TARGET]);
        assert_eq!(targets(json_lines("error,kube=warn", emit)), [TARGET]);
        assert!(json_lines("warn,token_broker::audit=off", emit).is_empty());
        assert_eq!(targets(json_lines("info", emit)), ["token_broker::app", TARGET]);
    }
}
