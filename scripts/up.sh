#!/usr/bin/env bash
# `just up`: starts the local stack (integration/src/bin/up.rs) in a session
# of its own, in the background, and prints what a program needs to use it
# once it is ready. Usage: up.sh STATE_DIR UP_BINARY METADATA_ADDRESS.
set -euo pipefail

state=$1 up=$2 metadata=$3
pidfile=$state/pid

if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "imds-mesh is already up (pid $(cat "$pidfile")); 'just down' stops it." >&2
    cat "$state/ready" 2>/dev/null >&2 || echo "It is still starting: $state/up.log" >&2
    exit 1
fi
if [[ -f $pidfile ]]; then
    # What a stack that died left behind (its processes, if any, first).
    kill -KILL -- "-$(cat "$pidfile")" 2>/dev/null || true
fi
rm -rf "$state"

host=${metadata%:*} port=${metadata##*:}
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    echo "$metadata, where the metadata service would stand, is taken by another program." >&2
    other=127.169.254.253:80
    [[ $metadata == "$other" ]] && other=127.169.254.252:80
    echo "Stop it, or choose another loopback address: IMDS_MESH_METADATA=$other just up" >&2
    exit 1
fi

mkdir -p "$state/tmp"
# Every temporary directory of the stack under the state directory, so
# `just down` removes them all.
TMPDIR=$state/tmp setsid "$up" "$state" "$metadata" >"$state/up.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
echo "imds-mesh is starting (pid $pid; progress in $state/up.log)..."

while [[ ! -f $state/ready ]]; do
    if ! kill -0 "$pid" 2>/dev/null; then
        if [[ -f $state/failed ]]; then
            echo "imds-mesh failed to start:" >&2
            cat "$state/failed" >&2
            echo >&2
            echo "(everything it said: $state/up.log)" >&2
        else
            echo "imds-mesh failed to start. What it said ($state/up.log):" >&2
            tail -n 60 "$state/up.log" >&2
        fi
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$pidfile"
        echo "(its files are kept in $state; the next 'just up' removes them)" >&2
        exit 1
    fi
    sleep 0.5
done
echo
cat "$state/ready"
