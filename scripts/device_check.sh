#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: verify every CUDA path of the project in one command (minutes).
#   1. the environment: .venv with a CUDA build of torch and faiss-gpu (TRIME_DEVICE=cuda setup.sh), or,
#      on a machine without internet that already has a CUDA torch, that python plus carried wheels;
#   2. tests/test_device.py (GPU results against the CPU's; fp16/amp; faiss-gpu); no test may skip,
#      except faiss-gpu's where only faiss-cpu is installed (said so in the log);
#   3. the benchmark suite at smoke size on CUDA (training, evaluation, kNN-LM / TRIMELM_ext, kNN-MT);
#   4. with TRIME_LM_DATA=<binarised LM corpus>: training speed and peak memory on CUDA of CE, local,
#      long and external (BM25-batch) memory at the full suite's model size (benchmarks/train_speed.py).
#
#   bash scripts/device_check.sh                          # online machine: sets up .venv itself
#   bash scripts/device_check.sh --fetch-wheels .whl      # here, online: Python 3.12 wheels for an offline GPU machine
#   TRIME_PYTHON=python3 TRIME_WHEELS=.whl bash scripts/device_check.sh    # there: its torch + the wheels
# Output: ${TRIME_CHECK_OUT:-runs/device_check}/{env.txt,pytest.log,report.md,report.json,train_cuda.json,...}.
# TRIME_CHECK_PARTS=tests,suite,train (default: all three) runs a subset, e.g. one per call where calls are timed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --fetch-wheels ]; then  # wheels the GPU image lacks (torch, numpy, scipy... it has)
  dir=${2:?usage: --fetch-wheels DIR}
  py=${TRIME_WHEEL_PYTHON_VERSION:-3.12}
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64)
  pip=(python3 -m pip)
  [ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
  "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp "${plat[@]}" \
    -d "$dir" fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray faiss-cpu rank-bm25
  "${pip[@]}" wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3  # pure Python, sdist only
  ls "$dir"
  exit 0
fi
OUT=${TRIME_CHECK_OUT:-runs/device_check}
mkdir -p "$OUT"
if [ -n "${TRIME_PYTHON:-}" ]; then
  PY=$TRIME_PYTHON
  if [ -n "${TRIME_WHEELS:-}" ]; then
    site=$(mktemp -d)/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$TRIME_WHEELS"/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  TRIME_DEVICE=cuda bash scripts/setup.sh
  PY=.venv/bin/python
fi
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import sys, torch
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA GPU")
import faiss, fairseq, numpy
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU {torch.cuda.get_device_name(0)}, numpy {numpy.__version__}, fairseq {fairseq.__version__}, "
      f"faiss {faiss.__version__} (GPU build: {hasattr(faiss, 'StandardGpuResources')})")
EOF
status=0
PARTS=",${TRIME_CHECK_PARTS:-tests,suite,train},"
part() { [[ "$PARTS" == *",$1,"* ]]; }
# no time limit on the tests: pytest prints a failure's details only when the session ends, so a
# killed run loses them (a stalled test dumps its stack after TRIME_TEST_STALL seconds instead)
if part tests; then
  "$PY" -m pytest -q -rfEs --durations=8 -p no:cacheprovider -o faulthandler_timeout="${TRIME_TEST_STALL:-300}" \
    tests/test_device.py 2>&1 | tee "$OUT/pytest.log" || status=1
  if grep "^SKIPPED" "$OUT/pytest.log" | grep -v "faiss-gpu" >/dev/null; then
    echo "error: device tests skipped on this machine (see the reasons above)" >&2
    status=1
  fi
  if grep -q "^SKIPPED.*faiss-gpu" "$OUT/pytest.log"; then
    echo "note: faiss-gpu is not installed; its test skipped" >&2
  fi
fi
if part suite; then
  timeout "${TRIME_BENCH_TIMEOUT:-900}" "$PY" benchmarks/run_all.py --size smoke --device cuda \
    --work "$OUT/work" --report "$OUT/report.md" 2>&1 | tail -n 40 || status=1
fi
if part train && [ -n "${TRIME_LM_DATA:-}" ]; then
  timeout "${TRIME_TRAIN_TIMEOUT:-600}" "$PY" benchmarks/train_speed.py "$TRIME_LM_DATA" --device cuda \
    --arch transformer_lm_trime_small --tokens-per-sample 512 --max-tokens 8192 --long-m 4 --ext --ext-chunk 8192 --op-counts \
    --blocks "${TRIME_TRAIN_BLOCKS:-3}" --steps 5 --out "$OUT/train_cuda.json" 2>&1 | tail -n 30 || status=1
fi
exit $status
