#!/usr/bin/env bash
# Builds integration/sdk-go (an app using the AWS SDK for Go v2's default
# credential chain, pinned in its go.mod; test tooling) into the target
# directory. Module downloads and the build cache live under the target dir,
# as for istio-xds; nothing is rebuilt while the binary is newer than every
# file of the module.
set -euo pipefail
target=${1:?usage: build-sdk-go.sh TARGET_DIR}
export GOMODCACHE="$target/go/mod" GOCACHE="$target/go/cache" GOFLAGS="-modcacherw -mod=readonly"
cd "$(dirname "$0")/../integration/sdk-go"
binary="$target/imds-mesh/sdk-go"
if [[ -x "$binary" && -z "$(find . -newer "$binary" -print -quit)" ]]; then
    exit 0
fi
go build -trimpath -o "$binary" .
