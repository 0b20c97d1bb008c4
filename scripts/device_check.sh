#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: verify every CUDA path of the project in one command (minutes).
#   1. set up .venv with a CUDA build of torch and faiss-gpu (TRIME_DEVICE=cuda);
#   2. tests/test_device.py (GPU results against the CPU's; fp16/amp; faiss-gpu), no test may skip;
#   3. the benchmark suite at smoke size with evaluation, kNN-LM / TRIMELM_ext and kNN-MT on CUDA.
# Output: runs/device_check/{pytest.log,report.md,report.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
TRIME_DEVICE=cuda bash scripts/setup.sh
mkdir -p runs/device_check
.venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA GPU')"
.venv/bin/python -m pytest -q -rs tests/test_device.py 2>&1 | tee runs/device_check/pytest.log
if grep -q "SKIPPED" runs/device_check/pytest.log; then
  echo "error: device tests skipped on this machine (see the reasons above)" >&2
  exit 1
fi
.venv/bin/python benchmarks/run_all.py --size smoke --device cuda --work runs/device_check/work \
  --report runs/device_check/report.md
