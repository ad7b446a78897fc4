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
