//! The imds-mesh token broker: the cluster service the filter calls. It
//! proves who is calling (mesh mTLS identity), checks that the caller's pod
//! may use the requested role, mints a Kubernetes service-account token for
//! it, exchanges that at AWS STS, and caches the result per
//! (role, namespace, service account).
//!
//! This crate is being built up from its pure parts; the service binary
//! (HTTP server, Kubernetes and STS clients) comes next.
//!
//! Layout:
//! - [`identity`]: who is calling: SPIFFE IDs and `X-Forwarded-Client-Cert`.
//! - [`authz`]: may this caller use this role: the pod and namespace rules.
//! - [`session`]: STS request parameters we validate ourselves (role ARN,
//!   duration) and the `RoleSessionName` CloudTrail shows.
#![forbid(unsafe_code)]

pub mod authz;
pub mod identity;
pub mod session;
