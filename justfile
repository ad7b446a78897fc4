# imds-mesh entry points. `just setup` is idempotent and is run by `test`.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
target := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target")
wasm := target / "imds-mesh/imds_filter.wasm"
metadata := env_var_or_default("IMDS_MESH_METADATA", "127.169.254.254:80")
wasm_opt := "--enable-bulk-memory --enable-mutable-globals --enable-nontrapping-float-to-int --enable-sign-ext --strip-debug --strip-producers --dce --remove-unused-module-elements --duplicate-function-elimination --vacuum"

# List the recipes.
default:
    @just --list

# Install everything the build and the tests need (idempotent).
setup:
    scripts/setup-system.sh
    rustup target add wasm32-wasip1 wasm32-unknown-unknown
    rustup component add clippy rustfmt
    scripts/setup-venv.sh "{{venv}}"
    scripts/setup-wasm-bindgen.sh
    scripts/setup-node.sh
    scripts/setup-fuzz.sh

# Build the filter: release .wasm, then binaryen's clean-up passes (the
# shipped artifact). Not wasm-opt -O3 or -Oz: their inlining makes larger
# functions, and V8 compiling those in each of the sidecar's VMs leaves
# Envoy's allocator holding about 10 MB more per sidecar, for no measured
# gain in req/s (`just bench-filter`, memory part).
build:
    cargo build --profile wasm-release -p imds-filter --target wasm32-wasip1
    mkdir -p "$(dirname "{{wasm}}")"
    wasm-opt {{wasm_opt}} "{{target}}/wasm32-wasip1/wasm-release/imds_filter.wasm" -o "{{wasm}}"
    @ls -l "{{wasm}}" | awk '{print "filter: " $5 " bytes, " $9}'

# The proxy-wasm floor bench-filter holds the filter against
# (integration/floor-filter), built the same way.
floor-filter:
    cargo build --profile wasm-release -p floor-filter --target wasm32-wasip1
    mkdir -p "$(dirname "{{wasm}}")"
    wasm-opt {{wasm_opt}} "{{target}}/wasm32-wasip1/wasm-release/floor_filter.wasm" \
        -o "{{target}}/imds-mesh/floor_filter.wasm"

# imds-mesh end to end on this machine: Kubernetes API, STS, the broker and
# both Envoy sidecars on what Istio's own generator makes of the rendering,
# and an unmodified boto3 app getting its role.
demo: setup build istio-xds kube-apiserver
    cargo build --quiet -p token-broker
    IMDS_MESH_VENV="{{venv}}" IMDS_MESH_WASM="{{wasm}}" IMDS_MESH_BROKER_BIN="{{target}}/debug/token-broker" \
        IMDS_MESH_ISTIO_XDS="{{target}}/imds-mesh/istio-xds" cargo run --quiet -p integration --bin demo

# The local stack of `just demo`, left running in the background for your own
# programs: prints the environment to give them, and where logs and metrics
# are. IMDS_MESH_METADATA moves the metadata address (a loopback address).
up: setup build istio-xds kube-apiserver
    cargo build --quiet -p token-broker
    cargo build --quiet -p integration --bin up
    IMDS_MESH_VENV="{{venv}}" IMDS_MESH_WASM="{{wasm}}" IMDS_MESH_BROKER_BIN="{{target}}/debug/token-broker" \
        IMDS_MESH_ISTIO_XDS="{{target}}/imds-mesh/istio-xds" \
        scripts/up.sh "{{target}}/imds-mesh/up" "{{target}}/debug/up" "{{metadata}}"

# Stop everything `just up` started and remove its files.
down:
    scripts/down.sh "{{target}}/imds-mesh/up"

# Run every test this machine can run: lint, unit (native and wasm32), integration.
test: setup build lint test-unit test-wasm test-integration fuzz-smoke

# Unit tests of every crate, natively.
test-unit:
    cargo test --workspace --lib --bins

# cargo-fuzz with `--sanitizer none`, built into <target>/fuzz so its
# coverage flags never touch the main build: the product forbids unsafe
# code, so what we hunt is panics and broken invariants, which libFuzzer
# catches without ASan. ASan would instrument every dependency for little:
# a cold build of all eight targets on 2 busy cores took 4m48s without it
# and 8m00s with it, whose runs were also 4-6x slower. Targets run one at a
# time and each prints its execution count; SECONDS 0 means no time bound.
# Fuzz each target for SECONDS, then libFuzzer flags: `just fuzz 0 -runs=1000000`.
fuzz seconds="60" *flags:
    scripts/setup-fuzz.sh
    scripts/fuzz.sh "{{target}}" -max_total_time={{seconds}} {{flags}}

