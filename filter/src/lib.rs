//! The imds-mesh filter: the AWS instance metadata service (IMDS), answered
//! inside the Envoy sidecar by a proxy-wasm HTTP filter.
//!
//! Everything but [`shell`] is host-free: no proxy-wasm types, time passed
//! in, shared data behind [`cache::SharedStore`], so the same code runs in
//! native tests, under `wasm-bindgen-test`, and in Envoy.
//!
//! Layout:
//! - [`config`]: `pluginConfig`, enablement from the pod's label and annotation.
//! - [`json`]: the strict JSON reader and string writer the filter needs.
//! - [`hex`]: hex digits for tokens, the broker authority and escapes.
//! - [`arn`]: IAM role ARN parsing.
//! - [`route`]: strict IMDS path parsing.
//! - [`token`]: stateless IMDSv2 session tokens.
//! - [`credentials`]: the credential document, validated once per fetch.
//! - [`policy`]: serve / refresh / back-off decisions as pure functions.
//! - [`cache`]: the per-role cache in shared data, with the fetch lease.
//! - [`broker`]: the filter's side of the broker contract.
//! - [`imds`]: the request-level behaviour tying the above together.
//! - [`metrics`]: per-worker counters flushed to Envoy stats.
//! - `shell` (wasm32-wasip1 only): the proxy-wasm contexts.
#![cfg_attr(not(target_os = "wasi"), forbid(unsafe_code))]

pub mod arn;
pub mod broker;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod hex;
pub mod imds;
pub mod json;
pub mod metrics;
pub mod policy;
pub mod route;
pub mod token;

#[cfg(target_os = "wasi")]
mod shell;
