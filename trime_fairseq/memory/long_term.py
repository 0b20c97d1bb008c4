"""A test-time long-term memory (Eq. 3): the representations of a document's earlier tokens.

Used by ``fairseq-eval-lm`` (``--eval-memory local+long``) for TRIMELM_long and the
continuous cache extended to long-term memory. Entries are appended in reading order,
with their stream position and document; :meth:`LongTermMemory.window` returns those a
block may use: the same document, strictly before the block's context window (the window
itself is local memory, so no token is counted twice), at most ``size`` of them (the
most recent). Only the current document is kept, in a preallocated buffer that is
compacted when full, so appends cost O(tokens appended) and windows are views.

It follows the memory protocol (:mod:`trime_fairseq.memory.protocol`): :meth:`LongTermMemory.update`
appends, :meth:`LongTermMemory.topk` returns the readable entries most similar to each query
(``window`` is the whole readable set, which Eq. 5 sums over), :meth:`LongTermMemory.reset`
empties it.

With ``across_documents`` (``--memory-across-documents``) the memory is the stream's: it
is not reset at document boundaries, and a block reads the ``size`` most recent tokens
before its window whatever their document (as the reference evaluates WikiText-103).
"""
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from trime_fairseq.errors import TrimeUserError
from trime_fairseq.memory.protocol import TopK, chunked_topk


class MemoryOrderError(RuntimeError):
    """Blocks did not arrive in reading order."""


@dataclass
class MemoryWindow:
    """The entries a block may read (views): keys ``[K, d]`` per representation, labels,
    documents and stream positions."""

    keys: Dict[str, Tensor]
    labels: Tensor
    docs: Tensor
    positions: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.numel())


class LongTermMemory:
    """The last ``size`` (+ ``context``) tokens of the current document (see module doc)."""

    def __init__(self, size: int, context: int = 0, across_documents: bool = False) -> None:
        if size < 0:
            raise TrimeUserError(f"--long-memory-size must be >= 0, got {size}")
        self.size, self.context = size, context
        self.across_documents = across_documents
        self.capacity = 2 * (size + context) + 1
        self.reset()

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Empty the memory (it has one stream, so ``rows`` is ignored)."""
        self._keys: Dict[str, Tensor] = {}
        self._labels = self._docs = self._pos = None
        self.start = self.end = 0

    @property
    def labels(self) -> Optional[Tensor]:
        return None if self._labels is None else self._labels[self.start:self.end]

    @property
    def next_position(self) -> Optional[int]:
        return None if self.end == self.start else int(self._pos[self.end - 1]) + 1

    def window(self, context_start: int, doc: int) -> Optional[MemoryWindow]:
        """Entries of document ``doc`` (any document with ``across_documents``) before stream
        position ``context_start``, newest last."""
        if self.end == self.start or self.size == 0:
            return None
        if not self.across_documents and int(self._docs[self.start]) != doc:
            return None
        pos = self._pos[self.start:self.end]
        at = torch.tensor(context_start, dtype=pos.dtype, device=pos.device)
        stop = self.start + int(torch.searchsorted(pos, at))
        first = max(self.start, stop - self.size)
        if stop <= first:
            return None
        return MemoryWindow({k: v[first:stop] for k, v in self._keys.items()},
                            self._labels[first:stop], self._docs[first:stop], self._pos[first:stop])

    def _allocate(self, keys: Dict[str, Tensor], labels: Tensor) -> None:
        cap = max(self.capacity, 1)
        self._keys = {k: v.new_empty((cap,) + tuple(v.shape[1:])) for k, v in keys.items()}
        self._labels = labels.new_empty(cap)
        self._docs = labels.new_empty(cap)
        self._pos = labels.new_empty(cap)

    def topk(self, queries: Tensor, before: Union[int, Tensor], query_docs: Tensor, k: Optional[int] = None,
             representation: str = "g") -> TopK:
        """The ``k`` readable entries of largest inner product ``q·key`` (Eq. 3's similarity,
        before the 1/√d scaling) with each of ``queries`` ``[T, d]``, best first.

        Readable: as :meth:`window` for a block whose context starts at ``before`` and whose
        first query is in document ``query_docs[0]``; per document, a query reads only its own
        document's entries. ``k=None``: all readable entries. Values are the entries' labels.
        """
        window = self.window(int(before), int(query_docs[0]))
        n = 0 if window is None else len(window)
        width = n if k is None else k
        t = queries.size(0)
        scores = queries.new_full((t, width), float("-inf"))
        values = torch.zeros(t, width, dtype=torch.long, device=queries.device)
        take = min(width, n)
        if take > 0:
            if representation not in window.keys:
                raise TrimeUserError(f"the long-term memory holds {sorted(window.keys)}, not {representation!r}")
            other_doc = None if self.across_documents else query_docs.unsqueeze(1) != window.docs.unsqueeze(0)
            top, idx = chunked_topk(queries, window.keys[representation].t(), take, other_doc)
            scores[:, :take] = top.to(scores.dtype)
            values[:, :take] = window.labels[idx]
        return TopK(scores, values, torch.isfinite(scores))

    def update(self, keys: Dict[str, Tensor], values: Tensor, positions: Tensor, docs: Tensor,
               keep: Optional[Tensor] = None) -> None:
        """Add scored tokens in reading order: ``[n, d]`` keys per representation, ``[n]``
        values (next-token labels), stream positions and documents; only where ``keep``
        (default all)."""
        if keep is not None:
            keys = {k: v[keep] for k, v in keys.items()}
            values, positions, docs = values[keep], positions[keep], docs[keep]
        labels = values
        n = int(positions.numel())
        if n == 0:
            return
        nxt = self.next_position
        if nxt is not None and int(positions[0]) != nxt:
            if int(positions[0]) == 0:
                self.reset()  # a new pass over the data
            else:
                raise MemoryOrderError(
                    f"long-term memory expected stream position {nxt}, got {int(positions[0])}: "
                    "blocks must be scored in reading order (use --task trime_lm's own data loader)"
                )
        # only the last document of these tokens can matter later, and only its newest
        # size + context tokens
        cut = 0
        if not self.across_documents:
            new_doc = (docs != docs[-1]).nonzero(as_tuple=True)[0]
            cut = int(new_doc[-1]) + 1 if new_doc.numel() else 0
            if cut > 0 or (self.end > self.start and int(self._docs[self.end - 1]) != int(docs[-1])):
                self.start = self.end = 0  # a new document: drop the old one
        keep = self.size + self.context
        cut = max(cut, n - keep)
        keys = {k: v[cut:].detach() for k, v in keys.items()}
        labels, docs, positions = labels[cut:], docs[cut:], positions[cut:]
        n = int(labels.numel())
        if self._labels is None or set(keys) != set(self._keys):
            self._allocate(keys, labels)
            self.start = self.end = 0
        if self.end + n > self.capacity:  # compact: move the newest entries to the front
            old = max(self.start, self.end - max(keep - n, 0))
            m = self.end - old
            for k in self._keys:
                self._keys[k][:m] = self._keys[k][old:self.end].clone()
            for buf in (self._labels, self._docs, self._pos):
                buf[:m] = buf[old:self.end].clone()
            self.start, self.end = 0, m
        s, e = self.end, self.end + n
        for k, v in keys.items():
            self._keys[k][s:e] = v
        self._labels[s:e], self._docs[s:e], self._pos[s:e] = labels, docs, positions
        self.end = e
        self.start = max(self.start, self.end - keep)
