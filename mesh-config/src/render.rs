//! Everything an operator applies for imds-mesh, as typed objects: the
//! broker (Namespace, ServiceAccount, RBAC, Deployment, Service,
//! PodDisruptionBudget), its mesh policy (PeerAuthentication,
//! AuthorizationPolicy, DestinationRule, and an EnvoyFilter by which its
//! sidecar states each caller's address), the metadata address
//! (ServiceEntry, fail-closed VirtualService) and the filter (WasmPlugin);
//! optionally a NetworkPolicy backstop per namespace and a
//! ValidatingAdmissionPolicy on the broker's TokenRequests.
//! [`render`] returns them in apply order; [`to_yaml`] prints them.

use std::collections::BTreeMap;

use imds_filter::config::{Config, ENABLE_LABEL, ENABLED_VALUE, HttpTokens, METADATA_PORT};
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec, ValidatingAdmissionPolicySpec, Validation,
};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Namespace, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Service, ServiceAccount, ServicePort, ServiceSpec, TopologySpreadConstraint,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::envoy;
use crate::istio::{
    Action, AuthorizationPolicy, AuthorizationPolicySpec, ClientTls, ConsistentHash, DestinationRule,
    DestinationRuleSpec, FailStrategy, HttpBody, HttpDirectResponse, HttpRoute, LoadBalancer, Location, MtlsMode,
    Operation, PeerAuthentication, PeerAuthenticationSpec, PeerMtls, PluginPhase, PluginType, PortSelector, PullPolicy,
    Resolution, Rule, RuleFrom, RuleTo, ServiceEntry, ServiceEntrySpec, ServicePort as MeshPort, Source, TlsMode,
    TrafficPolicy, TrafficSelector, VirtualService, VirtualServiceSpec, WasmPlugin, WasmPluginSpec, WorkloadMode,
    WorkloadSelector,
};
use crate::istio::{
    ApplyTo, ConfigPatch, EnvoyFilter, EnvoyFilterSelector, EnvoyFilterSpec, FilterChainMatch, FilterMatch,
    ListenerMatch, Patch, PatchContext, PatchMatch, PatchOperation, RouteConfigurationMatch, SubFilterMatch,
};
use crate::metadata::{self, METADATA_SERVICES, MetadataService};
use crate::version::IstioVersion;

/// The broker's name: ServiceAccount, Deployment, Service, labels.
pub const BROKER: &str = "token-broker";
/// The broker's service port (credentials; HTTP behind its sidecar).
pub const BROKER_PORT: u16 = 8080;
/// The broker's admin port (`/healthz`, `/readyz`, `/metrics`).
pub const ADMIN_PORT: u16 = 9090;
/// The WasmPlugin's name.
pub const WASM_PLUGIN: &str = "imds-mesh";
/// The EnvoyFilter that makes the broker's sidecar state each caller's
/// address.
pub const BROKER_PEER_ADDRESS: &str = "token-broker-peer-address";
/// The query parameter the broker's load balancing hashes on.
pub const HASH_PARAMETER: &str = "role_arn";
/// The audience of the tokens the broker requests (its default
/// `--token-audience`, `token_broker::app::DEFAULT_TOKEN_AUDIENCE`, which
/// `integration/tests/kube_admission.rs` checks equal): what the roles' STS
/// trust policies condition on, and, with
/// [`Options::restrict_token_audience`], the only audience the broker may
/// request.
pub const TOKEN_AUDIENCE: &str = "sts.amazonaws.com";
/// The name of the ValidatingAdmissionPolicy and of its binding that hold
/// the broker to [`TOKEN_AUDIENCE`].
pub const TOKEN_AUDIENCE_POLICY: &str = "imds-mesh-token-broker-audience";

/// Seconds the broker keeps serving, not ready, after SIGTERM
/// (`--shutdown-delay-seconds`): the time endpoints take to drop it.
pub const BROKER_SHUTDOWN_DELAY_SECONDS: u32 = 5;

/// Seconds the requests in flight may then take (`--shutdown-grace-seconds`):
/// above the broker's 25 s credential deadline
/// (`token_broker::app::DEFAULT_CREDENTIALS_DEADLINE`), so none is cut.
pub const BROKER_SHUTDOWN_GRACE_SECONDS: u32 = 30;

/// The broker pod's `terminationGracePeriodSeconds`: its delay and grace and
/// 5 s to exit, so the kubelet never kills a draining broker.
pub const BROKER_TERMINATION_GRACE_SECONDS: u32 = BROKER_SHUTDOWN_DELAY_SECONDS + BROKER_SHUTDOWN_GRACE_SECONDS + 5;

/// The broker sidecar's `proxy.istio.io/config`. Its first calls (the pod
/// watch, STS) go through the sidecar: start it first. The broker trusts
/// the last XFCC element only because its sidecar appends it: pin
/// `APPEND_FORWARD`, whatever the mesh's default (`ALWAYS_FORWARD_ONLY` or
/// `FORWARD_ONLY` would pass a caller's forged element on as the last).
/// On SIGTERM the sidecar drains for `terminationDrainDuration` (Istio's
/// default 5 s) and exits; the draining broker still needs it for its
/// callers and its own calls (STS, the API), so it is the broker's delay
/// plus grace, 35 s. Not `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`: the broker's
/// pod watch always holds a connection, and an idle moment during the
/// delay is no sign the broker is done.
pub const BROKER_PROXY_CONFIG: &str = r#"{"holdApplicationUntilProxyStarts":true,"proxyHeaders":{"forwardedClientCert":"APPEND_FORWARD"},"terminationDrainDuration":"35s"}"#;

