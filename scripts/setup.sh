#!/usr/bin/env bash
# Set up (or check) the environment in .venv: Python 3.11, torch 2.13 (CPU), fairseq-fixed.
# Idempotent: a complete environment is detected by a stamp file and left alone.
#   TRIME_DEVICE=cuda bash scripts/setup.sh   # GPU machines: CUDA build of torch + faiss-gpu-cu12
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRIME_VENV:-.venv}
DEVICE=${TRIME_DEVICE:-cpu}
case "$DEVICE" in
  cpu|cuda) ;;
  *) echo "error: TRIME_DEVICE=$DEVICE: use cpu (default) or cuda" >&2; exit 2 ;;
esac
STAMP="$VENV/.trime-setup-v2-$DEVICE"  # bump when the installed set changes
PY=${PYTHON:-python3}
if [ -f "$STAMP" ] && "$VENV/bin/python" -c "import fairseq, trime_fairseq" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating $VENV (takes ~4 minutes the first time: fairseq compiles)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip wheel setuptools
# torch first and pinned: an unpinned torch would download a CUDA build of several GB
if [ "$DEVICE" = cuda ]; then
  $PIP install "torch==2.13.0" --index-url "${TRIME_TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}" \
    || $PIP install "torch==2.13.0"   # PyPI's Linux wheel is a CUDA build too
else
  $PIP install "torch==2.13.0"
fi
# fairseq's build and run-time needs, then fairseq itself without its declared deps
$PIP install cython "numpy<2" hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu regex \
  cffi tqdm scikit-learn packaging
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
  $PIP install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
fi
$PIP install -e ".[test]"
if [ "$DEVICE" = cuda ]; then  # the same faiss module, built with GPU support
  $PIP uninstall -y faiss-cpu
  $PIP install faiss-gpu-cu12
fi
"$VENV/bin/python" -c "import fairseq, faiss, torch, trime_fairseq; print('[setup] ok: fairseq', fairseq.__version__, 'torch', torch.__version__, 'faiss', faiss.__version__)"
touch "$STAMP"
