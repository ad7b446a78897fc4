//! An OCI registry on loopback: Debian's `docker-registry` (the CNCF
//! distribution registry, what most registries are built on), plain HTTP,
//! storage in a temporary directory. Istio's WasmPlugin pulls from
//! registries like it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

use crate::sts::free_port;

/// A running registry; killed on drop, its log printed if the test panics.
pub struct OciRegistry {
    child: Child,
    dir: Option<TempDir>,
    addr: SocketAddr,
}

impl OciRegistry {
    /// Starts the registry and waits until `/v2/` answers.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("imds-mesh-registry-").tempdir().unwrap_or_else(|e| panic!("{e}"));
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap_or_else(|e| panic!("{e}"));
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap_or_else(|e| panic!("{e}"));
        let log_err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("start docker-registry (`just setup` installs it): {e}"));
        let mut registry = Self { child, dir: Some(dir), addr };
        let log = registry.dir.as_ref().map(|d| d.path().join("registry.log")).unwrap_or_default();
        crate::process::until_answering(&mut registry.child, "docker-registry", &log, addr, "/v2/").await;
        registry
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        crate::process::stop(&mut self.child, &mut self.dir, "registry.log", "docker-registry");
    }
}
