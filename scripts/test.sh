#!/usr/bin/env bash
# One command: install (into .venv) and run lint, types and the test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k egress  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "== ruff"
.venv/bin/ruff check mesh services tests bench
.venv/bin/ruff format --check mesh services tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"
