//! Where a caller is: the address its connection comes from, which must be
//! one of the addresses of the pod it names ([`crate::authz::caller_is_pod`]).
//!
//! Mesh identity is per service account: every pod running as `(ns, sa)`
//! presents the same SPIFFE ID, the opted-in pod and its plain siblings
//! alike. What tells them apart is their address, so the broker binds a
//! request to the pod it names by the connection's peer address. Where that
//! address comes from depends on the identity mode:
//! - `xfcc`: the broker's own sidecar accepts the caller's connection and
//!   opens a new one to the broker from its inbound passthrough address
//!   (Istio's `127.0.0.6`, or `::6`). The caller's address arrives in
//!   [`PEER_ADDRESS_HEADER`], which that sidecar sets from the connection it
//!   accepted (`%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`, never an
//!   address inferred from `X-Forwarded-For`), overwriting whatever the
//!   caller sent; `mesh-config` renders that as an EnvoyFilter. The header,
//!   like the XFCC element, means something only on a connection from the
//!   sidecar, so the broker serves only connections from
//!   [`DEFAULT_SIDECAR_SOURCES`] (or what `--sidecar-sources` says): a
//!   port-forward or a process reaching the broker's port directly skipped
//!   the sidecar, and its headers are its own words.
//! - `mtls`: the broker terminates TLS itself, so the TCP peer is the caller.
//! - `insecure-dev`: not checked. The identity is a plain header, and the
//!   broker runs outside the cluster, where no caller has a pod's address.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::{HeaderMap, HeaderName};

/// The header in which the broker's sidecar states the caller's address
/// (`mesh_config::envoy::PEER_ADDRESS_HEADER` writes it; the Istio
/// translation tests show it arriving).
pub const PEER_ADDRESS_HEADER: &str = "x-imds-mesh-peer-address";

const PEER_ADDRESS: HeaderName = HeaderName::from_static(PEER_ADDRESS_HEADER);

/// Where Istio's sidecar connects to its application from for inbound
/// traffic (`upstream_bind_config` of the `inbound|<port>||` clusters: the
/// inbound passthrough addresses, IPv4 and IPv6).
pub const DEFAULT_SIDECAR_SOURCES: [&str; 2] = ["127.0.0.6", "::6"];

/// Why the caller's address is unknown: the request is unauthenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// `xfcc`: the connection did not come from the broker's sidecar.
    #[error("the connection from {peer} did not come through the broker's sidecar (accepted sources: {accepted})")]
    NotThroughSidecar { peer: IpAddr, accepted: String },
    /// The server gave no peer address for the connection.
    #[error("the connection's peer address is unknown")]
    NoConnection,
    /// `xfcc`: the sidecar stated no address, or not exactly one valid one.
    #[error("the broker's sidecar stated no caller address in {PEER_ADDRESS_HEADER} ({0})")]
    NotStated(&'static str),
}

impl PeerError {
    /// A stable name for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotThroughSidecar { .. } => "not_through_sidecar",
            Self::NoConnection => "no_peer_address",
            Self::NotStated(_) => "no_stated_address",
        }
    }
}

/// An address, or a block of them in CIDR notation (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRange {
    network: IpAddr,
    prefix_len: u8,
}

impl SourceRange {
    /// Whether `address` is in this range (an IPv4-mapped IPv6 address counts
    /// as its IPv4 address).
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(network) & mask == u32::from(address) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(network) & mask == u128::from(address) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for SourceRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network = address
            .parse::<IpAddr>()
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR block"))?
            .to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Self { network, prefix_len })
    }
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = if self.network.is_ipv4() { 32 } else { 128 };
        if self.prefix_len == full {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix_len)
        }
    }
}

/// [`DEFAULT_SIDECAR_SOURCES`], parsed.
pub fn default_sidecar_sources() -> Vec<SourceRange> {
    DEFAULT_SIDECAR_SOURCES.iter().filter_map(|source| source.parse().ok()).collect()
}

