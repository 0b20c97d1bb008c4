"""The Memorizing Transformer's kNN memory (Wu et al., 2022): per batch row and head, a FIFO
of the (key, value) pairs one attention layer computed on earlier segments.

It follows the memory protocol (:mod:`trime_fairseq.memory.protocol`, meliad's memory
layer API): :meth:`KnnMemory.update` appends (detached:
no gradient ever reaches stored entries), :meth:`KnnMemory.topk` retrieves the k most
similar keys per query (inner product of L2-normalised queries and keys), and
:meth:`KnnMemory.reset` clears rows (at document boundaries). Rows never see each other.

Storage is a ring buffer per row: entry ``i`` of a row (counted since the row was last
cleared) lives in slot ``i % size``, so the oldest entry is overwritten first and nothing
is ever moved. Keys are normalised once, when stored.

Search (``--memorizing-search``):

* ``torch``: exact. One ``[heads, queries, entries]`` matmul per row (in chunks of queries
  that bound its size), then ``topk``; entries a query may not see are masked only when there
  are any (in training there are none).
* ``faiss``: one faiss index per (row, head) (``--memorizing-faiss-factory``, inner product) that
  holds the row's live entries under their entry number ``i`` as id. FIFO eviction removes
  the evicted id range (``remove_ids``; indexes that cannot remove, such as HNSW, are rebuilt
  from the ring buffer instead: correct, but slow for large memories). Trainable indexes (IVF)
  are trained once per (row, head), on the row's live keys as soon as it holds
  ``--memorizing-faiss-train-size`` of them (until then that row is searched exactly by torch), and
  keep their quantizer across document boundaries (it is not retrained as keys drift).
  Entries at or after a query's segment start are over-fetched and dropped, so the causal
  and document rules are the same as with torch.
* ``auto``: faiss when the memory is larger than ``--memorizing-faiss-min-size``, else torch.

In both, the retrieved keys are gathered from the ring buffer and their scores recomputed
with the (differentiable) queries; values come from the ring buffer. faiss runs on the CPU.
"""
import logging
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trime_fairseq.errors import TrimeUserError
from trime_fairseq.memory.protocol import TopK, chunked_topk

logger = logging.getLogger(__name__)

SEARCH_CHOICES = ("auto", "torch", "faiss")

#: the one source of the Memorizing Transformer's flag defaults (``--memorizing-*``; the
#: model's flags, the attention layer and :class:`KnnMemory` read them from here)
MEMORIZING_DEFAULTS = {
    "memorizing_layer": -1, "memorizing_memory_size": 8192, "memorizing_topk": 32,
    "memorizing_gate_init": 0.5, "memorizing_scale_init": 0.0, "memorizing_param_scale": 1.0,
    "memorizing_qk_norm": "off",
    "memorizing_search": "auto", "memorizing_faiss_min_size": 65536, "memorizing_faiss_factory": "auto",
    "memorizing_faiss_nprobe": 32, "memorizing_faiss_train_size": 0,
}
_D = MEMORIZING_DEFAULTS


def memory_index_factory(size: int) -> str:
    """``--memorizing-faiss-factory auto``: an inverted file with about 4·√size lists and flat codes,
    or exact ``Flat`` where the memory cannot hold 39 keys per list (faiss's training minimum)."""
    from trime_fairseq.memory.index import ivf_lists

    nlist = ivf_lists(size)
    return f"IVF{nlist},Flat" if 39 * nlist <= size else "Flat"


