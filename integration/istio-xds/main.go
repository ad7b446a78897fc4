// istio-xds runs Istio's own configuration generator (the xDS server istiod
// runs, as its fake discovery server) on imds-mesh's rendered objects and
// prints, for each requested pod's sidecar, what istiod would send it: the
// node, listeners, routes, clusters, endpoints and extension configs, as
// Envoy JSON. It is test tooling for the Rust harness, not part of the
// product.
//
// Usage:
//
//	istio-xds --mesh mesh.yaml --config rendered.yaml [--config extra.yaml] \
//	    --kube cluster.yaml --proxy NAMESPACE/POD [--proxy ...]
//
// --config: Istio objects (other kinds are skipped); each is validated as
// istiod's admission webhook validates it. With --crds FILE it generates
// nothing and instead checks the --config objects against those CRDs (an
// Istio release's istio.io/api kubernetes/customresourcedefinitions.gen.yaml)
// as a Kubernetes API server would (schema.go). --kube: Namespaces, Pods,
// Services, EndpointSlices. Each --proxy names a pod in --kube: its
// sidecar's node id and metadata are built from the pod as Istio's injector
// and agent build them.
//
// The process refuses to run unless PILOT_ENABLE_METADATA_EXCHANGE and
// PILOT_ENABLE_ALPN_FILTER are "false": Istio reads them when it starts,
// and with them on the output names filters only Istio's Envoy build has.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	meshconfig "istio.io/api/mesh/v1alpha1"
	corev1 "k8s.io/api/core/v1"

	"istio.io/istio/pilot/pkg/config/kube/crd"
	"istio.io/istio/pilot/pkg/model"
	v3 "istio.io/istio/pilot/pkg/xds/v3"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/config/schema/gvk"
	kubelib "istio.io/istio/pkg/kube"
	istiolog "istio.io/istio/pkg/log"
	"istio.io/istio/pkg/test"
	"istio.io/istio/pkg/test/util/retry"
	"istio.io/istio/pkg/util/protomarshal"
)