/// What [`render`] renders; [`Default`] is the committed rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Namespace of the broker and its policies.
    pub namespace: String,
    /// Istio's root namespace: the WasmPlugin, ServiceEntry and
    /// VirtualService there apply to the whole mesh.
    pub root_namespace: String,
    /// The token-broker container image.
    pub broker_image: String,
    /// Broker replicas.
    pub replicas: i32,
    /// The mesh's trust domain (the broker's SPIFFE ID and its callers').
    pub trust_domain: String,
    /// AWS region of the STS endpoint the broker calls.
    pub sts_region: String,
    /// `--sts-endpoint-url` of the broker (e.g. a VPC endpoint).
    pub sts_endpoint_url: Option<String>,
    /// Enables the broker's namespace policy with this Namespace annotation.
    pub namespace_policy_annotation: Option<String>,
    /// Namespaces that get a NetworkPolicy denying enabled pods egress to
    /// the metadata addresses (the backstop for what the mesh cannot
    /// capture).
    pub network_policy_namespaces: Vec<String>,
    /// Renders a ValidatingAdmissionPolicy and its binding that let the
    /// broker's service account request tokens only for [`TOKEN_AUDIENCE`].
    /// Off by default: `admissionregistration.k8s.io/v1` policies are
    /// served from Kubernetes 1.30, and the default rendering installs on
    /// 1.24 and later (on an older server, applying the whole file would
    /// fail on the unknown kind).
    pub restrict_token_audience: bool,
    /// Where sidecars pull the filter: `oci://...`, `https://...`.
    pub wasm_url: String,
    /// The WasmPlugin `sha256` (OCI: manifest digest; HTTP: module digest).
    pub wasm_sha256: Option<String>,
    /// The filter's IMDSv2 enforcement.
    pub http_tokens: HttpTokens,
    /// The Istio release the objects are for.
    pub istio_version: IstioVersion,
    /// The WasmPlugin `failStrategy`; `None`: the best the release has
    /// (`FAIL_RELOAD` from 1.27, `FAIL_CLOSE` before).
    pub fail_strategy: Option<FailStrategy>,
}

impl Default for Options {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            namespace: "imds-mesh".to_owned(),
            root_namespace: "istio-system".to_owned(),
            broker_image: format!("ghcr.io/imds-mesh/token-broker:{version}"),
            replicas: 2,
            trust_domain: "cluster.local".to_owned(),
            sts_region: "us-east-1".to_owned(),
            sts_endpoint_url: None,
            namespace_policy_annotation: None,
            network_policy_namespaces: Vec::new(),
            restrict_token_audience: false,
            wasm_url: format!("oci://ghcr.io/imds-mesh/imds-filter:{version}"),
            wasm_sha256: None,
            http_tokens: HttpTokens::Optional,
            istio_version: IstioVersion::NEWEST,
            fail_strategy: None,
        }
    }
}

impl Options {
    /// Refuses a combination the target Istio release cannot take.
    pub fn check(&self) -> Result<(), String> {
        if self.fail_strategy == Some(FailStrategy::FailReload) && !self.istio_version.has_fail_reload() {
            return Err(format!(
                "failStrategy FAIL_RELOAD needs Istio {} or later; Istio {} has only FAIL_CLOSE and FAIL_OPEN",
                IstioVersion::FAIL_RELOAD,
                self.istio_version
            ));
        }
        if self.fail_strategy == Some(FailStrategy::FailOpen) {
            return Err(
                "failStrategy FAIL_OPEN would let metadata requests through to the node when the filter fails".into()
            );
        }
        Ok(())
    }

    /// The WasmPlugin `failStrategy` this rendering uses.
    pub fn fail_strategy(&self) -> FailStrategy {
        self.fail_strategy.unwrap_or(if self.istio_version.has_fail_reload() {
            FailStrategy::FailReload
        } else {
            FailStrategy::FailClose
        })
    }

    /// The name Istio gives the filter in the sidecar's HTTP connection
    /// manager (the key of per-route filter config).
    pub fn wasm_filter_name(&self) -> String {
        self.istio_version.wasm_filter_name(&self.root_namespace, WASM_PLUGIN)
    }

    /// The STS endpoint the broker calls: host, port and whether over TLS.
    pub fn sts_endpoint(&self) -> (String, u16, bool) {
        let Some(url) = &self.sts_endpoint_url else {
            return (format!("sts.{}.amazonaws.com", self.sts_region), 443, true);
        };
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some((_, rest)) => (true, rest),
            None => (true, url.as_str()),
        };
        let authority = rest.split(['/', '?']).next().unwrap_or(rest);
        let default_port = if tls { 443 } else { 80 };
        match authority.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                (host.to_owned(), port.parse().unwrap_or(default_port), tls)
            }
            _ => (authority.to_owned(), default_port, tls),
        }
    }

    /// What a namespace's own `Sidecar` resource must import (its
    /// `egress.hosts`) for imds-mesh to work there: the metadata services
    /// (without them the sidecar has no port-80 HTTP listener for the
    /// metadata address, and the traffic leaves as TCP) and the broker.
    pub fn sidecar_egress_hosts(&self) -> Vec<String> {
        METADATA_SERVICES
            .iter()
            .map(|s| format!("{}/{}", self.root_namespace, s.host))
            .chain([format!("{}/{}", self.namespace, self.broker_host())])
            .collect()
    }

    /// The broker's in-cluster host name.
    pub fn broker_host(&self) -> String {
        format!("{BROKER}.{}.svc.cluster.local", self.namespace)
    }

    /// The broker sidecar's SPIFFE ID, which it writes as XFCC `By`.
    pub fn broker_spiffe_id(&self) -> String {
        format!("spiffe://{}/ns/{}/sa/{BROKER}", self.trust_domain, self.namespace)
    }

    /// The filter's `pluginConfig`: the filter's own type, pointed at the
    /// broker's mesh cluster.
    pub fn plugin_config(&self) -> Config {
        let host = self.broker_host();
        Config {
            broker_cluster: format!("outbound|{BROKER_PORT}||{host}"),
            broker_authority: host,
            http_tokens: self.http_tokens,
            ..Config::default()
        }
    }
}

