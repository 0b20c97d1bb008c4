"""Faults: a fairseq-train run stopped mid-epoch resumes from checkpoint_last.pt to
the same losses and weights as an uninterrupted run with the same seed, for every kind of
TRIME memory (local; long = --consecutive-segments; external = --bm25-batching with
--drop-local-prob) and for the Memorizing Transformer (--stream-batching, whose kNN memory
is saved with the data iterator's state).

The stop is ``--max-update 3`` (checkpoint_last.pt is written there, as after a kill at an
update boundary); the second run continues to update 10, across an epoch boundary. The
runs call fairseq-train's own ``cli_main`` in this process (the code path of the command)
and read the per-update losses it logs.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from conftest import USER_DIR

pytestmark = pytest.mark.slow

KINDS: Dict[str, List[str]] = {
    "local": ["--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--max-tokens", "128"],
    "long": ["--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--consecutive-segments", "2",
             "--batch-size", "4"],
    "external": ["--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--bm25-batching",
                 "--batch-size", "4", "--drop-local-prob", "0.5"],
    "memorizing": ["--arch", "memorizing_transformer_lm_tiny", "--criterion", "trime_loss", "--stream-batching",
                   "--batch-size", "4", "--memorizing-memory-size", "64", "--memorizing-topk", "4"],
}


class _Losses(logging.Handler):
    """Collects fairseq's per-update JSON log lines (``--log-format json``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rows: List[Tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "train_inner":
            stats = json.loads(record.getMessage())
            self.rows.append((int(stats["num_updates"]), stats["loss"]))


def train(data: Path, save_dir: Path, extra: List[str], max_update: int, cache: Path) -> List[Tuple[int, str]]:
    """``fairseq-train`` (in this process) until ``max_update``; the logged (update, loss)."""
    import fairseq_cli.train as fairseq_train

    argv = [str(data), "--user-dir", USER_DIR, "--task", "trime_lm", "--ce-warmup-updates", "1", "--optimizer",
            "adam", "--lr", "3e-3", "--tokens-per-sample", "32", "--max-update", str(max_update), "--save-dir",
            str(save_dir), "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1", "--cpu",
            "--seed", "3", "--num-workers", "0", "--disable-validation", "--bm25-cache-dir", str(cache), *extra]
    handler = _Losses()
    progress = logging.getLogger("fairseq.logging.progress_bar")
    progress.addHandler(handler)
    saved = sys.argv
    sys.argv = [fairseq_train.__file__, *argv]
    try:
        fairseq_train.cli_main()
    finally:
        sys.argv = saved
        progress.removeHandler(handler)
    return handler.rows


@pytest.mark.parametrize("kind", list(KINDS))
def test_stopped_run_resumes_to_the_same_losses(kind, tiny_lm, tmp_path):
    data, _, _ = tiny_lm
    full = train(data, tmp_path / "full", KINDS[kind], 10, tmp_path)
    first = train(data, tmp_path / "cut", KINDS[kind], 3, tmp_path)
    rest = train(data, tmp_path / "cut", KINDS[kind], 10, tmp_path)
    assert [u for u, _ in full] == list(range(1, 11))
    assert first + rest == full
    a = torch.load(tmp_path / "full" / "checkpoint_last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint_last.pt", weights_only=False)
    assert a["extra_state"]["train_iterator"]["epoch"] == b["extra_state"]["train_iterator"]["epoch"] == 2
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=0, msg=name)
