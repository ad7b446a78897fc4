//! Every way a credential request can fail, each mapped to one HTTP status,
//! one contract `Code` and one metrics label (the v1 contract in
//! `token-broker/README.md`).

use std::time::Duration;

use serde::Serialize;

/// A failed `GET /v1/credentials`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// Malformed role ARN, pod name or parameters: 400 InvalidRequest.
    #[error("{0}")]
    InvalidRequest(String),
    /// No verifiable mesh identity: 401 Unauthenticated. `label` names why.
    #[error("no verifiable mesh identity ({label})")]
    Unauthenticated { label: &'static str },
    /// The pod may not use the role: 403 AccessDenied. `label` is the rule.
    #[error("{reason}")]
    AccessDenied { label: &'static str, reason: String },
    /// The named pod is not known (yet): 404 PodNotFound.
    #[error("pod {namespace}/{name} not found")]
    PodNotFound { namespace: String, name: String },
    /// The named pod has no IP address yet, so no caller can be shown to be
    /// it (its status, or the watch, has not caught up): 404 PodNotFound,
    /// which the filter retries soon.
    #[error("pod {namespace}/{name} has no IP address yet")]
    PodHasNoAddress { namespace: String, name: String },
    /// STS or the broker is throttling: 429 Throttled with `Retry-After`.
    #[error("throttled; retry after {} s", retry_after.as_secs())]
    Throttled { retry_after: Duration },
    /// STS refused or failed: 502 StsError; the message names STS's code.
    #[error("STS error {code}: {message}")]
    Sts { code: String, message: String },
    /// Not ready, overloaded, or a dependency is down: 503 Unavailable.
    #[error("{0}")]
    Unavailable(String),
}

/// The JSON body of every failure: `{"Code": "...", "Message": "..."}`.
#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
}

/// Longest message sent to a caller; causes can quote caller input.
const MAX_MESSAGE: usize = 512;

impl BrokerError {
    /// The HTTP status the contract assigns.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidRequest(_) => 400,
            Self::Unauthenticated { .. } => 401,
            Self::AccessDenied { .. } => 403,
            Self::PodNotFound { .. } | Self::PodHasNoAddress { .. } => 404,
            Self::Throttled { .. } => 429,
            Self::Sts { .. } => 502,
            Self::Unavailable(_) => 503,
        }
    }

    /// The contract's `Code`, also the outcome label of the request metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "InvalidRequest",
            Self::Unauthenticated { .. } => "Unauthenticated",
            Self::AccessDenied { .. } => "AccessDenied",
            Self::PodNotFound { .. } | Self::PodHasNoAddress { .. } => "PodNotFound",
            Self::Throttled { .. } => "Throttled",
            Self::Sts { .. } => "StsError",
            Self::Unavailable(_) => "Unavailable",
        }
    }

    /// `Retry-After` in whole seconds, where the contract sends one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Throttled { retry_after } => Some(retry_after.as_secs().max(1)),
            _ => None,
        }
    }

    /// The body sent to the caller, its message bounded.
    pub fn body(&self) -> ErrorBody {
        let mut message = self.to_string();
        if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE) {
            message.truncate(cut);
        }
        ErrorBody { code: self.code(), message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<BrokerError> {
        vec![
            BrokerError::InvalidRequest("role_arn is not an IAM role ARN".into()),
            BrokerError::Unauthenticated { label: "not_own_sidecar" },
            BrokerError::AccessDenied { label: "role_mismatch", reason: "pod annotates another role".into() },
            BrokerError::PodNotFound { namespace: "default".into(), name: "web-0".into() },
            BrokerError::PodHasNoAddress { namespace: "default".into(), name: "web-0".into() },
            BrokerError::Throttled { retry_after: Duration::from_millis(200) },
            BrokerError::Sts { code: "InvalidIdentityToken".into(), message: "token expired".into() },
            BrokerError::Unavailable("pod cache not synced".into()),
        ]
    }

    #[test]
    fn every_error_maps_to_the_contract_status_and_code() {
        let mapped: Vec<(u16, &str)> = all().iter().map(|e| (e.status(), e.code())).collect();
        assert_eq!(
            mapped,
            [
                (400, "InvalidRequest"),
                (401, "Unauthenticated"),
                (403, "AccessDenied"),
                (404, "PodNotFound"),
                (404, "PodNotFound"),
                (429, "Throttled"),
                (502, "StsError"),
                (503, "Unavailable"),
            ]
        );
    }

    #[test]
    fn throttling_tells_the_filter_when_to_come_back() {
        assert_eq!(all()[5].retry_after(), Some(1), "sub-second rounds up to 1 s");
        assert_eq!(BrokerError::Throttled { retry_after: Duration::from_secs(7) }.retry_after(), Some(7));
        assert!(all().iter().filter(|e| e.status() != 429).all(|e| e.retry_after().is_none()));
    }

    #[test]
    fn the_body_is_the_contract_json_and_bounded() {
        let body = serde_json::to_value(all()[6].body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"Code": "StsError", "Message": "STS error InvalidIdentityToken: token expired"})
        );
        let long = BrokerError::InvalidRequest("x".repeat(10_000)).body();
        assert_eq!(long.message.len(), MAX_MESSAGE);
    }
}
