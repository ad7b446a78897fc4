//! The filter's `pluginConfig`, and the settings it resolves to once the
//! pod's node metadata is known.

use std::fmt;

use serde::Serialize;

use crate::arn::{InvalidArn, RoleArn};
use crate::json::{self, Value};

/// The label that enables the emulator on a pod; only the exact value
/// [`ENABLED_VALUE`] enables it, as on GKE multi-cloud where this label comes
/// from. The broker reads the same label (its pod watch selects on it).
pub const ENABLE_LABEL: &str = "gkemulticloud.googleapis.com/aws-imds-emulator-enabled";
/// The exact label value that enables the emulator: not `true`, not ` True`.
pub const ENABLED_VALUE: &str = "True";
/// The annotation that names the pod's role ARN: the one role the pod may use.
pub const ROLE_ANNOTATION: &str = "gkemulticloud.googleapis.com/aws-imds-emulator-role-arn";

/// One address of the instance metadata service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataAddress {
    /// The address itself.
    pub ip: &'static str,
    /// As an HTTP authority without a port (IPv6 in brackets).
    pub authority: &'static str,
    /// Its prefix length as a single-address CIDR.
    pub prefix_len: u8,
}

/// The metadata service's addresses: EC2's link-local IPv4 address and the
/// IPv6 address of Nitro instances. The one list the filter, the rendering
/// (ServiceEntry, guard, NetworkPolicy) and the tests use.
pub const METADATA_ADDRESSES: [MetadataAddress; 2] = [
    MetadataAddress { ip: "169.254.169.254", authority: "169.254.169.254", prefix_len: 32 },
    MetadataAddress { ip: "fd00:ec2::254", authority: "[fd00:ec2::254]", prefix_len: 128 },
];

/// The port the metadata service answers HTTP on.
pub const METADATA_PORT: u16 = 80;

/// Whether GET requests must carry an IMDSv2 session token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpTokens {
    /// IMDSv1 and IMDSv2 both work (the EC2 default).
    #[default]
    Optional,
    /// Only IMDSv2: a GET without a valid token answers 401.
    Required,
}

/// The WasmPlugin `pluginConfig`. Every field has a default; unknown fields
/// are rejected so a typo cannot silently fall back to a default.
/// [`Config::from_json`] reads it; `Serialize` writes it, for the tools
/// that render it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Envoy cluster of the token broker (Istio names it
    /// `outbound|<port>||<host>`).
    pub broker_cluster: String,
    /// `:authority` sent to the broker.
    pub broker_authority: String,
    /// Timeout of one broker call, in milliseconds (100..=30000).
    pub broker_timeout_ms: u64,
    /// Longest time an app request waits for a fetch in flight, in
    /// milliseconds (0..=950; SDKs give IMDS one second).
    pub max_wait_ms: u64,
    /// IMDSv2 enforcement.
    pub http_tokens: HttpTokens,
    /// More `:authority` values to answer as IMDS (`host` or `host:port`).
    pub extra_hosts: Vec<String>,
    /// Role ARN to serve instead of the pod annotation (outside Istio).
    pub role_arn: Option<String>,
    /// Pod name to send the broker instead of node metadata `NAME`.
    pub pod_name: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            broker_cluster: "outbound|8080||token-broker.imds-mesh.svc.cluster.local".to_owned(),
            broker_authority: "token-broker.imds-mesh.svc.cluster.local".to_owned(),
            broker_timeout_ms: 2000,
            max_wait_ms: 800,
            http_tokens: HttpTokens::Optional,
            extra_hosts: Vec::new(),
            role_arn: None,
            pod_name: None,
        }
    }
}

/// A configuration the filter refuses, naming the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid pluginConfig field `{}`: {}", self.field, self.reason)
    }
}

