//! The broker's credential-request query (`app::parse_query`), on raw
//! queries and on the query the filter itself sends
//! (`imds_filter::broker::request_path`).
//!
//! Invariants: an accepted query has exactly one `role_arn` and one `pod`,
//! and the results are their percent-decoded values, a role ARN the filter's
//! parser accepts and a DNS-1123 pod name; whatever role and pod the filter
//! encodes, the broker reads back exactly those (and accepts them when the
//! pod name is one Kubernetes allows).
#![no_main]

use imds_filter::arn::RoleArn;
use imds_filter::broker;
use libfuzzer_sys::fuzz_target;
use token_broker::app::parse_query;
use token_broker::identity::is_dns1123_subdomain;

/// Three lines: the raw query (`~` alone: none), a role (`role/...` is
/// wrapped into a valid ARN's account, to reach deep) and a pod name, for
/// the filter's own request.
struct Input<'a> {
    query: Option<&'a str>,
    role: &'a str,
    pod: &'a str,
    wrap_role: bool,
}

impl<'a> Input<'a> {
    fn parse(data: &'a str) -> Self {
        let mut lines = data.splitn(3, '\n');
        let query = lines.next().filter(|q| *q != "~");
        let role = lines.next().unwrap_or_default();
        let pod = lines.next().unwrap_or_default();
        match role.strip_prefix("role/") {
            Some(rest) => Self { query, role: rest, pod, wrap_role: true },
            None => Self { query, role, pod, wrap_role: false },
        }
    }
}

/// Percent-decoding as RFC 3986 says, written out: `%XX` is one byte,
/// anything else (a `+` included) is itself.
fn decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let input = Input::parse(text);
    if let Ok((role_arn, pod)) = parse_query(input.query) {
        let query = input.query.expect("accepted without a query");
        let params: Vec<(&str, &str)> =
            query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect();
        let roles: Vec<&str> = params.iter().filter(|(n, _)| *n == "role_arn").map(|(_, v)| *v).collect();
        let pods: Vec<&str> = params.iter().filter(|(n, _)| *n == "pod").map(|(_, v)| *v).collect();
        assert_eq!((roles.len(), pods.len()), (1, 1), "query {query:?}");
        assert_eq!(decode(roles[0]).as_deref(), Some(role_arn.as_str()));
        assert_eq!(decode(pods[0]).as_deref(), Some(&*pod));
        assert!(RoleArn::parse(&role_arn).is_ok());
        assert!(is_dns1123_subdomain(&pod));
    }

    // The filter's own request, read back by the broker.
    let role =
        if input.wrap_role { format!("arn:aws:iam::123456789012:role/{}", input.role) } else { input.role.to_owned() };
    let Ok(role) = RoleArn::parse(&role) else { return };
    let path = broker::request_path(&role, input.pod);
    let query = path.strip_prefix("/v1/credentials?").expect("the contract's path");
    match parse_query(Some(query)) {
        Ok((role_arn, pod)) => {
            assert_eq!(role_arn, role.as_str());
            assert_eq!(pod, input.pod);
        }
        Err(e) => assert!(!is_dns1123_subdomain(input.pod), "the filter's query {query:?} refused: {e}"),
    }
});
