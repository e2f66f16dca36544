#!/usr/bin/env bash
# Sets up the environment and runs the test suite (the README's test command; .ci/run calls it), in two
# worker processes (pytest-xdist; HOMEGEN_TEST_WORKERS=0 runs it in this one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${HOMEGEN_TEST_WORKERS:-2}" "$@"
