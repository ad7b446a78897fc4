#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ once, one after another (one libFuzzer
# process at a time), and prints each target's execution count.
#
#   scripts/fuzz.sh TARGET_DIR LIBFUZZER_FLAG...   e.g. -max_total_time=60
#
# Builds into TARGET_DIR/fuzz so the coverage flags never touch the main
# build. Each target starts from its committed seeds (fuzz/seeds/<target>,
# read only) and grows a scratch corpus under TARGET_DIR/fuzz/corpus; what it
# finds goes to fuzz/artifacts/<target>/ (ignored by git). Exits non-zero on
# the first failing target, after printing the end of its log.
set -euo pipefail
target_dir=$1
shift
cd "$(dirname "$0")/.."
# cargo-fuzz passes -Z flags; stable rustc accepts them with this.
export RUSTC_BOOTSTRAP=1
# `--sanitizer none`: the product is `#![forbid(unsafe_code)]`, so what we
# hunt is panics and broken invariants, which libFuzzer sees without ASan;
# ASan would instrument every dependency too (see the justfile for times).
build=(--sanitizer none --target-dir "${target_dir}/fuzz")
targets=$(cargo fuzz list)
cargo fuzz build "${build[@]}"
mkdir -p "${target_dir}/fuzz/logs"
for t in ${targets}; do
    corpus="${target_dir}/fuzz/corpus/${t}"
    log="${target_dir}/fuzz/logs/${t}.log"
    mkdir -p "${corpus}"
    start=$(date +%s)
    if ! cargo fuzz run "${build[@]}" "${t}" "${corpus}" "fuzz/seeds/${t}" -- "$@" >"${log}" 2>&1; then
        tail -n 40 "${log}"
        echo "fuzz: ${t} FAILED (log: ${log}; input under fuzz/artifacts/${t}/)" >&2
        exit 1
    fi
    done_line=$(grep -E '^Done [0-9]+ runs' "${log}" | tail -n 1)
    echo "fuzz: ${t}: ${done_line:-no summary (see ${log})} ($(($(date +%s) - start)) s wall)"
done
