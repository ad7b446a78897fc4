//! May this caller use this role for this pod?
//!
//! The caller's namespace and service account come only from the verified
//! mesh identity ([`crate::identity`]); the request contributes the pod name
//! (which the broker looks up) and the role ARN. The pod itself must opt in
//! (label [`ENABLED_LABEL`] = `True`) and name exactly that role (annotation
//! [`ROLE_ARN_ANNOTATION`]). A namespace may narrow the roles its pods can use
//! further with a [`NamespacePolicy`]. The STS trust policy on the role is the
//! last gate, enforced by AWS; this module is the one we own.
//!
//! Every refusal is a [`Denial`]: one variant per rule, with a stable
//! [`Denial::label`] for metrics and a [`Denial::reason`] for logs and
//! Kubernetes Events.
//!
//! The rules read a pod as [`PodFacts`] and a namespace as a
//! [`NamespaceRule`]: the few fields they need, which is all the broker's
//! watches keep of each object ([`crate::kube`]).

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use regex::bytes::{Regex, RegexBuilder};

/// The pod label that opts a pod in. Only the exact value [`ENABLED_VALUE`]
/// enables it, as on GKE multi-cloud where this label comes from.
pub const ENABLED_LABEL: &str = "gkemulticloud.googleapis.com/aws-imds-emulator-enabled";

/// The one label value that enables a pod: not `true`, not ` True`.
pub const ENABLED_VALUE: &str = "True";

/// The pod annotation naming the one role ARN the pod may use.
pub const ROLE_ARN_ANNOTATION: &str = "gkemulticloud.googleapis.com/aws-imds-emulator-role-arn";

/// The service account a pod runs as when its spec names none: the
/// ServiceAccount admission plugin fills in this value.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Longest namespace policy pattern we compile. Real allow-lists are a few
/// ARNs; a longer annotation is a mistake or an attack, and refusing it before
/// parsing keeps the parser's own allocations small too.
pub const MAX_POLICY_PATTERN: usize = 16 * 1024;

/// Bound on the compiled size of a namespace policy regex (the regex crate's
/// default is 10 MiB). `a{1000}{1000}` is 21 bytes of annotation but compiles
/// to far more than this; it is refused instead of eating memory.
pub const MAX_POLICY_COMPILED: usize = 1024 * 1024;

/// Bound on the lazy DFA cache each policy regex may grow while matching.
const MAX_POLICY_DFA: usize = 1024 * 1024;

/// Longest caller-influenced value quoted in a reason. Kubernetes Event
/// messages are cut at 1 KiB, so a reason must stay short even when an
/// annotation is not.
const MAX_QUOTED: usize = 256;

/// Why a caller may not use a role. The `Display` text is [`Denial::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The pod is not in the caller's namespace.
    #[error(
        "pod {} is in namespace {}, not in the caller's namespace {}",
        q(.pod), q_opt(.pod_namespace), q(.caller_namespace)
    )]
    WrongNamespace { pod: String, pod_namespace: Option<String>, caller_namespace: String },

    /// The pod runs as another service account than the caller's.
    #[error(
        "pod {} in namespace {} runs as service account {}, not as the caller's {}",
        q(.pod), q(.namespace), q(.pod_service_account), q(.caller_service_account)
    )]
    WrongServiceAccount { pod: String, namespace: String, pod_service_account: String, caller_service_account: String },

    /// The pod has run to completion (phase `Succeeded` or `Failed`).
    #[error("pod {} in namespace {} has finished (phase {})", q(.pod), q(.namespace), q(.phase))]
    PodFinished { pod: String, namespace: String, phase: String },

    /// The pod is being deleted (`metadata.deletionTimestamp` is set).
    #[error("pod {} in namespace {} is terminating", q(.pod), q(.namespace))]
    PodTerminating { pod: String, namespace: String },

    /// The pod does not carry the enabling label with the exact value `True`.
    #[error(
        "pod {} in namespace {} is not enabled: label {ENABLED_LABEL} is {}, it must be exactly \"True\"",
        q(.pod), q(.namespace), q_opt(.label_value)
    )]
    NotEnabled { pod: String, namespace: String, label_value: Option<String> },

    /// The pod has no (or an empty) role ARN annotation.
    #[error("pod {} in namespace {} has no {ROLE_ARN_ANNOTATION} annotation", q(.pod), q(.namespace))]
    NoRoleAnnotation { pod: String, namespace: String },

    /// The pod's annotation names another role than the one requested.
    #[error(
        "pod {} in namespace {} is annotated with role {}, not the requested {}",
        q(.pod), q(.namespace), q(.annotated), q(.requested)
    )]
    RoleMismatch { pod: String, namespace: String, annotated: String, requested: String },

    /// The namespace has no policy annotation, so it permits no role.
    #[error("namespace {} has no {} annotation, so it permits no role", q(.namespace), .annotation)]
    NoNamespacePolicy { namespace: String, annotation: String },

    /// The namespace's policy annotation is not a usable regex.
    #[error(
        "namespace {} annotation {} is not a usable regex ({}), so it permits no role",
        q(.namespace), .annotation, .problem
    )]
    InvalidNamespacePolicy { namespace: String, annotation: String, problem: String },

    /// The namespace's policy does not admit the role.
    #[error(
        "namespace {} does not permit role {}: it does not match {} = {}",
        q(.namespace), q(.role), .annotation, q(.pattern)
    )]
    NamespaceForbidsRole { namespace: String, role: String, annotation: String, pattern: String },

    /// The caller's connection does not come from the pod it names: another
    /// pod of the same service account (mesh identity is per service
    /// account, so only the address tells them apart).
    #[error(
        "the caller at {address} is not pod {} in namespace {}, whose addresses are {}",
        q(.pod), q(.namespace), addresses(.pod_addresses)
    )]
    CallerNotPod { pod: String, namespace: String, address: IpAddr, pod_addresses: Vec<IpAddr> },
}

