//! Every rendering against the CRD schemas of the Istio releases it names:
//! the oldest and newest supported (istio.io/api 1.24.2 and 1.32.0), checked
//! as a Kubernetes API server with those CRDs installed checks a create
//! (`integration/istio-xds/schema.go`: OpenAPI schema, enums, CEL rules,
//! unknown fields).

use integration::istio::{SCHEMA_RELEASES, check_against_crds};
use mesh_config::render::{self, Options};
use mesh_config::version::IstioVersion;

fn rendering(edit: impl FnOnce(&mut Options)) -> String {
    let mut options = Options::default();
    edit(&mut options);
    options.check().unwrap_or_else(|e| panic!("{e}"));
    render::to_yaml(&render::render(&options)).unwrap_or_else(|e| panic!("{e}"))
}

/// The rendering for `release` (`1.x.y`), with every option that changes an
/// Istio object set.
fn for_release(release: &str) -> String {
    let version: IstioVersion = release.parse().unwrap_or_else(|e| panic!("{e}"));
    rendering(|o| {
        o.istio_version = version;
        o.http_tokens = imds_filter::config::HttpTokens::Required;
        o.wasm_sha256 = Some("ab".repeat(32));
        o.sts_endpoint_url = Some("https://vpce-1.sts.eu-west-1.vpce.amazonaws.com".into());
        o.network_policy_namespaces = vec!["team-a".into()];
    })
}

#[test]
fn each_release_accepts_what_is_rendered_for_it() {
    for release in SCHEMA_RELEASES {
        check_against_crds(&for_release(release), release).unwrap_or_else(|e| panic!("Istio {release}: {e}"));
    }
    // The committed default targets the newest.
    check_against_crds(&rendering(|_| {}), SCHEMA_RELEASES[1]).unwrap_or_else(|e| panic!("default: {e}"));
}

#[test]
fn the_oldest_release_refuses_what_only_newer_ones_have() {
    let newest = for_release(SCHEMA_RELEASES[1]);
    let refused = check_against_crds(&newest, SCHEMA_RELEASES[0]).unwrap_err();
    assert!(refused.contains(r#"failStrategy: Unsupported value: "FAIL_RELOAD""#), "{refused}");
}

#[test]
fn a_bad_value_or_an_unknown_field_is_refused() {
    let rendered = rendering(|_| {});
    for release in SCHEMA_RELEASES {
        let bad_enum = rendered.replace("mode: ISTIO_MUTUAL", "mode: ISTIO_MUTAL");
        let refused = check_against_crds(&bad_enum, release).unwrap_err();
        assert!(refused.contains(r#"Unsupported value: "ISTIO_MUTAL""#), "{refused}");
        let unknown = rendered.replace("  pluginName: imds-mesh\n", "  pluginName: imds-mesh\n  pluginNmae: x\n");
        assert_ne!(unknown, rendered);
        let refused = check_against_crds(&unknown, release).unwrap_err();
        assert!(refused.contains("unknown field") && refused.contains("pluginNmae"), "{refused}");
    }
}
