//! The imds-mesh token broker: the cluster service the filter calls. It
//! proves who is calling (mesh mTLS identity), checks that the caller's pod
//! may use the requested role, mints a Kubernetes service-account token for
//! it, exchanges that at AWS STS, and caches the result per
//! (role, namespace, service account).
//!
//! So far: the rules (identity, authorization, STS parameters), the
//! credential cache, the Kubernetes and STS clients, and the HTTP service
//! that wires them together (the `token-broker` binary, `src/main.rs`, adds
//! flags, logging and signals).
//!
//! Layout:
//! - [`identity`]: who is calling: SPIFFE IDs, `X-Forwarded-Client-Cert`, and
//!   the identity mode that says which source counts.
//! - [`peer`]: where the caller is: the connection's peer address, which
//!   must be the named pod's, and in `xfcc` mode the broker's own sidecar.
//! - [`authz`]: may this caller use this role: the pod and namespace rules.
//! - [`session`]: STS request parameters we validate ourselves (role ARN,
//!   duration) and the `RoleSessionName` CloudTrail shows.
//! - [`cache`]: credentials per (role, namespace, service account): single
//!   flight, refresh ahead, backoff, bounded upstream load and memory.
//! - [`error`]: every failure of a credential request, mapped to the contract's
//!   status and `Code`.
//! - [`kube`]: the Kubernetes calls: the pod and namespace watches (small
//!   facts, not whole objects; a bounded direct read on a pod miss),
//!   TokenRequest, denial Events (a budget per pod); every call under a
//!   deadline.
//! - [`sts`]: STS `AssumeRoleWithWebIdentity` (unsigned, rustls on ring), the
//!   [`Credentials`](sts::Credentials) it returns, and what its errors mean
//!   for the contract.
//! - [`app`]: one credential request, check by check: identity, peer,
//!   query, pod, authorization, the cache; readiness and drain.
//! - [`fetch`]: the cache's fetch: a TokenRequest bound to the pod, then STS,
//!   rendered once into the IMDS document.
//! - [`server`]: the HTTP service: `/v1/credentials` per the contract,
//!   `/healthz`, `/readyz`, `/metrics`, and the listeners.
//! - [`metrics`]: the Prometheus metrics and their fixed label vocabularies.
//! - [`shutdown`]: one graceful shutdown for every listener, and its delays.
//! - [`connections`]: each listener's HTTP/1.1 connections, capped in
//!   number, closed when they send no request head in time.
//! - [`tls`]: the `mtls` mode's listener: TLS with required client
//!   certificates, the caller from their SPIFFE URI SAN, certificate reload.
//! - [`telemetry`]: the log filter, with hard caps on the targets that can
//!   log tokens (the AWS SDK's, kube-client's body logs).
//! - [`audit`]: one structured event per credential issued and per caller
//!   refused, for a SIEM.
//! - [`prefetch`]: credentials fetched for a pod the watch sees appear,
//!   before it asks.
#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod authz;
pub mod cache;
pub mod connections;
pub mod error;
pub mod fetch;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod peer;
pub mod prefetch;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod sts;
pub mod telemetry;
pub mod tls;
