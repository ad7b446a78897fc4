//! What the filter decodes from its host rather than from a request: the
//! pod's node metadata (`Config::enablement` on the label, annotation and
//! name bytes Istio puts there) and the shared data other workers wrote
//! (`Credential::decode`, the fetch state, through `CredentialCache`).
//!
//! Invariants: a pod is served only with the label exactly `True` and the
//! role exactly its annotation (or the config's role, which stands for
//! both), under its exact name (or the config's); a shared credential is
//! served only if its encoded expiry leaves the minimum served lifetime,
//! and then byte for byte as stored; `decode` inverts `encode`.
#![no_main]

use imds_filter::arn::RoleArn;
use imds_filter::cache::{CREDENTIAL_KEY_PREFIX, CredentialCache, Lookup, STATE_KEY_PREFIX, SharedStore};
use imds_filter::config::{Config, ENABLED_VALUE, Enablement, PodMetadata};
use imds_filter::credentials::Credential;
use imds_filter::policy::MIN_SERVED_LIFETIME_MS;
use imds_mesh_fuzz::{MemoryStore, NOW_MS, ROLE_ARN};
use libfuzzer_sys::fuzz_target;

/// Six lines: options (`config-role`, `config-other-role`, `config-pod`,
/// `config-other-pod`, `later=<ms>`, `wait=<ms>`), then the label, the
/// annotation, the pod name, the shared fetch state and the shared
/// credential (the rest, newlines included). `~` alone means absent.
struct Input {
    options: Vec<String>,
    label: Option<Vec<u8>>,
    annotation: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    shared_state: Option<Vec<u8>>,
    shared_credential: Option<Vec<u8>>,
}

impl Input {
    fn parse(data: &[u8]) -> Self {
        let mut lines = data.splitn(6, |&b| b == b'\n');
        let options = String::from_utf8_lossy(lines.next().unwrap_or_default()).split(' ').map(str::to_owned).collect();
        let mut field = || lines.next().filter(|l| *l != b"~").map(<[u8]>::to_vec);
        let (label, annotation, name, shared_state, shared_credential) = (field(), field(), field(), field(), field());
        Self { options, label, annotation, name, shared_state, shared_credential }
    }

    fn has(&self, word: &str) -> bool {
        self.options.iter().any(|w| w == word)
    }

    fn number(&self, prefix: &str) -> u64 {
        self.options.iter().find_map(|w| w.strip_prefix(prefix)?.parse::<u32>().ok()).map_or(0, u64::from)
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    let (label, annotation) = (input.label.clone(), input.annotation.clone());
    let pod =
        PodMetadata { enable_label: label.clone(), role_annotation: annotation.clone(), name: input.name.clone() };
    let config = Config {
        role_arn: if input.has("config-role") {
            Some(ROLE_ARN.to_owned())
        } else if input.has("config-other-role") {
            Some("arn:aws:iam::210987654321:role/x".to_owned())
        } else {
            None
        },
        pod_name: if input.has("config-pod") {
            Some("web-0".to_owned())
        } else if input.has("config-other-pod") {
            Some("db-1".to_owned())
        } else {
            None
        },
        ..Config::default()
    };
    match config.enablement(&pod) {
        Enablement::Enabled { role, pod: name } => {
            match &config.role_arn {
                Some(arn) => assert_eq!(role.as_str(), arn),
                None => {
                    assert_eq!(label.as_deref(), Some(ENABLED_VALUE.as_bytes()), "enabled by label {label:?}");
                    assert_eq!(Some(role.as_str().as_bytes()), annotation.as_deref(), "role not the annotation");
                }
            }
            match &config.pod_name {
                Some(own) => assert_eq!(&name, own),
                None => {
                    assert_eq!(Some(name.as_bytes()), input.name.as_deref());
                    assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)));
                }
            }
        }
        Enablement::Disabled { reason } => {
            assert!(!reason.to_string().is_empty());
            // The exact label, a valid annotation and name always enable.
            let valid_name = input.name.as_deref().is_some_and(|n| {
                !n.is_empty()
                    && n.len() <= 253
                    && n.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(b))
            });
            let enabling = label.as_deref() == Some(ENABLED_VALUE.as_bytes())
                && annotation
                    .as_deref()
                    .is_some_and(|a| std::str::from_utf8(a).is_ok_and(|a| RoleArn::parse(a).is_ok()));
            if config.role_arn.is_none() && enabling && (valid_name || config.pod_name.is_some()) {
                panic!("a pod with the label, a valid role and name was disabled: {reason}");
            }
        }
    }

    // Shared data as a worker finds it, whatever was left there.
    let store = MemoryStore::default();
    let role = RoleArn::parse(ROLE_ARN).unwrap();
    if let Some(bytes) = &input.shared_state {
        store.set(&format!("{STATE_KEY_PREFIX}{role}"), bytes, None);
    }
    if let Some(bytes) = &input.shared_credential {
        store.set(&format!("{CREDENTIAL_KEY_PREFIX}{role}"), bytes, None);
        let decoded = Credential::decode(bytes);
        assert_eq!(decoded.is_some(), bytes.len() >= 8);
        if let Some(credential) = decoded {
            assert_eq!(credential.encode(), *bytes);
        }
    }
    let mut cache = CredentialCache::new(&role, &store);
    let now = NOW_MS + input.number("later=");
    let served = match cache.lookup(now, input.number("wait="), &store) {
        Lookup::Hit(body) => Some(body.to_vec()),
        Lookup::Wait | Lookup::Fail(_) => None,
    };
    if let Some(body) = served {
        let stored = input.shared_credential.as_deref().expect("served with nothing stored");
        let expiry = u64::from_le_bytes(stored[..8].try_into().unwrap());
        assert!(now.saturating_add(MIN_SERVED_LIFETIME_MS) < expiry, "served at {now} a credential expiring {expiry}");
        assert_eq!(body, stored[8..]);
    }
    let _ = cache.begin_fetch(now, 2000, &store);
});
