//! Unit tests of `authz.rs`, kept apart so the rules read in one screen or
//! two: a pod that passes every rule, broken one thing at a time, and the
//! namespace policy's patterns.

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
            labels: Some(BTreeMap::from([(ENABLE_LABEL.to_owned(), "True".to_owned())])),
            annotations: Some(BTreeMap::from([(ROLE_ANNOTATION.to_owned(), ROLE.to_owned())])),
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
        set(&mut self.0.metadata.labels, ENABLE_LABEL, value);
        self
    }
    fn annotation(mut self, value: Option<&str>) -> Self {
        set(&mut self.0.metadata.annotations, ROLE_ANNOTATION, value);
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
    assert!(reason.contains("\"true\"") && reason.contains(ENABLE_LABEL), "{reason}");
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
        Denial::RoleMismatch { pod: "p".into(), namespace: "n".into(), annotated: ROLE.into(), requested: ROLE.into() },
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
    let roles: Vec<String> = (0..100).map(|i| format!(r"arn:aws:iam::123456789012:role/team/service-{i}\w*")).collect();
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
