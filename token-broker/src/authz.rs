//! May this caller use this role for this pod?
//!
//! The caller's namespace and service account come only from the verified
//! mesh identity ([`crate::identity`]); the request contributes the pod name
//! (which the broker looks up) and the role ARN. The pod itself must opt in
//! (label [`ENABLE_LABEL`] = `True`) and name exactly that role (annotation
//! [`ROLE_ANNOTATION`]). A namespace may narrow the roles its pods can use
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

use imds_filter::config::{ENABLE_LABEL, ENABLED_VALUE, ROLE_ANNOTATION};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use regex::bytes::{Regex, RegexBuilder};

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
        "pod {} in namespace {} is not enabled: label {ENABLE_LABEL} is {}, it must be exactly \"True\"",
        q(.pod), q(.namespace), q_opt(.label_value)
    )]
    NotEnabled { pod: String, namespace: String, label_value: Option<String> },

    /// The pod has no (or an empty) role ARN annotation.
    #[error("pod {} in namespace {} has no {ROLE_ANNOTATION} annotation", q(.pod), q(.namespace))]
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
/// (not finished, not being deleted), carries [`ENABLE_LABEL`] with the value
/// exactly `True`, and carries [`ROLE_ANNOTATION`] equal to `role_arn`
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
    /// The value of [`ENABLE_LABEL`], if any.
    pub enabled_label: Option<String>,
    /// The value of [`ROLE_ANNOTATION`], if any.
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
            enabled_label: meta.labels.and_then(|mut labels| labels.remove(ENABLE_LABEL)),
            role_arn: meta.annotations.and_then(|mut annotations| annotations.remove(ROLE_ANNOTATION)),
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
mod tests;
