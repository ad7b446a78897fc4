//! The committed rendering (`mesh-config/deploy/`) is what `mesh-config
//! render` prints today, and its Kubernetes objects pass `kubernetes-validate`
//! (strict: unknown fields are errors) for Kubernetes 1.24 and 1.33.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration::paths;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// `mesh-config render ARGS`, unpinned unless ARGS pin the module.
fn render(args: &[&str]) -> String {
    let mut args = args.to_vec();
    if !args.contains(&"--wasm-sha256") {
        args.push("--allow-unpinned-wasm");
    }
    try_render(&args).unwrap_or_else(|stderr| panic!("{stderr}"))
}

/// `mesh-config render ARGS`: its output, or what it said when it refused.
fn try_render(args: &[&str]) -> Result<String, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_mesh-config"))
        .arg("render")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run mesh-config: {e}"));
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn the_rendering_follows_the_istio_release() {
    let old = render(&["--istio-version", "1.26"]);
    assert!(old.contains("failStrategy: FAIL_CLOSE") && !old.contains("FAIL_RELOAD"), "{old}");
    assert!(old.contains("extensions.istio.io/wasmplugin/istio-system.imds-mesh:"), "{old}");
    let new = render(&["--istio-version", "1.31.2"]);
    assert!(new.contains("failStrategy: FAIL_RELOAD"), "{new}");
    assert!(new.contains("extensions.istio.io/trafficextension/istio-system.imds-mesh~istio-translated-wasmplugin:"));
}

#[test]
fn a_remote_module_must_be_pinned() {
    let refused = try_render(&[]).unwrap_err();
    assert!(refused.contains("pin the module with --wasm-sha256"), "{refused}");
    assert!(try_render(&["--allow-unpinned-wasm"]).is_ok());
    assert!(try_render(&["--wasm-url", "file:///var/lib/imds-mesh/imds_filter.wasm"]).is_ok());
}

#[test]
fn an_option_the_istio_release_cannot_take_is_refused_with_the_reason() {
    let refused =
        try_render(&["--allow-unpinned-wasm", "--istio-version", "1.26", "--fail-strategy", "reload"]).unwrap_err();
    assert!(refused.contains("FAIL_RELOAD needs Istio 1.27 or later"), "{refused}");
    for version in ["1.23", "2.1", "latest"] {
        let refused = try_render(&["--istio-version", version]).unwrap_err();
        assert!(refused.contains("--istio-version"), "{refused}");
    }
}

/// The digest of the filter's image built from this tree (`just build`),
/// without `sha256:`.
fn built_image_digest() -> String {
    let wasm = std::fs::read(paths::filter_wasm()).unwrap_or_else(|e| panic!("{e}"));
    let image = mesh_config::oci::OciImage::build(&wasm, env!("CARGO_PKG_VERSION")).unwrap_or_else(|e| panic!("{e}"));
    image.digest().trim_start_matches("sha256:").to_owned()
}

/// The default rendering, pinned to the filter built from this tree.
fn render_default() -> String {
    render(&["--wasm-sha256", &built_image_digest()])
}

#[test]
fn the_committed_rendering_is_current_and_pins_the_filter_built_from_this_tree() {
    let path = deploy_dir().join("imds-mesh.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        committed.contains(&format!("sha256: {}", built_image_digest())),
        "the committed WasmPlugin is not pinned to this tree's filter: run `just render`"
    );
    assert!(committed == render_default(), "{} is stale: run `just render` and commit the result", path.display());
    let kustomization = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap_or_default();
    assert!(kustomization.contains("- imds-mesh.yaml"), "{kustomization}");
}

/// The core (non-Istio) documents of a rendering.
fn core_documents(yaml: &str) -> String {
    yaml.split("---\n")
        .filter(|doc| !doc.trim().is_empty())
        .filter(|doc| !doc.lines().any(|line| line.starts_with("apiVersion:") && line.contains(".istio.io/")))
        .map(|doc| format!("---\n{doc}"))
        .collect()
}

/// `kubernetes-validate --strict` for `version`; its output on failure.
fn validate(yaml: &str, version: &str) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("{e}"));
    let output = Command::new(paths::venv().join("bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", version])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("run kubernetes-validate (`just setup` installs it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(text) }
}

#[test]
fn every_kubernetes_object_is_valid_for_1_24_and_1_33() {
    let options: [&[&str]; 2] = [
        &[],
        &[
            "--namespace-policy-annotation",
            "imds-mesh.io/permitted-roles",
            "--replicas",
            "3",
            "--network-policy-namespace",
            "team-a",
        ],
    ];
    for args in options {
        let core = core_documents(&render(args));
        let mut kinds = vec![
            "namespace",
            "serviceaccount",
            "clusterrole",
            "clusterrolebinding",
            "service",
            "deployment",
            "poddisruptionbudget",
        ];
        if !args.is_empty() {
            kinds.push("networkpolicy");
        }
        for version in ["1.24.0", "1.33.0"] {
            let report = validate(&core, version).unwrap_or_else(|report| panic!("{version}: {report}"));
            for kind in &kinds {
                assert!(
                    report.contains(&format!("passed for resource {kind}/")),
                    "{version}: {kind} not validated:\n{report}"
                );
            }
        }
    }
}

#[test]
fn the_token_audience_policy_is_rendered_only_when_asked_and_needs_kubernetes_1_30() {
    assert!(!render(&[]).contains("ValidatingAdmissionPolicy"));
    let core = core_documents(&render(&["--restrict-token-audience"]));
    assert!(core.contains("\nkind: ValidatingAdmissionPolicy\n"), "{core}");
    assert!(core.contains("\nkind: ValidatingAdmissionPolicyBinding\n"), "{core}");
    for version in ["1.30.0", "1.33.0"] {
        let report = validate(&core, version).unwrap_or_else(|report| panic!("{version}: {report}"));
        for kind in ["validatingadmissionpolicy", "validatingadmissionpolicybinding"] {
            assert!(report.contains(&format!("passed for resource {kind}/")), "{version}: {report}");
        }
    }
    // Why it is off by default: before 1.30 the kinds do not exist.
    let report = validate(&core, "1.29.0").unwrap_or_else(|report| panic!("{report}"));
    assert!(report.contains("Couldn't find schema for kind ValidatingAdmissionPolicy "), "{report}");
}

#[test]
fn the_validator_rejects_what_kubernetes_would() {
    let core = core_documents(&render(&[]));
    let broken = core
        .replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: true\n          readOnlyEverything: true");
    assert_ne!(broken, core);
    assert!(validate(&broken, "1.33.0").is_err(), "an unknown field passed");
}
