//! `mesh-config`: prints what imds-mesh needs outside its two binaries.
//! `mesh-config render` prints the objects an operator applies
//! ([`mesh_config::render`]) as multi-document YAML; `mesh-config envoy
//! app|broker` prints an Envoy bootstrap (JSON) for one of the two sidecars,
//! shaped as Istio shapes it ([`mesh_config::envoy`]).
//!
//! Layout: this file is the command line only.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use imds_filter::config::HttpTokens;
use mesh_config::envoy::{AppSidecar, BrokerRoute, BrokerSidecar, CertificateFiles, Workload};
use mesh_config::istio::FailStrategy;
use mesh_config::oci::OciImage;
use mesh_config::render::{self, Options};
use mesh_config::version::IstioVersion;

#[derive(Debug, Parser)]
#[command(name = "mesh-config", version, about = "Renders imds-mesh's deployment and local sidecar bootstraps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print everything to apply to a cluster, as multi-document YAML.
    Render(RenderArgs),
    /// Package the filter's .wasm as an OCI image layout (what WasmPlugin
    /// pulls) and print its manifest digest.
    OciImage(OciArgs),
    /// Print an Envoy bootstrap (JSON) shaped like an Istio sidecar's.
    #[command(subcommand)]
    Envoy(Sidecar),
}

#[derive(Debug, Args)]
struct OciArgs {
    /// The filter's release .wasm.
    #[arg(long)]
    wasm: PathBuf,
    /// Directory to write the OCI image layout into.
    #[arg(long)]
    out: PathBuf,
    /// Tag recorded in the layout's index.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
}

#[derive(Debug, Args)]
struct RenderArgs {
    /// Namespace of the broker and its policies.
    #[arg(long, default_value_t = Options::default().namespace)]
    namespace: String,
    /// Istio's root namespace (mesh-wide WasmPlugin, ServiceEntry,
    /// VirtualService).
    #[arg(long, default_value_t = Options::default().root_namespace)]
    root_namespace: String,
    /// The token-broker container image.
    #[arg(long, default_value_t = Options::default().broker_image)]
    broker_image: String,
    /// Broker replicas (at least 2 keeps it available through a disruption).
    #[arg(long, default_value_t = Options::default().replicas, value_parser = clap::value_parser!(i32).range(1..))]
    replicas: i32,
    /// The mesh's trust domain.
    #[arg(long, default_value_t = Options::default().trust_domain)]
    trust_domain: String,
    /// AWS region of the STS endpoint the broker calls.
    #[arg(long, default_value_t = Options::default().sts_region)]
    sts_region: String,
    /// STS endpoint URL for the broker (e.g. a VPC endpoint).
    #[arg(long)]
    sts_endpoint_url: Option<String>,
    /// Enable the broker's namespace policy with this Namespace annotation.
    #[arg(long)]
    namespace_policy_annotation: Option<String>,
    /// Render, in this namespace, a NetworkPolicy that denies enabled pods
    /// egress to the metadata addresses (repeatable): the backstop for
    /// traffic the mesh does not capture.
    #[arg(long = "network-policy-namespace")]
    network_policy_namespaces: Vec<String>,
    /// Render a ValidatingAdmissionPolicy and its binding (Kubernetes 1.30
    /// or later) that let the broker's service account request
    /// service-account tokens only for the audience sts.amazonaws.com, so
    /// its identity cannot mint tokens the API server or anything else
    /// accepts. Off by default: the default rendering installs on
    /// Kubernetes 1.24 and later.
    #[arg(long)]
    restrict_token_audience: bool,
    /// Where sidecars pull the filter: oci://host/repo:tag, or https://.../imds_filter.wasm.
    #[arg(long, default_value_t = Options::default().wasm_url)]
    wasm_url: String,
    /// The WasmPlugin sha256: for oci:// the image manifest digest, for
    /// https:// the module's (64 hex digits, no prefix).
    #[arg(long, value_parser = sha256_hex)]
    wasm_sha256: Option<String>,
    /// Render an oci:// or http(s):// module without --wasm-sha256: every
    /// sidecar then runs whatever the tag or URL serves when it pulls.
    #[arg(long)]
    allow_unpinned_wasm: bool,
    /// IMDSv2 enforcement: optional (IMDSv1 and IMDSv2) or required.
    #[arg(long, value_enum, default_value_t = Tokens::Optional)]
    http_tokens: Tokens,
    /// The Istio release to render for (1.24 to 1.32): what its API server
    /// accepts and the names its sidecars use.
    #[arg(long, default_value_t = Options::default().istio_version)]
    istio_version: IstioVersion,
    /// The WasmPlugin failStrategy: reload (Istio 1.27+) or close; by
    /// default the best the release has.
    #[arg(long, value_enum)]
    fail_strategy: Option<OnFailure>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Tokens {
    Optional,
    Required,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnFailure {
    /// FAIL_RELOAD: reload a failed VM (Istio 1.27 and later).
    Reload,
    /// FAIL_CLOSE: fail requests while the VM is down (older Istio).
    Close,
}

fn sha256_hex(s: &str) -> Result<String, String> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(s.to_owned())
    } else {
        Err("must be 64 lower-case hex digits, without a sha256: prefix".to_owned())
    }
}

