#!/usr/bin/env bash
# Set up (or check) the environment in .venv: Python 3.11, torch 2.13 (CPU), fairseq-fixed.
# Idempotent: a complete environment is detected by a stamp file and left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRIME_VENV:-.venv}
STAMP="$VENV/.trime-setup-v1"
PY=${PYTHON:-python3}
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import fairseq, trime_fairseq" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV (takes ~4 minutes the first time: fairseq compiles)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip wheel setuptools
# torch first and pinned: an unpinned torch would download a CUDA build of several GB
$PIP install "torch==2.13.0"
# fairseq's build and run-time needs, then fairseq itself without its declared deps
$PIP install cython "numpy<2" hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu regex \
  cffi tqdm scikit-learn packaging
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
  $PIP install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
$PIP install -e ".[test]"
"$VENV/bin/python" -c "import fairseq, faiss, torch, trime_fairseq; print('[setup] ok: fairseq', fairseq.__version__, 'torch', torch.__version__, 'faiss', faiss.__version__)"
touch "$STAMP"