# A short run of every fuzz target: 2000 executions each, seeds first.
fuzz-smoke:
    scripts/setup-fuzz.sh
    scripts/fuzz.sh "{{target}}" -runs=2000

# The filter core's unit tests compiled to wasm32 and run under node.
test-wasm:
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
        cargo test -p imds-filter --lib --target wasm32-unknown-unknown

# Every crate's tests/ (real Envoy, STS, clients, Istio's own xDS
# generator, the binaries' command lines).
test-integration: build istio-xds kube-apiserver sdk-go sdk-java
    IMDS_MESH_VENV="{{venv}}" IMDS_MESH_WASM="{{wasm}}" IMDS_MESH_BROKER_BIN="{{target}}/debug/token-broker" \
        IMDS_MESH_ISTIO_XDS="{{target}}/imds-mesh/istio-xds" IMDS_MESH_SDK_GO="{{target}}/imds-mesh/sdk-go" \
        IMDS_MESH_SDK_JAVA="{{target}}/imds-mesh/sdk-java/sdk-java.jar" cargo test --workspace --test '*'

# A real Kubernetes API server and etcd (integration/kube-apiserver, Go test
# tooling, pinned k8s.io/kubernetes and go.etcd.io/etcd/server/v3) built into
# target/imds-mesh; module downloads and build cache under the target dir.
kube-apiserver:
    scripts/build-kube-apiserver.sh "{{target}}"

# Istio's own xDS generator (integration/istio-xds, Go test tooling); module
# downloads and build cache under the target dir.
istio-xds:
    scripts/build-istio-xds.sh "{{target}}"

# An app on the AWS SDK for Go v2's default credential chain
# (integration/sdk-go, test tooling, the SDK pinned in its go.mod); module
# downloads and build cache under the target dir.
sdk-go:
    scripts/build-sdk-go.sh "{{target}}"

# An app on the AWS SDK for Java v2's instance profile provider
# (integration/sdk-java, test tooling, the SDK's BOM pinned in its pom.xml);
# Maven's local repository under the target dir.
sdk-java:
    scripts/build-sdk-java.sh "{{target}}"

# fmt check and clippy (warnings denied) for the host and the wasm target.
lint:
    cargo fmt --all --check
    cargo fmt --manifest-path fuzz/Cargo.toml --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p imds-filter --target wasm32-wasip1 -- -D warnings

# Package the filter as an OCI image layout (target/imds-mesh/oci) and print its digest.
wasm-image: build
    cargo run --quiet -p mesh-config -- oci-image --wasm "{{wasm}}" --out "{{target}}/imds-mesh/oci"

# Push the packaged image to REF (host/repo:tag), e.g. for a WasmPlugin url oci://REF.
push-wasm-image ref *flags: wasm-image
    "{{venv}}/bin/python" scripts/oci.py push "{{target}}/imds-mesh/oci" "{{ref}}" {{flags}}

# Rewrite the committed default rendering (mesh-config/deploy/imds-mesh.yaml),
# its WasmPlugin pinned to the image of the filter built from this tree.
render: build
    digest=$(cargo run --quiet -p mesh-config -- oci-image --wasm "{{wasm}}" --out "{{target}}/imds-mesh/oci"); \
        cargo run --quiet -p mesh-config -- render --wasm-sha256 "${digest#sha256:}" > mesh-config/deploy/imds-mesh.yaml

# Token broker: cached-hit req/s and p99 against /healthz on the same server,
# and single flight on a cold start (not a test).
bench-broker: setup
    cargo run --release -p integration --bin bench-broker

# Filter throughput and latency against Envoy baselines (not a test).
bench-filter: setup build floor-filter istio-xds
    IMDS_MESH_VENV="{{venv}}" IMDS_MESH_WASM="{{wasm}}" IMDS_MESH_ISTIO_XDS="{{target}}/imds-mesh/istio-xds" \
        cargo run -p integration --bin bench-filter
