"""Training memories built from the batch itself (§4), and the chunked Eq. 5 loss over them.

The batch is viewed as ``G`` groups of ``T`` tokens in reading order; a token's memory is a
subset of the tokens of its own group:

* ``local`` (§4.1, TRIMELM): groups are segments; memory = earlier tokens of the segment.
* ``long`` (§4.2, TRIMELM_long): groups are the ``m`` consecutive segments of a document
  laid end to end; memory = all earlier tokens of the group *of the same document*
  (Eq. 3 plus the local memory). ``doc_id`` keeps documents shorter than ``m`` segments
  from seeing each other.
* ``external`` (§4.3, TRIMELM_ext): one group holding the whole batch; memory = every
  token of every *other* segment plus the local memory, the latter dropped for a segment
  when ``keep_local`` is False. With several data-parallel workers the batch is the
  step's global batch: keys and labels are gathered from every worker (differentiably,
  :mod:`trime_fairseq.memory.distributed`), queries stay the worker's own rows.

Gradients flow into queries and memory alike. The similarity matrix is built in chunks of
query rows, in the forward pass and again in the hand-written backward
(:func:`~trime_fairseq.memory.joint.chunked_joint_target_log_prob`), so memory is
``O(G · chunk · T)`` rather than ``O((G·T)^2)``. Each query's memory is described by key
ranges (:meth:`InBatchMemory.ranges`, :class:`RangeLayout`), so no similarity-sized mask or
label comparison is built: a chunk masks only the keys some of its queries may not use, and
the positives (memory entries labelled with the target) are index pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from trime_fairseq.memory.joint import NEG_INF, DenseLayout, chunked_joint_target_log_prob

MODES = ("local", "long", "external")


@dataclass
class InBatchMemory:
    """Which tokens of a group may serve as memory for which (see module docstring).

    Attributes:
        mode: one of :data:`MODES`.
        seg_id: ``[G, T]`` segment index of each token (``external``/``long``).
        doc_id: ``[G, T]`` document index of each token (``long``).
        keep_local: ``[G, T]`` bool, False where a token's local memory is dropped
            (``external``).
        keys, key_labels, key_seg_id: ``[G, K, d]``, ``[G, K]``, ``[G, K]`` memory held
            apart from the queries (``external`` across workers); absent: the queries'
            own tokens are the memory.
        query_offset: position of the first query in the key layout.
    """

    mode: str = "local"
    seg_id: Optional[Tensor] = None
    doc_id: Optional[Tensor] = None
    keep_local: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    key_labels: Optional[Tensor] = None
    key_seg_id: Optional[Tensor] = None
    query_offset: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown in-batch memory mode {self.mode!r}; choose from {MODES}")
        if self.mode == "long" and self.doc_id is None:
            raise ValueError("'long' in-batch memory needs doc_id")
        if self.mode == "external" and self.seg_id is None:
            raise ValueError("'external' in-batch memory needs seg_id")

    def key_end(self, q_end: int, total: int) -> int:
        """Keys beyond this index are never in the memory of queries ``< q_end``."""
        return total if self.mode == "external" else q_end

    def mask(self, q0: int, q1: int, k_end: int, key_valid: Tensor) -> Tensor:
        """Bool ``[G, q1-q0, k_end]``: may query ``i`` use key ``j`` as memory."""
        device = key_valid.device
        qpos = torch.arange(q0, q1, device=device).view(1, -1, 1) + self.query_offset
        kpos = torch.arange(k_end, device=device).view(1, 1, -1)
        causal = kpos < qpos
        valid = key_valid[:, None, :k_end]
        if self.mode == "local":
            return causal & valid
        if self.mode == "long":
            same_doc = self.doc_id[:, q0:q1, None] == self.doc_id[:, None, :k_end]
            return causal & same_doc & valid
        key_seg = self.seg_id if self.key_seg_id is None else self.key_seg_id
        same_seg = self.seg_id[:, q0:q1, None] == key_seg[:, None, :k_end]
        local = same_seg & causal
        if self.keep_local is not None:
            local = local & self.keep_local[:, q0:q1, None]
        return (local | ~same_seg) & valid

    def ranges(self, key_valid: Tensor) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """The memory as key ranges: query ``i``'s memory is the valid keys in ``[lo_i, hi_i) ∪
        [tail_i, K)``, ``[G, T]`` each (key positions). ``None`` when a document or segment is
        not one run of positions (then only :meth:`mask` describes the memory)."""
        groups, total = (self.seg_id if self.mode == "external" else key_valid).shape
        n_keys = key_valid.size(1)
        device = key_valid.device
        qpos = torch.arange(total, device=device).expand(groups, total) + self.query_offset
        end = torch.full_like(qpos, n_keys)
        if self.mode == "local":
            return torch.zeros_like(qpos), qpos, end
        if self.mode == "long":
            start, _, _, ok = _runs(self.doc_id)
            return (start, qpos, end) if ok else None
        key_seg = self.seg_id if self.key_seg_id is None else self.key_seg_id
        key_start, key_end, first, ok = _runs(key_seg)
        if not ok or key_seg.size(0) != 1 or key_seg.numel() == 0:
            return None
        first = first[0]
        run_ids, run_start, run_end = key_seg[0][first], key_start[0][first], key_end[0][first]
        if run_ids.numel() > 1 and not bool((run_ids[1:] > run_ids[:-1]).all()):
            return None
        at = torch.searchsorted(run_ids, self.seg_id[0]).clamp_max(run_ids.numel() - 1)
        found = run_ids[at] == self.seg_id[0]
        seg_start = torch.where(found, run_start[at], n_keys).unsqueeze(0)
        seg_end = torch.where(found, run_end[at], n_keys).unsqueeze(0)
        keep = torch.ones_like(found) if self.keep_local is None else self.keep_local[0]
        hi = torch.where(found, torch.where(keep, qpos[0], seg_start[0]), n_keys).unsqueeze(0)
        return torch.zeros_like(qpos), hi, seg_end

    def layout(self, key_valid: Tensor, key_labels: Tensor, target: Tensor):
        """The :class:`~trime_fairseq.memory.joint.ChunkLayout` of this memory: key ranges
        (:class:`RangeLayout`) where :meth:`ranges` has them, else the dense :meth:`mask`."""
        ranges = self.ranges(key_valid)
        if ranges is None:
            return DenseLayout(lambda q0, q1, k_end: self.mask(q0, q1, k_end, key_valid))
        return RangeLayout(*ranges, key_valid, key_labels, target)


def _runs(ids: Tensor) -> Tuple[Tensor, Tensor, Tensor, bool]:
    """For ``[G, N]`` ids: the start and end (exclusive) of the run of equal ids holding each
    position, where runs begin (bool), and whether every id of a row forms a single run."""
    n = ids.size(1)
    pos = torch.arange(n, device=ids.device).expand_as(ids)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    start = torch.where(new, pos, torch.zeros_like(pos)).cummax(1).values
    end = torch.where(last, pos + 1, torch.full_like(pos, n)).flip(1).cummin(1).values.flip(1)
    ordered = ids.sort(1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(1) + 1
    return start, end, new, bool((new.sum(1) == distinct).all())


class RangeLayout:
    """A :class:`~trime_fairseq.memory.joint.ChunkLayout` for memories given as key ranges
    (:meth:`InBatchMemory.ranges`): each chunk computes scores only from the first key any of
    its queries may use, masks only the band of keys that some query may not use (its own
    segment, its future), and takes its positives as index pairs found once per batch by
    sorting the keys by label, so no similarity-sized comparison is made. What a chunk needs
    is worked out once and reused when the backward pass recomputes the chunk.

    Args:
        lo, hi, tail: ``[G, T]`` query ``i``'s memory is the valid keys in ``[lo_i, hi_i) ∪ [tail_i, K)``.
        key_valid, key_labels: ``[G, K]``; target: ``[G, T]``.
        max_pair_share, max_pairs: above this many positives per similarity entry, or in
            all, the positives are compared densely instead (a batch of few distinct tokens).
        mask_cache_bytes: chunk masks are kept for the backward's recompute up to this size.
    """

    def __init__(self, lo: Tensor, hi: Tensor, tail: Tensor, key_valid: Tensor, key_labels: Tensor,
                 target: Tensor, max_pair_share: float = 0.125, max_pairs: int = 1 << 23,
                 mask_cache_bytes: int = 1 << 26) -> None:
        self.lo, self.hi, self.tail = lo, hi, tail
        self.key_valid, self.key_labels, self.target = key_valid, key_labels, target
        self.max_pair_share, self.max_pairs = max_pair_share, max_pairs
        self._pairs: Optional[Tensor] = None
        self._pairs_built = False
        self._windows: dict = {}
        self._masks: dict = {}
        self._mask_bytes, self.mask_cache_bytes = 0, mask_cache_bytes

    def window(self, q0: int, q1: int, k_end: int) -> Tuple[int, int]:
        if (q0, q1, k_end) not in self._windows:
            self._windows[q0, q1, k_end] = min(int(self.lo[:, q0:q1].min()), k_end), k_end
        return self._windows[q0, q1, k_end]

    def fill_(self, scores: Tensor, q0: int, q1: int, k0: int) -> None:  # builds no full mask
        key = (q0, q1, k0, k0 + scores.size(-1))
        mask = self._masks.get(key) or self._chunk_mask(*key)
        band, outside, invalid = mask
        size = sum(t.numel() for t in (outside, invalid) if t is not None)
        if key not in self._masks and self._mask_bytes + size <= self.mask_cache_bytes:
            self._masks[key], self._mask_bytes = mask, self._mask_bytes + size
        if band is not None:
            scores[..., band[0] - k0:band[1] - k0].masked_fill_(outside, NEG_INF)
        if invalid is not None and invalid.dtype == torch.bool:
            scores.masked_fill_(invalid, NEG_INF)
        elif invalid is not None:
            scores.index_fill_(-1, invalid, NEG_INF)

    def _chunk_mask(self, q0: int, q1: int, k0: int, k1: int):
        """``(band, outside, invalid)``: the columns ``band`` where some query of the chunk has
        keys outside its memory and those keys (bool ``[G, q, band]``), and the invalid keys
        of the window (their columns for one group, else bool ``[G, 1, k1-k0]``); ``None``
        where there are none."""
        lo, hi, tail = (t[:, q0:q1].clamp(k0, k1) for t in (self.lo, self.hi, self.tail))
        # keys outside memory within the window: [k0, lo) and [hi, tail)
        band = []
        if bool((lo > k0).any()):
            band.append((k0, int(lo.max())))
        cut = hi < tail
        if bool(cut.any()):
            band.append((int(hi[cut].min()), int(tail[cut].max())))
        outside = None
        if band:
            band = (min(b[0] for b in band), max(b[1] for b in band))
            cols = torch.arange(*band, device=lo.device)
            outside = (cols < lo[..., None]) | ((cols >= hi[..., None]) & (cols < tail[..., None]))
        valid = self.key_valid[:, k0:k1]
        invalid = None
        if not bool(valid.all()):  # one group: the padding keys' columns; several: a mask
            invalid = (~valid[0]).nonzero().squeeze(1) if valid.size(0) == 1 else ~valid[:, None, :]
        return (band or None), outside, invalid

    def pairs(self, q0: int, q1: int, k0: int, k1: int) -> Optional[Tuple[Tensor, Tensor]]:
        if not self._pairs_built:
            self._pairs, self._pairs_built = self._all_pairs(), True
        if self._pairs is None:
            return None
        groups, n_keys = self.key_labels.shape
        bounds = torch.tensor([q0 * groups * n_keys, q1 * groups * n_keys], device=self._pairs.device)
        s, e = torch.searchsorted(self._pairs, bounds).tolist()
        flat = self._pairs[s:e]
        owner, j = flat // n_keys, flat % n_keys
        row = (owner % groups) * (q1 - q0) + owner // groups - q0
        return row * (k1 - k0) + (j - k0), row

    def _all_pairs(self) -> Optional[Tensor]:
        """Every (query ``i``, group ``g``, key ``j``) whose key is in the query's memory with the
        query's target as label, as one sorted index ``(i·G + g)·K + j``; ``None`` if there are
        more than ``max_pair_share`` of all entries or ``max_pairs`` (a batch of few distinct tokens)."""
        groups, n_keys = self.key_labels.shape
        n_queries = self.target.size(1)
        device = self.target.device
        span = int(max(int(self.key_labels.max()), int(self.target.max()))) + 1
        offset = torch.arange(groups, device=device).unsqueeze(1) * span
        valid = self.key_valid.reshape(-1).nonzero().squeeze(1)  # flat g·K + j
        labels, order = (self.key_labels + offset).reshape(-1)[valid].sort()
        keys = valid[order] % n_keys
        wanted = (self.target + offset).t().reshape(-1)  # query-major: i·G + g
        first = torch.searchsorted(labels, wanted)
        counts = torch.searchsorted(labels, wanted, right=True) - first
        total = int(counts.sum())
        if total > min(self.max_pair_share * groups * n_queries * n_keys, self.max_pairs):
            return None
        owner = torch.repeat_interleave(torch.arange(wanted.numel(), device=device), counts)
        key = keys[first[owner] + torch.arange(total, device=device)
                   - torch.repeat_interleave(counts.cumsum(0) - counts, counts)]
        query, group = owner // groups, owner % groups
        inside = ((key >= self.lo[group, query]) & (key < self.hi[group, query])) | (key >= self.tail[group, query])
        return (owner * n_keys + key)[inside].sort().values


def in_batch_log_prob(
    tok_target: Tensor,
    tok_lse: Tensor,
    reps: Tensor,
    target: Tensor,
    memory: InBatchMemory,
    padding_idx: int,
    temperature: float = 1.0,
    chunk_size: int = 512,
    checkpoint_above: int = 0,
    top_k: int = 0,
    with_log_partition: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``log P(target)`` of Eq. 5 for every token of the batch, memory taken in-batch.

    Args:
        tok_target, tok_lse: ``[G, T]`` token terms (see :mod:`trime_fairseq.memory.joint`).
        reps: ``[G, T, d]`` the representations ``g`` (queries, and keys unless
            ``memory.keys`` is given).
        target: ``[G, T]`` next tokens; also the memory labels (unless
            ``memory.key_labels``). Padding is never memory.
        memory: which tokens are each token's memory.
        chunk_size: query rows per chunk of the similarity matrix (causal memories only
            compute keys up to the chunk's last query).
        checkpoint_above: the forward keeps the similarities of its first chunks, as many
            as hold at most this many entries, for the backward, which recomputes the others
            one at a time (:func:`chunked_joint_target_log_prob`). 0: recompute all,
            memory stays at one chunk.
        top_k: keep only each query's ``top_k`` highest memory scores (0: all), as the
            reference TRIME-MT does with 8 (:func:`~trime_fairseq.memory.joint.top_k_mask`).
        with_log_partition: also return each token's joint log-partition ``[G, T]``.
    Returns:
        ``[G, T]`` log-probabilities (meaningless at padding targets).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    keys = reps if memory.keys is None else memory.keys
    key_labels = target if memory.key_labels is None else memory.key_labels
    total = reps.size(1)
    key_valid = key_labels.ne(padding_idx)
    chunks = [(q0, min(q0 + chunk_size, total), memory.key_end(min(q0 + chunk_size, total), keys.size(1)))
              for q0 in range(0, total, chunk_size)]
    layout = memory.layout(key_valid, key_labels, target)
    lprob, log_partition = chunked_joint_target_log_prob(
        tok_target, tok_lse, reps, keys, key_labels, target, layout, chunks, temperature, checkpoint_above, top_k,
    )
    return (lprob, log_partition) if with_log_partition else lprob


@dataclass(frozen=True)
class MemorySpec:
    """How the rows of a training batch form in-batch memory: what a batching task puts in
    ``sample["trime_memory"]`` (as :meth:`to_sample`'s dict, whose tensors fairseq moves
    between devices with the batch) and the criterion reads back (:meth:`from_sample`).

    Attributes:
        mode: ``local`` (each segment alone), ``long`` (runs of ``segments_per_group``
            consecutive segments, ``row_doc`` their documents) or ``external`` (the whole
            batch; ``keep_local`` ``[B]``: False where a row's local memory is dropped).
        placeholder: fairseq's dummy batch on a data-parallel worker without data: its rows
            never enter the memory the other workers gather.
    """

    mode: str = "local"
    segments_per_group: int = 1
    row_doc: Optional[Tensor] = None
    keep_local: Optional[Tensor] = None
    placeholder: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown in-batch memory mode {self.mode!r}; choose from {MODES}")
        if self.mode == "long" and (self.row_doc is None or self.segments_per_group < 1):
            raise ValueError("'long' in-batch memory needs segments_per_group >= 1 and row_doc")

    @classmethod
    def long(cls, segments_per_group: int, row_doc: Tensor) -> "MemorySpec":
        return cls("long", segments_per_group=segments_per_group, row_doc=row_doc)

    @classmethod
    def external(cls, keep_local: Optional[Tensor] = None) -> "MemorySpec":
        return cls("external", keep_local=keep_local)

    @classmethod
    def from_sample(cls, spec) -> "MemorySpec":
        """From ``sample.get("trime_memory")`` (``None``: local memory)."""
        if spec is None:
            return cls()
        if isinstance(spec, MemorySpec):
            return spec
        return cls(**spec)

    def to_sample(self) -> dict:
        """The dict carried in ``sample["trime_memory"]`` (only the fields that are set)."""
        out = {"mode": self.mode}
        if self.mode == "long":
            out.update(segments_per_group=self.segments_per_group, row_doc=self.row_doc)
        if self.keep_local is not None:
            out["keep_local"] = self.keep_local
        if self.placeholder:
            out["placeholder"] = True
        return out


def mark_placeholder(sample, ignore_grad: bool):
    """``sample`` with its memory spec marked as fairseq's placeholder batch when the step is
    one (``ignore_grad``): shared by the LM and MT tasks' ``train_step``."""
    if ignore_grad and isinstance(sample, dict) and sample.get("trime_memory") is not None:
        spec = replace(MemorySpec.from_sample(sample["trime_memory"]), placeholder=True)
        sample = dict(sample, trime_memory=spec.to_sample())
    return sample


def group_batch(
    tensors: Tuple[Tensor, ...], spec, padding_target: Tensor
) -> Tuple[Tuple[Tensor, ...], InBatchMemory]:
    """Lay out ``[B, L, ...]`` batch tensors as the ``[G, T, ...]`` groups of ``spec`` (a
    :class:`MemorySpec` or its ``sample["trime_memory"]`` dict; ``None``: local):

    * ``local``: one group per row.
    * ``long``: rows ``k·m .. k·m+m-1`` are consecutive segments, in order, one group;
      ``row_doc`` their documents.
    * ``external``: one group for the batch.

    Args:
        tensors: batch tensors with leading ``[B, L]`` dims, reshaped alike.
        padding_target: ``[B, L]`` targets (for shape).
    """
    spec = MemorySpec.from_sample(spec)
    mode = spec.mode
    bsz, seq_len = padding_target.shape[:2]
    if mode == "local":
        return tensors, InBatchMemory("local")
    if mode == "long":
        m = int(spec.segments_per_group)
        if m < 1 or bsz % m != 0:
            raise ValueError(
                f"batch of {bsz} segments cannot be split into groups of {m} consecutive segments"
            )
        groups = bsz // m

        def regroup(t: Tensor) -> Tensor:
            return t.reshape(groups, m * seq_len, *t.shape[2:])

        row_doc = spec.row_doc.to(padding_target.device)
        doc_id = row_doc.view(bsz, 1).expand(bsz, seq_len)
        return tuple(regroup(t) for t in tensors), InBatchMemory("long", doc_id=regroup(doc_id))
    if mode == "external":

        def flat(t: Tensor) -> Tensor:
            return t.reshape(1, bsz * seq_len, *t.shape[2:])

        rows = torch.arange(bsz, device=padding_target.device).view(bsz, 1).expand(bsz, seq_len)
        keep = spec.keep_local
        keep_t = None
        if keep is not None:
            keep_t = flat(keep.to(padding_target.device).view(bsz, 1).expand(bsz, seq_len))
        return tuple(flat(t) for t in tensors), InBatchMemory(
            "external", seg_id=flat(rows), keep_local=keep_t
        )
    raise ValueError(f"unknown in-batch memory mode {mode!r}; choose from {MODES}")


def external_memory_across_workers(
    memory: InBatchMemory, reps: Tensor, target: Tensor, share: bool = True
) -> InBatchMemory:
    """Make the ``external`` memory of this worker's rows the step's global batch.

    ``reps``/``target`` are this worker's grouped ``[1, N, d]``/``[1, N]`` tensors (from
    :func:`group_batch`); keys, labels and segment ids of every worker are gathered in
    rank order (keys differentiably), and the queries keep their local rows. With
    ``share=False`` (fairseq's placeholder batch on a worker without data) this worker's
    rows are kept out of everyone's memory. Without distribution: ``memory`` unchanged.
    """
    from trime_fairseq.memory.distributed import all_gather_rows, gather_sizes, world

    rank, size = world()
    if memory.mode != "external" or size == 1:
        return memory
    n = reps.size(1)
    seg = memory.seg_id[0]
    segs = int(seg.max()) + 1 if n else 0
    shared_n, shared_segs = (n, segs) if share else (0, 0)
    sizes = gather_sizes([shared_n, shared_segs], device=reps.device)  # [W, 2]: tokens, segments per rank
    tokens, segments = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    keys, _ = all_gather_rows(reps[0, :shared_n], rows=tokens)
    labels, _ = all_gather_rows(target[0, :shared_n], rows=tokens)
    key_seg, _ = all_gather_rows(seg[:shared_n] + sum(segments[:rank]), rows=tokens)
    query_seg = seg + sum(segments[:rank]) if share else torch.full_like(seg, -1)
    return InBatchMemory(
        "external", seg_id=query_seg.unsqueeze(0), keep_local=memory.keep_local,
        keys=keys.unsqueeze(0), key_labels=labels.unsqueeze(0), key_seg_id=key_seg.unsqueeze(0),
        query_offset=sum(tokens[:rank]),
    )


def segment_uniform(ids: Tensor, key: int) -> Tensor:
    """One uniform draw in ``[0, 1)`` per segment id, a pure function of ``(id, key)``
    (splitmix64), so a segment's draw does not depend on which worker or batch row holds
    it. ``key`` comes from the step's random state (the same on every worker)."""
    with np.errstate(over="ignore"):
        z = ids.detach().cpu().numpy().astype(np.uint64) + np.uint64(key % (1 << 64))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(1 << 53)).to(ids.device)
