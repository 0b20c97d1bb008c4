"""The Memorizing Transformer's kNN memory (Wu et al., 2022): per batch row and head, a FIFO
of the (key, value) pairs one attention layer computed on earlier segments.

API in the spirit of meliad's memory layer: :meth:`KnnMemory.update` appends (detached:
no gradient ever reaches stored entries), :meth:`KnnMemory.topk` retrieves the k most
similar keys per query (exact inner product over L2-normalised keys), and
:meth:`KnnMemory.reset` clears rows (at document boundaries). Rows never see each other.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class KnnMemory:
    """``[rows, heads, size, dim]`` FIFO of normalised keys and their values."""

    def __init__(self, size: int, topk: int) -> None:
        if size < 0:
            raise ValueError(f"--knn-memory-size must be >= 0, got {size}")
        if topk < 1:
            raise ValueError(f"--knn-memory-topk must be >= 1, got {topk}")
        self.size, self.k = size, topk
        self.keys: Optional[Tensor] = None
        self.values: Optional[Tensor] = None
        self.count: Optional[Tensor] = None  # valid entries per row (newest at the end)
        self.positions: Optional[Tensor] = None  # stream position of each entry (-1: unknown)
        self.docs: Optional[Tensor] = None  # document of each row's entries

    def _allocate(self, rows: int, heads: int, dim: int, like: Tensor) -> None:
        self.keys = like.new_zeros(rows, heads, self.size, dim)
        self.values = like.new_zeros(rows, heads, self.size, dim)
        self.count = torch.zeros(rows, dtype=torch.long, device=like.device)
        self.positions = torch.full((rows, self.size), -1, dtype=torch.long, device=like.device)
        self.docs = torch.full((rows,), -1, dtype=torch.long, device=like.device)

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Clear ``rows`` (bool ``[rows]``), or everything."""
        if self.keys is None:
            return
        if rows is None:
            self.keys = None
            return
        self.count[rows] = 0
        self.positions[rows] = -1
        self.docs[rows] = -1

    def update(self, keys: Tensor, values: Tensor, keep: Tensor, positions: Tensor, docs: Tensor) -> None:
        """Append ``[rows, heads, T, dim]`` keys (normalised here) and values, FIFO.

        Args:
            keep: ``[rows, T]`` bool, which positions to store (not padding, not a context
                window stored before).
            positions, docs: ``[rows, T]`` stream position and document of each token. A
                row keeps one document: its memory is cleared when a newer one starts.
        """
        if self.size == 0:
            return
        rows, heads, t, dim = keys.shape
        if self.keys is None or self.keys.shape[0] != rows:
            self._allocate(rows, heads, dim, keys)
        keys = F.normalize(keys.detach(), dim=-1)
        values = values.detach()
        for r in range(rows):  # rows keep different numbers of entries
            sel = keep[r].nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            last_doc = docs[r, sel[-1]]
            sel = sel[docs[r, sel] == last_doc][-self.size:]
            if int(self.docs[r]) != int(last_doc):
                self.count[r] = 0
                self.docs[r] = last_doc
            n, c = sel.numel(), int(self.count[r])
            drop = max(0, c + n - self.size)
            if drop:
                self.keys[r, :, : c - drop] = self.keys[r, :, drop:c].clone()
                self.values[r, :, : c - drop] = self.values[r, :, drop:c].clone()  # overlapping move
                self.positions[r, : c - drop] = self.positions[r, drop:c].clone()
                c -= drop
            self.keys[r, :, c:c + n] = keys[r, :, sel]
            self.values[r, :, c:c + n] = values[r, :, sel]
            self.positions[r, c:c + n] = positions[r, sel]
            self.count[r] = c + n

    def topk(self, queries: Tensor, before: Tensor, query_docs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Exact top-k by inner product of normalised queries and keys.

        Args:
            queries: ``[rows, heads, T, dim]``.
            before: ``[rows]`` stream position; entries at or after it are skipped (they are
                in the local context already).
            query_docs: ``[rows, T]``: a query only sees its own document's entries.
        Returns:
            ``(scores [rows, heads, T, k], values [rows, heads, T, k, dim], found [rows, heads, T, k])``
            (``found`` False where fewer than k entries exist).
        """
        rows, heads, t, dim = queries.shape
        if self.keys is None:
            empty = queries.new_zeros(rows, heads, t, 0)
            return empty, queries.new_zeros(rows, heads, t, 0, dim), empty.bool()
        k = min(self.k, self.size)
        scores, vals, found = [], [], []
        slots = torch.arange(self.size, device=queries.device)
        head_idx = torch.arange(heads, device=queries.device)[:, None, None]
        for r in range(rows):  # one row at a time bounds the [heads, T, size] similarities
            q = F.normalize(queries[r], dim=-1)
            with torch.no_grad():  # search without a graph; scores are recomputed below
                sims = torch.matmul(q, self.keys[r].transpose(-1, -2))
                valid = (slots < self.count[r]) & (self.positions[r] < before[r])
                same_doc = query_docs[r] == self.docs[r]  # [T]
                sims = sims.masked_fill(~(valid[None, :] & same_doc[:, None]), float("-inf"))
                top, idx = sims.topk(k, dim=-1)
            keys = self.keys[r][head_idx, idx]  # [heads, T, k, dim], a copy: the buffer stays free
            scores.append(torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1))  # differentiable in q
            vals.append(self.values[r][head_idx, idx])
            found.append(torch.isfinite(top))
        return torch.stack(scores), torch.stack(vals), torch.stack(found)
