//! The imds-mesh token broker: the cluster service the filter calls. It
//! proves who is calling (mesh mTLS identity), checks that the caller's pod
//! may use the requested role, mints a Kubernetes service-account token for
//! it, exchanges that at AWS STS, and caches the result per
//! (role, namespace, service account).
//!
//! So far: the rules (identity, authorization, STS parameters) and the
//! credential cache. The service binary (HTTP server, Kubernetes and STS
//! clients) comes next.
//!
//! Layout:
//! - [`identity`]: who is calling: SPIFFE IDs and `X-Forwarded-Client-Cert`.
//! - [`authz`]: may this caller use this role: the pod and namespace rules.
//! - [`session`]: STS request parameters we validate ourselves (role ARN,
//!   duration) and the `RoleSessionName` CloudTrail shows.
//! - [`cache`]: credentials per (role, namespace, service account): single
//!   flight, refresh ahead, backoff, bounded upstream load and memory.
#![forbid(unsafe_code)]

pub mod authz;
pub mod cache;
pub mod identity;
pub mod session;