/// One rendered object.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
#[expect(clippy::large_enum_variant, reason = "a dozen objects, rendered once")]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Deployment(Deployment),
    Service(Service),
    PodDisruptionBudget(PodDisruptionBudget),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    DestinationRule(DestinationRule),
    ServiceEntry(ServiceEntry),
    VirtualService(VirtualService),
    EnvoyFilter(EnvoyFilter),
    WasmPlugin(WasmPlugin),
    NetworkPolicy(NetworkPolicy),
    ValidatingAdmissionPolicy(ValidatingAdmissionPolicy),
    ValidatingAdmissionPolicyBinding(ValidatingAdmissionPolicyBinding),
}

impl Object {
    /// Whether this is an Istio object (not validated as a core kind).
    pub fn is_istio(&self) -> bool {
        matches!(
            self,
            Self::PeerAuthentication(_)
                | Self::AuthorizationPolicy(_)
                | Self::DestinationRule(_)
                | Self::ServiceEntry(_)
                | Self::VirtualService(_)
                | Self::EnvoyFilter(_)
                | Self::WasmPlugin(_)
        )
    }
}

/// Everything, in the order `kubectl apply` should see it.
pub fn render(options: &Options) -> Vec<Object> {
    // The broker's limits before the broker: the token audience policy
    // right after its RBAC.
    let audience_policy = options.restrict_token_audience.then(|| {
        [
            Object::ValidatingAdmissionPolicy(token_audience_policy(options)),
            Object::ValidatingAdmissionPolicyBinding(token_audience_policy_binding()),
        ]
    });
    vec![
        Object::Namespace(namespace(options)),
        Object::ServiceAccount(ServiceAccount {
            metadata: meta(BROKER, &options.namespace),
            ..ServiceAccount::default()
        }),
        Object::ClusterRole(cluster_role(options)),
        Object::ClusterRoleBinding(cluster_role_binding(options)),
    ]
    .into_iter()
    .chain(audience_policy.into_iter().flatten())
    .chain([
        Object::Service(service(options)),
        Object::Deployment(deployment(options)),
        Object::PodDisruptionBudget(pod_disruption_budget(options)),
        Object::PeerAuthentication(peer_authentication(options)),
        Object::AuthorizationPolicy(authorization_policy(options)),
        Object::DestinationRule(destination_rule(options)),
        Object::EnvoyFilter(broker_peer_address(options)),
        Object::ServiceEntry(sts_service_entry(options)),
        Object::ServiceEntry(service_entry(options, &METADATA_SERVICES[0])),
        Object::ServiceEntry(service_entry(options, &METADATA_SERVICES[1])),
        Object::VirtualService(fail_closed_route(options)),
        Object::EnvoyFilter(metadata_guard(options)),
        Object::EnvoyFilter(metadata_chain(options)),
        Object::EnvoyFilter(filter_on_metadata_chain(options)),
        Object::WasmPlugin(wasm_plugin(options)),
    ])
    .chain(options.network_policy_namespaces.iter().map(|ns| Object::NetworkPolicy(metadata_egress_policy(ns))))
    .collect()
}

/// Multi-document YAML, one document per object.
pub fn to_yaml(objects: &[Object]) -> Result<String, String> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(object).map_err(|e| format!("YAML: {e}"))?);
    }
    Ok(out)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Labels every object carries.
fn common_labels() -> BTreeMap<String, String> {
    labels(&[("app.kubernetes.io/part-of", "imds-mesh"), ("app.kubernetes.io/managed-by", "mesh-config")])
}

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(common_labels()),
        ..ObjectMeta::default()
    }
}

fn broker_selector() -> BTreeMap<String, String> {
    labels(&[("app.kubernetes.io/name", BROKER)])
}

fn namespace(options: &Options) -> Namespace {
    let mut labels = common_labels();
    // The broker runs in the mesh: its sidecar terminates mTLS and writes
    // the XFCC element it trusts.
    labels.insert("istio-injection".to_owned(), "enabled".to_owned());
    Namespace {
        metadata: ObjectMeta { name: Some(options.namespace.clone()), labels: Some(labels), ..ObjectMeta::default() },
        ..Namespace::default()
    }
}

/// Least privilege: read pods (the watch and the direct read), mint tokens,
/// record denial Events; watch namespaces only for the namespace policy
/// (the broker keeps them in a reflector, so list and watch, never get).
fn cluster_role(options: &Options) -> ClusterRole {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    };
    let mut rules = vec![
        rule(&[""], &["pods"], &["get", "list", "watch"]),
        rule(&[""], &["serviceaccounts/token"], &["create"]),
        rule(&["events.k8s.io"], &["events"], &["create"]),
    ];
    if options.namespace_policy_annotation.is_some() {
        rules.push(rule(&[""], &["namespaces"], &["list", "watch"]));
    }
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(format!("imds-mesh-{BROKER}")),
            labels: Some(common_labels()),
            ..ObjectMeta::default()
        },
        rules: Some(rules),
        ..ClusterRole::default()
    }
}