impl Denial {
    /// A stable, low-cardinality name for metrics. Never carries a role,
    /// pod or namespace.
    pub fn label(&self) -> &'static str {
        match self {
            Self::WrongNamespace { .. } => "wrong_namespace",
            Self::WrongServiceAccount { .. } => "wrong_service_account",
            Self::PodFinished { .. } => "pod_finished",
            Self::PodTerminating { .. } => "pod_terminating",
            Self::NotEnabled { .. } => "not_enabled",
            Self::NoRoleAnnotation { .. } => "no_role_annotation",
            Self::RoleMismatch { .. } => "role_mismatch",
            Self::NoNamespacePolicy { .. } => "no_namespace_policy",
            Self::InvalidNamespacePolicy { .. } => "invalid_namespace_policy",
            Self::NamespaceForbidsRole { .. } => "namespace_forbids_role",
            Self::CallerNotPod { .. } => "caller_not_pod",
        }
    }

    /// One sentence for logs and Kubernetes Events. It names the pod,
    /// namespace, service account and roles involved; nothing here is secret.
    /// Caller-influenced values are quoted, escaped and clipped, so the
    /// sentence stays on one line and short.
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

/// Decides whether the caller `(caller_ns, caller_sa)`, taken from its
/// verified mesh identity, may use `role_arn` on behalf of `pod`.
///
/// Granted only if the pod is in `caller_ns`, runs as `caller_sa`, is live
/// (not finished, not being deleted), carries [`ENABLED_LABEL`] with the value
/// exactly `True`, and carries [`ROLE_ARN_ANNOTATION`] equal to `role_arn`
/// byte for byte. Rules are checked in that order, so the first denial names
/// the most fundamental problem: identity, then lifecycle, then opt-in.
pub fn authorize(caller_ns: &str, caller_sa: &str, role_arn: &str, pod: &PodFacts) -> Result<(), Denial> {
    let pod_name = || pod.name.clone();
    let namespace = || caller_ns.to_owned();

    // A pod object without a namespace is not one the API server returns;
    // deny rather than assume it is the caller's.
    if pod.namespace.as_deref() != Some(caller_ns) {
        return Err(Denial::WrongNamespace {
            pod: pod_name(),
            pod_namespace: pod.namespace.clone(),
            caller_namespace: namespace(),
        });
    }

    if pod.service_account != caller_sa {
        return Err(Denial::WrongServiceAccount {
            pod: pod_name(),
            namespace: namespace(),
            pod_service_account: pod.service_account.clone(),
            caller_service_account: caller_sa.to_owned(),
        });
    }

    if let Some(phase) = pod.finished {
        return Err(Denial::PodFinished { pod: pod_name(), namespace: namespace(), phase: phase.to_owned() });
    }
    if pod.terminating {
        return Err(Denial::PodTerminating { pod: pod_name(), namespace: namespace() });
    }

    if pod.enabled_label.as_deref() != Some(ENABLED_VALUE) {
        return Err(Denial::NotEnabled {
            pod: pod_name(),
            namespace: namespace(),
            label_value: pod.enabled_label.clone(),
        });
    }

    // An empty annotation names no role; without this check an empty
    // requested ARN would match it.
    let annotated = pod.role_arn.as_ref().filter(|v| !v.is_empty());
    let Some(annotated) = annotated else {
        return Err(Denial::NoRoleAnnotation { pod: pod_name(), namespace: namespace() });
    };
    if annotated != role_arn {
        return Err(Denial::RoleMismatch {
            pod: pod_name(),
            namespace: namespace(),
            annotated: annotated.clone(),
            requested: role_arn.to_owned(),
        });
    }
    Ok(())
}

/// The service account the pod runs as, as the API server resolves it:
/// `serviceAccountName`, else the deprecated `serviceAccount` (the v1 API
/// copies one into the other), else `default`. Empty counts as unset, as in
/// the Go types, where empty and absent are the same value.
fn pod_service_account(pod: &Pod) -> &str {
    let spec = pod.spec.as_ref();
    [spec.and_then(|s| s.service_account_name.as_deref()), spec.and_then(|s| s.service_account.as_deref())]
        .into_iter()
        .flatten()
        .find(|sa| !sa.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT)
}

