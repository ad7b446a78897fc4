#!/usr/bin/env bash
# `just down`: stops everything `just up` started (its whole session) and
# removes its files. Usage: down.sh STATE_DIR.
set -euo pipefail

state=$1
pidfile=$state/pid

if [[ ! -f $pidfile ]]; then
    rm -rf "$state"
    echo "imds-mesh is not up."
    exit 0
fi
pid=$(cat "$pidfile")
kill -TERM -- "-$pid" 2>/dev/null || true
for _ in $(seq 1 40); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.25
done
if kill -0 -- "-$pid" 2>/dev/null; then
    echo "Some processes ignored SIGTERM for 10 s; killing them." >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
fi
rm -rf "$state"
echo "imds-mesh is down; its files ($state) are removed."
