//! The filter as an OCI image Istio's WasmPlugin pulls: the "compat"
//! variant of the Wasm image spec (one `application/vnd.oci.image.layer.v1.tar+gzip`
//! layer holding `plugin.wasm`), which Istio's fetcher
//! (`pkg/wasm/imagefetcher.go`) reads in every release and which any OCI
//! registry stores.
//!
//! The image is reproducible: fixed tar metadata, no gzip timestamp, no
//! creation date, so its manifest digest (what WasmPlugin `sha256` checks
//! for an `oci://` URL) depends only on the `.wasm`. [`OciImage::write_layout`]
//! writes an OCI image layout directory that registry clients push as is.

use std::io::{self, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

/// The image manifest's media type (OCI image manifest v1).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config blob's media type (OCI image config v1).
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The one layer's media type: what Istio's "compat" variant reads.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file Istio looks for in the layer.
pub const WASM_FILE_NAME: &str = "plugin.wasm";

/// A built image: its three blobs and the manifest's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciImage {
    /// The manifest, byte for byte as pushed (its digest is the image's).
    pub manifest: Vec<u8>,
    /// The image config blob.
    pub config: Vec<u8>,
    /// The gzipped tar holding `plugin.wasm`.
    pub layer: Vec<u8>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for byte in hash {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

impl OciImage {
    /// Packages `wasm`; `version` goes into the manifest's annotations.
    pub fn build(wasm: &[u8], version: &str) -> io::Result<Self> {
        let tar = tar_of(wasm)?;
        let mut gzip = GzEncoder::new(Vec::new(), Compression::best());
        gzip.write_all(&tar)?;
        let layer = gzip.finish()?;
        // The platform an OCI runtime for wasm would look for; Istio reads
        // only the layer.
        let config = serde_json::to_vec(&json!({
            "architecture": "wasm",
            "os": "wasip1",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [digest(&tar)] },
        }))?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": digest(&config), "size": config.len() },
            "layers": [{
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": digest(&layer),
                "size": layer.len(),
                "annotations": { "org.opencontainers.image.title": WASM_FILE_NAME },
            }],
            "annotations": {
                "org.opencontainers.image.title": "imds-mesh filter",
                "org.opencontainers.image.version": version,
            },
        }))?;
        Ok(Self { manifest, config, layer })
    }

    /// The manifest digest, `sha256:<hex>`.
    pub fn digest(&self) -> String {
        digest(&self.manifest)
    }

    /// Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/`)
    /// into `dir`, the manifest tagged `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> io::Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        for blob in [&self.manifest, &self.config, &self.layer] {
            let name = digest(blob);
            std::fs::write(blobs.join(name.trim_start_matches("sha256:")), blob)?;
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": self.digest(),
                "size": self.manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec_pretty(&index)?)
    }
}

/// A tar holding only `plugin.wasm`, with fixed metadata.
fn tar_of(wasm: &[u8]) -> io::Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_data(&mut header, WASM_FILE_NAME, wasm)?;
    builder.into_inner()
}

/// The `.wasm` inside a layer built by [`OciImage::build`] (or any compat
/// layer): what Istio extracts.
pub fn wasm_in_layer(layer: &[u8]) -> io::Result<Vec<u8>> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.path()?.file_name().is_some_and(|name| name == WASM_FILE_NAME) {
            let mut wasm = Vec::new();
            io::Read::read_to_end(&mut entry, &mut wasm)?;
            return Ok(wasm);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("no {WASM_FILE_NAME} in the layer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WASM: &[u8] = b"\0asm\x01\0\0\0 a module";

    #[test]
    fn the_image_is_reproducible_and_holds_the_module() {
        let image = OciImage::build(WASM, "0.1.0").unwrap();
        assert_eq!(image, OciImage::build(WASM, "0.1.0").unwrap());
        assert_eq!(wasm_in_layer(&image.layer).unwrap(), WASM);
        assert_ne!(image.digest(), OciImage::build(b"\0asm\x01\0\0\0 another", "0.1.0").unwrap().digest());
    }

    #[test]
    fn the_manifest_names_its_blobs_by_digest_and_size() {
        let image = OciImage::build(WASM, "0.1.0").unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(manifest["config"]["digest"], digest(&image.config));
        assert_eq!(manifest["layers"][0]["digest"], digest(&image.layer));
        assert_eq!(manifest["layers"][0]["size"], image.layer.len());
        assert_eq!(manifest["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(1), "Istio's compat variant reads the last layer");
    }

    #[test]
    fn the_layout_has_every_blob_and_the_tag() {
        let dir = tempfile::tempdir().unwrap();
        let image = OciImage::build(WASM, "0.1.0").unwrap();
        image.write_layout(dir.path(), "0.1.0").unwrap();
        for blob in [&image.manifest, &image.config, &image.layer] {
            let path = dir.path().join("blobs/sha256").join(digest(blob).trim_start_matches("sha256:"));
            assert_eq!(&std::fs::read(path).unwrap(), blob);
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], image.digest());
        assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "0.1.0");
    }
}
