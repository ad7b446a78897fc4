#!/usr/bin/env bash
# Installs the system tools the recipes need that neither cargo nor the venv
# provides, from Debian packages: `wasm-opt` (binaryen) for `just build`,
# `wrk` for the benchmarks, and `docker-registry` (the CNCF distribution
# registry) that the OCI packaging test pushes to. Idempotent: calls
# apt-get only when a tool is missing, so a provisioned machine needs no root.
set -euo pipefail
missing=()
command -v wasm-opt >/dev/null 2>&1 || missing+=(binaryen)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