impl Config {
    /// Parses and checks `pluginConfig` JSON; empty input means all defaults.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let document = json::parse(bytes).map_err(|e| ConfigError { field: DOCUMENT, reason: e.to_string() })?;
        let Value::Object(members) = document else {
            return Err(wrong_type(DOCUMENT, "a JSON object", &document));
        };
        let mut config = Self::default();
        let mut seen = Vec::with_capacity(members.len());
        for (name, value) in members {
            let Some(field) = FIELDS.iter().copied().find(|f| *f == name) else {
                return Err(ConfigError {
                    field: UNKNOWN_FIELD,
                    reason: format!("unknown field `{name}`, expected one of {}", Fields),
                });
            };
            if seen.contains(&field) {
                return Err(ConfigError { field, reason: "appears more than once".to_owned() });
            }
            seen.push(field);
            config.set(field, value)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Sets one field from its JSON value, checking only the JSON type.
    fn set(&mut self, field: &'static str, value: Value) -> Result<(), ConfigError> {
        match field {
            "broker_cluster" => self.broker_cluster = string(field, value)?,
            "broker_authority" => self.broker_authority = string(field, value)?,
            "broker_timeout_ms" => self.broker_timeout_ms = milliseconds(field, &value)?,
            "max_wait_ms" => self.max_wait_ms = milliseconds(field, &value)?,
            "http_tokens" => {
                self.http_tokens = match value.as_str() {
                    Some("optional") => HttpTokens::Optional,
                    Some("required") => HttpTokens::Required,
                    _ => return Err(wrong_type(field, "\"optional\" or \"required\"", &value)),
                }
            }
            "extra_hosts" => {
                let Value::Array(items) = value else { return Err(wrong_type(field, "an array of strings", &value)) };
                self.extra_hosts = items.into_iter().map(|item| string(field, item)).collect::<Result<_, _>>()?;
            }
            "role_arn" => self.role_arn = optional_string(field, value)?,
            "pod_name" => self.pod_name = optional_string(field, value)?,
            _ => return Err(ConfigError { field, reason: "is not read".to_owned() }),
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, reason: &str| Err(ConfigError { field, reason: reason.to_owned() });
        if self.broker_cluster.chars().all(char::is_whitespace) {
            return fail("broker_cluster", "must not be empty");
        }
        if self.broker_authority.is_empty() || self.broker_authority.contains(char::is_whitespace) {
            return fail("broker_authority", "must be a host name without spaces");
        }
        if !(100..=30_000).contains(&self.broker_timeout_ms) {
            return fail("broker_timeout_ms", "must be within 100..=30000");
        }
        if self.max_wait_ms > 950 {
            return fail("max_wait_ms", "must be at most 950: SDKs give IMDS one second");
        }
        if let Some(at) = self.extra_hosts.iter().position(|h| !is_authority(h)) {
            return fail("extra_hosts", &format!("entry {at} is not a host or host:port"));
        }
        if let Some(arn) = &self.role_arn {
            RoleArn::parse(arn).map_err(|e| ConfigError { field: "role_arn", reason: e.to_string() })?;
        }
        if self.pod_name.as_deref().is_some_and(|p| !is_dns_label_path(p.as_bytes())) {
            return fail("pod_name", "must be a Kubernetes object name");
        }
        Ok(())
    }
}

/// Every `pluginConfig` field, as JSON names it.
pub const FIELDS: [&str; 8] = [
    "broker_cluster",
    "broker_authority",
    "broker_timeout_ms",
    "max_wait_ms",
    "http_tokens",
    "extra_hosts",
    "role_arn",
    "pod_name",
];
fn string(field: &'static str, value: Value) -> Result<String, ConfigError> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(wrong_type(field, "a string", &other)),
    }
}

/// A string, or null for none.
fn optional_string(field: &'static str, value: Value) -> Result<Option<String>, ConfigError> {
    match value {
        Value::Null => Ok(None),
        other => string(field, other).map(Some),
    }
}

fn milliseconds(field: &'static str, value: &Value) -> Result<u64, ConfigError> {
    value.as_u64().ok_or_else(|| match value {
        Value::Number(_) => ConfigError {
            field,
            reason: "must be a whole number of milliseconds, without sign, fraction or exponent".to_owned(),
        },
        other => wrong_type(field, "a whole number of milliseconds", other),
    })
}

fn wrong_type(field: &'static str, want: &str, found: &Value) -> ConfigError {
    ConfigError { field, reason: format!("must be {want}, not {}", found.kind()) }
}

/// [`FIELDS`] as a list for messages.
struct Fields;

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, field) in FIELDS.iter().enumerate() {
            f.write_str(if i == 0 { "" } else { ", " })?;
            f.write_str(field)?;
        }
        Ok(())
    }
}

/// [`ConfigError::field`] when the document itself is wrong.
pub const DOCUMENT: &str = "(document)";
/// [`ConfigError::field`] for a field the filter does not know.
pub const UNKNOWN_FIELD: &str = "(unknown field)";

fn is_authority(text: &str) -> bool {
    !text.is_empty() && text.len() <= 255 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
}

fn is_dns_label_path(text: &[u8]) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
}

/// What the filter does for this pod: serve a role, or answer every IMDS
/// request with 404 (and say why once, at configure time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enablement {
    Enabled { role: RoleArn, pod: String },
    Disabled { reason: DisabledReason },
}

/// Why the filter serves nothing for this pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisabledReason {
    LabelAbsent,
    LabelNotEnabled,
    AnnotationAbsent,
    AnnotationNotUtf8,
    AnnotationInvalid(InvalidArn),
    PodNameInvalid,
}