#[derive(Debug, Subcommand)]
enum Sidecar {
    /// The app pod's sidecar: outbound port 80 with the filter, the pod in
    /// node metadata, the broker cluster over mesh mTLS.
    App(AppArgs),
    /// The broker's sidecar: inbound mTLS with XFCC APPEND_FORWARD, to the
    /// broker on loopback.
    Broker(BrokerArgs),
}

#[derive(Debug, Args)]
struct AppArgs {
    /// Pod name (node metadata NAME).
    #[arg(long)]
    pod_name: String,
    /// Pod namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The pod's service account.
    #[arg(long, default_value = "default")]
    service_account: String,
    /// A pod label, KEY=VALUE; repeat for more.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// A pod annotation, KEY=VALUE; repeat for more.
    #[arg(long = "annotation", value_parser = key_value)]
    annotations: Vec<(String, String)>,
    /// Address of the listener standing for the pod's outbound port 80.
    #[arg(long, default_value = "127.0.0.1:15080")]
    listen: SocketAddr,
    /// Envoy admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The filter's .wasm.
    #[arg(long)]
    wasm: PathBuf,
    /// The filter's pluginConfig (JSON); checked with the filter's own parser.
    #[arg(long, default_value = "{}")]
    plugin_config: String,
    /// Where the broker (or its sidecar) listens.
    #[arg(long)]
    broker: SocketAddr,
    /// The SPIFFE ID the broker's certificate must carry; with --cert,
    /// --key and --ca the broker is reached over mesh mTLS.
    #[arg(long, requires_all = ["cert", "key", "ca"])]
    broker_id: Option<String>,
    #[command(flatten)]
    certificates: OptionalCertificates,
    /// Where non-IMDS port-80 traffic goes.
    #[arg(long, default_value = "127.0.0.1:9")]
    upstream: SocketAddr,
}

