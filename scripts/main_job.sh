#!/usr/bin/env bash
# README command 1: set up the environment if needed, then run the main job
# (default corpus -> vanilla / +cache / TRIMELM -> results table and plot in runs/main).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/main_job.py "$@"
