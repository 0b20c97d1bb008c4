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
4. fairseq's distributed training assumes GPUs: ``--distributed-world-size N`` spawns
   ``min(#GPUs, N)`` processes (none on a CPU machine) and asserts that N GPUs exist,
   torchrun's environment is read with ``rank % #GPUs``, ``--ddp-backend c10d`` passes
   ``device_ids=[i]`` to ``DistributedDataParallel`` (refused for CPU modules), and
   ``all_gather_list`` (used to sync logging outputs) allocates CUDA buffers. Without
   GPUs (or with ``--cpu``) we spawn N local processes on ``tcp://localhost:PORT`` (or
   read torchrun's ``env://``), switch an ``nccl`` backend to ``gloo``, build DDP without
   device ids for CPU modules, and gather logging outputs with
   ``torch.distributed.all_gather_object`` on gloo groups. GPU runs are untouched.
5. fairseq's ``clip_grad_norm_`` sums gradient norms on the current CUDA device whenever
   CUDA is available, also in a ``--cpu`` run, and then scales the CPU gradients by a CUDA
   scalar ("scalar tensor is expected to be on cpu but is on cuda:0"): ``--cpu --clip-norm``
   failed on every GPU machine. For CPU gradients we keep the norm on the CPU.

The shims were written for fairseq 0.12 (``fairseq-fixed`` 0.12.3.1, upstream 0.12.2): with
another fairseq version they are skipped with a warning. ``TRIME_FAIRSEQ_SHIMS=0`` in the
environment switches them off altogether.
"""
from __future__ import annotations

import importlib
import logging
import os
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


def _cpu_training(cfg) -> bool:
    return not cfg.common.tpu and (cfg.common.cpu or not torch.cuda.is_available())


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _prepare_cpu_distributed(cfg) -> None:
    """Fill in what fairseq infers from GPUs: init method, rank, backend (see 4.)."""
    import os

    dt = cfg.distributed_training
    if dt.distributed_backend == "nccl":
        logger.info("training on CPU: --distributed-backend gloo (nccl needs GPUs)")
        dt.distributed_backend = "gloo"
    if dt.distributed_init_method is not None:
        return
    if all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")):  # torchrun
        dt.distributed_init_method = "env://"
        dt.distributed_world_size = int(os.environ["WORLD_SIZE"])
        dt.distributed_rank = int(os.environ["RANK"])
        dt.device_id = 0
        dt.distributed_no_spawn = True
    else:
        port = dt.distributed_port if dt.distributed_port > 0 else _free_port()
        dt.distributed_init_method = f"tcp://localhost:{port}"


def _patch_clip_grad_norm() -> None:
    from fairseq import utils

    original = utils.clip_grad_norm_
    if getattr(original, "_trime_cpu_grads", False):
        return

    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None) -> torch.Tensor:
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        with_grad = [p for p in params if p is not None and getattr(p, "grad", None) is not None]
        if len(with_grad) < 2 or with_grad[0].grad.device.type != "cpu" or not torch.cuda.is_available():
            return original(params, max_norm, aggregate_norm_fn)
        grads = [p.grad.detach() for p in with_grad if not hasattr(p, "expert")]
        experts = [p.grad.detach() for p in with_grad if hasattr(p, "expert")]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                     for g in grads])) if grads else torch.tensor(0.0)
        if aggregate_norm_fn is not None:
            norm = aggregate_norm_fn(norm)
        if max_norm > 0:
            torch._foreach_mul_(grads + experts, (float(max_norm) / (norm + 1e-6)).clamp_(max=1))
        return norm

    clip_grad_norm_._trime_cpu_grads = True  # type: ignore[attr-defined]
    utils.clip_grad_norm_ = clip_grad_norm_


def _patch_cpu_distributed() -> None:
    from fairseq.distributed import utils as dist_utils
    from fairseq.models import distributed_fairseq_model
    from torch.nn.parallel import DistributedDataParallel

    original_call_main = dist_utils.call_main
    if getattr(original_call_main, "_trime_cpu", False):
        return

    def call_main(cfg, main, **kwargs):
        dt = cfg.distributed_training
        if not _cpu_training(cfg) or dt.distributed_world_size <= 1:
            return original_call_main(cfg, main, **kwargs)
        _prepare_cpu_distributed(cfg)
        if dt.distributed_no_spawn:
            return dist_utils.distributed_main(dt.device_id, main, cfg, kwargs)
        kwargs["start_rank"] = dt.distributed_rank
        dt.distributed_rank = None  # assigned per spawned process
        torch.multiprocessing.spawn(fn=dist_utils.distributed_main, args=(main, cfg, kwargs),
                                    nprocs=dt.distributed_world_size, join=True)

    class DeviceAwareDDP(DistributedDataParallel):
        """``DistributedDataParallel`` that drops GPU device ids for a CPU module."""

        def __init__(self, module, device_ids=None, output_device=None, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)

    original_gather = dist_utils.all_gather_list

    def all_gather_list(data, group=None, max_size=16384):
        import torch.distributed as dist

        pg = dist_utils.get_global_group() if group is None else group
        if isinstance(pg, tuple) or dist.get_backend(pg) != "gloo":
            return original_gather(data, group=group, max_size=max_size)
        out = [None] * dist.get_world_size(pg)
        dist.all_gather_object(out, data, group=pg)
        return out

    call_main._trime_cpu = True  # type: ignore[attr-defined]
    dist_utils.call_main = call_main
    dist_utils.all_gather_list = all_gather_list
    distributed_fairseq_model.DistributedDataParallel = DeviceAwareDDP


_applied = False

#: environment variable that switches the shims off (``0``, ``off``, ``false`` or ``no``)
SHIMS_ENV = "TRIME_FAIRSEQ_SHIMS"
#: fairseq versions the shims were written for (prefix match)
SUPPORTED_FAIRSEQ = "0.12."


def shims_enabled() -> bool:
    """False when ``$TRIME_FAIRSEQ_SHIMS`` switches the shims off."""
    return os.environ.get(SHIMS_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def apply() -> bool:
    """Apply all shims (idempotent). Returns whether they are in effect."""
    global _applied
    if _applied:
        return True
    if not shims_enabled():
        logger.info("%s=%s: fairseq stack shims not applied", SHIMS_ENV, os.environ.get(SHIMS_ENV))
        return False
    import fairseq

    version = getattr(fairseq, "__version__", "unknown")
    if not version.startswith(SUPPORTED_FAIRSEQ):
        logger.warning("fairseq %s: the stack shims of trime_fairseq.compat were written for fairseq %sx "
                       "and are not applied", version, SUPPORTED_FAIRSEQ)
        return False
    _patch_numpy_compat()
    _patch_torch_load()
    _patch_batch_by_size()
    _patch_cpu_distributed()
    _patch_clip_grad_norm()
    _applied = True
    logger.debug("trime_fairseq compatibility shims applied")
    return True
