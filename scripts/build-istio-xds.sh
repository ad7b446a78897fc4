#!/usr/bin/env bash
# Builds integration/istio-xds (Istio's own xDS generator and a CRD schema
# check, Go test tooling) into the target directory, and puts beside it the
# CRDs of the oldest and newest Istio releases the rendering supports (from
# their istio.io/api modules). Module downloads and the build cache live
# under the target dir too, so a warm run only relinks when nothing changed
# and CI caches everything in one place.
set -euo pipefail
target=${1:?usage: build-istio-xds.sh TARGET_DIR}
export GOMODCACHE="$target/go/mod" GOCACHE="$target/go/cache" GOFLAGS="-modcacherw -mod=readonly"
cd "$(dirname "$0")/../integration/istio-xds"
go build -trimpath -o "$target/imds-mesh/istio-xds" .
mkdir -p "$target/imds-mesh/istio-crds"
for version in 1.24.2 1.32.0; do
    crds="$target/imds-mesh/istio-crds/$version.yaml"
    if [[ ! -s "$crds" ]]; then
        dir=$(go mod download -json "istio.io/api@v$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
        cp "$dir/kubernetes/customresourcedefinitions.gen.yaml" "$crds"
    fi
done
