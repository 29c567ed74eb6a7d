#!/usr/bin/env bash
# Set up a virtualenv from nothing (or reuse .venv) and run the whole test
# suite: ruff, mypy --strict, pytest (warnings are errors). This is the
# README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# mdb_dump (Debian's lmdb-utils) lets a test read the mirror with a non-Python
# tool, and redis-cli (redis-tools) talk to the sidecar's socket as users do;
# installed when this runs as root with apt-get, else those tests are skipped
need=""
command -v mdb_dump >/dev/null 2>&1 || need="$need lmdb-utils"
command -v redis-cli >/dev/null 2>&1 || need="$need redis-tools"
if [ -n "$need" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # shellcheck disable=SC2086
  (apt-get install -y -q $need >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $need >/dev/null 2>&1; }) \
    || echo "note: could not install$need; the tests that need them will be skipped"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