/// Decides whether a caller whose connection comes from `address` is `pod`:
/// `address` must be one of the pod's IPs ([`PodFacts::ips`]; an
/// IPv4-mapped IPv6 address counts as its IPv4 address). Checked after
/// [`authorize`] admitted the caller's service account for the pod, so this
/// tells the pod from its siblings. A pod without IPs yet is the caller's
/// to retry ([`crate::error::BrokerError::PodHasNoAddress`]), not a denial.
pub fn caller_is_pod(address: IpAddr, pod: &PodFacts) -> Result<(), Denial> {
    let address = address.to_canonical();
    if pod.ips.iter().any(|ip| ip.to_canonical() == address) {
        return Ok(());
    }
    Err(Denial::CallerNotPod {
        pod: pod.name.clone(),
        namespace: pod.namespace.clone().unwrap_or_default(),
        address,
        pod_addresses: pod.ips.clone(),
    })
}

/// Addresses for a reason: `10.0.0.1, fd00::1`, or `none` (a few at most:
/// a pod has one per IP family).
fn addresses(list: &[IpAddr]) -> String {
    if list.is_empty() {
        return "none".to_owned();
    }
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// What the rules read from a pod, and all the broker keeps of one: the pod
/// watch holds thousands of these cluster-wide, so not the whole object
/// (managed fields, container specs and statuses are several KiB a pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    /// Always set on a pod the API server returns.
    pub namespace: Option<String>,
    /// What a TokenRequest binds the token to, and a denial Event names.
    pub uid: String,
    /// Resolved as the API server does ([`DEFAULT_SERVICE_ACCOUNT`] when
    /// unset).
    pub service_account: String,
    /// The value of [`ENABLED_LABEL`], if any.
    pub enabled_label: Option<String>,
    /// The value of [`ROLE_ARN_ANNOTATION`], if any.
    pub role_arn: Option<String>,
    /// `Succeeded` or `Failed` once the pod has run to completion. Pending
    /// and Unknown are not finished: a native-sidecar or init container may
    /// need credentials before the pod is Running, and Unknown means the
    /// node stopped reporting, not that the pod stopped.
    pub finished: Option<&'static str>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// `status.podIPs`, else `status.podIP`; unparsable entries left out.
    pub ips: Vec<IpAddr>,
}

impl From<Pod> for PodFacts {
    fn from(pod: Pod) -> Self {
        let service_account = pod_service_account(&pod).to_owned();
        let meta = pod.metadata;
        let status = pod.status.unwrap_or_default();
        let finished = match status.phase.as_deref() {
            Some("Succeeded") => Some("Succeeded"),
            Some("Failed") => Some("Failed"),
            _ => None,
        };
        let listed = status.pod_ips.unwrap_or_default().into_iter().map(|ip| ip.ip);
        let mut ips: Vec<IpAddr> = listed.filter_map(|ip| ip.parse().ok()).collect();
        if ips.is_empty() {
            ips.extend(status.pod_ip.and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        ips.shrink_to_fit();
        Self {
            name: meta.name.unwrap_or_default(),
            namespace: meta.namespace,
            uid: meta.uid.unwrap_or_default(),
            service_account,
            enabled_label: meta.labels.and_then(|mut labels| labels.remove(ENABLED_LABEL)),
            role_arn: meta.annotations.and_then(|mut annotations| annotations.remove(ROLE_ARN_ANNOTATION)),
            finished,
            terminating: meta.deletion_timestamp.is_some(),
            ips,
        }
    }
}

/// An optional allow-list on the Namespace object, in the style of kiam's
/// `iam.amazonaws.com/permitted`: the annotation holds a regex the role ARN
/// must match in full.
///
/// Unlike kiam (`^` + pattern + `$`), the pattern is wrapped as `^(?:...)$`,
/// so `a|b` means "exactly a or exactly b" rather than "starts with a or ends
/// with b". Like kiam's Go regexp, classes are ASCII (`\w` is
/// `[0-9A-Za-z_]`) and `(?i)` folds ASCII case: role ARNs are ASCII, and the
/// Unicode tables would make every `\w` cost kilobytes of compiled program
/// (this build of the regex crate also lacks Unicode case folding, so `(?i)`
/// would not compile at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// The Namespace annotation that holds the pattern.
    pub annotation: String,
}

impl NamespacePolicy {
    /// Admits `role_arn` only if `namespace` carries the policy annotation and
    /// its pattern, anchored at both ends, matches the whole ARN. A missing,
    /// oversized or invalid pattern denies; nothing here panics.
    pub fn check(&self, namespace: &Namespace, role_arn: &str) -> Result<(), Denial> {
        self.rule(namespace.clone()).check(role_arn)
    }