// istioVersion is the version this module's Istio reports (its VERSION
// file); proxies claim it, so the generator emits what that release emits.
const istioVersion = "1.31.0"

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	var configs, kubes, proxies files
	meshFile := flag.String("mesh", "", "mesh config YAML (MeshConfig)")
	flag.Var(&configs, "config", "Istio objects, multi-document YAML (repeatable)")
	flag.Var(&kubes, "kube", "Kubernetes objects, multi-document YAML (repeatable)")
	flag.Var(&proxies, "proxy", "NAMESPACE/POD whose sidecar config to print (repeatable)")
	outFile := flag.String("out", "", "where to write the JSON (default: standard output)")
	crdFile := flag.String("crds", "", "instead of generating: check the --config objects against these CRDs, as an API server would")
	flag.Parse()
	// Istio's own log goes to stderr, so the JSON alone is on the output.
	logOptions := istiolog.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	logOptions.ErrorOutputPaths = []string{"stderr"}
	if err := istiolog.Configure(logOptions); err != nil {
		fmt.Fprintln(os.Stderr, "istio-xds: log:", err)
		os.Exit(1)
	}
	if *crdFile != "" {
		text, err := concat(configs)
		if err == nil {
			var problems []string
			if problems, err = checkAgainstCRDs(*crdFile, text); err == nil && len(problems) > 0 {
				err = fmt.Errorf("the API server would refuse:\n%s", strings.Join(problems, "\n"))
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "istio-xds:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*meshFile, configs, kubes, proxies, *outFile); err != nil {
		fmt.Fprintln(os.Stderr, "istio-xds:", err)
		os.Exit(1)
	}
}

func run(meshFile string, configFiles, kubeFiles, proxies []string, outFile string) error {
	for _, switchName := range []string{"PILOT_ENABLE_METADATA_EXCHANGE", "PILOT_ENABLE_ALPN_FILTER"} {
		if os.Getenv(switchName) != "false" {
			return fmt.Errorf("%s must be \"false\" (upstream Envoy has no Istio-only filters)", switchName)
		}
	}
	meshConfig := mesh.DefaultMeshConfig()
	if meshFile != "" {
		text, err := os.ReadFile(meshFile)
		if err != nil {
			return err
		}
		if meshConfig, err = mesh.ApplyMeshConfigDefaults(string(text)); err != nil {
			return fmt.Errorf("mesh config: %v", err)
		}
	}
	configText, err := concat(configFiles)
	if err != nil {
		return err
	}
	// istiod's admission webhook: every Istio object must pass the
	// validation of the release it is applied to.
	parsed, _, err := crd.ParseInputs(configText)
	if err != nil {
		return fmt.Errorf("Istio refuses the configuration: %v", err)
	}
	wasmPlugins := 0
	for _, c := range parsed {
		if c.GroupVersionKind == gvk.WasmPlugin {
			wasmPlugins++
		}
	}
	kubeText, err := concat(kubeFiles)
	if err != nil {
		return err
	}
	pods, err := podsOf(kubeText)
	if err != nil {
		return err
	}
	var out map[string]any
	err = test.Wrap(func(t test.Failer) {
		s := xds.NewFakeDiscoveryServer(t, xds.FakeOptions{
			ConfigString:           configText,
			KubernetesObjectString: kubeText,
			MeshConfig:             meshConfig,
		})
		awaitTranslation(t, s, wasmPlugins)
		out = map[string]any{}
		for _, name := range proxies {
			pod, ok := pods[name]
			if !ok {
				t.Fatalf("--proxy %s: no such pod in --kube", name)
			}
			generated, err := generate(t, s, pod, meshConfig)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			out[name] = generated
		}
	})
	if err != nil {
		return err
	}
	encoded, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	if outFile == "" {
		_, err = os.Stdout.Write(encoded)
		return err
	}
	return os.WriteFile(outFile, encoded, 0o644)
}

// awaitTranslation waits until istiod has translated every WasmPlugin
// (asynchronously, after the server reports itself synced) and a push
// includes them.
func awaitTranslation(t test.Failer, s *xds.FakeDiscoveryServer, wasmPlugins int) {
	retry.UntilOrFail(t, func() bool {
		return len(s.Env().List(gvk.TrafficExtension, "")) >= wasmPlugins
	}, retry.Delay(10*time.Millisecond), retry.Timeout(30*time.Second))
	s.Discovery.ConfigUpdate(&model.PushRequest{Forced: true, Reason: model.NewReasonStats(model.ConfigUpdate)})
	s.EnsureSynced(t)
}

func concat(paths []string) (string, error) {
	var b strings.Builder
	for _, path := range paths {
		text, err := os.ReadFile(path)
		if err != nil {
			return "", err
		}
		b.WriteString("\n---\n")
		b.Write(text)
	}
	return b.String(), nil
}

// podsOf indexes the pods in a multi-document YAML stream by NAMESPACE/NAME.
func podsOf(text string) (map[string]*corev1.Pod, error) {
	decode := kubelib.IstioCodec.UniversalDeserializer().Decode
	pods := map[string]*corev1.Pod{}
	for _, doc := range strings.Split(text, "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		object, _, err := decode([]byte(doc), nil, nil)
		if err != nil {
			return nil, fmt.Errorf("kubernetes object: %v", err)
		}
		if pod, ok := object.(*corev1.Pod); ok {
			pods[pod.Namespace+"/"+pod.Name] = pod
		}
	}
	return pods, nil
}

// nodeOf is the Envoy node Istio's injector and agent give pod's sidecar:
// the id istiod parses and the metadata the agent writes into the bootstrap
// (the filter reads LABELS, ANNOTATIONS, NAME, NAMESPACE, SERVICE_ACCOUNT).
// PROXY_CONFIG is the mesh's defaultConfig with the pod's
// proxy.istio.io/config annotation merged over it, as the injector does.
func nodeOf(pod *corev1.Pod, meshConfig *meshconfig.MeshConfig) (string, *model.BootstrapNodeMetadata, error) {
	proxyConfig := protomarshal.Clone(meshConfig.GetDefaultConfig())
	if annotation, ok := pod.Annotations["proxy.istio.io/config"]; ok {
		merged, err := mesh.MergeProxyConfig(annotation, proxyConfig)
		if err != nil {
			return "", nil, fmt.Errorf("%s/%s: proxy.istio.io/config: %v", pod.Namespace, pod.Name, err)
		}
		proxyConfig = merged
	}
	trustDomain := meshConfig.GetTrustDomain()
	ip := pod.Status.PodIP
	id := fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", ip, pod.Name, pod.Namespace, pod.Namespace)
	workload := pod.Labels["app"]
	if workload == "" {
		workload = pod.Name
	}
	return id, &model.BootstrapNodeMetadata{
		NodeMetadata: model.NodeMetadata{
			ProxyConfig:      (*model.NodeMetaProxyConfig)(proxyConfig),
			IstioVersion:     istioVersion,
			Labels:           pod.Labels,
			Annotations:      pod.Annotations,
			InstanceIPs:      []string{ip},
			Namespace:        pod.Namespace,
			WorkloadName:     workload,
			InterceptionMode: model.InterceptionRedirect,
			ServiceAccount:   pod.Spec.ServiceAccountName,
			MeshID:           trustDomain,
			ClusterID:        "Kubernetes",
		},
		InstanceName: pod.Name,
		Owner:        fmt.Sprintf("kubernetes://apis/v1/namespaces/%s/pods/%s", pod.Namespace, pod.Name),
	}, nil
}

// generate connects pod's sidecar to istiod over ADS, as Envoy does at
// start-up (clusters, their endpoints, listeners, their routes, the filters
// they leave to ECDS), and returns what istiod sent.
func generate(t test.Failer, s *xds.FakeDiscoveryServer, pod *corev1.Pod, meshConfig *meshconfig.MeshConfig) (map[string]any, error) {
	id, bootstrapMeta, err := nodeOf(pod, meshConfig)
	if err != nil {
		return nil, err
	}
	ads := s.ConnectADS().WithID(id).WithMetadata(bootstrapMeta.NodeMetadata).WithTimeout(30 * time.Second)
	fetch := func(typeURL string, names []string) []json.RawMessage {
		response := ads.RequestResponseAck(t, &discovery.DiscoveryRequest{TypeUrl: typeURL, ResourceNames: names})
		out := make([]json.RawMessage, 0, len(response.Resources))
		for _, resource := range response.Resources {
			message, err := resource.UnmarshalNew()
			if err != nil {
				t.Fatalf("%s: %v", typeURL, err)
			}
			encoded, err := protomarshal.MarshalProtoNames(message)
			if err != nil {
				t.Fatalf("%s: %v", typeURL, err)
			}
			out = append(out, encoded)
		}
		return out
	}
	// Types named by resource are asked for only when something names
	// one: an empty list would be a wildcard request, which istiod does not
	// answer for these types.
	named := func(typeURL string, names []string) []json.RawMessage {
		if len(names) == 0 {
			return []json.RawMessage{}
		}
		return fetch(typeURL, names)
	}
	clusters := fetch(v3.ClusterType, nil)
	endpoints := named(v3.EndpointType, namesWhere(clusters, `"type":"EDS"`, "name"))
	listeners := fetch(v3.ListenerType, nil)
	routes := named(v3.RouteType, fieldValues(listeners, "route_config_name"))
	extensions := named(v3.ExtensionConfigurationType, discoveredFilters(listeners))
	metadata, err := json.Marshal(bootstrapMeta)
	if err != nil {
		return nil, err
	}
	return map[string]any{
		"node": map[string]any{
			"id":       id,
			"cluster":  fmt.Sprintf("%s.%s", bootstrapMeta.WorkloadName, pod.Namespace),
			"metadata": json.RawMessage(metadata),
		},
		"clusters":          clusters,
		"endpoints":         endpoints,
		"listeners":         listeners,
		"routes":            routes,
		"extension_configs": extensions,
	}, nil
}

// discoveredFilters names the filters the listeners leave to ECDS (the
// WasmPlugin's filter among them): what the sidecar asks istiod for next.
func discoveredFilters(listeners []json.RawMessage) []string {
	var names []string
	walk(listeners, func(object map[string]any) {
		if _, ok := object["config_discovery"]; ok {
			if name, ok := object["name"].(string); ok {
				names = append(names, name)
			}
		}
	})
	return names
}

// fieldValues collects every string value of field in resources.
func fieldValues(resources []json.RawMessage, field string) []string {
	var values []string
	walk(resources, func(object map[string]any) {
		if value, ok := object[field].(string); ok {
			values = append(values, value)
		}
	})
	return values
}

// namesWhere returns field of each top-level resource whose JSON contains
// marker (e.g. the EDS clusters).
func namesWhere(resources []json.RawMessage, marker, field string) []string {
	var names []string
	for _, resource := range resources {
		compact := &bytes.Buffer{}
		if json.Compact(compact, resource) != nil || !strings.Contains(compact.String(), marker) {
			continue
		}
		var object map[string]any
		if json.Unmarshal(resource, &object) == nil {
			if name, ok := object[field].(string); ok {
				names = append(names, name)
			}
		}
	}
	return names
}

// walk calls visit on every JSON object inside resources.
func walk(resources []json.RawMessage, visit func(map[string]any)) {
	var descend func(any)
	descend = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			visit(v)
			for _, child := range v {
				descend(child)
			}
		case []any:
			for _, child := range v {
				descend(child)
			}
		}
	}
	for _, resource := range resources {
		var tree any
		if json.Unmarshal(resource, &tree) == nil {
			descend(tree)
		}
	}
}
