"""Compatibility shims that let stock fairseq 0.12 run on the current stack.

Everything that patches fairseq (or numpy) for Python 3.11 / torch >= 2.6 / numpy >= 2
lives here and nowhere else. It is applied once, when :mod:`trime_fairseq` is imported
(``--user-dir trime_fairseq`` does that before any checkpoint is read).

1. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6. fairseq checkpoints
   hold ``argparse.Namespace`` and omegaconf objects, so fairseq's own loaders
   (``fairseq-train --restore-file``, ``fairseq-eval-lm``, ``fairseq-generate``) fail.
   We give the fairseq modules that call ``torch.load`` a view of ``torch`` whose
   ``load`` defaults to ``weights_only=False``; the rest of ``torch`` is untouched.
   As with fairseq on older torch, only load checkpoints you trust.
2. ``fairseq-fixed``'s ``data_utils.batch_by_size`` silently drops the last batch when its
   size is not a multiple of ``--required-batch-size-multiple`` (default 8). For
   ``fairseq-eval-lm`` and ``fairseq-generate`` that means skipping the end of the test
   set, and a small validation set can come out empty. We restore upstream fairseq's
   behaviour: the remainder is kept as a final, smaller batch.
3. numpy >= 2 removed ``np.compat``, still used by fairseq's ``token_block_dataset`` and
   ``language_pair_dataset``. We pin ``numpy<2`` in ``setup.py`` and, should numpy 2 be
   installed anyway, provide the one name fairseq needs (``np.compat.long``).
"""
from __future__ import annotations

import importlib
import logging
import types
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# fairseq modules that call ``torch.load`` on files fairseq itself wrote.
_TORCH_LOAD_USERS = ("fairseq.checkpoint_utils", "fairseq.distributed.utils")


class _TrustedTorch(types.ModuleType):
    """A stand-in for the ``torch`` module whose ``load`` defaults to full unpickling."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("weights_only", False)
        return torch.load(f, *args, **kwargs)


def _patch_torch_load() -> None:
    shim = _TrustedTorch()
    for name in _TORCH_LOAD_USERS:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = shim


def _patch_numpy_compat() -> None:
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=np.int64)  # type: ignore[attr-defined]
    elif not hasattr(np.compat, "long"):
        np.compat.long = np.int64  # type: ignore[attr-defined]


def _patch_batch_by_size() -> None:
    from fairseq.data import data_utils

    original = data_utils.batch_by_size
    if getattr(original, "_trime_keeps_last", False):
        return

    def batch_by_size(indices, *args, **kwargs):
        batches = original(indices, *args, **kwargs)
        if kwargs.get("fixed_shapes") is not None:
            return batches
        indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        covered = sum(len(b) for b in batches)
        if covered < len(indices):  # batches are consecutive slices; the tail was dropped
            batches = list(batches) + [indices[covered:]]
        return batches

    batch_by_size._trime_keeps_last = True  # type: ignore[attr-defined]
    data_utils.batch_by_size = batch_by_size


_applied = False


def apply() -> None:
    """Apply all shims (idempotent)."""
    global _applied
    if _applied:
        return
    _patch_numpy_compat()
    _patch_torch_load()
    _patch_batch_by_size()
    _applied = True
    logger.debug("trime_fairseq compatibility shims applied")
