//! The parameters of STS `AssumeRoleWithWebIdentity` that we check ourselves.
//!
//! Real STS rejects a malformed role ARN, duration or session name; the STS
//! endpoint used in tests (moto) accepts anything. Checking here gives the
//! same answer in both places, before any token is minted, and lets the
//! broker answer `400 InvalidRequest` instead of a `502 StsError`.

use sha2::{Digest, Sha256};

/// Why a request's STS parameters are unusable; answered as HTTP 400
/// `InvalidRequest`. Messages are fixed text plus at most a number, so they
/// stay short whatever the request held, and never echo the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    /// The role ARN is not an IAM role ARN; the text names the broken part.
    #[error("role_arn is not an IAM role ARN: {0}")]
    RoleArn(&'static str),
    /// The session duration is outside what STS allows.
    #[error("duration {0} seconds is outside {MIN_DURATION_SECONDS}..={MAX_DURATION_SECONDS}")]
    Duration(u32),
}

impl InvalidRequest {
    /// A stable name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::RoleArn(_) => "invalid_role_arn",
            Self::Duration(_) => "invalid_duration",
        }
    }
}

/// Checks `arn:<partition>:iam::<12-digit account>:role/<optional/path/><name>`
/// with the filter's own parser, so the filter (which refuses a pod whose
/// annotation fails it) and the broker (which refuses such a request) cannot
/// disagree.
pub fn validate_role_arn(arn: &str) -> Result<(), InvalidRequest> {
    imds_filter::arn::RoleArn::parse(arn).map(drop).map_err(|e| InvalidRequest::RoleArn(e.0))
}

/// STS `DurationSeconds` bounds: at least 15 minutes, at most 12 hours (the
/// role's own `MaxSessionDuration` may be lower; STS enforces that).
pub const MIN_DURATION_SECONDS: u32 = 900;
pub const MAX_DURATION_SECONDS: u32 = 43_200;

/// Returns `seconds` if STS would accept it as `DurationSeconds`.
pub fn validate_duration(seconds: u32) -> Result<u32, InvalidRequest> {
    if (MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&seconds) {
        Ok(seconds)
    } else {
        Err(InvalidRequest::Duration(seconds))
    }
}

/// STS `RoleSessionName` length bounds.
pub const MIN_SESSION_NAME: usize = 2;
pub const MAX_SESSION_NAME: usize = 64;

/// Hex digits of the hash suffix on a shortened or cleaned session name.
const HASH_HEX: usize = 8;

/// The `RoleSessionName` CloudTrail shows for this identity, in
/// `assumed-role/<role>/<session name>`: `<namespace>.<service-account>`.
///
/// Why this form: it is the Kubernetes identity in the order of the token
/// subject `system:serviceaccount:<ns>:<sa>`, in the fewest characters, and it
/// is unambiguous because a namespace (a DNS label) cannot contain `.`, so the
/// first `.` splits it. A fixed product prefix is left out: the role already
/// says who assumed it, and every character spent on a prefix is one less of
/// the identity in the 64 STS allows.
///
/// When that form does not fit STS's rules (longer than 64, shorter than 2,
/// or a character outside `[\w+=,.@-]`, which no valid Kubernetes name has),
/// both parts are cut to share the room fairly, forbidden characters become
/// `_`, and `-` plus the first 8 hex digits of the SHA-256 of the subject
/// `system:serviceaccount:<namespace>:<service-account>` is appended. Two
/// identities that differ only after the cut therefore still get different
/// names, and an operator can recompute the suffix from the subject that the
/// `AssumeRoleWithWebIdentity` CloudTrail event records.
pub fn role_session_name(namespace: &str, service_account: &str) -> String {
    let plain = format!("{namespace}.{service_account}");
    let fits = (MIN_SESSION_NAME..=MAX_SESSION_NAME).contains(&plain.len())
        && namespace.bytes().all(|b| b != b'.' && is_session_byte(b))
        && service_account.bytes().all(is_session_byte);
    if fits {
        return plain;
    }

    // Room for both parts once the `.` and the `-<hash>` suffix are placed.
    let room = MAX_SESSION_NAME - 1 - 1 - HASH_HEX;
    let ns = clean(namespace, |c| c != '.');
    let sa = clean(service_account, |_| true);
    // Each part gets at least half the room; a short part leaves the rest to
    // the other.
    let ns_keep = ns.len().min(room.saturating_sub(sa.len()).max(room / 2));
    let sa_keep = sa.len().min(room - ns_keep);

    let digest = Sha256::digest(format!("system:serviceaccount:{namespace}:{service_account}"));
    let hex: String = digest.iter().flat_map(|b| [b >> 4, b & 0xf]).take(HASH_HEX).map(hex_digit).collect();
    format!("{}.{}-{hex}", &ns[..ns_keep], &sa[..sa_keep])
}

