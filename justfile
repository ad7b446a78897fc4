# imds-mesh entry points. `just setup` is idempotent and is run by `test`.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := justfile_directory() / ".venv"
wasm := justfile_directory() / "target/wasm32-wasip1/release/imds_filter.wasm"

# List the recipes.
default:
    @just --list

# Install everything the build and the tests need (idempotent).
setup:
    rustup target add wasm32-wasip1 wasm32-unknown-unknown
    rustup component add clippy rustfmt
    scripts/setup-venv.sh "{{venv}}"
    scripts/setup-wasm-bindgen.sh
    scripts/setup-node.sh

# Build the filter (.wasm, release) and the native crates.
build:
    cargo build --release -p imds-filter --target wasm32-wasip1
    @ls -l "{{wasm}}" | awk '{print "filter: " $5 " bytes, " $9}'

# Run every test this machine can run: lint, unit (native and wasm32), integration.
test: setup build lint test-unit test-wasm test-integration

# Unit tests of every crate, natively.
test-unit:
    cargo test --workspace --lib --bins

# The filter core's unit tests compiled to wasm32 and run under node.
test-wasm:
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
        cargo test -p imds-filter --lib --target wasm32-unknown-unknown

# Real Envoy, real clients, started by the harness.
test-integration: build
    IMDS_MESH_VENV="{{venv}}" cargo test -p integration --tests

# fmt check and clippy (warnings denied) for the host and the wasm target.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy -p imds-filter --target wasm32-wasip1 -- -D warnings

# Filter throughput and latency against Envoy baselines (not a test).
bench-filter: setup build
    IMDS_MESH_VENV="{{venv}}" cargo run -p integration --bin bench-filter
