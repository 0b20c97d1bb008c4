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
from typing import NamedTuple, Optional, Protocol, runtime_checkable

from torch import Tensor


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
