#!/usr/bin/env bash
# Set up .venv (if needed) and run the system. Today that is the sync-core
# walk-through (`replicad demo`); the origin + sidecar take its place as they
# land.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/replicad demo "$@"
