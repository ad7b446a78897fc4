//! The filter's OCI image through a real registry: `mesh-config oci-image`
//! packages the built `.wasm`, PyPI `oras` pushes it to Debian's
//! `docker-registry` on loopback and pulls it back; the registry's manifest
//! digest is the one `mesh-config` printed and the one the rendered
//! WasmPlugin pins, and the layer holds the module as Istio extracts it.

use std::path::Path;
use std::process::Command;

use integration::paths;
use integration::registry::OciRegistry;
use mesh_config::oci;

fn run(program: &Path, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(output.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("{e}"))
}

fn oci_script(args: &[&str]) -> serde_json::Value {
    let script = paths::repo_root().join("scripts/oci.py");
    let mut all = vec![script.to_str().unwrap_or_default()];
    all.extend_from_slice(args);
    serde_json::from_str(&run(&paths::python(), &all)).unwrap_or_else(|e| panic!("oci.py printed no JSON: {e}"))
}

#[tokio::test]
async fn the_pushed_image_is_what_the_wasm_plugin_pins_and_holds_the_filter() {
    let registry = OciRegistry::start().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let layout = dir.path().join("layout");
    let wasm = paths::filter_wasm();
    let mesh_config = Path::new(env!("CARGO_BIN_EXE_mesh-config"));

    let args = ["oci-image", "--wasm", wasm.to_str().unwrap_or_default(), "--out", layout.to_str().unwrap_or_default()];
    let digest = run(mesh_config, &args).trim().to_owned();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert_eq!(run(mesh_config, &args).trim(), digest, "the image is not reproducible");

    let reference = format!("{}/imds-mesh/imds-filter:test", registry.host());
    let pushed = oci_script(&["push", layout.to_str().unwrap_or_default(), &reference, "--insecure"]);
    assert_eq!(pushed["digest"], digest.as_str());

    let pulled_dir = dir.path().join("pulled");
    let pulled = oci_script(&["pull", &reference, pulled_dir.to_str().unwrap_or_default(), "--insecure"]);
    assert_eq!(pulled["digest"], digest.as_str());
    assert_eq!(pulled["registryDigest"], digest.as_str());
    let layers = pulled["layers"].as_array().cloned().unwrap_or_default();
    let last = layers.last().unwrap_or_else(|| panic!("no layers: {pulled}"));
    assert_eq!(last["mediaType"], oci::LAYER_MEDIA_TYPE, "Istio's compat variant reads the last layer");
    let layer = std::fs::read(last["path"].as_str().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
    let module = oci::wasm_in_layer(&layer).unwrap_or_else(|e| panic!("{e}"));
    assert!(module == std::fs::read(&wasm).unwrap_or_default(), "the layer's plugin.wasm is not the built filter");

    let hex = digest.trim_start_matches("sha256:");
    let rendered = run(mesh_config, &["render", "--wasm-url", &format!("oci://{reference}"), "--wasm-sha256", hex]);
    assert!(rendered.contains(&format!("sha256: {hex}")), "the WasmPlugin does not pin the pushed digest");
    assert!(rendered.contains(&format!("url: oci://{reference}")));
}