/// `xfcc`: accepts the connection from `peer` only if it came from the
/// broker's sidecar, one of `sidecar_sources`.
pub fn through_sidecar(peer: Option<SocketAddr>, sidecar_sources: &[SourceRange]) -> Result<(), PeerError> {
    let peer = peer.ok_or(PeerError::NoConnection)?.ip().to_canonical();
    if sidecar_sources.iter().any(|source| source.contains(peer)) {
        return Ok(());
    }
    let accepted = sidecar_sources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    Err(PeerError::NotThroughSidecar { peer, accepted })
}

/// `xfcc`: the caller's address as the broker's sidecar stated it in
/// [`PEER_ADDRESS_HEADER`]: exactly one value, an IP address.
pub fn stated(headers: &HeaderMap) -> Result<IpAddr, PeerError> {
    let mut values = headers.get_all(PEER_ADDRESS).iter();
    let value = match (values.next(), values.next()) {
        (Some(value), None) => value,
        (None, _) => return Err(PeerError::NotStated("missing")),
        (Some(_), Some(_)) => return Err(PeerError::NotStated("more than one value")),
    };
    let text = value.to_str().map_err(|_| PeerError::NotStated("not text"))?;
    text.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()).map_err(|_| PeerError::NotStated("not an IP address"))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn range(text: &str) -> SourceRange {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_are_addresses_or_cidr_blocks() {
        assert!(range("127.0.0.6").contains(ip("127.0.0.6")));
        assert!(!range("127.0.0.6").contains(ip("127.0.0.1")));
        assert!(range("10.0.0.0/8").contains(ip("10.244.1.10")));
        assert!(!range("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(range("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(range("::6").contains(ip("::6")));
        assert!(range("fd00::/8").contains(ip("fd00:ec2::254")));
        assert!(!range("::/0").contains(ip("127.0.0.6")), "an IPv6 range holds no IPv4 address");
        // A dual-stack socket reports IPv4 peers as IPv4-mapped addresses.
        assert!(range("127.0.0.6").contains(ip("::ffff:127.0.0.6")));
        assert_eq!(range("::ffff:127.0.0.6"), range("127.0.0.6"));
        for bad in ["", "localhost", "127.0.0.6/33", "::6/129", "10.0.0.0/x", "10.0.0.0/"] {
            assert!(bad.parse::<SourceRange>().is_err(), "{bad:?}");
        }
        assert_eq!(range("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(range("127.0.0.6").to_string(), "127.0.0.6");
        assert_eq!(default_sidecar_sources(), [range("127.0.0.6"), range("::6")]);
    }

    #[test]
    fn only_the_sidecars_connections_are_served() {
        let sources = default_sidecar_sources();
        let peer = |text: &str| Some(SocketAddr::new(ip(text), 41000));
        assert_eq!(through_sidecar(peer("127.0.0.6"), &sources), Ok(()));
        assert_eq!(through_sidecar(peer("::6"), &sources), Ok(()));
        let bypass = through_sidecar(peer("127.0.0.1"), &sources).unwrap_err();
        assert_eq!(bypass.label(), "not_through_sidecar");
        assert_eq!(
            bypass.to_string(),
            "the connection from 127.0.0.1 did not come through the broker's sidecar \
             (accepted sources: 127.0.0.6, ::6)"
        );
        assert_eq!(through_sidecar(None, &sources), Err(PeerError::NoConnection));
    }

    #[test]
    fn the_stated_address_is_exactly_one_ip() {
        let headers = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(PEER_ADDRESS, HeaderValue::from_str(value).unwrap());
            }
            headers
        };
        assert_eq!(stated(&headers(&["10.244.1.10"])), Ok(ip("10.244.1.10")));
        assert_eq!(stated(&headers(&["fd00::10"])), Ok(ip("fd00::10")));
        assert_eq!(stated(&headers(&["::ffff:10.244.1.10"])), Ok(ip("10.244.1.10")));
        for (values, why) in [
            (&[][..], "missing"),
            (&["10.244.1.10", "10.244.1.11"][..], "more than one value"),
            (&["10.244.1.10:80"][..], "not an IP address"),
            (&["pod.example"][..], "not an IP address"),
        ] {
            assert_eq!(stated(&headers(values)), Err(PeerError::NotStated(why)), "{values:?}");
        }
    }
}