fn cluster_role_binding(options: &Options) -> ClusterRoleBinding {
    let name = format!("imds-mesh-{BROKER}");
    ClusterRoleBinding {
        metadata: ObjectMeta { name: Some(name.clone()), labels: Some(common_labels()), ..ObjectMeta::default() },
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".to_owned(), kind: "ClusterRole".to_owned(), name },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: BROKER.to_owned(),
            namespace: Some(options.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// RBAC cannot narrow `serviceaccounts/token` create by audience, so the
/// broker may mint a token of any service account for any audience; one for
/// the API server's own audience would let whoever holds the broker's
/// identity act as that service account at the API server. This policy
/// lets the broker ask for [`TOKEN_AUDIENCE`] alone. It judges only the
/// broker's requests (`matchConditions` on the user name); everyone else's
/// TokenRequests pass untouched. A request naming no audience is refused
/// too: the API server fills in its own audiences before validating
/// admission sees the request (`TokenREST.Create`, k8s.io/kubernetes
/// `pkg/registry/core/serviceaccount/storage/token.go`; the message then
/// names them). `failurePolicy: Fail`: a request the policy cannot judge is
/// refused.
fn token_audience_policy(options: &Options) -> ValidatingAdmissionPolicy {
    let broker_user = format!("system:serviceaccount:{}:{BROKER}", options.namespace);
    let only = format!("the token broker may request service-account tokens only for the audience {TOKEN_AUDIENCE}");
    ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(TOKEN_AUDIENCE_POLICY.to_owned()),
            labels: Some(common_labels()),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".to_owned()),
            match_constraints: Some(MatchResources {
                // A subresource is written `resource/subresource`.
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec![String::new()]),
                    api_versions: Some(vec!["v1".to_owned()]),
                    operations: Some(vec!["CREATE".to_owned()]),
                    resources: Some(vec!["serviceaccounts/token".to_owned()]),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            match_conditions: Some(vec![MatchCondition {
                name: "requested-by-the-token-broker".to_owned(),
                expression: format!("request.userInfo.username == '{broker_user}'"),
            }]),
            validations: Some(vec![Validation {
                expression: format!("has(object.spec.audiences) && object.spec.audiences == ['{TOKEN_AUDIENCE}']"),
                message: Some(only.clone()),
                // Names what was asked for, the server's defaults included.
                message_expression: Some(format!(
                    "'{only}; this request asked for [' + object.spec.audiences.join(', ') + ']'"
                )),
                reason: Some("Forbidden".to_owned()),
            }]),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        ..ValidatingAdmissionPolicy::default()
    }
}

/// Puts [`token_audience_policy`] in force, refusing what it denies.
fn token_audience_policy_binding() -> ValidatingAdmissionPolicyBinding {
    ValidatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(TOKEN_AUDIENCE_POLICY.to_owned()),
            labels: Some(common_labels()),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicyBindingSpec {
            policy_name: Some(TOKEN_AUDIENCE_POLICY.to_owned()),
            validation_actions: Some(vec!["Deny".to_owned()]),
            ..ValidatingAdmissionPolicyBindingSpec::default()
        }),
    }
}

fn service(options: &Options) -> Service {
    Service {
        metadata: meta(BROKER, &options.namespace),
        spec: Some(ServiceSpec {
            selector: Some(broker_selector()),
            ports: Some(vec![ServicePort {
                // `http`: Istio treats the port as HTTP without sniffing.
                name: Some("http".to_owned()),
                port: i32::from(BROKER_PORT),
                target_port: Some(IntOrString::Int(i32::from(BROKER_PORT))),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn broker_args(options: &Options) -> Vec<String> {
    let mut args = vec![
        format!("--listen=0.0.0.0:{BROKER_PORT}"),
        format!("--admin-listen=0.0.0.0:{ADMIN_PORT}"),
        "--identity-mode=xfcc".to_owned(),
        format!("--own-spiffe-id={}", options.broker_spiffe_id()),
        format!("--trust-domain={}", options.trust_domain),
        format!("--sts-region={}", options.sts_region),
        "--log-format=json".to_owned(),
        format!("--shutdown-delay-seconds={BROKER_SHUTDOWN_DELAY_SECONDS}"),
        format!("--shutdown-grace-seconds={BROKER_SHUTDOWN_GRACE_SECONDS}"),
    ];
    if let Some(url) = &options.sts_endpoint_url {
        args.push(format!("--sts-endpoint-url={url}"));
    }
    if let Some(annotation) = &options.namespace_policy_annotation {
        args.push(format!("--namespace-policy-annotation={annotation}"));
    }
    args
}

fn deployment(options: &Options) -> Deployment {
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let quantities = |cpu: &str, memory: &str| {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])
    };
    let container = Container {
        name: BROKER.to_owned(),
        image: Some(options.broker_image.clone()),
        args: Some(broker_args(options)),
        env: Some(vec![EnvVar {
            // Names this replica in the denial Events it records.
            name: "TOKEN_BROKER_INSTANCE".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".to_owned()),
                container_port: i32::from(BROKER_PORT),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("admin".to_owned()),
                container_port: i32::from(ADMIN_PORT),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("50m", "64Mi")),
            limits: Some(quantities("1", "256Mi")),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let spread = |key: &str, when: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.to_owned(),
        when_unsatisfiable: when.to_owned(),
        label_selector: Some(LabelSelector { match_labels: Some(broker_selector()), ..LabelSelector::default() }),
        ..TopologySpreadConstraint::default()
    };
    let mut pod_labels = common_labels();
    pod_labels.extend(broker_selector());
    Deployment {
        metadata: meta(BROKER, &options.namespace),
        spec: Some(DeploymentSpec {
            replicas: Some(options.replicas),
            selector: LabelSelector { match_labels: Some(broker_selector()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(labels(&[("proxy.istio.io/config", BROKER_PROXY_CONFIG)])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(BROKER.to_owned()),
                    termination_grace_period_seconds: Some(i64::from(BROKER_TERMINATION_GRACE_SECONDS)),
                    containers: vec![container],
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    topology_spread_constraints: Some(vec![
                        spread("topology.kubernetes.io/zone", "ScheduleAnyway"),
                        spread("kubernetes.io/hostname", "ScheduleAnyway"),
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn pod_disruption_budget(options: &Options) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(BROKER, &options.namespace),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(broker_selector()), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// Callers reach the broker's service port only over mesh mTLS: the XFCC
/// element the broker trusts exists only then. The admin port is
/// PERMISSIVE so a scraper outside the mesh can read health and metrics.
fn peer_authentication(options: &Options) -> PeerAuthentication {
    PeerAuthentication {
        metadata: meta(BROKER, &options.namespace),
        spec: PeerAuthenticationSpec {
            selector: WorkloadSelector { match_labels: broker_selector() },
            mtls: PeerMtls { mode: MtlsMode::Strict },
            // Health and metrics only, no secrets: scrapers outside the mesh
            // may reach them.
            port_level_mtls: BTreeMap::from([(u32::from(ADMIN_PORT), PeerMtls { mode: MtlsMode::Permissive })]),
        },
    }
}

/// Credentials only to authenticated mesh workloads; health and metrics
/// (no secrets) to anyone who can reach the admin port.
fn authorization_policy(options: &Options) -> AuthorizationPolicy {
    let get = |ports: Vec<String>, paths: &[&str]| RuleTo {
        operation: Operation {
            ports,
            methods: vec!["GET".to_owned()],
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        },
    };
    AuthorizationPolicy {
        metadata: meta(BROKER, &options.namespace),
        spec: AuthorizationPolicySpec {
            selector: WorkloadSelector { match_labels: broker_selector() },
            action: Action::Allow,
            rules: vec![
                Rule {
                    from: vec![RuleFrom { source: Source { principals: vec!["*".to_owned()] } }],
                    to: vec![get(vec![BROKER_PORT.to_string()], &["/v1/credentials"])],
                },
                Rule {
                    from: Vec::new(),
                    to: vec![get(vec![ADMIN_PORT.to_string()], &["/healthz", "/readyz", "/metrics"])],
                },
            ],
        },
    }
}

/// Makes the broker cluster a hash ring, so each role's fetches land on one
/// replica and STS sees one exchange per role and key, not one per replica;
/// mesh mTLS. The filter's wasm `httpCall`s use no route, so Envoy hashes
/// them on their `:authority`, which the filter derives from the role
/// (`imds_filter::broker::request_authority`); the query-parameter policy
/// here is what routed callers of the broker hash on.
fn destination_rule(options: &Options) -> DestinationRule {
    DestinationRule {
        metadata: meta(BROKER, &options.namespace),
        spec: DestinationRuleSpec {
            host: options.broker_host(),
            traffic_policy: TrafficPolicy {
                load_balancer: LoadBalancer {
                    consistent_hash: ConsistentHash { http_query_parameter_name: HASH_PARAMETER.to_owned() },
                },
                tls: ClientTls { mode: TlsMode::IstioMutual },
            },
            export_to: vec!["*".to_owned()],
        },
    }
}

/// The broker's sidecar states each caller's address to the broker: the
/// direct peer of the mTLS connection it accepted (the calling pod's IP),
/// in [`envoy::PEER_ADDRESS_HEADER`], replacing whatever the caller sent.
/// The broker binds a request to the pod it names by that address (mesh
/// identity alone is per service account). A route-configuration MERGE on
/// the inbound side of the broker's port, which every inbound filter chain
/// of that port (mTLS, plaintext) routes with.
fn broker_peer_address(options: &Options) -> EnvoyFilter {
    EnvoyFilter {
        metadata: meta(BROKER_PEER_ADDRESS, &options.namespace),
        spec: EnvoyFilterSpec {
            priority: None,
            workload_selector: Some(EnvoyFilterSelector { labels: broker_selector() }),
            config_patches: vec![ConfigPatch {
                apply_to: ApplyTo::RouteConfiguration,
                target: PatchMatch {
                    context: PatchContext::SidecarInbound,
                    listener: None,
                    route_configuration: Some(RouteConfigurationMatch { port_number: u32::from(BROKER_PORT) }),
                },
                patch: Patch {
                    operation: PatchOperation::Merge,
                    value: serde_json::json!({ "request_headers_to_add": [envoy::peer_address_header()] }),
                },
            }],
        },
    }
}

/// STS as a mesh service the broker's sidecar knows, so the broker reaches
/// it when the mesh's `outboundTrafficPolicy` is `REGISTRY_ONLY` (there an
/// unknown destination is a black hole). Visible to the broker's namespace
/// only.
fn sts_service_entry(options: &Options) -> ServiceEntry {
    let (host, port, tls) = options.sts_endpoint();
    let (protocol, name) = if tls { ("TLS", "tls") } else { ("HTTP", "http") };
    ServiceEntry {
        metadata: meta("aws-sts", &options.namespace),
        spec: ServiceEntrySpec {
            hosts: vec![host],
            addresses: Vec::new(),
            ports: vec![MeshPort { number: u32::from(port), protocol: protocol.to_owned(), name: name.to_owned() }],
            location: Location::MeshExternal,
            resolution: Resolution::Dns,
            export_to: vec![".".to_owned()],
        },
    }
}

/// The backstop for what the mesh cannot capture (UID 1337, capture
/// exclusions, a pod whose sidecar is gone): enabled pods in `namespace`
/// may send anything anywhere except to the metadata addresses. Their
/// sidecar answers those locally and never connects there, so the policy
/// costs nothing while the mesh works. Enforced by the cluster's CNI.
fn metadata_egress_policy(namespace: &str) -> NetworkPolicy {
    let everything_but = |all: &str, prefix_len: u8| {
        let except = imds_filter::config::METADATA_ADDRESSES
            .iter()
            .filter(|a| a.prefix_len == prefix_len)
            .map(|a| format!("{}/{}", a.ip, a.prefix_len))
            .collect();
        NetworkPolicyPeer {
            ip_block: Some(IPBlock { cidr: all.to_owned(), except: Some(except) }),
            ..NetworkPolicyPeer::default()
        }
    };
    NetworkPolicy {
        metadata: meta("imds-mesh-deny-node-metadata", namespace),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels(&[(ENABLE_LABEL, ENABLED_VALUE)])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Egress".to_owned()]),
            egress: Some(vec![NetworkPolicyEgressRule {
                to: Some(vec![everything_but("0.0.0.0/0", 32), everything_but("::/0", 128)]),
                ..NetworkPolicyEgressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// A metadata address as an HTTP service on port 80, so its traffic lands
/// on the sidecar's HTTP listener where the filter runs. One object per
/// address (see [`MetadataService::host`]).
fn service_entry(options: &Options, service: &MetadataService) -> ServiceEntry {
    let address = service.address;
    ServiceEntry {
        metadata: meta(service.name, &options.root_namespace),
        spec: ServiceEntrySpec {
            hosts: vec![service.host.to_owned()],
            addresses: vec![format!("{}/{}", address.ip, address.prefix_len)],
            ports: vec![MeshPort {
                number: u32::from(METADATA_PORT),
                protocol: "HTTP".to_owned(),
                name: "http".to_owned(),
            }],
            location: Location::MeshExternal,
            resolution: Resolution::None,
            export_to: vec!["*".to_owned()],
        },
    }
}

/// Fail closed: what the filter does not answer (it is absent, disabled, or
/// the pod is not enabled) gets a fixed 404 from the sidecar and never
/// reaches the node's IMDS.
fn fail_closed_route(options: &Options) -> VirtualService {
    VirtualService {
        metadata: meta("instance-metadata-fail-closed", &options.root_namespace),
        spec: VirtualServiceSpec {
            hosts: METADATA_SERVICES.iter().map(|s| s.host.to_owned()).collect(),
            http: vec![HttpRoute {
                name: "fail-closed".to_owned(),
                direct_response: HttpDirectResponse {
                    status: 404,
                    body: HttpBody { string: metadata::FAIL_CLOSED_BODY.to_owned() },
                },
            }],
            export_to: vec!["*".to_owned()],
        },
    }
}

/// Fail closed by destination: in every sidecar, a port-80 request whose
/// connection is to a metadata address and that no filter answered gets
/// 403 before the router could pass it to the node's IMDS, whatever its
/// `Host` says (the VirtualService above matches by `Host` only). Inserted
/// just before the router, so after the imds-mesh filter, which answers
/// enabled pods first. The same filter is in the local bootstraps.
fn metadata_guard(options: &Options) -> EnvoyFilter {
    EnvoyFilter {
        metadata: meta("instance-metadata-guard", &options.root_namespace),
        spec: EnvoyFilterSpec {
            config_patches: vec![ConfigPatch {
                apply_to: ApplyTo::HttpFilter,
                target: PatchMatch {
                    context: PatchContext::SidecarOutbound,
                    listener: Some(ListenerMatch {
                        port_number: u32::from(METADATA_PORT),
                        filter_chain: Some(FilterChainMatch {
                            name: None,
                            filter: FilterMatch {
                                name: metadata::HTTP_CONNECTION_MANAGER.to_owned(),
                                sub_filter: Some(SubFilterMatch { name: "envoy.filters.http.router".to_owned() }),
                            },
                        }),
                    }),
                    route_configuration: None,
                },
                patch: Patch { operation: PatchOperation::InsertBefore, value: metadata::guard() },
            }],
            workload_selector: None,
            priority: None,
        },
    }
}

/// Fail closed by destination, below HTTP: every sidecar's port-80
/// listener gets a filter chain of its own for connections to a metadata
/// address ([`metadata::metadata_filter_chain`]), answered 404 unless the
/// filter answers first.
fn metadata_chain(options: &Options) -> EnvoyFilter {
    EnvoyFilter {
        metadata: meta("instance-metadata-chain", &options.root_namespace),
        spec: EnvoyFilterSpec {
            priority: None,
            workload_selector: None,
            // A listener MERGE, not a FILTER_CHAIN ADD: Istio appends added
            // chains after every other patch, so none (the guard, the
            // filter below) would reach it; a merged chain is patched like
            // Istio's own.
            config_patches: vec![ConfigPatch {
                apply_to: ApplyTo::Listener,
                target: PatchMatch {
                    context: PatchContext::SidecarOutbound,
                    listener: Some(ListenerMatch { port_number: u32::from(METADATA_PORT), filter_chain: None }),
                    route_configuration: None,
                },
                patch: Patch {
                    operation: PatchOperation::Merge,
                    value: serde_json::json!({ "filter_chains": [metadata::metadata_filter_chain()] }),
                },
            }],
        },
    }
}

/// On enabled pods the filter runs in the metadata chain only: first in
/// that chain, and switched off for the port-80 route configuration the
/// WasmPlugin's own placement serves, so the pod's other port-80 HTTP
/// never enters the wasm VM. (Switching it off there and on again for the
/// metadata virtual hosts cannot be written: the "on" value,
/// `FilterConfig{config: {}}`, is an `Any` without `@type`, which Istio's
/// EnvoyFilter validation refuses.)
fn filter_on_metadata_chain(options: &Options) -> EnvoyFilter {
    let filter = options.wasm_filter_name();
    let port_number = u32::from(METADATA_PORT);
    EnvoyFilter {
        metadata: meta("imds-mesh-metadata-only", &options.root_namespace),
        spec: EnvoyFilterSpec {
            priority: None,
            workload_selector: Some(EnvoyFilterSelector { labels: labels(&[(ENABLE_LABEL, ENABLED_VALUE)]) }),
            config_patches: vec![
                ConfigPatch {
                    apply_to: ApplyTo::HttpFilter,
                    target: PatchMatch {
                        context: PatchContext::SidecarOutbound,
                        listener: Some(ListenerMatch {
                            port_number,
                            filter_chain: Some(FilterChainMatch {
                                name: Some(metadata::METADATA_CHAIN.to_owned()),
                                filter: FilterMatch {
                                    name: metadata::HTTP_CONNECTION_MANAGER.to_owned(),
                                    sub_filter: None,
                                },
                            }),
                        }),
                        route_configuration: None,
                    },
                    patch: Patch {
                        operation: PatchOperation::InsertFirst,
                        value: metadata::discovered_filter(&filter),
                    },
                },
                ConfigPatch {
                    apply_to: ApplyTo::RouteConfiguration,
                    target: PatchMatch {
                        context: PatchContext::SidecarOutbound,
                        listener: None,
                        route_configuration: Some(RouteConfigurationMatch { port_number }),
                    },
                    patch: Patch {
                        operation: PatchOperation::Merge,
                        value: serde_json::json!({ "typed_per_filter_config": { filter: metadata::filter_disabled() } }),
                    },
                },
            ],
        },
    }
}

/// The filter in every sidecar whose pod carries the enable label, on
/// outbound port 80. Phase `AUTHN` with a high priority puts it first in
/// the chain, ahead of any other filter that could forward the request.
fn wasm_plugin(options: &Options) -> WasmPlugin {
    let mut plugin_config = match serde_json::to_value(options.plugin_config()) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    // Unset options (`role_arn`, `pod_name`) are left out, not sent as null.
    plugin_config.retain(|_, value| !value.is_null());
    WasmPlugin {
        metadata: meta(WASM_PLUGIN, &options.root_namespace),
        spec: WasmPluginSpec {
            selector: WorkloadSelector { match_labels: labels(&[(ENABLE_LABEL, ENABLED_VALUE)]) },
            url: options.wasm_url.clone(),
            sha256: options.wasm_sha256.clone(),
            image_pull_policy: Some(PullPolicy::IfNotPresent),
            image_pull_secret: None,
            plugin_name: "imds-mesh".to_owned(),
            phase: PluginPhase::Authn,
            priority: 1000,
            fail_strategy: options.fail_strategy(),
            plugin_type: PluginType::Http,
            traffic: vec![TrafficSelector {
                mode: WorkloadMode::Client,
                ports: vec![PortSelector { number: u32::from(METADATA_PORT) }],
            }],
            plugin_config,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;

    use super::*;

    #[test]
    fn a_terminating_broker_outlives_its_drain_and_its_sidecar_outlives_the_broker() {
        let deployment = deployment(&Options::default());
        let pod = deployment.spec.unwrap().template;
        let spec = pod.spec.unwrap();
        let (delay, grace) = (BROKER_SHUTDOWN_DELAY_SECONDS, BROKER_SHUTDOWN_GRACE_SECONDS);
        // 25 s: the broker's credential deadline, the longest a request waits.
        assert!(grace > 25);
        assert!(spec.termination_grace_period_seconds.unwrap() > i64::from(delay + grace));
        let args = spec.containers[0].args.clone().unwrap();
        assert!(args.contains(&format!("--shutdown-delay-seconds={delay}")), "{args:?}");
        assert!(args.contains(&format!("--shutdown-grace-seconds={grace}")), "{args:?}");
        let proxy: serde_json::Value = serde_json::from_str(BROKER_PROXY_CONFIG).unwrap();
        assert_eq!(proxy["terminationDrainDuration"], format!("{}s", delay + grace));
        assert_eq!(pod.metadata.unwrap().annotations.unwrap()["proxy.istio.io/config"], BROKER_PROXY_CONFIG);
    }

    fn all_options() -> Vec<Options> {
        vec![
            Options::default(),
            Options {
                namespace: "creds".into(),
                http_tokens: HttpTokens::Required,
                namespace_policy_annotation: Some("imds-mesh.io/permitted-roles".into()),
                wasm_sha256: Some("ab".repeat(32)),
                istio_version: "1.24".parse().unwrap(),
                ..Options::default()
            },
        ]
    }

    fn wasm_plugin_of(objects: &[Object]) -> &WasmPlugin {
        objects
            .iter()
            .find_map(|o| match o {
                Object::WasmPlugin(plugin) => Some(plugin),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn every_rendered_plugin_config_is_one_the_filter_accepts() {
        for options in all_options() {
            let objects = render(&options);
            let plugin = wasm_plugin_of(&objects);
            let json = serde_json::to_vec(&plugin.spec.plugin_config).unwrap();
            let config = Config::from_json(&json).unwrap();
            assert_eq!(config, options.plugin_config());
            assert_eq!(
                config.broker_cluster,
                format!("outbound|8080||token-broker.{}.svc.cluster.local", options.namespace)
            );
        }
    }

    /// Parses `object`'s YAML back into `T` and checks nothing was lost.
    fn round_trip<T: Serialize + DeserializeOwned>(object: &Object) {
        let yaml = serde_saphyr::to_string(object).unwrap();
        let typed: T = serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(serde_json::to_value(&typed).unwrap(), serde_json::to_value(object).unwrap());
    }

    #[test]
    fn every_istio_object_round_trips_through_its_type() {
        for options in all_options() {
            for object in render(&options) {
                match &object {
                    Object::WasmPlugin(_) => round_trip::<WasmPlugin>(&object),
                    Object::ServiceEntry(_) => round_trip::<ServiceEntry>(&object),
                    Object::VirtualService(_) => round_trip::<VirtualService>(&object),
                    Object::DestinationRule(_) => round_trip::<DestinationRule>(&object),
                    Object::PeerAuthentication(_) => round_trip::<PeerAuthentication>(&object),
                    Object::AuthorizationPolicy(_) => round_trip::<AuthorizationPolicy>(&object),
                    Object::EnvoyFilter(_) => round_trip::<EnvoyFilter>(&object),
                    _ => assert!(!object.is_istio()),
                }
            }
        }
    }

    #[test]
    fn the_istio_types_refuse_unknown_fields_and_values() {
        let plugin = serde_saphyr::to_string(&Object::WasmPlugin(wasm_plugin(&Options::default()))).unwrap();
        assert!(serde_saphyr::from_str::<WasmPlugin>(&plugin).is_ok());
        let typo = plugin.replace("failStrategy:", "failStrategyy:");
        assert!(serde_saphyr::from_str::<WasmPlugin>(&typo).is_err(), "an unknown field was accepted");
        let bad_value = plugin.replace("FAIL_RELOAD", "FAIL_SOMETIMES");
        assert!(serde_saphyr::from_str::<WasmPlugin>(&bad_value).is_err(), "an unknown enum value was accepted");
    }

    #[test]
    fn the_sts_service_entry_names_the_endpoint_the_broker_calls() {
        let endpoint = |url: Option<&str>| {
            Options { sts_endpoint_url: url.map(str::to_owned), ..Options::default() }.sts_endpoint()
        };
        assert_eq!(endpoint(None), ("sts.us-east-1.amazonaws.com".to_owned(), 443, true));
        assert_eq!(
            endpoint(Some("https://vpce-1.sts.eu-west-1.vpce.amazonaws.com/")),
            ("vpce-1.sts.eu-west-1.vpce.amazonaws.com".to_owned(), 443, true)
        );
        assert_eq!(endpoint(Some("http://sts.local:4566")), ("sts.local".to_owned(), 4566, false));
        assert_eq!(endpoint(Some("https://[fd00::1]:8443/x")), ("[fd00::1]".to_owned(), 8443, true));
    }

    #[test]
    fn the_network_policy_denies_only_the_metadata_addresses_to_enabled_pods() {
        let options =
            Options { network_policy_namespaces: vec!["team-a".into(), "team-b".into()], ..Options::default() };
        let policies: Vec<NetworkPolicy> = render(&options)
            .into_iter()
            .filter_map(|o| match o {
                Object::NetworkPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(
            policies.iter().map(|p| p.metadata.namespace.clone().unwrap()).collect::<Vec<_>>(),
            ["team-a", "team-b"]
        );
        let spec = policies[0].spec.clone().unwrap();
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()[ENABLE_LABEL], ENABLED_VALUE);
        let blocks: Vec<IPBlock> =
            spec.egress.unwrap()[0].to.clone().unwrap().into_iter().filter_map(|peer| peer.ip_block).collect();
        let as_pairs: Vec<(String, Vec<String>)> =
            blocks.into_iter().map(|b| (b.cidr, b.except.unwrap_or_default())).collect();
        assert_eq!(
            as_pairs,
            [
                ("0.0.0.0/0".to_owned(), vec!["169.254.169.254/32".to_owned()]),
                ("::/0".to_owned(), vec!["fd00:ec2::254/128".to_owned()]),
            ]
        );
        assert!(!render(&Options::default()).iter().any(|o| matches!(o, Object::NetworkPolicy(_))));
    }

    #[test]
    fn the_token_audience_policy_holds_only_the_broker_to_sts_and_is_rendered_only_when_asked() {
        let kinds = |options: &Options| -> Vec<String> {
            render(options)
                .iter()
                .map(|o| serde_json::to_value(o).unwrap()["kind"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(!kinds(&Options::default()).iter().any(|k| k.starts_with("ValidatingAdmissionPolicy")));
        let options = Options { namespace: "creds".into(), restrict_token_audience: true, ..Options::default() };
        // After the broker's RBAC, before the broker.
        assert_eq!(
            kinds(&options)[..6],
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"
            ]
        );
        let objects = render(&options);
        let json = serde_json::to_value(&objects[4]).unwrap();
        assert_eq!(json["apiVersion"], "admissionregistration.k8s.io/v1");
        let (Object::ValidatingAdmissionPolicy(policy), Object::ValidatingAdmissionPolicyBinding(binding)) =
            (&objects[4], &objects[5])
        else {
            panic!("{objects:?}")
        };
        assert_eq!(policy.metadata.name.as_deref(), Some(TOKEN_AUDIENCE_POLICY));
        let spec = policy.spec.clone().unwrap();
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
        let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
        let [rule] = &rules[..] else { panic!("{rules:?}") };
        assert_eq!(
            (&rule.api_groups, &rule.resources, &rule.operations),
            (&Some(vec![String::new()]), &Some(vec!["serviceaccounts/token".into()]), &Some(vec!["CREATE".into()]))
        );
        let conditions = spec.match_conditions.unwrap();
        let [condition] = &conditions[..] else { panic!("{conditions:?}") };
        assert_eq!(condition.expression, "request.userInfo.username == 'system:serviceaccount:creds:token-broker'");
        let validations = spec.validations.unwrap();
        let [validation] = &validations[..] else { panic!("{validations:?}") };
        assert_eq!(
            validation.expression,
            "has(object.spec.audiences) && object.spec.audiences == ['sts.amazonaws.com']"
        );
        assert_eq!(validation.reason.as_deref(), Some("Forbidden"));
        assert!(validation.message.as_deref().unwrap().ends_with("only for the audience sts.amazonaws.com"));
        let binding_spec = binding.spec.clone().unwrap();
        assert_eq!(binding.metadata.name.as_deref(), Some(TOKEN_AUDIENCE_POLICY));
        assert_eq!(binding_spec.policy_name.as_deref(), Some(TOKEN_AUDIENCE_POLICY));
        assert_eq!(binding_spec.validation_actions, Some(vec!["Deny".to_owned()]));
        // Every request the policy matches: no narrower resources.
        assert_eq!(binding_spec.match_resources, None);
    }

    #[test]
    fn a_fail_strategy_that_would_open_or_that_the_release_lacks_is_refused() {
        let with = |version: &str, strategy| Options {
            istio_version: version.parse().unwrap(),
            fail_strategy: Some(strategy),
            ..Options::default()
        };
        assert!(with("1.24", FailStrategy::FailOpen).check().unwrap_err().contains("FAIL_OPEN"));
        assert!(with("1.26", FailStrategy::FailReload).check().unwrap_err().contains("needs Istio 1.27"));
        assert_eq!(with("1.27", FailStrategy::FailReload).check(), Ok(()));
        assert_eq!(with("1.26", FailStrategy::FailClose).check(), Ok(()));
    }

    #[test]
    fn rbac_is_least_privilege() {
        let rules = |options: &Options| {
            let role = cluster_role(options);
            role.rules
                .unwrap_or_default()
                .into_iter()
                .flat_map(|r| {
                    let resources = r.resources.unwrap_or_default();
                    resources
                        .into_iter()
                        .flat_map(move |res| r.verbs.iter().map(move |v| format!("{res}:{v}")).collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
        };
        let base = ["pods:get", "pods:list", "pods:watch", "serviceaccounts/token:create", "events:create"];
        assert_eq!(rules(&Options::default()), base);
        let with_policy = Options { namespace_policy_annotation: Some("a".into()), ..Options::default() };
        assert_eq!(rules(&with_policy), [&base[..], &["namespaces:list", "namespaces:watch"]].concat());
    }

    #[test]
    fn the_broker_is_in_the_mesh_but_not_served_by_the_filter() {
        let deployment = deployment(&Options::default());
        let template = deployment.spec.unwrap().template;
        let labels = template.metadata.unwrap().labels.unwrap();
        assert!(!labels.contains_key(ENABLE_LABEL));
        assert_eq!(namespace(&Options::default()).metadata.labels.unwrap()["istio-injection"], "enabled");
        let args = template.spec.unwrap().containers[0].args.clone().unwrap();
        assert!(
            args.contains(&"--own-spiffe-id=spiffe://cluster.local/ns/imds-mesh/sa/token-broker".to_owned()),
            "{args:?}"
        );
    }
}
