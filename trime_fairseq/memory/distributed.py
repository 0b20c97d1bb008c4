"""In-batch memory across data-parallel workers: an autograd-aware all-gather.

With ``W`` workers each holding ``B`` segments, TRIME's external (BM25) in-batch memory of
a segment is every *other* segment of the step's global batch (all ``W·B``), so keys and
labels are gathered from every worker while each worker keeps its own rows as queries.
:func:`all_gather_rows` concatenates a tensor from all workers along dim 0 (sizes may
differ) and, in the backward pass, sums the gradient of the gathered tensor over workers
and hands each worker the slice of its own rows. After fairseq's gradient all-reduce,
``W`` workers × ``B`` then get exactly the loss and gradients of 1 worker × ``W·B``.

Everything here is a no-op (returns its input) when ``torch.distributed`` is not
initialised or the world has one worker. Collectives run on a process group of their own
(created on first use), so they never interleave with DDP's gradient buckets.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

_GROUP = None


def world() -> Tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def memory_group():
    """The process group for memory collectives (all ranks; created on first use, which
    every rank reaches at the same step)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(list(range(dist.get_world_size())))
    return _GROUP


def _gather_equal(x: Tensor, group) -> List[Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


def gather_sizes(sizes: List[int], group=None, device: Optional[torch.device] = None) -> Tensor:
    """``[W, len(sizes)]`` integer sizes from every rank (rank order); ``device``: where the
    group's backend wants tensors (CUDA for NCCL)."""
    group = group if group is not None else memory_group()
    t = torch.tensor(sizes, dtype=torch.long, device=device)
    return torch.stack(_gather_equal(t, group))


class _AllGatherRows(torch.autograd.Function):
    """Forward: ``cat`` of every rank's rows. Backward: sum over ranks, own slice."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: List[int], rank: int, group) -> Tensor:  # type: ignore[override]
        ctx.rows, ctx.rank, ctx.group = rows, rank, group
        pad = max(rows) - x.size(0)
        padded = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
        parts = _gather_equal(padded, group)
        return torch.cat([p[:n] for p, n in zip(parts, rows)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss reads every rank's rows
        start = sum(ctx.rows[: ctx.rank])
        return grad[start:start + ctx.rows[ctx.rank]], None, None, None


def all_gather_rows(x: Tensor, rows: Optional[List[int]] = None, group=None) -> Tuple[Tensor, List[int]]:
    """Concatenate ``x`` ``[n_r, ...]`` of every rank along dim 0, in rank order.

    Differentiable: the gradient a rank receives for its ``x`` is the sum, over all ranks,
    of their gradients for those rows. Trailing dims must agree across ranks; ``n_r`` may
    differ (also 0). ``rows`` (every rank's ``n_r``) skips the size exchange when known.
    Returns ``(gathered, rows)``; without distribution ``(x, [n])``.
    """
    rank, size = world()
    if size == 1:
        return x, [x.size(0)]
    group = group if group is not None else memory_group()
    if rows is None:
        rows = gather_sizes([x.size(0)], group, x.device)[:, 0].tolist()
    return _AllGatherRows.apply(x, rows, rank, group), rows
