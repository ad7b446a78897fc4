#!/usr/bin/env bash
# Installs wasm-bindgen-test-runner at the version Cargo.lock pins for
# wasm-bindgen (the runner must match it exactly). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
if [[ -z "$version" ]]; then
    echo "wasm-bindgen is not in Cargo.lock" >&2
    exit 1
fi
if command -v wasm-bindgen-test-runner >/dev/null \
    && [[ "$(wasm-bindgen-test-runner --version 2>/dev/null)" == *" $version"* ]]; then
    exit 0
fi
# `--locked` first, for the lockfile wasm-bindgen-cli was released with.
# That lockfile can pin a version the registry we install from does not serve
# (0.2.130's pins webpki-roots 1.0.11; 1.0.10 is the newest there), and then
# nothing installs; so fall back to resolving its dependencies afresh within
# their semver ranges. The retry also follows a failed build: slower, harmless.
if ! cargo install --locked wasm-bindgen-cli --version "=$version"; then
    echo "locked install of wasm-bindgen-cli $version failed; retrying without --locked" >&2
    cargo install wasm-bindgen-cli --version "=$version"
fi
