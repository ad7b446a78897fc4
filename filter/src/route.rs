//! Strict, total parsing of IMDS request paths.
//!
//! Every byte sequence maps to a route or to a 400 with a reason: no
//! normalisation is ever applied, so no spelling of a path can reach the
//! credential route except the one canonical spelling.

/// The longest path accepted. Real IMDS paths are under 100 bytes.
pub const MAX_PATH: usize = 1024;

/// What an IMDS path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/latest/api/token`: the IMDSv2 session token.
    Token,
    /// `/<dated version>/api/token`: real IMDS issues tokens only under
    /// `latest` and answers a PUT here 403.
    DatedToken,
    /// `/<version>/meta-data/iam/security-credentials[/]`: the role list.
    RoleList,
    /// `/<version>/meta-data/iam/security-credentials/<role>`.
    Credentials(&'a str),
    /// Any other well-formed path: IMDS answers 404.
    Other,
}

/// A path that is not a well-formed IMDS path; answered with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadPath(pub &'static str);

/// Parses a request path (`:path`, including any query) into a [`Route`].
pub fn route(path: &[u8]) -> Result<Route<'_>, BadPath> {
    if path.len() > MAX_PATH {
        return Err(BadPath("path too long"));
    }
    let Some(rest) = path.strip_prefix(b"/") else {
        return Err(BadPath("path must start with /"));
    };
    for &b in rest {
        match b {
            b'?' | b'#' => return Err(BadPath("query strings are not supported")),
            b'%' => return Err(BadPath("percent-encoded paths are not supported")),
            b'\\' => return Err(BadPath("backslash in path")),
            0x21..=0x7e => {}
            _ => return Err(BadPath("path must be printable ASCII")),
        }
    }
    // Only printable ASCII is left, so this cannot fail.
    let Ok(rest) = std::str::from_utf8(rest) else {
        return Err(BadPath("path must be printable ASCII"));
    };
    let (rest, trailing_slash) = match rest.strip_suffix('/') {
        Some(stripped) => (stripped, true),
        None => (rest, false),
    };
    if rest.is_empty() {
        return Ok(Route::Other);
    }
    // One pass over the segments (this runs on every request): keep the
    // version and the five after it, note any empty or dot segment.
    let mut parts: [Option<&str>; 6] = [None; 6];
    let (mut empty, mut dot) = (false, false);
    for (i, segment) in rest.split('/').enumerate() {
        empty |= segment.is_empty();
        dot |= segment == "." || segment == "..";
        if let Some(part) = parts.get_mut(i) {
            *part = Some(segment);
        }
    }
    if empty {
        return Err(BadPath("empty path segment"));
    }
    if dot {
        return Err(BadPath("dot segment in path"));
    }
    let [Some(version), tail @ ..] = parts else {
        return Ok(Route::Other);
    };
    if !is_api_version(version.as_bytes()) {
        return Ok(Route::Other);
    }
    Ok(match tail {
        [Some("api"), Some("token"), None, _, _] if !trailing_slash && version == "latest" => Route::Token,
        [Some("api"), Some("token"), None, _, _] if !trailing_slash => Route::DatedToken,
        [Some("meta-data"), Some("iam"), Some("security-credentials"), None, _] => Route::RoleList,
        [Some("meta-data"), Some("iam"), Some("security-credentials"), Some(role), None] if !trailing_slash => {
            Route::Credentials(role)
        }
        _ => Route::Other,
    })
}

