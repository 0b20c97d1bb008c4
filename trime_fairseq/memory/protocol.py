"""The memory protocol shared by the long-term memory and the Memorizing Transformer's kNN memory.

In the style of meliad's memory layer: a memory is written with :meth:`SegmentMemory.update`
(entries in reading order, detached: no gradient reaches stored entries), read with
:meth:`SegmentMemory.topk` (the entries most similar to each query, by inner product) and
cleared with :meth:`SegmentMemory.reset`. Both implementations follow the same rules, which
``tests/test_memory_protocol.py`` checks on each against a brute-force reference:

* a query reads only entries stored strictly before the stream position ``before`` (later
  ones are in its local context already) and, per document, only its own document's;
* a memory holds at most its ``size`` newest entries (FIFO);
* ``reset()`` empties it.

Implementations: :class:`~trime_fairseq.memory.long_term.LongTermMemory` (one stream of
token representations and their next-token labels; TRIMELM_long and the continuous cache,
Eq. 3) and :class:`~trime_fairseq.memory.knn_memory.KnnMemory` (per batch row and head, the
keys and values of one attention layer; the Memorizing Transformer).
"""
from typing import NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor

SIM_CHUNK = 1 << 22  # similarities computed at once by chunked_topk (16 MiB in fp32)


class TopK(NamedTuple):
    """What :meth:`SegmentMemory.topk` returns, each ``[..., queries, k]`` (values may add
    trailing dimensions; a memory that holds fewer than ``k`` entries may return fewer
    columns): the similarity of each retrieved entry, its value (a label for the long-term
    memory, an attention value vector for the kNN memory) and ``found`` (False where fewer
    than ``k`` entries were readable; scores and values there are arbitrary)."""

    scores: Tensor
    values: Tensor
    found: Tensor


@runtime_checkable
class SegmentMemory(Protocol):
    """update / top-k / reset (see the module doc for the rules every memory follows)."""

    size: int

    def update(self, keys, values: Tensor, positions: Tensor, docs: Tensor,
               keep: Optional[Tensor] = None) -> None:
        """Append entries (their stream ``positions`` and ``docs``) in reading order; only
        those where ``keep`` is True (default: all)."""

    def topk(self, queries: Tensor, before, query_docs: Tensor, k: Optional[int] = None) -> TopK:
        """The ``k`` (default: the memory's own) readable entries of largest inner product
        with each query."""

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Forget everything (or only the given batch rows, where the memory has rows)."""


def chunked_topk(queries: Tensor, keys_t: Tensor, k: int, hidden: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of ``queries`` ``[..., T, d]`` with ``keys_t`` ``[..., d, n]``:
    ``(scores, entry indices)``, each ``[..., T, k]``, computed for a few queries at a time so
    that at most :data:`SIM_CHUNK` similarities exist at once. ``hidden`` (bool, ``[n]`` or
    ``[..., T, n]``) marks entries a query may not read (score -inf)."""
    t, n = queries.size(-2), keys_t.size(-1)
    if t == 0:
        empty = queries.new_empty(queries.shape[:-1] + (0,), dtype=keys_t.dtype)
        return empty, empty.long()
    per_query = max(1, keys_t[..., :1, :].numel())  # similarities per query, over the batch dims
    step = max(1, SIM_CHUNK // per_query)
    per_row_mask = hidden is not None and hidden.dim() > 1
    scores, index = [], []
    for s in range(0, t, step):
        sims = torch.matmul(queries[..., s:s + step, :].to(keys_t.dtype), keys_t)
        if hidden is not None:
            sims.masked_fill_(hidden[..., s:s + step, :] if per_row_mask else hidden, float("-inf"))
        v, i = sims.topk(min(k, n), dim=-1)
        scores.append(v)
        index.append(i)
    return torch.cat(scores, -2), torch.cat(index, -2)
