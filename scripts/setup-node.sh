#!/usr/bin/env bash
# Installs the Node AWS SDK clients the integration tests drive
# (integration/clients), exactly as package-lock.json pins them. Idempotent:
# runs `npm ci` only when node_modules is missing or the lock file changed.
set -euo pipefail
clients="$(cd "$(dirname "$0")/../integration/clients" && pwd)"
lock="$clients/package-lock.json"
stamp="$clients/node_modules/.package-lock.sha256"
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
npm ci --prefix "$clients" --no-audit --no-fund --loglevel=error
echo "$want" > "$stamp"
