//! The Istio releases a rendering targets, and what each one accepts:
//! `failStrategy: FAIL_RELOAD` exists from 1.27 (istio/api, first in tag
//! 1.27.0), and the name Istio gives a WasmPlugin's filter (the key a
//! per-route `FilterConfig` must use) changed when WasmPlugin became a
//! TrafficExtension on master after the 1.30 branch.

use std::fmt;
use std::str::FromStr;

/// An Istio release `1.minor` (a patch number, if given, is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IstioVersion {
    minor: u32,
}

impl IstioVersion {
    /// The oldest release imds-mesh renders for (the oldest whose CRD
    /// schemas the tests check).
    pub const OLDEST: Self = Self { minor: 24 };
    /// The newest release imds-mesh renders for (the newest whose CRD
    /// schemas the tests check); the default.
    pub const NEWEST: Self = Self { minor: 32 };
    /// The first release with `FAIL_RELOAD`.
    pub const FAIL_RELOAD: Self = Self { minor: 27 };
    /// The first release naming a WasmPlugin's filter as a TrafficExtension.
    pub const TRAFFIC_EXTENSION: Self = Self { minor: 31 };

    /// `1.<minor>`, if imds-mesh supports it.
    pub fn new(minor: u32) -> Result<Self, String> {
        let version = Self { minor };
        if (Self::OLDEST..=Self::NEWEST).contains(&version) {
            Ok(version)
        } else {
            Err(format!(
                "Istio {version} is not supported: imds-mesh renders for Istio {} to {}",
                Self::OLDEST,
                Self::NEWEST
            ))
        }
    }

    /// Whether `failStrategy: FAIL_RELOAD` is a value this release accepts.
    pub fn has_fail_reload(self) -> bool {
        self >= Self::FAIL_RELOAD
    }

    /// The name this release gives the HTTP filter (and its ECDS resource)
    /// of WasmPlugin `namespace/name`.
    pub fn wasm_filter_name(self, namespace: &str, name: &str) -> String {
        if self >= Self::TRAFFIC_EXTENSION {
            format!("extensions.istio.io/trafficextension/{namespace}.{name}~istio-translated-wasmplugin")
        } else {
            format!("extensions.istio.io/wasmplugin/{namespace}.{name}")
        }
    }
}

impl fmt::Display for IstioVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1.{}", self.minor)
    }
}

impl FromStr for IstioVersion {
    type Err = String;

    /// `1.27` or `1.27.3`.
    fn from_str(s: &str) -> Result<Self, String> {
        let malformed = || format!("{s:?} is not an Istio version (expected 1.<minor>, e.g. 1.27)");
        let mut parts = s.split('.');
        if parts.next() != Some("1") {
            return Err(malformed());
        }
        let minor = parts.next().and_then(|m| m.parse().ok()).ok_or_else(malformed)?;
        match parts.next() {
            Some(patch) if patch.parse::<u32>().is_err() => return Err(malformed()),
            _ if parts.next().is_some() => return Err(malformed()),
            _ => {}
        }
        Self::new(minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_with_or_without_a_patch_and_outside_the_range_are_refused() {
        assert_eq!("1.27".parse(), Ok(IstioVersion { minor: 27 }));
        assert_eq!("1.24.2".parse(), Ok(IstioVersion::OLDEST));
        for bad in ["1.23", "1.33", "2.0", "1", "1.x", "1.27.x", "1.27.1.1", ""] {
            assert!(bad.parse::<IstioVersion>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn fail_reload_and_the_filter_name_follow_the_release() {
        let v = |s: &str| s.parse::<IstioVersion>().unwrap();
        assert!(!v("1.26").has_fail_reload());
        assert!(v("1.27").has_fail_reload());
        assert_eq!(
            v("1.30").wasm_filter_name("istio-system", "imds-mesh"),
            "extensions.istio.io/wasmplugin/istio-system.imds-mesh"
        );
        assert_eq!(
            v("1.31").wasm_filter_name("istio-system", "imds-mesh"),
            "extensions.istio.io/trafficextension/istio-system.imds-mesh~istio-translated-wasmplugin"
        );
    }
}
