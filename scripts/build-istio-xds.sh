#!/usr/bin/env bash
# Builds integration/istio-xds (Istio's own xDS generator, test tooling in
# Go) into the target directory. Module downloads and the build cache live
# under the target dir too, so a warm run only relinks when nothing changed
# and CI caches everything in one place.
set -euo pipefail
target=${1:?usage: build-istio-xds.sh TARGET_DIR}
export GOMODCACHE="$target/go/mod" GOCACHE="$target/go/cache" GOFLAGS="-modcacherw -mod=readonly"
cd "$(dirname "$0")/../integration/istio-xds"
go build -trimpath -o "$target/imds-mesh/istio-xds" .