impl fmt::Display for DisabledReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LabelAbsent => write!(f, "label {ENABLE_LABEL} is absent"),
            Self::LabelNotEnabled => write!(f, "label {ENABLE_LABEL} is not exactly \"{ENABLED_VALUE}\""),
            Self::AnnotationAbsent => write!(f, "annotation {ROLE_ANNOTATION} is absent"),
            Self::AnnotationNotUtf8 => write!(f, "annotation {ROLE_ANNOTATION} is not UTF-8"),
            Self::AnnotationInvalid(e) => write!(f, "annotation {ROLE_ANNOTATION}: {e}"),
            Self::PodNameInvalid => f.write_str("node metadata NAME (the pod name) is absent or invalid"),
        }
    }
}

/// The pod facts Istio puts in node metadata, as raw bytes.
#[derive(Debug, Default, Clone)]
pub struct PodMetadata {
    pub enable_label: Option<Vec<u8>>,
    pub role_annotation: Option<Vec<u8>>,
    pub name: Option<Vec<u8>>,
}

impl Config {
    /// Decides whether this pod is served, and with which role and pod name.
    /// A role in the config stands for the annotation and the label (for use
    /// outside Istio); otherwise the label must be exactly `True`.
    pub fn enablement(&self, pod: &PodMetadata) -> Enablement {
        let disabled = |reason| Enablement::Disabled { reason };
        let role = match &self.role_arn {
            Some(arn) => arn.clone(),
            None => {
                match pod.enable_label.as_deref() {
                    None => return disabled(DisabledReason::LabelAbsent),
                    Some(label) if label != ENABLED_VALUE.as_bytes() => {
                        return disabled(DisabledReason::LabelNotEnabled);
                    }
                    Some(_) => {}
                }
                match pod.role_annotation.as_deref().map(std::str::from_utf8) {
                    Some(Ok(arn)) => arn.to_owned(),
                    Some(Err(_)) => return disabled(DisabledReason::AnnotationNotUtf8),
                    None => return disabled(DisabledReason::AnnotationAbsent),
                }
            }
        };
        let role = match RoleArn::parse(&role) {
            Ok(role) => role,
            Err(e) => return disabled(DisabledReason::AnnotationInvalid(e)),
        };
        let pod = match (&self.pod_name, &pod.name) {
            (Some(name), _) => name.clone(),
            (None, Some(name)) if is_dns_label_path(name) => String::from_utf8(name.clone()).unwrap_or_default(),
            _ => return disabled(DisabledReason::PodNameInvalid),
        };
        Enablement::Enabled { role, pod }
    }

    /// Whether an `:authority` is the metadata service's.
    #[inline]
    pub fn is_imds_authority(&self, authority: &[u8]) -> bool {
        // `:80` is METADATA_PORT, as an authority spells it.
        let host = authority.strip_suffix(b":80").unwrap_or(authority);
        METADATA_ADDRESSES.iter().any(|a| a.authority.as_bytes() == host)
            || self.extra_hosts.iter().any(|h| h.as_bytes().eq_ignore_ascii_case(authority))
    }
}

