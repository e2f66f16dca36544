#!/usr/bin/env bash
# Creates .venv (Python 3.10+) and installs homegen with its test extra from this repository's files, at
# the versions in constraints.txt (the ones the test suite passes with; bash scripts/lock.sh refreshes them).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