/// `latest` or a dated version such as `2016-09-02`.
fn is_api_version(b: &[u8]) -> bool {
    if b == b"latest" {
        return true;
    }
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn credential_paths_route_for_any_api_version() {
        for version in ["latest", "2016-09-02", "2009-04-04"] {
            let list = format!("/{version}/meta-data/iam/security-credentials");
            assert_eq!(route(list.as_bytes()), Ok(Route::RoleList));
            assert_eq!(route(format!("{list}/").as_bytes()), Ok(Route::RoleList));
            assert_eq!(route(format!("{list}/my-role").as_bytes()), Ok(Route::Credentials("my-role")));
        }
    }

    #[test]
    fn only_latest_issues_tokens() {
        assert_eq!(route(b"/latest/api/token"), Ok(Route::Token));
        for version in ["2016-09-02", "2021-03-23"] {
            assert_eq!(route(format!("/{version}/api/token").as_bytes()), Ok(Route::DatedToken));
        }
        assert_eq!(route(b"/2021-03-23/api/token/"), Ok(Route::Other));
    }

    #[test]
    fn other_metadata_paths_are_not_found() {
        for path in [
            "/",
            "/latest",
            "/latest/",
            "/latest/meta-data/",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/iam/info",
            "/latest/meta-data/iam/security-credentials-extended/",
            "/latest/meta-data/iam/security-credentials/my-role/",
            "/latest/meta-data/iam/security-credentials/my-role/extra",
            "/latest/api/token/",
            "/latest/dynamic/instance-identity/document",
            "/v1/credentials",
            "/2016-9-02/meta-data/iam/security-credentials",
            "/LATEST/meta-data/iam/security-credentials",
        ] {
            assert_eq!(route(path.as_bytes()), Ok(Route::Other), "{path}");
        }
    }

    #[test]
    fn unusual_spellings_are_rejected_not_normalised() {
        for (path, why) in [
            (&b"latest/meta-data"[..], "path must start with /"),
            (b"", "path must start with /"),
            (b"//latest/meta-data/iam/security-credentials/r", "empty path segment"),
            (b"/latest//meta-data/iam/security-credentials/r", "empty path segment"),
            (b"/latest/meta-data/iam/x/../security-credentials/r", "dot segment in path"),
            (b"/latest/meta-data/./iam/security-credentials/r", "dot segment in path"),
            (b"/latest/meta-data/iam/security-credentials/%72", "percent-encoded paths are not supported"),
            (b"/latest/meta-data/iam/security-credentials/r?x=1", "query strings are not supported"),
            (b"/latest/meta-data/iam/security-credentials/r#f", "query strings are not supported"),
            (b"/latest\\meta-data", "backslash in path"),
            (b"/latest/meta data", "path must be printable ASCII"),
            (b"/latest/\xff\x00", "path must be printable ASCII"),
        ] {
            assert_eq!(route(path), Err(BadPath(why)), "{:?}", String::from_utf8_lossy(path));
        }
        assert_eq!(route(&[b'/'; MAX_PATH + 1]), Err(BadPath("path too long")));
    }

    /// What [`route`] must answer for `/<segments joined by />[/]`, worked
    /// out from the IMDS paths rather than from the parser.
    fn expected<'a>(segments: &[&'a str], trailing_slash: bool) -> Result<Route<'a>, ()> {
        if segments.iter().any(|s| [".", "..", "%61", "a?b", "a\\b"].contains(s)) {
            return Err(());
        }
        let dated = |v: &str| v == "2016-09-02";
        let version = |v: &str| v == "latest" || dated(v);
        Ok(match (segments, trailing_slash) {
            (["latest", "api", "token"], false) => Route::Token,
            ([v, "api", "token"], false) if dated(v) => Route::DatedToken,
            ([v, "meta-data", "iam", "security-credentials"], _) if version(v) => Route::RoleList,
            ([v, "meta-data", "iam", "security-credentials", role], false) if version(v) => Route::Credentials(role),
            _ => Route::Other,
        })
    }

    #[test]
    fn every_path_of_imds_and_odd_segments_routes_as_imds_would() {
        // Every path of up to five segments from IMDS's own words and the
        // spellings that must be refused, with and without a trailing slash:
        // deep enough to reach the credential and token routes, so a
        // normalisation or a route for a wrong spelling fails here.
        let words = [
            "latest",
            "2016-09-02",
            "api",
            "token",
            "meta-data",
            "iam",
            "security-credentials",
            "app",
            ".",
            "..",
            "%61",
            "a?b",
            "a\\b",
        ];
        let mut checked = 0;
        let mut reached = std::collections::HashSet::new();
        for depth in 0..=5u32 {
            for n in 0..words.len().pow(depth) {
                let mut k = n;
                let segments: Vec<&str> = (0..depth)
                    .map(|_| {
                        let word = words[k % words.len()];
                        k /= words.len();
                        word
                    })
                    .collect();
                for trailing_slash in [false, true] {
                    let path = format!("/{}{}", segments.join("/"), if trailing_slash { "/" } else { "" });
                    let got = route(path.as_bytes()).map_err(|_| ());
                    assert_eq!(got, expected(&segments, trailing_slash), "{path}");
                    reached.insert(match got {
                        Ok(Route::Token) => "token",
                        Ok(Route::DatedToken) => "dated token",
                        Ok(Route::RoleList) => "role list",
                        Ok(Route::Credentials(_)) => "credentials",
                        Ok(Route::Other) => "other",
                        Err(()) => "refused",
                    });
                    checked += 1;
                }
            }
        }
        assert!(checked > 500_000, "{checked}");
        for kind in ["token", "dated token", "role list", "credentials", "other", "refused"] {
            assert!(reached.contains(kind), "{kind} never reached");
        }
    }

    #[test]
    fn every_short_byte_string_is_answered_without_panicking() {
        // Raw bytes, exhaustive over a small alphabet; the words above cover
        // the routes.
        let alphabet = [b'/', b'.', b'a', b'%', b'?', 0u8, 0xff, b'l'];
        let mut path = Vec::new();
        for n in 0..(alphabet.len().pow(5)) {
            path.clear();
            let mut k = n;
            for _ in 0..5 {
                path.push(alphabet[k % alphabet.len()]);
                k /= alphabet.len();
            }
            assert!(!matches!(route(&path), Ok(Route::Credentials(_) | Route::Token)), "{path:?}");
        }
    }
}
