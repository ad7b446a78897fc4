//! The metadata service as the mesh sees it: the service names the rendering
//! gives its addresses, the authorities a request to it may carry, the
//! fail-closed answer and the guard that refuses it by destination. The
//! addresses themselves live in the filter's core
//! ([`imds_filter::config::METADATA_ADDRESSES`]); both the rendering and the
//! local bootstraps take everything here.

use imds_filter::config::{METADATA_ADDRESSES, METADATA_PORT, MetadataAddress};
use serde_json::{Value, json};

/// One metadata address as a mesh service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataService {
    /// The `ServiceEntry`'s name.
    pub name: &'static str,
    /// The `ServiceEntry` host. One host per address: Istio builds one
    /// service per (host, address) and keeps one of them in the route's
    /// domains (istio/istio#58692), so a shared host loses an address.
    pub host: &'static str,
    /// The address.
    pub address: MetadataAddress,
}

/// The metadata services, one per address. `instance-data.ec2.internal` is
/// the name EC2 itself resolves to the IPv4 address.
pub const METADATA_SERVICES: [MetadataService; 2] = [
    MetadataService { name: "instance-metadata", host: "instance-data.ec2.internal", address: METADATA_ADDRESSES[0] },
    MetadataService {
        name: "instance-metadata-ipv6",
        host: "instance-data-ipv6.ec2.internal",
        address: METADATA_ADDRESSES[1],
    },
];

/// What the fail-closed route answers a request nothing else answered.
pub const FAIL_CLOSED_BODY: &str = "imds-mesh: instance metadata is not served to this pod\n";

/// Every authority a metadata request may carry: each service's host and
/// address, with and without the port.
pub fn authorities() -> Vec<String> {
    METADATA_SERVICES
        .iter()
        .flat_map(|s| [s.host, s.address.authority])
        .flat_map(|host| [host.to_owned(), format!("{host}:{METADATA_PORT}")])
        .collect()
}

/// An HTTP RBAC filter refusing every request whose connection is to a
/// metadata address (the original destination), whatever its `Host`,
/// before the router could pass it through. It sits after the imds-mesh
/// filter, which answers the requests of enabled pods first.
pub fn guard() -> Value {
    let permissions: Vec<Value> = METADATA_ADDRESSES
        .iter()
        .map(|a| json!({ "destination_ip": { "address_prefix": a.ip, "prefix_len": a.prefix_len } }))
        .collect();
    json!({
        "name": GUARD,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "DENY",
                "policies": {
                    "instance-metadata": { "permissions": permissions, "principals": [{ "any": true }] },
                },
            },
        },
    })
}

/// The guard's filter name.
pub const GUARD: &str = "imds-mesh.deny-instance-metadata";

/// Per-route filter config switching a filter off (`FilterConfig{disabled:
/// true}`): on the port-80 route configuration of enabled pods it keeps
/// their ordinary HTTP out of the wasm VM.
pub fn filter_disabled() -> Value {
    json!({ "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true })
}

/// The name of the filter chain every sidecar's port-80 listener gets for
/// connections to a metadata address.
pub const METADATA_CHAIN: &str = "imds-mesh-metadata";

/// The filter chain for connections to a metadata address, chosen by their
/// original destination before any protocol detection: an HTTP connection
/// manager whose only route answers the fail-closed 404. Without it, such
/// a connection would share the port-80 chains, and one the HTTP inspector
/// did not take for HTTP would go through Istio's TCP passthrough to the
/// node's IMDS. On enabled pods the filter runs first in this chain.
pub fn metadata_filter_chain() -> Value {
    let prefix_ranges: Vec<Value> =
        METADATA_ADDRESSES.iter().map(|a| json!({ "address_prefix": a.ip, "prefix_len": a.prefix_len })).collect();
    let fail_closed = json!({
        "match": { "prefix": "/" },
        "direct_response": { "status": 404, "body": { "inline_string": FAIL_CLOSED_BODY } },
    });
    json!({
        "name": METADATA_CHAIN,
        "filter_chain_match": { "prefix_ranges": prefix_ranges },
        "filters": [{
            "name": HTTP_CONNECTION_MANAGER,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": METADATA_CHAIN,
                "route_config": {
                    "name": METADATA_CHAIN,
                    "virtual_hosts": [{ "name": "instance-metadata", "domains": ["*"], "routes": [fail_closed] }],
                },
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                }],
            },
        }],
    })
}

/// The network filter name of Envoy's HTTP connection manager.
pub const HTTP_CONNECTION_MANAGER: &str = "envoy.filters.network.http_connection_manager";

/// A reference to the WasmPlugin's filter by its ECDS name, as Istio
/// writes one into the chains it builds (its types: the wasm filter, or the
/// RBAC deny Istio sends instead when a `FAIL_CLOSE` module cannot load).
pub fn discovered_filter(name: &str) -> Value {
    json!({
        "name": name,
        "config_discovery": {
            "config_source": { "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" },
            "type_urls": [
                "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            ],
        },
    })
}
