#!/usr/bin/env bash
# Builds the harness's real Kubernetes API server and etcd from
# integration/kube-apiserver (k8s.io/kubernetes and go.etcd.io/etcd/server/v3,
# pinned in its go.mod) into the target directory. Module downloads and the
# build cache live under the target dir, as for istio-xds, so a warm run
# only relinks when nothing changed.
set -euo pipefail
target=${1:?usage: build-kube-apiserver.sh TARGET_DIR}
export GOMODCACHE="$target/go/mod" GOCACHE="$target/go/cache" GOFLAGS="-modcacherw -mod=readonly"
cd "$(dirname "$0")/../integration/kube-apiserver"
version=$(sed -n "s/^[[:space:]]*k8s.io\/kubernetes \(v[0-9.]*\)$/\1/p" go.mod)
minor=$(echo "$version" | cut -d. -f2)
# What `kubectl version` and the API's /version report, as a release build
# stamps it.
ldflags="-X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 \
-X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
go build -trimpath -ldflags "$ldflags" -o "$target/imds-mesh/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
go build -trimpath -o "$target/imds-mesh/etcd" ./etcd
