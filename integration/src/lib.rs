//! The imds-mesh test harness: builders that start real processes on
//! loopback (Envoy from the project's venv with the built filter, scripted
//! brokers and upstreams) and clients that talk to them, so that a test reads
//! as a story:
//!
//! ```no_run
//! # async fn story() {
//! use integration::{Envoy, Pod, ScriptedBroker, Scripted, Upstream};
//! let broker = ScriptedBroker::start(|n| Scripted::credentials_for(integration::HOUR, n)).await;
//! let upstream = Upstream::start().await;
//! let envoy = Envoy::sidecar().pod(Pod::enabled()).broker(&broker).upstream(&upstream).start().await;
//! let reply = envoy.imds(integration::Req::get("/latest/meta-data/iam/security-credentials/")).await;
//! assert_eq!(reply.body_text(), "app");
//! # }
//! ```
//!
//! Every process is torn down on drop; when a test fails, its logs are
//! printed.
//!
//! Layout:
//! - [`paths`]: where the venv, the Envoy binary and the built filter live.
//! - [`envoy`]: the sidecar bootstrap and the running Envoy.
//! - [`broker`]: a scripted broker speaking the v1 contract.
//! - [`clients`]: real AWS SDK clients (Python, node, Go, Java) as child processes.
//! - [`upstream`]: a plain HTTP upstream that records what reaches it.
//! - [`sts`]: AWS STS from PyPI `moto`, in server mode.
//! - [`sts_oidc`]: the web identity token checks AWS STS makes, in front of moto.
//! - [`scripted_sts`]: an STS that throttles, denies or hangs on cue.
//! - [`kube_cluster`]: a real Kubernetes API server (etcd, kube-apiserver) on loopback.
//! - [`http`]: a raw HTTP/1.1 client, able to send what real clients would not.
//! - [`istio`]: Istio's own translation of the rendered objects, run as a sidecar's bootstrap.
//! - [`netns`]: network namespaces, for tests that need the metadata address itself.
//! - [`pki`]: a mesh CA and workload certificates (rcgen), and TLS clients.
//! - [`registry`]: an OCI registry (Debian `docker-registry`) for the filter's image.
//! - [`real_broker`]: the real token broker, in-process, in any identity mode.
//! - [`logs`]: an in-memory sink for the broker's own logging setup in tests.
//! - [`process`]: readiness and teardown of child processes.
//! - [`wait`]: polling for eventual states without timing assumptions.
//! - [`stack`]: the whole local stack, as `just demo` and `just up` run it.
//! - [`bench`]: what the `bench-*` binaries share: options, `wrk` runs, rounds and their figures.

pub mod bench;
pub mod broker;
pub mod clients;
pub mod envoy;
pub mod http;
pub mod istio;
pub mod kube_cluster;
pub mod logs;
pub mod netns;
pub mod paths;
pub mod pki;
pub mod process;
pub mod real_broker;
pub mod registry;
pub mod scripted_sts;
pub mod stack;
pub mod sts;
pub mod sts_oidc;
pub mod upstream;
pub mod wait;

pub use broker::{BrokerCall, Scripted, ScriptedBroker};
pub use envoy::{Envoy, EnvoyBuilder, Pod};
pub use http::{Reply, Req};
pub use real_broker::RealBroker;
pub use scripted_sts::ScriptedSts;
pub use sts::Sts;
pub use upstream::Upstream;

use std::time::Duration;

/// One hour, the default STS session length.
pub const HOUR: Duration = Duration::from_secs(3600);
/// The role every harness pod uses unless a test says otherwise.
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/app";
/// The role name IMDS lists for [`ROLE_ARN`].
pub const ROLE_NAME: &str = "app";
/// Where credentials live for [`ROLE_NAME`].
pub const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/app";