#[derive(Debug, Args)]
struct OptionalCertificates {
    /// This sidecar's workload certificate (PEM).
    #[arg(long, requires = "broker_id")]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "broker_id")]
    key: Option<PathBuf>,
    /// The mesh root certificate (PEM).
    #[arg(long, requires = "broker_id")]
    ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// The mTLS listener callers reach.
    #[arg(long, default_value = "127.0.0.1:15443")]
    listen: SocketAddr,
    /// Also a plaintext listener (PERMISSIVE mode).
    #[arg(long)]
    plaintext_listen: Option<SocketAddr>,
    /// Envoy admin address.
    #[arg(long, default_value = "127.0.0.1:15001")]
    admin: SocketAddr,
    /// The broker on loopback.
    #[arg(long, default_value = "127.0.0.1:8080")]
    broker: SocketAddr,
    /// The broker's workload certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The mesh root certificate callers must chain to (PEM).
    #[arg(long)]
    ca: PathBuf,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("mesh-config: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<String, String> {
    let bootstrap = match cli.command {
        Command::Render(args) => return render::to_yaml(&render::render(&options(args)?)),
        Command::OciImage(args) => return oci_image(&args),
        Command::Envoy(Sidecar::App(args)) => app(args)?.bootstrap(),
        Command::Envoy(Sidecar::Broker(args)) => BrokerSidecar {
            inbound: args.listen,
            plaintext: args.plaintext_listen,
            admin: args.admin,
            broker: args.broker,
            certificates: CertificateFiles { cert: args.cert, key: args.key, ca: args.ca },
        }
        .bootstrap(),
    };
    serde_json::to_string_pretty(&bootstrap).map_err(|e| e.to_string())
}

fn oci_image(args: &OciArgs) -> Result<String, String> {
    let wasm = std::fs::read(&args.wasm).map_err(|e| format!("--wasm {}: {e}", args.wasm.display()))?;
    if !wasm.starts_with(b"\0asm") {
        return Err(format!("--wasm {}: not a WebAssembly module", args.wasm.display()));
    }
    let image = OciImage::build(&wasm, env!("CARGO_PKG_VERSION")).map_err(|e| e.to_string())?;
    image.write_layout(&args.out, &args.tag).map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    Ok(image.digest())
}

fn options(args: RenderArgs) -> Result<Options, String> {
    let scheme = args.wasm_url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("oci" | "https" | "http" | "file")) {
        return Err(format!("--wasm-url {:?}: must start with oci://, https://, http:// or file://", args.wasm_url));
    }
    if args.wasm_sha256.is_none() && scheme != Some("file") && !args.allow_unpinned_wasm {
        return Err(format!(
            "--wasm-url {}: pin the module with --wasm-sha256 (the digest `just wasm-image` prints), or pass \
             --allow-unpinned-wasm",
            args.wasm_url
        ));
    }
    let options = Options {
        namespace: args.namespace,
        root_namespace: args.root_namespace,
        broker_image: args.broker_image,
        replicas: args.replicas,
        trust_domain: args.trust_domain,
        sts_region: args.sts_region,
        sts_endpoint_url: args.sts_endpoint_url,
        namespace_policy_annotation: args.namespace_policy_annotation,
        network_policy_namespaces: args.network_policy_namespaces,
        restrict_token_audience: args.restrict_token_audience,
        wasm_url: args.wasm_url,
        wasm_sha256: args.wasm_sha256,
        http_tokens: match args.http_tokens {
            Tokens::Optional => HttpTokens::Optional,
            Tokens::Required => HttpTokens::Required,
        },
        istio_version: args.istio_version,
        fail_strategy: args.fail_strategy.map(|f| match f {
            OnFailure::Reload => FailStrategy::FailReload,
            OnFailure::Close => FailStrategy::FailClose,
        }),
    };
    options.check()?;
    Ok(options)
}

fn app(args: AppArgs) -> Result<AppSidecar, String> {
    imds_filter::config::Config::from_json(args.plugin_config.as_bytes())
        .map_err(|e| format!("--plugin-config: {e}"))?;
    let plugin_config = serde_json::from_str(&args.plugin_config).map_err(|e| format!("--plugin-config: {e}"))?;
    let mtls = match (args.broker_id, args.certificates) {
        (Some(broker_id), OptionalCertificates { cert: Some(cert), key: Some(key), ca: Some(ca) }) => {
            Some((CertificateFiles { cert, key, ca }, broker_id))
        }
        _ => None,
    };
    Ok(AppSidecar {
        pod: Workload {
            name: args.pod_name,
            namespace: args.namespace,
            service_account: args.service_account,
            labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
            annotations: args.annotations.into_iter().collect(),
        },
        outbound: args.listen,
        admin: args.admin,
        wasm: Some(args.wasm),
        plugin_config,
        broker: BrokerRoute { address: args.broker, mtls, source_address: None },
        upstream: args.upstream,
    })
}
