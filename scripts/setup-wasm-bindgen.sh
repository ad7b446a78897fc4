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
cargo install --locked wasm-bindgen-cli --version "$version"