/// `[\w+=,.@-]` as STS reads it: ASCII word characters and those five.
fn is_session_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)
}

/// `text` with every character STS forbids (or `keep` refuses) replaced by
/// `_`. The result is ASCII, so it can be cut at any byte.
fn clean(text: &str, keep: impl Fn(char) -> bool) -> String {
    text.chars().map(|c| if c.is_ascii() && is_session_byte(c as u8) && keep(c) { c } else { '_' }).collect()
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// STS's `RoleSessionName` rule: `[\w+=,.@-]{2,64}`.
    fn assert_sts_valid(name: &str) {
        assert!((2..=64).contains(&name.len()), "{name:?} is {} bytes", name.len());
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b)), "{name:?}");
    }

    #[test]
    fn role_arns_are_checked_with_the_filters_rules() {
        // The rules themselves are tested in filter/src/arn.rs.
        assert_eq!(validate_role_arn("arn:aws:iam::123456789012:role/team/app"), Ok(()));
        assert_eq!(
            validate_role_arn("arn:aws:iam::123456789012:user/app"),
            Err(InvalidRequest::RoleArn("resource must start with role/"))
        );
    }

    #[test]
    fn invalid_request_messages_are_short_and_do_not_echo_the_input() {
        let hostile = format!("arn:aws:iam::123456789012:role/{}\nSECRET", "x".repeat(100_000));
        let error = validate_role_arn(&hostile).unwrap_err();
        let message = error.to_string();
        assert!(message.len() < 128 && !message.contains("SECRET") && !message.contains('\n'), "{message}");
        assert_eq!(error.label(), "invalid_role_arn");
        let message = validate_duration(u32::MAX).unwrap_err().to_string();
        assert_eq!(message, "duration 4294967295 seconds is outside 900..=43200");
    }

    #[test]
    fn durations_inside_sts_bounds_are_accepted() {
        for seconds in [900, 3600, 43_200] {
            assert_eq!(validate_duration(seconds), Ok(seconds));
        }
    }

    #[test]
    fn durations_outside_sts_bounds_are_rejected() {
        for seconds in [0, 1, 899, 43_201, u32::MAX] {
            let error = validate_duration(seconds).unwrap_err();
            assert_eq!(error, InvalidRequest::Duration(seconds));
            assert_eq!(error.label(), "invalid_duration");
        }
    }

    #[test]
    fn session_name_is_namespace_dot_service_account() {
        assert_eq!(role_session_name("team-a", "app"), "team-a.app");
        assert_eq!(role_session_name("default", "default"), "default.default");
        // Service account names may contain dots; the namespace cannot, so the
        // first dot still splits them.
        assert_eq!(role_session_name("team-a", "app.reader"), "team-a.app.reader");
    }

    #[test]
    fn session_name_of_exactly_64_is_kept_whole() {
        let ns = "n".repeat(31);
        let sa = "s".repeat(32);
        let name = role_session_name(&ns, &sa);
        assert_eq!(name, format!("{ns}.{sa}"));
        assert_eq!(name.len(), 64);
    }

    #[test]
    fn long_identities_get_hashed_session_names_within_64() {
        let ns = "n".repeat(32);
        let sa = "s".repeat(32);
        let name = role_session_name(&ns, &sa);
        assert_sts_valid(&name);
        assert_eq!(name.len(), 64);
        let (readable, hash) = name.rsplit_once('-').unwrap();
        assert_eq!(hash.len(), 8);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()), "{hash}");
        assert_eq!(readable, format!("{}.{}", "n".repeat(27), "s".repeat(27)));
    }

    #[test]
    fn hash_suffix_is_the_sha256_of_the_token_subject() {
        let ns = "n".repeat(40);
        let sa = "s".repeat(40);
        let name = role_session_name(&ns, &sa);
        let digest = Sha256::digest(format!("system:serviceaccount:{ns}:{sa}"));
        let expected: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert!(name.ends_with(&format!("-{}", &expected[..8])), "{name}");
    }

    #[test]
    fn long_identities_get_distinct_hashed_session_names() {
        // Kubernetes allows a 63-character namespace and 253-character
        // service account names; these differ only after character 64.
        let ns = "tenant-with-a-rather-long-namespace-name";
        let a = format!("{}-reader", "s".repeat(100));
        let b = format!("{}-writer", "s".repeat(100));
        let (name_a, name_b) = (role_session_name(ns, &a), role_session_name(ns, &b));
        assert_ne!(name_a, name_b);
        assert_sts_valid(&name_a);
        assert_sts_valid(&name_b);
        // ... and so do names that differ only in the namespace's tail.
        let ns_a = format!("{}a", "n".repeat(62));
        let ns_b = format!("{}b", "n".repeat(62));
        assert_ne!(role_session_name(&ns_a, "app"), role_session_name(&ns_b, "app"));
    }

    #[test]
    fn truncation_keeps_both_parts_readable() {
        // A long namespace leaves the short service account whole.
        let ns = format!("payments-{}", "x".repeat(54));
        let name = role_session_name(&ns, "ledger-writer");
        assert_sts_valid(&name);
        assert!(name.starts_with("payments-"), "{name}");
        assert!(name.contains(".ledger-writer-"), "{name}");
        // A long service account leaves the short namespace whole.
        let name = role_session_name("team-a", &format!("reporting-{}", "y".repeat(200)));
        assert_sts_valid(&name);
        assert!(name.starts_with("team-a.reporting-"), "{name}");
    }

    #[test]
    fn session_names_are_deterministic() {
        let sa = "s".repeat(100);
        assert_eq!(role_session_name("team-a", &sa), role_session_name("team-a", &sa));
        assert_eq!(role_session_name("team-a", "app"), role_session_name("team-a", "app"));
    }

    #[test]
    fn characters_sts_forbids_never_reach_the_session_name() {
        for (ns, sa) in [
            ("team a", "app"),
            ("team-a", "app/admin"),
            ("t\u{e9}am", "app"),
            ("team-a", "app:x\n"),
            ("ns", "\u{1F600}"),
            ("a.b", "c"),
        ] {
            let name = role_session_name(ns, sa);
            assert_sts_valid(&name);
            assert_eq!(name.len(), name.chars().count(), "{name:?} is not ASCII");
        }
    }

    #[test]
    fn cleaned_names_do_not_collide_with_names_that_were_already_valid() {
        // `team a` cleans to `team_a`; the hash suffix keeps it apart.
        assert_ne!(role_session_name("team a", "app"), role_session_name("team_a", "app"));
        // A dot in the namespace would make the split ambiguous; such input
        // is cleaned and hashed rather than passed through.
        assert_ne!(role_session_name("a.b", "c"), role_session_name("a", "b.c"));
        assert_eq!(role_session_name("a", "b.c"), "a.b.c");
    }

    #[test]
    fn too_short_identities_still_get_a_valid_name() {
        for (ns, sa) in [("", ""), ("", "a"), ("a", "")] {
            assert_sts_valid(&role_session_name(ns, sa));
        }
        assert_ne!(role_session_name("", ""), role_session_name("", "a"));
    }

    #[test]
    fn every_kubernetes_name_length_gives_a_valid_session_name() {
        // Namespaces are DNS labels (1-63), service accounts DNS subdomains
        // (1-253).
        for ns_len in [1, 2, 31, 32, 62, 63] {
            for sa_len in [1, 2, 31, 32, 33, 62, 63, 64, 253] {
                let name = role_session_name(&"n".repeat(ns_len), &"s".repeat(sa_len));
                assert_sts_valid(&name);
                assert!(name.starts_with('n') && name.contains(".s"), "{ns_len}/{sa_len}: {name}");
            }
        }
    }
}
