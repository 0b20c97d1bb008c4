#!/usr/bin/env bash
# README command 2: set up the environment if needed, then run the whole test suite.
# Tests run in TRIME_TEST_WORKERS processes (pytest-xdist; default 2, one per core here), each
# single-threaded; pass "-n 0" to run them in this process (e.g. with a debugger).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n "${TRIME_TEST_WORKERS:-2}" "$@"