    /// What this policy keeps of `namespace`: its name and pattern, the
    /// pattern compiled on first use.
    pub fn rule(&self, namespace: Namespace) -> NamespaceRule {
        let name = namespace.metadata.name.unwrap_or_default();
        let pattern = namespace.metadata.annotations.and_then(|mut a| a.remove(&self.annotation));
        let pattern = match pattern {
            None => Pattern::Missing,
            // Not kept: it could never compile.
            Some(pattern) if pattern.len() > MAX_POLICY_PATTERN => Pattern::Oversized,
            Some(pattern) => Pattern::Text(pattern),
        };
        NamespaceRule { name, annotation: Arc::from(self.annotation.as_str()), pattern, compiled: OnceLock::new() }
    }
}

/// One namespace as the [`NamespacePolicy`] sees it. The namespace watch
/// keeps one per namespace; its regex is compiled at most once, by the first
/// request that needs it, so a request costs a lookup and a match, not two
/// compilations.
#[derive(Debug, Clone)]
pub struct NamespaceRule {
    /// The namespace's name.
    pub name: String,
    annotation: Arc<str>,
    pattern: Pattern,
    compiled: OnceLock<Result<Regex, String>>,
}

#[derive(Debug, Clone)]
enum Pattern {
    Missing,
    Oversized,
    Text(String),
}

impl NamespaceRule {
    /// [`NamespacePolicy::check`] for this namespace.
    pub fn check(&self, role_arn: &str) -> Result<(), Denial> {
        let invalid = |problem: String| Denial::InvalidNamespacePolicy {
            namespace: self.name.clone(),
            annotation: self.annotation.to_string(),
            problem,
        };
        let pattern = match &self.pattern {
            Pattern::Missing => {
                return Err(Denial::NoNamespacePolicy {
                    namespace: self.name.clone(),
                    annotation: self.annotation.to_string(),
                });
            }
            Pattern::Oversized => return Err(invalid(format!("longer than {MAX_POLICY_PATTERN} bytes"))),
            Pattern::Text(pattern) => pattern,
        };
        let regex = self.compiled.get_or_init(|| compile_policy(pattern)).as_ref().map_err(|p| invalid(p.clone()))?;
        if regex.is_match(role_arn.as_bytes()) {
            Ok(())
        } else {
            Err(Denial::NamespaceForbidsRole {
                namespace: self.name.clone(),
                role: role_arn.to_owned(),
                annotation: self.annotation.to_string(),
                pattern: pattern.clone(),
            })
        }
    }
}

/// `pattern` anchored at both ends, or why it cannot be used.
fn compile_policy(pattern: &str) -> Result<Regex, String> {
    let compile = |text: &str| {
        RegexBuilder::new(text)
            .unicode(false)
            .size_limit(MAX_POLICY_COMPILED)
            .dfa_size_limit(MAX_POLICY_DFA)
            .build()
            .map_err(|e| regex_problem(&e))
    };
    // The pattern must be a regex on its own before we wrap it: otherwise
    // `x)|(.*` would close our group early and become `^(?:x)|(.*)$`,
    // which admits every role.
    compile(pattern)?;
    compile(&format!("^(?:{pattern})$"))
}

/// A one-line description of why a pattern did not compile. The regex
/// crate's syntax errors span several lines (the pattern, a caret, then
/// `error: ...`); the last line is the part worth logging.
fn regex_problem(error: &regex::Error) -> String {
    match error {
        regex::Error::CompiledTooBig(_) => format!("compiles to more than {MAX_POLICY_COMPILED} bytes"),
        regex::Error::Syntax(text) => {
            let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("syntax error");
            clip(line.strip_prefix("error: ").unwrap_or(line)).to_owned()
        }
        _ => "cannot be compiled".to_owned(),
    }
}

/// Formats a caller-influenced value for a reason: quoted, escaped (no
/// newlines or control characters reach a log line) and clipped.
fn q(value: &str) -> Quoted<'_> {
    Quoted(Some(value))
}

fn q_opt(value: &Option<String>) -> Quoted<'_> {
    Quoted(value.as_deref())
}

struct Quoted<'a>(Option<&'a str>);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("unset"),
            Some(value) => {
                let clipped = clip(value);
                write!(f, "{clipped:?}")?;
                if clipped.len() < value.len() { write!(f, " (cut from {} bytes)", value.len()) } else { Ok(()) }
            }
        }
    }
}

