#!/usr/bin/env bash
# The README's trime-inspect example: one valid document of the main job's corpus, scored by a
# TRIMELM with local memory, as an HTML page (+ JSON) and a PNG screenshot.
#
#   bash scripts/inspect_example.sh [CKPT [TAU [DOC]]]
#
# Without CKPT, trains a TRIMELM with the main job's flags for 80 updates (instead of 320)
# into runs/inspect/ckpt (~11 minutes on 2 CPU cores). The corpus is runs/main/corpus/bin
# (override with DATA=...), built by the main job (bash scripts/main_job.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/main/corpus/bin}
CKPT=${1:-runs/inspect/ckpt/checkpoint_last.pt}
TAU=${2:-1}
DOC=${3:-4}
PY=${PYTHON:-python}
if [ ! -f "$DATA/dict.txt" ]; then
  echo "error: $DATA has no dict.txt: build the corpus first (bash scripts/main_job.sh) or set DATA=" >&2
  exit 2
fi
if [ ! -f "$CKPT" ]; then
  if [ $# -ge 1 ]; then echo "error: $CKPT: no such checkpoint" >&2; exit 2; fi
  "$PY" -m fairseq_cli.train "$DATA" --user-dir trime_fairseq --save-dir runs/inspect/ckpt --log-format json \
    --no-epoch-checkpoints --task trime_lm --arch transformer_lm_trime_small --tokens-per-sample 512 \
    --max-update 80 --optimizer adam --adam-betas "(0.9, 0.98)" --lr 0.002 --lr-scheduler inverse_sqrt \
    --warmup-updates 10 --warmup-init-lr 1e-7 --clip-norm 1.0 --seed 1 --log-interval 10 --disable-validation \
    --cpu --num-workers 0 --max-tokens 8192 --criterion trime_loss --ce-warmup-updates 4
fi
PAGE=runs/inspect/trime_valid_doc$DOC.html
"$PY" -m trime_fairseq.cli.inspect "$DATA" --path "$CKPT" --tokens-per-sample 512 --context-window 256 \
  --max-tokens 4096 --cpu --gen-subset valid --eval-combiner trime --eval-temperature "$TAU" --doc "$DOC" \
  --out "$PAGE"
bash scripts/screenshot_inspect.sh "$PAGE" docs/results/inspect.png 1500 1000
