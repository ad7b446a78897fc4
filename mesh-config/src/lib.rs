//! imds-mesh's deployment, generated from typed Rust so that it cannot drift
//! from what the filter and the broker accept.
//!
//! Layout:
//! - [`envoy`]: Envoy bootstraps shaped as Istio shapes the app's and the
//!   broker's sidecars, for running both on one machine (tests, `just demo`).
#![forbid(unsafe_code)]

pub mod envoy;
