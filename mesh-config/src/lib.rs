//! imds-mesh's deployment, generated from typed Rust so that it cannot drift
//! from what the filter and the broker accept.
//!
//! Layout:
//! - [`render`]: the objects an operator applies (Kubernetes and Istio),
//!   from [`render::Options`], and their YAML.
//! - [`istio`]: typed Istio resources (WasmPlugin, ServiceEntry,
//!   VirtualService, DestinationRule, PeerAuthentication,
//!   AuthorizationPolicy).
//! - [`metadata`]: the metadata service as the mesh sees it (service
//!   names, authorities, the fail-closed answer, the guard), shared by the
//!   rendering and the bootstraps.
//! - [`version`]: the Istio releases a rendering targets and what each accepts.
//! - [`oci`]: the filter as a reproducible OCI image WasmPlugin pulls.
//! - [`envoy`]: Envoy bootstraps shaped as Istio shapes the app's and the
//!   broker's sidecars, for running both on one machine (tests, `just demo`).
#![forbid(unsafe_code)]

pub mod envoy;
pub mod istio;
pub mod metadata;
pub mod oci;
pub mod render;
pub mod version;
