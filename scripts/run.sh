#!/usr/bin/env bash
# Set up .venv (if needed) and run the system on this machine: a real origin
# (replicad serve) and a real sidecar (sidecar run), seed-like user profiles
# loaded, zero-copy reads shown, a write followed. Options are passed on:
# --records N, --keep (leave both running until Ctrl-C), --dir DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python -m sidecar.quickstart "$@"
