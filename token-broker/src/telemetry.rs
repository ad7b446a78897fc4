//! The broker's log filter: the operator's directives, under hard caps on
//! the dependencies' targets that can log secrets. The binary installs it
//! (`src/main.rs`) and the log-secrecy test installs the same one, at the
//! same default, so a cap removed here fails that test.

use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{ParseError, filter_fn};
use tracing_subscriber::layer::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The `--log` default.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// kube-client's module that logs whole response bodies: at `warn` one it
/// cannot decode (`Client::request`), at `debug` and `trace` error and
/// `Status` bodies. A TokenRequest's body holds the minted JWT, so nothing
/// from this target is ever logged. Its submodules (`builder`, `tls`) log
/// no bodies and stay under the operator's filter.
pub const KUBE_CLIENT_BODY_TARGET: &str = "kube_client::client";

/// `directives` (tracing `EnvFilter` syntax), capped whatever they say:
/// - the AWS SDK's crates (`aws_smithy*`, `aws_sdk*`) at `debug`: at
///   `trace` they describe each request, whose body holds the web identity
///   token;
/// - [`KUBE_CLIENT_BODY_TARGET`] off at every level.
///
/// The audit trail ([`crate::audit::TARGET`]) stays at `info` unless a
/// directive names it: a quieter `--log` must not silence it by accident.
pub fn log_filter<S>(directives: &str) -> Result<impl Layer<S> + Send + Sync + 'static, ParseError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let filter = EnvFilter::try_new(with_audit(directives))?;
    Ok(filter.and_then(filter_fn(allowed_whatever_the_directives)))
}

/// `directives` with `<audit target>=info` added unless one of them names
/// the audit target (a directive is `target[span{field}]=level`).
fn with_audit(directives: &str) -> String {
    let names_audit = directives.split(',').any(|directive| directive.trim().starts_with(crate::audit::TARGET));
    if names_audit { directives.to_owned() } else { format!("{directives},{}=info", crate::audit::TARGET) }
}

/// The caps of [`log_filter`], as a pure check of an event's metadata.
pub fn allowed_whatever_the_directives(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    if target == KUBE_CLIENT_BODY_TARGET {
        return false;
    }
    let sdk = target.starts_with("aws_smithy") || target.starts_with("aws_sdk");
    !sdk || *meta.level() <= Level::DEBUG
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::Event;
    use tracing_subscriber::layer::{Context, SubscriberExt};

    use super::*;

    /// Records the target of every event that passes the filter.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let meta = event.metadata();
            self.0.lock().unwrap().push(format!("{} {}", meta.level(), meta.target()));
        }
    }

    #[test]
    fn the_caps_hold_even_when_the_directives_ask_for_everything() {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(log_filter("trace").unwrap()).with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "kube_client::client", "a body it could not decode");
            tracing::error!(target: "kube_client::client::builder", "failed with status 500");
            tracing::trace!(target: "aws_smithy_runtime::client", "a request, body and all");
            tracing::debug!(target: "aws_smithy_runtime::client", "a request");
            tracing::trace!(target: "token_broker::cache", "the broker's own trace");
        });
        assert_eq!(
            *seen.0.lock().unwrap(),
            ["ERROR kube_client::client::builder", "DEBUG aws_smithy_runtime::client", "TRACE token_broker::cache"]
        );
    }

    #[test]
    fn the_default_is_info_and_bad_directives_are_refused() {
        assert_eq!(DEFAULT_LOG_FILTER, "info");
        assert!(log_filter::<tracing_subscriber::Registry>("token_broker=notalevel").is_err());
    }
}
