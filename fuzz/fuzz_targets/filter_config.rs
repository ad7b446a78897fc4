//! The filter's `pluginConfig` (`Config::from_json`) and the IMDS
//! authority and destination checks it drives.
//!
//! Invariants: an accepted config satisfies every documented bound
//! (timeouts, wait, host and pod-name alphabets, a role ARN that parses)
//! and survives a serialize/parse round trip unchanged; a refusal names one
//! of the config's fields (or the document, or an unknown field); an
//! authority is IMDS exactly when it is a metadata address (with or without
//! `:80`) or one of `extra_hosts` (ASCII case-insensitive).
#![no_main]

use imds_filter::arn::RoleArn;
use imds_filter::config::{self, Config, METADATA_ADDRESSES};
use libfuzzer_sys::fuzz_target;

/// `<authority>\n<pluginConfig JSON>`; without a newline, all JSON and an
/// empty authority.
struct Input<'a> {
    json: &'a [u8],
    authority: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Self {
        match data.iter().position(|&b| b == b'\n') {
            Some(at) => Self { authority: &data[..at], json: &data[at + 1..] },
            None => Self { authority: b"", json: data },
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let config = match Config::from_json(input.json) {
        Ok(config) => config,
        Err(e) => {
            let named =
                config::FIELDS.contains(&e.field) || [config::DOCUMENT, config::UNKNOWN_FIELD].contains(&e.field);
            assert!(named, "unnamed field {:?}", e.field);
            // The default config answers the authority questions below.
            Config::default()
        }
    };
    assert!(!config.broker_cluster.trim().is_empty());
    assert!(!config.broker_authority.trim().is_empty() && !config.broker_authority.contains(char::is_whitespace));
    assert!((100..=30_000).contains(&config.broker_timeout_ms));
    assert!(config.max_wait_ms <= 950);
    for host in &config.extra_hosts {
        assert!(!host.is_empty() && host.len() <= 255);
        assert!(host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)), "host {host:?}");
    }
    if let Some(arn) = &config.role_arn {
        assert!(RoleArn::parse(arn).is_ok(), "role_arn {arn:?}");
    }
    if let Some(pod) = &config.pod_name {
        assert!(!pod.is_empty() && pod.len() <= 253);
        assert!(pod.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)), "{pod:?}");
    }
    let json = serde_json::to_vec(&config).unwrap();
    assert_eq!(Config::from_json(&json), Ok(config.clone()), "round trip of {}", String::from_utf8_lossy(&json));

    let host = input.authority.strip_suffix(b":80").unwrap_or(input.authority);
    let metadata = METADATA_ADDRESSES.iter().any(|a| a.authority.as_bytes() == host);
    let extra = config.extra_hosts.iter().any(|h| h.as_bytes().eq_ignore_ascii_case(input.authority));
    assert_eq!(config.is_imds_authority(input.authority), metadata || extra);
    let destination = input
        .authority
        .strip_suffix(b":80")
        .is_some_and(|h| METADATA_ADDRESSES.iter().any(|a| a.authority.as_bytes() == h));
    assert_eq!(config::is_imds_destination(input.authority), destination);
});
