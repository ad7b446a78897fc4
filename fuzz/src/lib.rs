//! Helpers shared by the fuzz targets in `fuzz_targets/`: a shared-data
//! store (the filter's own, through its `test-support` feature), request
//! headers, a clock and a broker answer.
//!
//! Layout:
//! - [`MemoryStore`]: proxy-wasm shared data, global versions, CAS.
//! - [`Headers`]: request headers in arrival order.
//! - [`At`]: a stopped clock.
//! - [`broker_body`]: a contract credential document.
//! - [`is_printable_path_byte`]: what the route model allows in a path.
#![forbid(unsafe_code)]

use imds_filter::imds::{Clock, RequestHeaders};

/// The role every filter target serves, and its name.
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/team/app";
/// [`ROLE_ARN`]'s name: the one credential route that may answer 200.
pub const ROLE_NAME: &str = "app";
/// 2027-01-15T10:00:00Z, the time the filter targets run at.
pub const NOW_MS: u64 = 1_800_007_200_000;

/// Shared data as Envoy keeps it: the filter's own test store.
pub use imds_filter::cache::memory::MemoryStore;

/// Headers in arrival order; a name may repeat.
#[derive(Debug, Default, Clone)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl RequestHeaders for Headers {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    fn repeated(&self, name: &str) -> bool {
        self.0.iter().filter(|(n, _)| n == name).nth(1).is_some()
    }
}

/// A clock stopped at one instant.
pub struct At(pub u64);

impl Clock for At {
    fn coarse_ms(&self) -> u64 {
        self.0
    }
    fn now_ms(&self) -> u64 {
        self.0
    }
}

/// A credential document as the broker sends it, expiring at `expiration`
/// (RFC 3339).
pub fn broker_body(expiration: &str) -> Vec<u8> {
    serde_json::json!({
        "Code": "Success",
        "LastUpdated": "2027-01-15T09:00:00Z",
        "Type": "AWS-HMAC",
        "AccessKeyId": "ASIAFUZZFUZZFUZZFUZZ",
        "SecretAccessKey": "fuzz/secret/key/fuzz/secret/key/fuzz/sec",
        "Token": "FwoGZXIvYXdzEFUZZ//////////token",
        "Expiration": expiration,
    })
    .to_string()
    .into_bytes()
}

/// Bytes the route model lets through unrefused: printable ASCII but not
/// `?`, `#`, `%` or `\` (real IMDS paths need none of them).
pub fn is_printable_path_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && !b"?#%\\".contains(&b)
}