/// The longest prefix of `value` of at most [`MAX_QUOTED`] bytes that ends
/// on a character boundary.
fn clip(value: &str) -> &str {
    if value.len() <= MAX_QUOTED {
        return value;
    }
    let mut end = MAX_QUOTED;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    const NS: &str = "team-a";
    const SA: &str = "app";
    const ROLE: &str = "arn:aws:iam::123456789012:role/app";
    const POLICY: &str = "iam.amazonaws.com/permitted";

    /// A pod that passes every rule for `(NS, SA, ROLE)`; each test breaks
    /// exactly one thing.
    struct PodBuilder(Pod);

    fn pod() -> PodBuilder {
        PodBuilder(Pod {
            metadata: ObjectMeta {
                name: Some("web-0".to_owned()),
                namespace: Some(NS.to_owned()),
                labels: Some(BTreeMap::from([(ENABLED_LABEL.to_owned(), "True".to_owned())])),
                annotations: Some(BTreeMap::from([(ROLE_ARN_ANNOTATION.to_owned(), ROLE.to_owned())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec { service_account_name: Some(SA.to_owned()), ..PodSpec::default() }),
            status: Some(PodStatus { phase: Some("Running".to_owned()), ..PodStatus::default() }),
        })
    }

    impl PodBuilder {
        fn namespace(mut self, ns: Option<&str>) -> Self {
            self.0.metadata.namespace = ns.map(str::to_owned);
            self
        }
        fn service_account_name(mut self, sa: Option<&str>) -> Self {
            self.0.spec.get_or_insert_default().service_account_name = sa.map(str::to_owned);
            self
        }
        fn deprecated_service_account(mut self, sa: &str) -> Self {
            self.0.spec.get_or_insert_default().service_account = Some(sa.to_owned());
            self
        }
        fn no_spec(mut self) -> Self {
            self.0.spec = None;
            self
        }
        fn phase(mut self, phase: Option<&str>) -> Self {
            self.0.status = phase.map(|p| PodStatus { phase: Some(p.to_owned()), ..PodStatus::default() });
            self
        }
        fn deleting(mut self) -> Self {
            self.0.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
            self
        }
        fn label(mut self, value: Option<&str>) -> Self {
            set(&mut self.0.metadata.labels, ENABLED_LABEL, value);
            self
        }
        fn annotation(mut self, value: Option<&str>) -> Self {
            set(&mut self.0.metadata.annotations, ROLE_ARN_ANNOTATION, value);
            self
        }
        /// The pod as the rules (and the watches) see it.
        fn build(self) -> PodFacts {
            PodFacts::from(self.0)
        }
    }

    fn set(map: &mut Option<BTreeMap<String, String>>, key: &str, value: Option<&str>) {
        let map = map.get_or_insert_default();
        match value {
            Some(v) => map.insert(key.to_owned(), v.to_owned()),
            None => map.remove(key),
        };
    }

    fn namespace(annotation: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(NS.to_owned()),
                annotations: annotation.map(|p| BTreeMap::from([(POLICY.to_owned(), p.to_owned())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn policy() -> NamespacePolicy {
        NamespacePolicy { annotation: POLICY.to_owned() }
    }

    fn denial_label(result: Result<(), Denial>) -> &'static str {
        result.expect_err("expected a denial").label()
    }

    #[test]
    fn pod_meeting_every_rule_is_allowed() {
        assert_eq!(authorize(NS, SA, ROLE, &pod().build()), Ok(()));
    }

    #[test]
    fn the_caller_must_connect_from_one_of_the_pods_addresses() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let mut web = pod().build();
        web.ips = vec![ip("10.244.1.10"), ip("fd00::10")];
        assert_eq!(caller_is_pod(ip("10.244.1.10"), &web), Ok(()));
        assert_eq!(caller_is_pod(ip("fd00::10"), &web), Ok(()));
        assert_eq!(caller_is_pod(ip("::ffff:10.244.1.10"), &web), Ok(()), "IPv4-mapped is IPv4");
        // A sibling of the same service account, at its own address.
        let denial = caller_is_pod(ip("10.244.1.11"), &web).unwrap_err();
        assert_eq!(denial.label(), "caller_not_pod");
        assert_eq!(
            denial.reason(),
            "the caller at 10.244.1.11 is not pod \"web-0\" in namespace \"team-a\", \
             whose addresses are 10.244.1.10, fd00::10"
        );
        web.ips.clear();
        let denial = caller_is_pod(ip("10.244.1.10"), &web).unwrap_err();
        assert!(denial.reason().ends_with("whose addresses are none"), "{}", denial.reason());
    }

    #[test]
    fn pod_in_another_namespace_is_denied() {
        let denial = authorize(NS, SA, ROLE, &pod().namespace(Some("team-b")).build()).unwrap_err();
        assert_eq!(
            denial,
            Denial::WrongNamespace {
                pod: "web-0".to_owned(),
                pod_namespace: Some("team-b".to_owned()),
                caller_namespace: NS.to_owned(),
            }
        );
        assert_eq!(denial.label(), "wrong_namespace");
    }

    #[test]
    fn pod_without_a_namespace_is_denied() {
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &pod().namespace(None).build())), "wrong_namespace");
    }

    #[test]
    fn namespace_comparison_is_exact() {
        for other in ["Team-a", "team-a ", "team-"] {
            assert_eq!(
                denial_label(authorize(NS, SA, ROLE, &pod().namespace(Some(other)).build())),
                "wrong_namespace",
                "{other:?}"
            );
        }
    }

    #[test]
    fn pod_running_as_another_service_account_is_denied() {
        let denial = authorize(NS, SA, ROLE, &pod().service_account_name(Some("admin")).build()).unwrap_err();
        assert_eq!(
            denial,
            Denial::WrongServiceAccount {
                pod: "web-0".to_owned(),
                namespace: NS.to_owned(),
                pod_service_account: "admin".to_owned(),
                caller_service_account: SA.to_owned(),
            }
        );
        assert_eq!(denial.label(), "wrong_service_account");
    }

    #[test]
    fn absent_service_account_name_means_default() {
        let unnamed = pod().service_account_name(None).build();
        assert_eq!(authorize(NS, "default", ROLE, &unnamed), Ok(()));
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &unnamed)), "wrong_service_account");
        let empty = pod().service_account_name(Some("")).build();
        assert_eq!(authorize(NS, "default", ROLE, &empty), Ok(()));
        let no_spec = pod().no_spec().build();
        assert_eq!(authorize(NS, "default", ROLE, &no_spec), Ok(()));
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &no_spec)), "wrong_service_account");
    }

    #[test]
    fn deprecated_service_account_field_is_honoured_when_name_is_absent() {
        let legacy = pod().service_account_name(None).deprecated_service_account(SA).build();
        assert_eq!(authorize(NS, SA, ROLE, &legacy), Ok(()));
        assert_eq!(denial_label(authorize(NS, "default", ROLE, &legacy)), "wrong_service_account");
        // serviceAccountName wins over the deprecated field.
        let both = pod().service_account_name(Some("other")).deprecated_service_account(SA).build();
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &both)), "wrong_service_account");
    }

    #[test]
    fn finished_pods_are_denied() {
        for phase in ["Succeeded", "Failed"] {
            let denial = authorize(NS, SA, ROLE, &pod().phase(Some(phase)).build()).unwrap_err();
            assert_eq!(
                denial,
                Denial::PodFinished { pod: "web-0".to_owned(), namespace: NS.to_owned(), phase: phase.to_owned() }
            );
            assert_eq!(denial.label(), "pod_finished");
        }
    }

    #[test]
    fn pending_unknown_and_unreported_phases_are_allowed() {
        for phase in [Some("Pending"), Some("Running"), Some("Unknown"), None] {
            assert_eq!(authorize(NS, SA, ROLE, &pod().phase(phase).build()), Ok(()), "{phase:?}");
        }
    }

    #[test]
    fn terminating_pod_is_denied() {
        let denial = authorize(NS, SA, ROLE, &pod().deleting().build()).unwrap_err();
        assert_eq!(denial, Denial::PodTerminating { pod: "web-0".to_owned(), namespace: NS.to_owned() });
        assert_eq!(denial.label(), "pod_terminating");
    }

    #[test]
    fn pod_without_the_label_is_not_enabled() {
        let denial = authorize(NS, SA, ROLE, &pod().label(None).build()).unwrap_err();
        assert_eq!(denial, Denial::NotEnabled { pod: "web-0".to_owned(), namespace: NS.to_owned(), label_value: None });
        assert_eq!(denial.label(), "not_enabled");
    }

    #[test]
    fn label_value_true_lowercase_does_not_enable() {
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &pod().label(Some("true")).build())), "not_enabled");
    }

    #[test]
    fn label_value_must_be_exactly_true() {
        for value in ["TRUE", " True", "True ", "True\n", "", "1", "yes", "\"True\""] {
            assert_eq!(
                denial_label(authorize(NS, SA, ROLE, &pod().label(Some(value)).build())),
                "not_enabled",
                "{value:?}"
            );
        }
    }

    #[test]
    fn pod_without_the_role_annotation_is_denied() {
        let denial = authorize(NS, SA, ROLE, &pod().annotation(None).build()).unwrap_err();
        assert_eq!(denial, Denial::NoRoleAnnotation { pod: "web-0".to_owned(), namespace: NS.to_owned() });
        assert_eq!(denial.label(), "no_role_annotation");
    }

    #[test]
    fn empty_role_annotation_names_no_role_even_for_an_empty_request() {
        let empty = pod().annotation(Some("")).build();
        assert_eq!(denial_label(authorize(NS, SA, "", &empty)), "no_role_annotation");
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &empty)), "no_role_annotation");
    }

    #[test]
    fn requesting_another_role_than_annotated_is_denied() {
        let other = "arn:aws:iam::123456789012:role/admin";
        let denial = authorize(NS, SA, other, &pod().build()).unwrap_err();
        assert_eq!(
            denial,
            Denial::RoleMismatch {
                pod: "web-0".to_owned(),
                namespace: NS.to_owned(),
                annotated: ROLE.to_owned(),
                requested: other.to_owned(),
            }
        );
        assert_eq!(denial.label(), "role_mismatch");
    }

    #[test]
    fn role_annotation_must_match_byte_for_byte() {
        for annotated in [
            " arn:aws:iam::123456789012:role/app",
            "arn:aws:iam::123456789012:role/app ",
            "arn:aws:iam::123456789012:role/app\n",
            "arn:aws:iam::123456789012:role/App",
            "ARN:AWS:IAM::123456789012:ROLE/APP",
            "arn:aws:iam::123456789012:role/app-admin",
            "arn:aws:iam::123456789012:role/ap",
        ] {
            assert_eq!(
                denial_label(authorize(NS, SA, ROLE, &pod().annotation(Some(annotated)).build())),
                "role_mismatch",
                "{annotated:?}"
            );
        }
    }

    #[test]
    fn identity_is_checked_before_the_pod_opt_in() {
        // A pod of another service account that also lacks the label: the
        // reason names the identity problem, the one an operator must fix.
        let pod = pod().service_account_name(Some("admin")).label(None).deleting().build();
        assert_eq!(denial_label(authorize(NS, SA, ROLE, &pod)), "wrong_service_account");
    }

    #[test]
    fn reasons_name_pod_namespace_and_service_accounts() {
        let reason = authorize(NS, SA, ROLE, &pod().service_account_name(Some("admin")).build()).unwrap_err().reason();
        assert_eq!(
            reason,
            "pod \"web-0\" in namespace \"team-a\" runs as service account \"admin\", not as the caller's \"app\""
        );
        let reason = authorize(NS, SA, ROLE, &pod().label(Some("true")).build()).unwrap_err().reason();
        assert!(reason.contains("\"true\"") && reason.contains(ENABLED_LABEL), "{reason}");
    }

    #[test]
    fn reasons_stay_on_one_line_and_short_for_hostile_values() {
        let hostile = format!("x\nFAKE LOG LINE{}", "y".repeat(10_000));
        let denial = authorize(NS, SA, ROLE, &pod().annotation(Some(&hostile)).build()).unwrap_err();
        let reason = denial.reason();
        assert!(!reason.contains('\n'), "{reason}");
        assert!(reason.len() < 1024, "{} bytes", reason.len());
        assert!(reason.contains(&format!("cut from {} bytes", hostile.len())), "{reason}");
    }

    #[test]
    fn clipping_never_splits_a_character() {
        // One ASCII byte first, so byte MAX_QUOTED falls inside an `é`.
        let value = format!("a{}", "\u{e9}".repeat(MAX_QUOTED));
        let clipped = clip(&value);
        assert_eq!(clipped.len(), MAX_QUOTED - 1);
        assert!(value.starts_with(clipped));
    }

    #[test]
    fn labels_are_stable_and_carry_no_role() {
        let denials = [
            Denial::WrongNamespace { pod: "p".into(), pod_namespace: None, caller_namespace: "n".into() },
            Denial::WrongServiceAccount {
                pod: "p".into(),
                namespace: "n".into(),
                pod_service_account: "a".into(),
                caller_service_account: "b".into(),
            },
            Denial::PodFinished { pod: "p".into(), namespace: "n".into(), phase: "Failed".into() },
            Denial::PodTerminating { pod: "p".into(), namespace: "n".into() },
            Denial::NotEnabled { pod: "p".into(), namespace: "n".into(), label_value: None },
            Denial::NoRoleAnnotation { pod: "p".into(), namespace: "n".into() },
            Denial::RoleMismatch {
                pod: "p".into(),
                namespace: "n".into(),
                annotated: ROLE.into(),
                requested: ROLE.into(),
            },
            Denial::NoNamespacePolicy { namespace: "n".into(), annotation: POLICY.into() },
            Denial::InvalidNamespacePolicy { namespace: "n".into(), annotation: POLICY.into(), problem: "x".into() },
            Denial::NamespaceForbidsRole {
                namespace: "n".into(),
                role: ROLE.into(),
                annotation: POLICY.into(),
                pattern: "x".into(),
            },
            Denial::CallerNotPod {
                pod: "p".into(),
                namespace: "n".into(),
                address: [10, 0, 0, 1].into(),
                pod_addresses: Vec::new(),
            },
        ];
        let labels: Vec<_> = denials.iter().map(Denial::label).collect();
        assert_eq!(
            labels,
            [
                "wrong_namespace",
                "wrong_service_account",
                "pod_finished",
                "pod_terminating",
                "not_enabled",
                "no_role_annotation",
                "role_mismatch",
                "no_namespace_policy",
                "invalid_namespace_policy",
                "namespace_forbids_role",
                "caller_not_pod",
            ]
        );
        for label in labels {
            assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{label}");
        }
    }

    #[test]
    fn namespace_policy_admits_a_matching_role() {
        assert_eq!(policy().check(&namespace(Some(ROLE)), ROLE), Ok(()));
        let pattern = r"arn:aws:iam::123456789012:role/(app|web)";
        assert_eq!(policy().check(&namespace(Some(pattern)), ROLE), Ok(()));
        assert_eq!(policy().check(&namespace(Some(".*")), ROLE), Ok(()));
    }

    #[test]
    fn namespace_policy_prefix_match_does_not_pass() {
        let denial = policy().check(&namespace(Some(ROLE)), "arn:aws:iam::123456789012:role/app-admin").unwrap_err();
        assert_eq!(denial.label(), "namespace_forbids_role");
        let suffix = policy().check(&namespace(Some("role/app")), ROLE).unwrap_err();
        assert_eq!(suffix.label(), "namespace_forbids_role");
    }

    #[test]
    fn namespace_policy_alternation_is_anchored_as_a_whole() {
        // Naive `^a|b$` anchoring would admit anything starting with `a` or
        // ending with `b`.
        let pattern = "arn:aws:iam::123456789012:role/app|arn:aws:iam::123456789012:role/web";
        let ns = namespace(Some(pattern));
        assert_eq!(policy().check(&ns, ROLE), Ok(()));
        assert_eq!(policy().check(&ns, "arn:aws:iam::123456789012:role/web"), Ok(()));
        for role in ["arn:aws:iam::123456789012:role/app-admin", "arn:aws:iam::999999999999:role/x/role/web"] {
            assert_eq!(denial_label(policy().check(&ns, role)), "namespace_forbids_role", "{role}");
        }
    }

    #[test]
    fn namespace_policy_pattern_cannot_escape_its_group() {
        // A `)` in the annotation must not close our wrapper group and leave
        // the rest unanchored: it is a syntax error instead.
        let ns = namespace(Some("nothing)|(.*"));
        assert_eq!(denial_label(policy().check(&ns, ROLE)), "invalid_namespace_policy");
        // A trailing comment in verbose mode would swallow our `)$`: the
        // wrapped pattern no longer compiles, so it denies rather than
        // matching unanchored.
        let ns = namespace(Some("(?x).*#"));
        assert_eq!(denial_label(policy().check(&ns, ROLE)), "invalid_namespace_policy");
    }

    #[test]
    fn namespace_without_the_policy_annotation_permits_nothing() {
        let denial = policy().check(&namespace(None), ROLE).unwrap_err();
        assert_eq!(denial, Denial::NoNamespacePolicy { namespace: NS.to_owned(), annotation: POLICY.to_owned() });
        assert_eq!(denial.label(), "no_namespace_policy");
    }

    #[test]
    fn invalid_namespace_policy_regex_denies_with_a_clear_reason() {
        let denial = policy().check(&namespace(Some("arn:aws:iam::(")), ROLE).unwrap_err();
        assert_eq!(denial.label(), "invalid_namespace_policy");
        let reason = denial.reason();
        assert!(!reason.contains('\n'), "{reason}");
        assert!(reason.contains("unclosed group"), "{reason}");
        assert!(reason.contains(POLICY) && reason.contains("\"team-a\""), "{reason}");
    }

    #[test]
    fn namespace_policy_that_compiles_too_big_is_refused() {
        let denial = policy().check(&namespace(Some("a{1000}{1000}")), ROLE).unwrap_err();
        assert_eq!(denial.label(), "invalid_namespace_policy");
        assert!(denial.reason().contains("compiles to more than"), "{}", denial.reason());
    }

    #[test]
    fn namespace_policy_longer_than_the_limit_is_refused() {
        let long = format!("{ROLE}|{}", "x".repeat(MAX_POLICY_PATTERN));
        let denial = policy().check(&namespace(Some(&long)), ROLE).unwrap_err();
        assert_eq!(denial.label(), "invalid_namespace_policy");
        assert!(denial.reason().contains("longer than"), "{}", denial.reason());
    }

    #[test]
    fn namespace_policy_classes_and_case_folding_are_ascii() {
        let ns = namespace(Some(r"(?i)ARN:AWS:IAM::\d{12}:ROLE/\w+"));
        assert_eq!(policy().check(&ns, ROLE), Ok(()));
        // `\w` does not admit non-ASCII letters (nor would STS).
        let unicode = "arn:aws:iam::123456789012:role/\u{e9}";
        assert_eq!(
            denial_label(policy().check(&namespace(Some(r"arn:aws:iam::\d{12}:role/\w+")), unicode)),
            "namespace_forbids_role"
        );
    }

    #[test]
    fn realistic_namespace_allow_list_fits_the_limits() {
        let roles: Vec<String> =
            (0..100).map(|i| format!(r"arn:aws:iam::123456789012:role/team/service-{i}\w*")).collect();
        let ns = namespace(Some(&roles.join("|")));
        assert_eq!(policy().check(&ns, "arn:aws:iam::123456789012:role/team/service-42_reader"), Ok(()));
        assert_eq!(denial_label(policy().check(&ns, ROLE)), "namespace_forbids_role");
    }

    #[test]
    fn a_namespace_rule_compiles_its_pattern_once_on_first_use() {
        let rule = policy().rule(namespace(Some(r"arn:aws:iam::123456789012:role/(app|web)")));
        assert!(rule.compiled.get().is_none(), "compiled before any request needed it");
        assert_eq!(rule.check(ROLE), Ok(()));
        let compiled = rule.compiled.get().and_then(|r| r.as_ref().ok()).map(Regex::as_str).map(str::to_owned);
        assert_eq!(compiled.as_deref(), Some(r"^(?:arn:aws:iam::123456789012:role/(app|web))$"));
        // Later checks reuse it: the same regex, not a new one.
        let first: *const Regex = rule.compiled.get().and_then(|r| r.as_ref().ok()).unwrap();
        assert_eq!(denial_label(rule.check("arn:aws:iam::123456789012:role/db")), "namespace_forbids_role");
        assert!(std::ptr::eq(first, rule.compiled.get().and_then(|r| r.as_ref().ok()).unwrap()));
        // An invalid pattern is compiled (and refused) once too.
        let invalid = policy().rule(namespace(Some("(")));
        assert_eq!(denial_label(invalid.check(ROLE)), "invalid_namespace_policy");
        assert!(invalid.compiled.get().is_some_and(Result::is_err));
    }

    #[test]
    fn pod_facts_keep_what_the_rules_read_and_the_pod_addresses() {
        use k8s_openapi::api::core::v1::PodIP;
        let mut pod = pod().0;
        pod.metadata.uid = Some("uid-1".to_owned());
        pod.metadata.labels.get_or_insert_default().insert("app".to_owned(), "web".to_owned());
        let status = pod.status.get_or_insert_default();
        status.pod_ip = Some("10.0.0.1".to_owned());
        status.pod_ips = Some(["10.0.0.1", "fd00::1", "not an address"].map(|ip| PodIP { ip: ip.to_owned() }).to_vec());
        let facts = PodFacts::from(pod.clone());
        assert_eq!(
            facts,
            PodFacts {
                name: "web-0".to_owned(),
                namespace: Some(NS.to_owned()),
                uid: "uid-1".to_owned(),
                service_account: SA.to_owned(),
                enabled_label: Some(ENABLED_VALUE.to_owned()),
                role_arn: Some(ROLE.to_owned()),
                finished: None,
                terminating: false,
                ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            }
        );
        // Only `podIP` (an older API server or kubelet): that one.
        pod.status.get_or_insert_default().pod_ips = None;
        assert_eq!(PodFacts::from(pod.clone()).ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        pod.status = None;
        assert!(PodFacts::from(pod).ips.is_empty());
    }
}