class KnnMemory:
    """``[rows, heads, size, dim]`` ring buffers of normalised keys and their values."""

    def __init__(self, size: int, topk: int, search: str = _D["memorizing_search"],
                 faiss_factory: str = _D["memorizing_faiss_factory"], faiss_min_size: int = _D["memorizing_faiss_min_size"],
                 faiss_nprobe: int = _D["memorizing_faiss_nprobe"],
                 faiss_train_size: int = _D["memorizing_faiss_train_size"]) -> None:
        if size < 0:
            raise TrimeUserError(f"--memorizing-memory-size must be >= 0, got {size}")
        if topk < 1:
            raise TrimeUserError(f"--memorizing-topk must be >= 1, got {topk}")
        if search not in SEARCH_CHOICES:
            raise TrimeUserError(f"--memorizing-search must be one of {SEARCH_CHOICES}, got {search!r}")
        if faiss_nprobe < 1:
            raise TrimeUserError(f"--memorizing-faiss-nprobe must be >= 1, got {faiss_nprobe}")
        if faiss_train_size < 0:
            raise TrimeUserError(f"--memorizing-faiss-train-size must be >= 0, got {faiss_train_size}")
        self.size, self.k = size, topk
        self.search = "faiss" if search == "faiss" or (search == "auto" and size > faiss_min_size) else "torch"
        self.faiss_factory, self.faiss_nprobe, self.faiss_train_size = faiss_factory, faiss_nprobe, faiss_train_size
        self.keys: Optional[Tensor] = None  # [rows, heads, size, dim], normalised
        self.values: Optional[Tensor] = None
        self.positions: Optional[Tensor] = None  # [rows, size] stream position of each slot (-1: empty)
        self.inserted: Optional[Tensor] = None  # [rows] entries stored since the row was cleared (CPU)
        self.count: Optional[Tensor] = None  # [rows] live entries: min(inserted, size) (CPU)
        self.docs: Optional[Tensor] = None  # [rows] document of each row's entries (CPU)
        self._indexes: List[List[Any]] = []  # faiss: [rows][heads]
        self._train_at = 0
        self._removable = True

    # --- storage ---------------------------------------------------------------------------

    _STATE = ("keys", "values", "positions", "inserted", "count", "docs")

    def state_dict(self) -> dict:
        """The memory's contents (CPU tensors; empty when nothing is stored), so that a
        resumed training run continues with the memory it had (see ``trime_lm``'s stream
        iterator)."""
        if self.keys is None:
            return {}
        return {k: getattr(self, k).detach().cpu().clone() for k in self._STATE}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore :meth:`state_dict` (tensors moved to ``device``; faiss indexes rebuilt
        from the stored keys)."""
        if not state:
            self.reset()
            return
        rows, heads, size, dim = state["keys"].shape
        if size != self.size:
            raise TrimeUserError(f"--memorizing-memory-size {self.size}: the checkpoint's memory holds {size} entries per "
                                 "row; resume with the same --memorizing-memory-size (or --reset-dataloader)")
        for k in self._STATE:
            v = state[k].clone()
            setattr(self, k, v.to(device) if k in ("keys", "values", "positions") and device is not None else v)
        self._indexes = []
        if self.search == "faiss":
            self._make_indexes(rows, heads, dim)
            for r in range(rows):
                self._index_rebuild(r)

    def _allocate(self, rows: int, heads: int, dim: int, like: Tensor) -> None:
        self.keys = like.new_zeros(rows, heads, self.size, dim)
        self.values = like.new_zeros(rows, heads, self.size, dim)
        self.positions = torch.full((rows, self.size), -1, dtype=torch.long, device=like.device)
        self.inserted = torch.zeros(rows, dtype=torch.long)
        self.count = torch.zeros(rows, dtype=torch.long)
        self.docs = torch.full((rows,), -1, dtype=torch.long)
        self._indexes = []
        if self.search == "faiss":
            self._make_indexes(rows, heads, dim)

    def reset(self, rows: Optional[Tensor] = None) -> None:
        """Clear ``rows`` (bool ``[rows]``), or everything (faiss indexes and their training too)."""
        if self.keys is None:
            return
        if rows is None:
            self.keys = None
            self._indexes = []
            return
        for r in rows.nonzero(as_tuple=True)[0].tolist():
            self._clear_row(r)

    def _clear_row(self, r: int) -> None:
        self.inserted[r] = 0
        self.count[r] = 0
        self.positions[r] = -1
        self.docs[r] = -1
        for index in self._indexes[r] if self._indexes else ():
            index.reset()  # an IVF index keeps its trained quantizer

    def update(self, keys: Tensor, values: Tensor, positions: Tensor, docs: Tensor,
               keep: Optional[Tensor] = None) -> None:
        """Append ``[rows, heads, T, dim]`` keys (normalised here) and values, FIFO.

        Args:
            positions, docs: ``[rows, T]`` stream position and document of each token. A
                row keeps one document: its memory is cleared when a newer one starts.
            keep: ``[rows, T]`` bool, which positions to store (not padding, not a context
                window stored before); default all.
        """
        if self.size == 0:
            return
        rows, heads, t, dim = keys.shape
        if keep is None:
            keep = torch.ones(rows, t, dtype=torch.bool)
        if self.keys is None or self.keys.shape[:2] != (rows, heads) or self.keys.shape[-1] != dim:
            self._allocate(rows, heads, dim, keys)
        keys = F.normalize(keys.detach(), dim=-1).to(self.keys.dtype)
        values = values.detach().to(self.values.dtype)
        keep_c, docs_c, device = keep.cpu(), docs.cpu(), keys.device
        for r in range(rows):  # rows keep different numbers of entries
            sel = keep_c[r].nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            last_doc = int(docs_c[r, sel[-1]])
            sel = sel[docs_c[r, sel] == last_doc][-self.size:]
            if int(self.docs[r]) != last_doc:
                self._clear_row(r)
                self.docs[r] = last_doc
            start, n = int(self.inserted[r]), sel.numel()
            slots = (torch.arange(start, start + n) % self.size).to(device)
            sel = sel.to(device)
            self.keys[r].index_copy_(1, slots, keys[r].index_select(1, sel))
            self.values[r].index_copy_(1, slots, values[r].index_select(1, sel))
            self.positions[r].index_copy_(0, slots, positions[r].index_select(0, sel))
            self.inserted[r] = start + n
            self.count[r] = min(start + n, self.size)
            if self._indexes:
                self._index_add(r, start, n)

    # --- search ----------------------------------------------------------------------------

    def topk(self, queries: Tensor, before: Tensor, query_docs: Tensor, k: Optional[int] = None) -> TopK:
        """Top-k by inner product of normalised queries and keys.

        Args:
            queries: ``[rows, heads, T, dim]``.
            before: ``[rows]`` stream position; entries at or after it are skipped (they are
                in the local context already).
            query_docs: ``[rows, T]``: a query only sees its own document's entries.
            k: entries per query (default ``--memorizing-topk``).
        Returns:
            ``(scores [rows, heads, T, k], values [rows, heads, T, k, dim], found [rows, heads, T, k])``
            (``found`` False where fewer than k entries exist; scores and values there are
            arbitrary). Scores are differentiable in ``queries``.
        """
        rows, heads, t, dim = queries.shape
        if self.keys is None or self.keys.shape[:2] != (rows, heads):
            empty = queries.new_zeros(rows, heads, t, 0)
            return TopK(empty, queries.new_zeros(rows, heads, t, 0, dim), empty.bool())
        q = F.normalize(queries, dim=-1)
        top, slots = self.search_slots(q.detach(), before, query_docs, k=k)
        k = slots.size(-1)
        base = torch.arange(rows * heads, device=slots.device).view(rows, heads, 1, 1) * self.size
        flat = (base + slots).view(-1)  # one gather over all rows and heads
        keys = self.keys.view(-1, dim).index_select(0, flat).view(rows, heads, t, k, dim)
        values = self.values.view(-1, dim).index_select(0, flat).view(rows, heads, t, k, dim)
        scores = torch.matmul(keys, q.to(keys.dtype).unsqueeze(-1)).squeeze(-1)  # differentiable in q
        return TopK(scores, values, torch.isfinite(top))

    @torch.no_grad()
    def search_slots(self, q: Tensor, before: Tensor, query_docs: Tensor,
                     method: Optional[str] = None, k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """``(scores, slots)``, each ``[rows, heads, T, k]``, for normalised queries ``q``.

        Scores are -inf where nothing was found (slot 0 there). ``method`` (torch|faiss)
        overrides the memory's own search; faiss needs built indexes (rows without one, or
        whose IVF index is not trained yet, are searched by torch).
        """
        rows, heads, t, _ = q.shape
        k = min(self.k if k is None else k, self.size)
        top = q.new_full((rows, heads, t, k), float("-inf"), dtype=self.keys.dtype)
        slots = torch.zeros(rows, heads, t, k, dtype=torch.long, device=q.device)
        use_faiss = (method or self.search) == "faiss"
        counts, firsts, mem_docs = self.count.tolist(), before.tolist(), self.docs.tolist()
        for r in range(rows):
            if counts[r] == 0:
                continue
            same = query_docs[r] == mem_docs[r]  # [T]
            if not bool(same.any()):
                continue
            if use_faiss and self._index_ready(r):
                self._search_faiss(r, q[r], firsts[r], top[r], slots[r])
            else:
                self._search_torch(r, q[r], firsts[r], top[r], slots[r])
            if not bool(same.all()):
                top[r].masked_fill_(~same[None, :, None], float("-inf"))
        return top, slots

    def _search_torch(self, r: int, q: Tensor, before: int, top: Tensor, slots: Tensor) -> None:
        n = int(self.count[r])  # live entries fill slots [0, n)
        valid = self.positions[r, :n] < before
        v, i = chunked_topk(q, self.keys[r, :, :n].transpose(-1, -2), slots.size(-1),
                            None if bool(valid.all()) else ~valid)
        top[..., :v.size(-1)] = v
        slots[..., :i.size(-1)] = i

    # --- faiss -----------------------------------------------------------------------------

    def _make_indexes(self, rows: int, heads: int, dim: int) -> None:
        from trime_fairseq.memory.search_index import SearchIndex

        factory = self.faiss_factory
        if factory == "auto":
            factory = memory_index_factory(self.size)
        self._indexes = [[SearchIndex.empty(dim, factory, "ip", flag="--memorizing-faiss-factory")
                          for _ in range(heads)] for _ in range(rows)]
        first = self._indexes[0][0]
        nlist = first.nlist
        self._train_at = min(self.size, self.faiss_train_size or (39 * nlist if nlist else 10_000))
        if not first.is_trained and self._train_at < max(nlist, 1):
            raise TrimeUserError(f"--memorizing-faiss-factory {factory!r} needs >= {nlist} keys to train; the memory "
                             f"(--memorizing-memory-size {self.size}) or --memorizing-faiss-train-size is smaller")
        for row in self._indexes:
            for index in row:
                index.set_nprobe(self.faiss_nprobe)
        logger.info("kNN memory: faiss %s per (row, head), %d x %d indexes%s", factory, rows, heads,
                    "" if first.is_trained else f", trained once a row holds {self._train_at} keys")

    def _live(self, r: int) -> Tuple[np.ndarray, Tensor]:
        """Ids and slots of row ``r``'s live entries."""
        end = int(self.inserted[r])
        ids = np.arange(max(0, end - self.size), end, dtype=np.int64)
        return ids, torch.from_numpy(ids % self.size).to(self.keys.device)

    def _row_keys(self, r: int, h: int, slots: Tensor) -> np.ndarray:
        return np.ascontiguousarray(self.keys[r, h].index_select(0, slots).float().cpu().numpy())

    def _index_ready(self, r: int) -> bool:
        return bool(self._indexes) and self._indexes[r][0].is_trained

    def _index_rebuild(self, r: int) -> None:
        """Refill row ``r``'s indexes from the ring buffer (training them first if needed)."""
        ids, slots = self._live(r)
        for h, index in enumerate(self._indexes[r]):
            index.reset()
            if not index.is_trained:
                if len(ids) < self._train_at:
                    continue
                index.train(self._row_keys(r, h, slots))
            if len(ids):
                index.add(self._row_keys(r, h, slots), ids)

    def _index_add(self, r: int, start: int, n: int) -> None:
        if not self._index_ready(r):
            if int(self.count[r]) >= self._train_at:
                self._index_rebuild(r)  # trains, then adds every live entry
            return
        if not self._removable:
            self._index_rebuild(r)
            return
        lo, hi = max(0, start - self.size), max(0, start + n - self.size)  # evicted ids
        ids = np.arange(start, start + n, dtype=np.int64)
        slots = torch.from_numpy(ids % self.size).to(self.keys.device)
        for h, index in enumerate(self._indexes[r]):
            if not index.remove_range(lo, hi):
                logger.warning("kNN memory: this faiss index cannot remove entries; rebuilding it on every update")
                self._removable = False
                self._index_rebuild(r)
                return
            index.add(self._row_keys(r, h, slots), ids)

    def _search_faiss(self, r: int, q: Tensor, before: int, top: Tensor, slots: Tensor) -> None:
        n = int(self.count[r])
        positions = self.positions[r].cpu()
        hidden = int((positions[:n] >= before).sum())  # live entries in the local context: over-fetch
        fetch = min(slots.size(-1) + hidden, n)
        kk = min(slots.size(-1), fetch)
        qs = q.float().cpu().numpy()
        for h, index in enumerate(self._indexes[r]):
            d, i = index.search(qs[h], fetch)
            ids, d = torch.from_numpy(i), torch.from_numpy(d)
            ok = ids >= 0
            slot = torch.where(ok, ids % self.size, torch.zeros_like(ids))
            ok &= positions[slot] < before
            v, j = d.masked_fill(~ok, float("-inf")).topk(kk, dim=-1)
            top[h, :, :kk] = v.to(top)
            slots[h, :, :kk] = slot.gather(1, j).to(slots.device)

    def with_faiss(self, factory: str = "Flat", nprobe: int = 32, train_size: int = 0) -> "KnnMemory":
        """A faiss-searched memory over this memory's current entries (buffers shared, not copied)."""
        other = KnnMemory(self.size, self.k, "faiss", factory, faiss_nprobe=nprobe, faiss_train_size=train_size)
        if self.keys is None:
            return other
        for name in ("keys", "values", "positions", "inserted", "count", "docs"):
            setattr(other, name, getattr(self, name))
        rows, heads, _, dim = self.keys.shape
        other._make_indexes(rows, heads, dim)
        for r in range(rows):
            other._index_rebuild(r)
        return other


def search_recall(memory: KnnMemory, queries: Tensor, before: Tensor, query_docs: Tensor) -> float:
    """recall@k of ``memory``'s faiss search against exact torch search over the same entries.

    Counts, over queries whose exact search finds k entries, the share of those entries that
    the faiss search also returns (:func:`trime_fairseq.memory.index.recall_at_k`).
    """
    from trime_fairseq.memory.index import recall_at_k

    q = F.normalize(queries.detach(), dim=-1)
    a_top, a_slots = memory.search_slots(q, before, query_docs, "faiss")
    e_top, e_slots = memory.search_slots(q, before, query_docs, "torch")
    full = torch.isfinite(e_top).all(-1)
    if not bool(full.any()):
        raise ValueError("search_recall: no query has k entries in memory")
    approx = a_slots.masked_fill(~torch.isfinite(a_top), -1)[full]
    return recall_at_k(approx.cpu().numpy(), e_slots[full].cpu().numpy())
