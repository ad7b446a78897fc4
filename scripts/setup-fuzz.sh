#!/usr/bin/env bash
# Installs cargo-fuzz, pinned, for `just fuzz` and `just fuzz-smoke`.
# Idempotent: skips the install when this version is already on PATH (a
# cold `cargo install` took about 1 minute here).
set -euo pipefail
version=0.13.2
if [[ "$(cargo fuzz --version 2>/dev/null)" == "cargo-fuzz ${version}" ]]; then
    exit 0
fi
cargo install cargo-fuzz --version "${version}" --locked
