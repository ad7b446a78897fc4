//! `mesh-config`: prints what imds-mesh needs outside its two binaries.
//! `mesh-config envoy app|broker` prints an Envoy bootstrap (JSON) for one
//! of the two sidecars, shaped as Istio shapes it ([`mesh_config::envoy`]).
//!
//! Layout: this file is the command line only.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mesh_config::envoy::{AppSidecar, BrokerRoute, BrokerSidecar, CertificateFiles, Workload};

#[derive(Debug, Parser)]
#[command(name = "mesh-config", version, about = "Renders imds-mesh's deployment and local sidecar bootstraps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print an Envoy bootstrap (JSON) shaped like an Istio sidecar's.
    #[command(subcommand)]
    Envoy(Sidecar),
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
        wasm: args.wasm,
        plugin_config,
        broker: BrokerRoute { address: args.broker, mtls },
        upstream: args.upstream,
    })
}
