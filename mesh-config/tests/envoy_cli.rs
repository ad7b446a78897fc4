//! `mesh-config envoy app|broker` prints bootstraps that Envoy 1.40 accepts
//! (`envoy --mode validate`, which also loads the filter and its
//! `pluginConfig`), and refuses a `pluginConfig` the filter would refuse.

use std::path::Path;
use std::process::{Command, Output};

use integration::paths;
use integration::pki::{self, MeshCa, WorkloadFiles};

fn mesh_config(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-config"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run mesh-config: {e}"))
}

/// `--cert`, `--key` and `--ca` for `files`.
fn certificate_flags(files: &WorkloadFiles) -> [&str; 6] {
    [
        "--cert",
        files.cert.to_str().unwrap_or_default(),
        "--key",
        files.key.to_str().unwrap_or_default(),
        "--ca",
        files.ca.to_str().unwrap_or_default(),
    ]
}

/// Writes `bootstrap` and runs `envoy --mode validate` on it.
fn validate(dir: &Path, bootstrap: &[u8]) -> Output {
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, bootstrap).unwrap_or_else(|e| panic!("{e}"));
    Command::new(paths::envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("run envoy: {e}"))
}

#[test]
fn the_app_sidecar_bootstrap_loads_the_filter_and_validates() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let certs = MeshCa::new("mesh").workload(&[&pki::spiffe_id("default", "app")]).write(dir.path(), "app");
    let wasm = paths::filter_wasm();
    let output = mesh_config(
        &[
            "envoy",
            "app",
            "--pod-name",
            "app-0",
            "--service-account",
            "app",
            "--label",
            "gkemulticloud.googleapis.com/aws-imds-emulator-enabled=True",
            "--annotation",
            "gkemulticloud.googleapis.com/aws-imds-emulator-role-arn=arn:aws:iam::123456789012:role/app",
            "--wasm",
            wasm.to_str().unwrap_or_default(),
            "--plugin-config",
            r#"{"http_tokens":"required"}"#,
            "--broker",
            "127.0.0.1:15443",
            "--broker-id",
            "spiffe://cluster.local/ns/imds-mesh/sa/token-broker",
        ]
        .into_iter()
        .chain(certificate_flags(&certs))
        .collect::<Vec<_>>(),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let bootstrap: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("not JSON: {e}"));
    assert_eq!(bootstrap["node"]["metadata"]["NAME"], "app-0");
    let clusters = bootstrap["static_resources"]["clusters"].to_string();
    assert!(clusters.contains("outbound|8080||token-broker.imds-mesh.svc.cluster.local"), "{clusters}");

    let validated = validate(dir.path(), &output.stdout);
    assert!(validated.status.success(), "{}", String::from_utf8_lossy(&validated.stdout));
}

#[test]
fn the_broker_sidecar_bootstrap_validates() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let certs = MeshCa::new("mesh")
        .workload(&["spiffe://cluster.local/ns/imds-mesh/sa/token-broker"])
        .write(dir.path(), "broker");
    let output = mesh_config(
        &["envoy", "broker", "--plaintext-listen", "127.0.0.1:15081"]
            .into_iter()
            .chain(certificate_flags(&certs))
            .collect::<Vec<_>>(),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("APPEND_FORWARD") && text.contains("\"require_client_certificate\": true"), "{text}");

    let validated = validate(dir.path(), &output.stdout);
    assert!(validated.status.success(), "{}", String::from_utf8_lossy(&validated.stdout));
}

#[test]
fn a_plugin_config_the_filter_would_refuse_is_refused_naming_the_field() {
    let output = mesh_config(&[
        "envoy",
        "app",
        "--pod-name",
        "app-0",
        "--wasm",
        "/dev/null",
        "--broker",
        "127.0.0.1:1",
        "--plugin-config",
        r#"{"max_wait_ms": 5000}"#,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_wait_ms"), "{stderr}");
}
