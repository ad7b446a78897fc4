// etcd, as the etcd project's own binary runs it (etcdmain.Main), built
// from the pinned go.etcd.io/etcd/server/v3 module for the harness's
// Kubernetes API server.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