/// Whether a connection's original destination (`destination.address`) is
/// the metadata service, whatever `Host` the app sent.
#[inline]
pub fn is_imds_destination(address: &[u8]) -> bool {
    address.strip_suffix(b":80").is_some_and(|host| METADATA_ADDRESSES.iter().any(|a| a.authority.as_bytes() == host))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const ARN: &str = "arn:aws:iam::123456789012:role/app";

    fn pod(label: Option<&str>, annotation: Option<&str>, name: Option<&str>) -> PodMetadata {
        let bytes = |v: Option<&str>| v.map(|s| s.as_bytes().to_vec());
        PodMetadata { enable_label: bytes(label), role_annotation: bytes(annotation), name: bytes(name) }
    }

    #[test]
    fn empty_config_means_defaults() {
        assert_eq!(Config::from_json(b"").unwrap(), Config::default());
        assert_eq!(Config::from_json(b" {} ").unwrap(), Config::default());
    }

    #[test]
    fn every_field_parses() {
        let config = Config::from_json(
            br#"{"broker_cluster":"b","broker_authority":"broker.local","broker_timeout_ms":500,
                "max_wait_ms":0,"http_tokens":"required","extra_hosts":["metadata.local:8080"],
                "role_arn":"arn:aws:iam::123456789012:role/app","pod_name":"web-0"}"#,
        )
        .unwrap();
        assert_eq!(config.http_tokens, HttpTokens::Required);
        assert_eq!(config.max_wait_ms, 0);
        assert!(config.is_imds_authority(b"METADATA.local:8080"));
    }

    #[test]
    fn bad_config_names_the_field() {
        for (json, field) in [
            (&br#"{"broker_clustr":"x"}"#[..], "(unknown field)"),
            (br#"{"http_tokens":"always"}"#, "http_tokens"),
            (br#"{"broker_timeout_ms":"2s"}"#, "broker_timeout_ms"),
            (br#"{"broker_timeout_ms":2000.0}"#, "broker_timeout_ms"),
            (br#"{"max_wait_ms":-1}"#, "max_wait_ms"),
            (br#"{"extra_hosts":"a"}"#, "extra_hosts"),
            (br#"{"extra_hosts":[1]}"#, "extra_hosts"),
            (br#"{"broker_cluster":null}"#, "broker_cluster"),
            (br#"{"pod_name":"a","pod_name":"b"}"#, "pod_name"),
            (br#"["broker_cluster"]"#, "(document)"),
            (br#"{"broker_timeout_ms":0}"#, "broker_timeout_ms"),
            (br#"{"max_wait_ms":1000}"#, "max_wait_ms"),
            (br#"{"broker_cluster":" "}"#, "broker_cluster"),
            (br#"{"broker_authority":"a b"}"#, "broker_authority"),
            (br#"{"extra_hosts":["a b"]}"#, "extra_hosts"),
            (br#"{"role_arn":"arn:aws:iam::1:role/x"}"#, "role_arn"),
            (br#"{"pod_name":"Web_0"}"#, "pod_name"),
            (b"[", "(document)"),
        ] {
            let err = Config::from_json(json).unwrap_err();
            assert_eq!(err.field, field, "{}: {err}", String::from_utf8_lossy(json));
        }
        let err = Config::from_json(br#"{"broker_clustr":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("broker_clustr"), "{err}");
        let err = Config::from_json(br#"{"http_tokens":"always"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid pluginConfig field `http_tokens`: must be "optional" or "required", not a string"#
        );
    }

    #[test]
    fn null_clears_an_optional_field() {
        let config = Config::from_json(br#"{"role_arn":null,"pod_name":null}"#).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn what_serialize_writes_reads_back() {
        let config = Config {
            http_tokens: HttpTokens::Required,
            extra_hosts: vec!["metadata.local".to_owned()],
            role_arn: Some(ARN.to_owned()),
            pod_name: Some("web-0".to_owned()),
            ..Config::default()
        };
        for config in [config, Config::default()] {
            assert_eq!(Config::from_json(&serde_json::to_vec(&config).unwrap()), Ok(config.clone()));
        }
    }

    #[test]
    fn only_the_exact_label_value_enables() {
        let config = Config::default();
        let enabled = config.enablement(&pod(Some("True"), Some(ARN), Some("web-0")));
        assert!(matches!(enabled, Enablement::Enabled { ref role, ref pod } if role.name() == "app" && pod == "web-0"));
        for label in [Some("true"), Some("TRUE"), Some("True "), Some("1"), Some(""), None] {
            assert!(
                matches!(config.enablement(&pod(label, Some(ARN), Some("web-0"))), Enablement::Disabled { .. }),
                "{label:?}"
            );
        }
    }

    #[test]
    fn a_missing_or_invalid_annotation_disables_with_a_reason() {
        let config = Config::default();
        for (annotation, want) in [(None, "absent"), (Some("arn:aws:iam::123:role/x"), "12 digits")] {
            match config.enablement(&pod(Some("True"), annotation, Some("web-0"))) {
                Enablement::Disabled { reason } => assert!(reason.to_string().contains(want), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(config.enablement(&pod(Some("True"), Some(ARN), None)), Enablement::Disabled { .. }));
    }

    #[test]
    fn configured_role_and_pod_stand_in_for_node_metadata() {
        let config = Config { role_arn: Some(ARN.to_owned()), pod_name: Some("local".to_owned()), ..Config::default() };
        assert!(matches!(config.enablement(&PodMetadata::default()), Enablement::Enabled { .. }));
    }

    #[test]
    fn imds_is_recognised_by_authority_or_original_destination() {
        let config = Config::default();
        for authority in ["169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]", "[fd00:ec2::254]:80"] {
            assert!(config.is_imds_authority(authority.as_bytes()), "{authority}");
        }
        for authority in ["169.254.169.254:8080", "169.254.169.25", "example.com", "", "[fd00:ec2::254]:81"] {
            assert!(!config.is_imds_authority(authority.as_bytes()), "{authority}");
        }
        assert!(is_imds_destination(b"169.254.169.254:80"));
        assert!(!is_imds_destination(b"169.254.169.254:443"));
    }
}
