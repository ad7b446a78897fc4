//! Graceful shutdown, shared by the broker's listeners: one trigger stops
//! every server, so the service and admin listeners cannot disagree about
//! whether the broker is stopping. The delays that keep a terminating broker
//! from dropping requests live beside it; `main.rs` makes them flag
//! defaults, and the rendered pod's termination grace period covers both.

use std::future::Future;
use std::time::Duration;

/// How long a broker told to stop (SIGTERM) keeps serving, not ready,
/// before it stops accepting connections: the time the endpoints
/// controller, kube-proxy and the callers' sidecars take to stop sending it
/// requests once it is terminating. Without it, requests sent in that
/// window meet a closed port.
pub const DEFAULT_SHUTDOWN_DELAY: Duration = Duration::from_secs(5);

/// How long the requests in flight when a broker stops accepting may take
/// to finish: above [`crate::app::DEFAULT_CREDENTIALS_DEADLINE`], the
/// longest a credential request waits, so none is cut off.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// One shutdown for the several servers of a broker (service and admin
/// listeners): every [`Shutdown::signal`] completes once [`Shutdown::trigger`]
/// is called or the `Shutdown` is dropped.
#[derive(Debug)]
pub struct Shutdown(tokio::sync::watch::Sender<()>);

impl Default for Shutdown {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(()))
    }
}

impl Shutdown {
    /// A future for [`crate::server::run`], [`crate::server::run_mtls`] or
    /// [`crate::server::run_admin`].
    pub fn signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut changed = self.0.subscribe();
        async move {
            let _ = changed.changed().await;
        }
    }

    /// Starts the graceful shutdown of every server given a signal.
    pub fn trigger(&self) {
        self.0.send_replace(());
    }
}
