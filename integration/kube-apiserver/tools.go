//go:build tools

// The Kubernetes API server and etcd the harness runs, pinned here: test
// tooling, not part of the product. `scripts/build-kube-apiserver.sh` builds
// `k8s.io/kubernetes/cmd/kube-apiserver` and ./etcd from this module.
package tools

import (
	_ "go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
)
