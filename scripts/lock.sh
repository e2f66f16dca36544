#!/usr/bin/env bash
# Refreshes constraints.txt: installs homegen with its test and plots extras into a fresh virtualenv,
# without constraints (the newest releases the bounds in pyproject.toml allow), and pins what was installed.
# Then run the tests (bash scripts/test.sh) before committing the new constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
fresh="$(mktemp -d)"
trap 'rm -rf "$fresh"' EXIT
"$PYTHON" -m venv "$fresh/venv"
"$fresh/venv/bin/python" -m pip install --quiet --upgrade pip
"$fresh/venv/bin/python" -m pip install --quiet ".[test,plots]"
{
  echo "# The versions the test suite passes with; scripts/setup.sh and CI install with them."
  echo "# Refresh: bash scripts/lock.sh (then run the tests)."
  "$fresh/venv/bin/python" -m pip freeze --exclude homegen
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
