//! IAM role ARNs, as the pod annotation names them.

use std::fmt;

/// Partitions IAM issues role ARNs in. An ARN in any other partition is a typo
/// or an attack, never a role STS will accept.
const PARTITIONS: &[&str] =
    &["aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b", "aws-iso-e", "aws-iso-f", "aws-eusc"];

/// IAM limits a role name to 64 characters and an ARN to 2048.
const MAX_ROLE_NAME: usize = 64;
const MAX_ARN: usize = 2048;

/// A syntactically valid IAM role ARN:
/// `arn:<partition>:iam::<12-digit account>:role/<optional/path/><name>`.
#[derive(Clone, PartialEq, Eq)]
pub struct RoleArn {
    arn: String,
    name_start: usize,
}

/// Why a string is not a role ARN; the message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidArn(pub &'static str);

impl fmt::Display for InvalidArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not an IAM role ARN: {}", self.0)
    }
}

impl RoleArn {
    /// Parses `arn:<partition>:iam::<account>:role/<path/><name>`.
    pub fn parse(text: &str) -> Result<Self, InvalidArn> {
        if text.len() > MAX_ARN {
            return Err(InvalidArn("longer than 2048 characters"));
        }
        let mut parts = text.splitn(6, ':');
        let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(resource)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidArn("expected arn:<partition>:iam::<account>:role/<name>"));
        };
        if !PARTITIONS.contains(&partition) {
            return Err(InvalidArn("unknown partition"));
        }
        if service != "iam" {
            return Err(InvalidArn("service must be iam"));
        }
        if !region.is_empty() {
            return Err(InvalidArn("IAM ARNs have an empty region"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidArn("account must be 12 digits"));
        }
        let Some(path_and_name) = resource.strip_prefix("role/") else {
            return Err(InvalidArn("resource must start with role/"));
        };
        let (path, name) = match path_and_name.rsplit_once('/') {
            Some((path, name)) => (Some(path), name),
            None => (None, path_and_name),
        };
        if name.is_empty() || name.len() > MAX_ROLE_NAME || !name.bytes().all(is_name_byte) {
            return Err(InvalidArn("role name must be 1-64 of [A-Za-z0-9+=,.@_-]"));
        }
        // IAM paths are `/` or `/segment/.../`; ours omit the leading slash
        // because `role/` already supplies it, so every segment before the
        // name is non-empty.
        if path
            .is_some_and(|path| path.split('/').any(|segment| segment.is_empty() || !segment.bytes().all(is_path_byte)))
        {
            return Err(InvalidArn("invalid role path"));
        }
        Ok(Self { name_start: text.len() - name.len(), arn: text.to_owned() })
    }

    /// The full ARN.
    pub fn as_str(&self) -> &str {
        &self.arn
    }

    /// The role name, the last path segment: what IMDS lists under
    /// `security-credentials/`.
    pub fn name(&self) -> &str {
        self.arn.get(self.name_start..).unwrap_or_default()
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b)
}

fn is_path_byte(b: u8) -> bool {
    // IAM allows any printable ASCII except `/` inside a path segment.
    (0x21..0x7f).contains(&b) && b != b'/'
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn role_name_is_the_last_path_segment() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/team/app/my-example-role").unwrap();
        assert_eq!(arn.name(), "my-example-role");
        let arn = RoleArn::parse("arn:aws-cn:iam::123456789012:role/r+=,.@_-1").unwrap();
        assert_eq!(arn.name(), "r+=,.@_-1");
    }

    #[test]
    fn malformed_arns_are_rejected_with_the_reason() {
        for (text, why) in [
            ("", "expected arn:<partition>:iam::<account>:role/<name>"),
            ("arn:aws:iam::123456789012", "expected arn:<partition>:iam::<account>:role/<name>"),
            ("arn:azure:iam::123456789012:role/x", "unknown partition"),
            ("arn:aws:s3::123456789012:role/x", "service must be iam"),
            ("arn:aws:iam:us-east-1:123456789012:role/x", "IAM ARNs have an empty region"),
            ("arn:aws:iam::12345678901:role/x", "account must be 12 digits"),
            ("arn:aws:iam::12345678901a:role/x", "account must be 12 digits"),
            ("arn:aws:iam::123456789012:user/x", "resource must start with role/"),
            ("arn:aws:iam::123456789012:role/", "role name must be 1-64 of [A-Za-z0-9+=,.@_-]"),
            ("arn:aws:iam::123456789012:role/a b", "role name must be 1-64 of [A-Za-z0-9+=,.@_-]"),
            ("arn:aws:iam::123456789012:role/a:b", "role name must be 1-64 of [A-Za-z0-9+=,.@_-]"),
            ("arn:aws:iam::123456789012:role/a//b", "invalid role path"),
            ("arn:aws:iam::123456789012:role//b", "invalid role path"),
            ("arn:AWS:iam::123456789012:role/x", "unknown partition"),
            ("arn:aws:iam::123456789012:role/x\n", "role name must be 1-64 of [A-Za-z0-9+=,.@_-]"),
            ("arn:aws:iam::123456789012:role/p q/b", "invalid role path"),
            ("arn:aws:iam::123456789012:role/p\u{e9}/b", "invalid role path"),
        ] {
            assert_eq!(RoleArn::parse(text), Err(InvalidArn(why)), "{text:?}");
        }
        let long = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(65));
        assert!(RoleArn::parse(&long).is_err());
        let path = "p/".repeat(1000);
        let at_limit = format!("arn:aws:iam::123456789012:role/{path}{}", "x".repeat(2048 - 31 - path.len()));
        assert_eq!(at_limit.len(), 2048);
        assert!(RoleArn::parse(&at_limit).is_ok());
        assert_eq!(RoleArn::parse(&format!("{at_limit}x")), Err(InvalidArn("longer than 2048 characters")));
    }

    #[test]
    fn every_partition_iam_uses_is_accepted() {
        for partition in PARTITIONS {
            let arn = format!("arn:{partition}:iam::123456789012:role/x");
            assert!(RoleArn::parse(&arn).is_ok(), "{arn}");
        }
        assert!(RoleArn::parse("arn:aws-iso-f:iam::123456789012:role/p!~/x").is_ok());
    }
}
