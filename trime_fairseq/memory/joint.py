"""The TRIME joint softmax (Eq. 5-8 of Zhong et al., 2022) as pure tensor functions.

Every memory-augmented probability in this package (training loss, ``fairseq-eval-lm``
scoring, tuning sweeps, the continuous-cache and kNN baselines) is computed here.

Notation used throughout:

* ``tok_scores`` ``[..., V]``: token scores. With a full softmax these are the raw logits
  ``E_w . f(c)`` and ``tok_lse = logsumexp(tok_scores)``. With an adaptive softmax they are
  ``log p_AS(w) + log Z_head`` and ``tok_lse = log Z_head`` (the head's unnormalised mass,
  :mod:`trime_fairseq.models.output_layer`), or, for the ``normalised`` ablation, the
  normalised log-probabilities and ``tok_lse = 0`` (``P(w) ∝ p_AS(w) + Σ exp(sim)``).
* ``mem_scores`` ``[..., K]``: ``sim(g(c), g(c_j)) / τ`` for K memory candidates.
* ``mem_labels`` ``[..., K]``: the next token ``x_j`` of each candidate.
* ``mem_mask`` ``[..., K]``: which candidates are in the memory of this query. Masked
  entries are set to ``-inf`` and every log-sum-exp also contains a finite token term,
  so rows with an empty (or no positive) memory fall back to the token term exactly and
  gradients stay finite.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Tuple, Union

import torch
from torch import Tensor

NEG_INF = float("-inf")


def at_least_float32(x: Tensor) -> Tensor:
    """Half/bfloat16 -> float32 for the softmax math; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def scaled_similarity(query: Tensor, keys: Tensor, temperature: float = 1.0) -> Tensor:
    """``sim(q, k) / τ = q·k / (√d τ)`` (scaled dot product, §3), batched.

    The product runs in whatever precision autocast picks (fp16/bf16 under mixed
    precision); the scores come back in at least float32, as they enter exponentials.

    Args:
        query: ``[..., Q, d]``; keys: ``[..., K, d]`` (same leading dims).
    Returns:
        ``[..., Q, K]``.
    """
    scale = 1.0 / (math.sqrt(query.size(-1)) * temperature)
    return at_least_float32(torch.matmul(query * scale, keys.transpose(-1, -2)))


def masked_logsumexp(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``log Σ_{mask} exp(scores)``; ``-inf`` where the mask is empty (no NaN gradients
    as long as the result is later combined with a finite term)."""
    return torch.logsumexp(scores.masked_fill(~mask, NEG_INF), dim=dim)


def top_k_mask(mem_scores: Tensor, mem_mask: Tensor, k: int) -> Tensor:
    """``mem_mask`` restricted to each row's ``k`` highest-scoring allowed entries (the
    reference TRIME-MT keeps the top-8 in-batch memory logits per query); ``k <= 0``: the
    mask unchanged. Ties at the k-th score are broken by position (``torch.topk``)."""
    if k <= 0 or mem_scores.size(-1) <= k:
        return mem_mask
    scores = mem_scores.detach().masked_fill(~mem_mask, NEG_INF)
    idx = scores.topk(k, dim=-1).indices
    keep = torch.zeros_like(mem_mask).scatter_(-1, idx, True)
    return keep & mem_mask


def _row_shift(scores: Tensor) -> Tensor:
    """Each row's largest score ``[..., 1]`` (detached; 0 for rows without one): subtracted
    before the exponentials so that one pass serves every sum."""
    shift = scores.amax(dim=-1, keepdim=True).detach()
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def _num_den(tok_target: Tensor, tok_lse: Tensor, pos_sum: Tensor, total: Tensor,
             shift: Tensor) -> Tuple[Tensor, Tensor]:
    """Eq. 5's log numerator and denominator from the shifted memory sums of the positives
    and of all entries (``shift`` ``[..., 1]`` from :func:`_row_shift`)."""
    shift = shift.squeeze(-1)
    num = torch.logaddexp(tok_target, _log_or_neg_inf(pos_sum) + shift)
    den = torch.logaddexp(tok_lse, _log_or_neg_inf(total) + shift)
    return num, den


def _joint_num_den(tok_target: Tensor, tok_lse: Tensor, scores: Tensor, positive: Tensor) -> Tuple[Tensor, Tensor]:
    """Numerator and denominator of Eq. 5 in log space, ``[N]`` each:
    ``log(exp(s_target) + Σ_{j∈M, x_j=target} exp(m_j))`` and ``log(Σ_v exp(s_v) + Σ_{j∈M} exp(m_j))``,
    from memory scores already ``-inf`` outside the memory."""
    shift = _row_shift(scores)
    weights = torch.sub(scores, shift)
    if scores.requires_grad:
        weights = weights.exp()  # masked -> 0
        total, pos_sum = weights.sum(-1), weights.mul(positive).sum(-1)
    else:  # no graph to keep: one buffer, exponentiated and then masked in place
        total = weights.exp_().sum(-1)
        pos_sum = weights.masked_fill_(positive.logical_not(), 0.0).sum(-1)
    return _num_den(tok_target, tok_lse, pos_sum, total, shift)


def joint_target_log_prob(
    tok_target: Tensor,
    tok_lse: Tensor,
    mem_scores: Tensor,
    mem_labels: Tensor,
    mem_mask: Tensor,
    target: Tensor,
    with_log_partition: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``log P(target | c)`` under Eq. 5 (training) / Eq. 6 (testing, scores already / τ).

    ``P(w|c) = [exp(s_w) + Σ_{j∈M, x_j=w} exp(m_j)] / [Σ_v exp(s_v) + Σ_{j∈M} exp(m_j)]``

    Args:
        tok_target: ``[N]`` token score of the target (``s_target``).
        tok_lse: ``[N]`` ``log Σ_v exp(s_v)`` (0 for normalised scores).
        mem_scores, mem_labels, mem_mask: ``[N, K]``.
        target: ``[N]``.
        with_log_partition: also return the log of the denominator (the joint
            log-partition), e.g. for label smoothing over the vocabulary entries.
    Returns:
        ``[N]`` log-probabilities (and ``[N]`` log-partitions).
    """
    positive = mem_mask & mem_labels.eq(target.unsqueeze(-1))
    num, den = _joint_num_den(tok_target, tok_lse, mem_scores.masked_fill(~mem_mask, NEG_INF), positive)
    return (num - den, den) if with_log_partition else num - den


#: ``mask_fn(q0, q1, k_end) -> [G, q1-q0, k_end]`` bool: which keys are each query's memory
MaskFn = Callable[[int, int, int], Tensor]


class ChunkLayout(Protocol):
    """Which keys are each query's memory, told chunk by chunk of query rows to
    :func:`chunked_joint_target_log_prob` (built by :mod:`trime_fairseq.memory.in_batch`)."""

    def window(self, q0: int, q1: int, k_end: int) -> Tuple[int, int]:
        """``(k0, k1)``: the keys outside ``[k0, k1)`` are in no memory of queries ``q0..q1``."""

    def fill_(self, scores: Tensor, q0: int, q1: int, k0: int) -> Optional[Tensor]:
        """Set ``scores`` ``[G, q1-q0, k1-k0]`` to ``-inf`` outside each query's memory, in place;
        returns the memory mask when it built one (else ``None``)."""

    def pairs(self, q0: int, q1: int, k0: int, k1: int) -> Optional[Tuple[Tensor, Tensor]]:
        """The positives (memory entries labelled with the query's target) of the chunk as
        ``(flat index into the [G, q1-q0, k1-k0] block, flat index into its [G, q1-q0]
        rows)``; ``None``: compare labels densely instead."""


class DenseLayout:
    """A :class:`ChunkLayout` from a dense :data:`MaskFn` (every key, every entry masked)."""

    def __init__(self, mask_fn: MaskFn) -> None:
        self.mask_fn = mask_fn

    def window(self, q0: int, q1: int, k_end: int) -> Tuple[int, int]:
        return 0, k_end

    def fill_(self, scores: Tensor, q0: int, q1: int, k0: int) -> Tensor:
        mask = self.mask_fn(q0, q1, k0 + scores.size(-1))[..., k0:]
        scores.masked_fill_(~mask, NEG_INF)
        return mask

    def pairs(self, q0: int, q1: int, k0: int, k1: int) -> None:
        return None


@dataclass
class _Chunk:
    """One chunk's masked memory scores ``[G, q, k1-k0]`` (keys ``k0..k1``) and its positives:
    dense (``positive`` bool, same shape) or sparse (``pairs`` of :meth:`ChunkLayout.pairs`
    and their scores ``pair_scores``)."""

    scores: Tensor
    k0: int
    k1: int
    positive: Optional[Tensor] = None
    pairs: Optional[Tuple[Tensor, Tensor]] = None
    pair_scores: Optional[Tensor] = None
    #: after :func:`_chunk_num_den`, ``scores`` holds ``exp(m - shift)`` and this the rows'
    #: ``shift`` ``[G, q, 1]``: a kept chunk's backward needs no exponential of its own
    shift: Optional[Tensor] = None


class _ChunkedJointLogProb(torch.autograd.Function):
    """Eq. 5 with memory scores ``q·k/(√d τ)`` computed chunk by chunk of query rows, with a
    hand-written backward: two matrix products per chunk, no autograd graph over the
    elementwise work. The forward keeps the exponentiated scores ``exp(m - shift)`` of the
    chunks flagged in ``keep_scores`` for the backward (one float per entry; the backward then
    rescales them, ``exp(m - D) = exp(m - shift)·exp(shift - D)``, without recomputing scores
    or exponentials); the backward recomputes the other chunks' scores and exponentials one
    chunk at a time, so no similarity-sized tensor of theirs outlives a chunk. Where the
    layout gives the positives as index pairs, the target's memory mass is gathered from
    them, not compared densely.

    Outputs ``log P(target)`` and the log-partition ``D``. With ``N``/``D`` the log numerator/
    denominator of Eq. 5 (:func:`_joint_num_den`) and ``m_j`` the scores:
    ``∂ log P/∂m_j = [x_j = target]·exp(m_j - N) - exp(m_j - D)``, ``∂D/∂m_j = exp(m_j - D)``,
    ``∂ log P/∂s_target = exp(s_target - N)``, ``∂ log P/∂ log Z = -∂D/∂ log Z = -exp(log Z - D)``.
    """

    @staticmethod
    def forward(ctx, tok_target, tok_lse, queries, keys, key_labels, target, scale, chunks, layout, top_k,
                keep_scores):
        nums, dens, kept = [], [], []
        for (q0, q1, k_end), keep in zip(chunks, keep_scores):
            chunk = _chunk_scores(queries, keys, key_labels, target, scale, layout, top_k, q0, q1, k_end)
            num, den = _chunk_num_den(tok_target[:, q0:q1], tok_lse[:, q0:q1], chunk, keep=keep)
            nums.append(num)
            dens.append(den)
            kept.append(chunk if keep else None)
        num, den = torch.cat(nums, 1), torch.cat(dens, 1)
        ctx.save_for_backward(tok_target, tok_lse, queries, keys, key_labels, target, num, den)
        ctx.scale, ctx.chunks, ctx.layout, ctx.top_k, ctx.kept = scale, chunks, layout, top_k, kept
        return num - den, den

    @staticmethod
    def backward(ctx, grad, grad_den):
        tok_target, tok_lse, queries, keys, key_labels, target, num, den = ctx.saved_tensors
        grad, grad_den = grad.to(num.dtype), grad_den.to(num.dtype)
        need_tok_t, need_tok_l, need_q, need_k = ctx.needs_input_grad[:4]
        g_tt = (grad * torch.exp(tok_target.to(num.dtype) - num)).to(tok_target.dtype) if need_tok_t else None
        g_tl = ((grad_den - grad) * torch.exp(tok_lse.to(den.dtype) - den)).to(tok_lse.dtype) if need_tok_l else None
        g_q = torch.zeros_like(queries, dtype=num.dtype) if need_q else None
        g_k = torch.zeros_like(keys, dtype=num.dtype) if need_k else None
        if need_q or need_k:
            qf, kf = at_least_float32(queries), at_least_float32(keys)
            for i, (q0, q1, k_end) in enumerate(ctx.chunks):
                chunk = ctx.kept[i]
                if chunk is not None:  # left as it is (gradcheck, retain_graph): exp(m - shift)·exp(shift - D)
                    coef = torch.mul(chunk.scores, torch.exp(chunk.shift - den[:, q0:q1, None]))
                else:
                    chunk = _chunk_scores(queries, keys, key_labels, target, ctx.scale, ctx.layout, ctx.top_k,
                                          q0, q1, k_end)
                    coef = chunk.scores.sub_(den[:, q0:q1, None]).exp_()
                # g·(exp(m - N)·[pos] - exp(m - D)) + g_D·exp(m - D)
                #   = exp(m - D)·(g_D - g) + [pos]·g·exp(m - N): the per-query factor (times the
                # scale) in one product, the positives added apart
                g, gd = grad[:, q0:q1], grad_den[:, q0:q1]
                base = ((gd - g) * ctx.scale).unsqueeze(-1)
                if chunk.pairs is None:
                    with_pos = torch.exp(den[:, q0:q1, None] - num[:, q0:q1, None]) * g.unsqueeze(-1) * ctx.scale
                    coef.mul_(torch.where(chunk.positive, with_pos + base, base))
                else:
                    coef.mul_(base)
                    blk, row = chunk.pairs
                    extra = torch.exp(chunk.pair_scores - num[:, q0:q1].reshape(-1)[row])
                    coef.view(-1).index_add_(0, blk, (extra * (g * ctx.scale).reshape(-1)[row]).to(coef.dtype))
                k0, k1 = chunk.k0, chunk.k1
                if need_q:
                    g_q[:, q0:q1] = torch.matmul(coef, kf[:, k0:k1])
                if need_k:
                    g_k[:, k0:k1].baddbmm_(coef.transpose(1, 2), qf[:, q0:q1])
        g_q = g_q.to(queries.dtype) if g_q is not None else None
        g_k = g_k.to(keys.dtype) if g_k is not None else None
        return g_tt, g_tl, g_q, g_k, None, None, None, None, None, None, None


def _chunk_scores(queries, keys, key_labels, target, scale, layout: ChunkLayout, top_k, q0, q1, k_end) -> _Chunk:
    """The masked scores of queries ``q0..q1`` against the keys of the layout's window
    (``-inf`` outside memory, and outside each query's ``top_k`` best entries when
    ``top_k > 0``) and their positives (memory entries labelled with the query's target)."""
    k0, k1 = layout.window(q0, q1, k_end)
    scores = at_least_float32(torch.matmul(queries[:, q0:q1] * scale, keys[:, k0:k1].transpose(1, 2)))
    mask = layout.fill_(scores, q0, q1, k0)
    pairs = layout.pairs(q0, q1, k0, k1) if top_k <= 0 else None
    if pairs is not None:
        return _Chunk(scores, k0, k1, pairs=pairs, pair_scores=scores.view(-1)[pairs[0]])
    if mask is None:
        mask = scores.ne(NEG_INF)
    if top_k > 0:
        mask = top_k_mask(scores, mask, top_k)
        scores.masked_fill_(~mask, NEG_INF)
    positive = mask.logical_and_(key_labels[:, None, k0:k1].eq(target[:, q0:q1, None]))
    return _Chunk(scores, k0, k1, positive=positive)


def _chunk_num_den(tok_target: Tensor, tok_lse: Tensor, chunk: _Chunk, keep: bool) -> Tuple[Tensor, Tensor]:
    """:func:`_joint_num_den` of one chunk, ``[G, q]`` each, exponentiating its scores in
    place (``chunk.scores`` becomes ``exp(m - shift)``, ``chunk.shift`` the shift); with sparse
    positives the target's memory mass is summed over the pairs. ``keep``: the weights stay
    intact for the backward (the dense positives' sum takes a copy instead of masking them)."""
    scores = chunk.scores
    shift = _row_shift(scores)
    weights = scores.sub_(shift).exp_()  # masked -> 0
    total = weights.sum(-1)
    chunk.shift = shift
    if chunk.pairs is None:
        pos = weights.mul(chunk.positive) if keep else weights.masked_fill_(chunk.positive.logical_not(), 0.0)
        return _num_den(tok_target, tok_lse, pos.sum(-1), total, shift)
    _, row = chunk.pairs
    flat_shift = shift.view(-1)
    pos_sum = torch.zeros_like(flat_shift).index_add_(0, row, torch.exp(chunk.pair_scores - flat_shift[row]))
    return _num_den(tok_target, tok_lse, pos_sum.view_as(total), total, shift)


def chunked_joint_target_log_prob(
    tok_target: Tensor,
    tok_lse: Tensor,
    queries: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    target: Tensor,
    mask_fn: Union[MaskFn, ChunkLayout],
    chunks: Sequence[Tuple[int, int, int]],
    temperature: float = 1.0,
    recompute_above: int = 0,
    top_k: int = 0,
) -> Tuple[Tensor, Tensor]:
    """``log P(target)`` of Eq. 5 and its log-partition for ``[G, T]`` queries against ``[G, K]``
    memory keys whose scores are ``sim(q, k)/τ`` (:func:`scaled_similarity`), per chunk.

    Args:
        tok_target, tok_lse, target: ``[G, T]``; queries ``[G, T, d]``; keys ``[G, K, d]``;
            key_labels ``[G, K]``.
        mask_fn: memory mask of a chunk of queries against the first ``k_end`` keys, or a
            :class:`ChunkLayout` (key windows, in-place masking, sparse positives).
        chunks: ``(q0, q1, k_end)`` covering ``0..T`` in order; keys past ``k_end`` are
            outside every memory of that chunk.
        recompute_above: the forward keeps the similarities of its first chunks, as many as
            hold at most this many entries together, for the backward; the backward recomputes
            the others chunk by chunk (memory: one chunk). 0: recompute every chunk.
        top_k: keep only each query's ``top_k`` highest-scoring memory entries (0: all;
            :func:`top_k_mask`).
    Returns:
        ``([G, T], [G, T])``; gradients reach token terms, queries and keys.
    """
    scale = 1.0 / (math.sqrt(queries.size(-1)) * temperature)
    budget = recompute_above if torch.is_grad_enabled() else 0
    sizes = [queries.size(0) * (q1 - q0) * k_end for q0, q1, k_end in chunks]
    keep = tuple(total <= budget for total in itertools.accumulate(sizes))
    layout = mask_fn if hasattr(mask_fn, "fill_") else DenseLayout(mask_fn)
    return _ChunkedJointLogProb.apply(tok_target, tok_lse, queries, keys, key_labels, target, scale,
                                      tuple(chunks), layout, int(top_k), keep)


def _log_or_neg_inf(x: Tensor) -> Tensor:
    """``log x`` with ``log 0 = -inf`` and a zero (not NaN) gradient there."""
    return torch.where(x > 0, torch.log(x.clamp_min(torch.finfo(x.dtype).tiny)), torch.full_like(x, NEG_INF))


@dataclass
class Support:
    """Where a memory distribution lives in the vocabulary, and its values there.

    ``shared``: one index ``[U]`` (the distinct labels) for every row, values ``[..., U]``
    (memory shared by all queries of a row: local and long-term); otherwise a per-row
    index ``[..., K]`` with duplicates allowed (retrieved neighbours).
    """

    index: Tensor
    values: Tensor
    shared: bool

    def gather(self, t: Tensor) -> Tensor:
        return t.index_select(-1, self.index) if self.shared else t.gather(-1, self.index)

    def scatter_(self, out: Tensor, values: Tensor) -> Tensor:
        return out.index_copy_(-1, self.index, values) if self.shared else out.scatter_(-1, self.index, values)


def label_logsumexp_at(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, vocab_size: int
) -> Tuple[Support, Tensor]:
    """``log Σ_{j∈M, x_j=w} exp(m_j)`` on the words ``w`` present in memory, and the total
    ``log Σ_{j∈M} exp(m_j)`` ``[...]``.

    Labels shared by all rows (``mem_labels`` ``[..., 1, K]``) are summed per distinct
    label (no vocabulary-sized buffer); per-row labels are scattered into a ``[..., V]``
    scratch buffer and read back at each entry (duplicates get the same value; masked
    entries point at label 0 with label 0's value, so writing back is consistent).
    """
    scores = mem_scores.masked_fill(~mem_mask, NEG_INF)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores.sub_(row_max))  # masked entries -> 0
    total = torch.log(weights.sum(-1)) + row_max.squeeze(-1)
    if mem_labels.dim() >= 2 and mem_labels.size(-2) == 1 and all(d == 1 for d in mem_labels.shape[:-2]):
        uniq, inverse = torch.unique(mem_labels.reshape(-1), return_inverse=True)
        flat = weights.reshape(-1, weights.size(-1))
        sums = flat.new_zeros(flat.size(0), uniq.numel()).index_add_(1, inverse, flat)
        values = (torch.log(sums) + row_max.reshape(-1, 1)).reshape(*weights.shape[:-1], uniq.numel())
        return Support(uniq.long(), values, True), total
    labels = torch.broadcast_to(mem_labels, scores.shape).masked_fill(~mem_mask, 0).long()
    sums = weights.new_zeros(weights.shape[:-1] + (vocab_size,))
    sums.scatter_add_(-1, labels, weights)
    return Support(labels, torch.log(sums.gather(-1, labels)) + row_max, False), total


def joint_log_probs(
    tok_scores: Tensor,
    tok_lse: Tensor,
    mem_scores: Tensor,
    mem_labels: Tensor,
    mem_mask: Tensor,
) -> Tensor:
    """The whole distribution of Eq. 6, ``log P(w|c)`` for every ``w``: ``[N, V]``.

    Words absent from memory get ``s_w - log Z``; only the memory's labels are updated.
    For an adaptive softmax whose ``tok_scores`` are only valid at some entries (fairseq
    fills the rest with 0), the result is valid at those same entries.
    """
    support, mem_total = label_logsumexp_at(mem_scores, mem_labels, mem_mask, tok_scores.size(-1))
    den = torch.logaddexp(tok_lse, mem_total).unsqueeze(-1)
    out = tok_scores - den
    return support.scatter_(out, torch.logaddexp(support.gather(tok_scores), support.values) - den)


def memory_log_probs_at(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, vocab_size: int
) -> Support:
    """The memory-only distribution of Eq. 7 at its support (also the continuous cache's
    and kNN-LM's ``P_mem``)."""
    support, total = label_logsumexp_at(mem_scores, mem_labels, mem_mask, vocab_size)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total)).unsqueeze(-1)
    return Support(support.index, support.values - total, support.shared)


def memory_log_probs(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, vocab_size: int
) -> Tensor:
    """Eq. 7 as a dense ``[N, V]`` distribution (``-inf`` off its support; rows with an
    empty memory are all ``-inf``)."""
    support = memory_log_probs_at(mem_scores, mem_labels, mem_mask, vocab_size)
    out = mem_scores.new_full(mem_scores.shape[:-1] + (vocab_size,), NEG_INF)
    return support.scatter_(out, support.values)


def joint_entry_log_weights(tok_lse: Tensor, mem_scores: Tensor, mem_mask: Tensor) -> Tensor:
    """Eq. 6 per memory entry: ``log(exp(m_j) / Z)``, the probability mass entry ``j`` adds to
    its label ``x_j``; ``Z = Σ_v exp(s_v) + Σ_{j∈M} exp(m_j)``. ``-inf`` off the mask.

    Args:
        tok_lse: ``[...]``; mem_scores, mem_mask: ``[..., K]``.
    """
    scores = mem_scores.masked_fill(~mem_mask, NEG_INF)
    den = torch.logaddexp(tok_lse, torch.logsumexp(scores, -1))
    return scores - den.unsqueeze(-1)


def memory_entry_log_weights(mem_scores: Tensor, mem_mask: Tensor) -> Tensor:
    """Eq. 7 per memory entry: ``log softmax_j(m_j)`` over the masked entries (``-inf`` off
    the mask and in rows with an empty memory); the entries of a label sum to ``P_mem``."""
    scores = mem_scores.masked_fill(~mem_mask, NEG_INF)
    total = torch.logsumexp(scores, -1, keepdim=True)
    return scores - torch.where(torch.isfinite(total), total, torch.zeros_like(total))


def memory_target_log_prob(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, target: Tensor
) -> Tensor:
    """``log P_mem(target)`` of Eq. 7 for one target per row: ``[N]``."""
    positive = mem_mask & mem_labels.eq(target.unsqueeze(-1))
    total = masked_logsumexp(mem_scores, mem_mask)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    return masked_logsumexp(mem_scores, positive) - total


# Appendix F: which entries P' (Eq. 7) is computed over, and how they are scored
PPRIME_KINDS = ("ext-raw", "all-scaled")
DEFAULT_PPRIME = "ext-raw"


def appendix_f_entries(
    kind: str,
    scores: Tensor,
    labels: Tensor,
    mask: Tensor,
    temperature: float,
    memory_temperature: float,
    ext_scores: Optional[Tensor] = None,
    ext_labels: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``(scores, labels, mask)`` over which Appendix F's memory-only distribution
    ``P'`` (Eq. 7) is computed, for :func:`memory_log_probs_at` / :func:`memory_target_log_prob`.

    * ``"ext-raw"`` (the published setup): the retrieved external neighbours only, scored
      by their raw similarity (inner product, no ``√d``) divided by ``τ'``:
      ``P'(w) ∝ Σ_{j∈ext, x_j=w} exp(q·k_j / τ')``. Needs ``ext_scores``; rows without a
      finite one have an empty ``P'`` (Eq. 8 then leaves ``P`` unchanged).
    * ``"all-scaled"``: every memory entry of Eq. 6 (local, long-term and external),
      scored ``sim/(√d τ')``.

    Args:
        scores, labels, mask: all memory entries of Eq. 6, ``scores = sim/(√d τ)``.
        temperature, memory_temperature: ``τ`` (of ``scores``) and ``τ'``.
        ext_scores, ext_labels: ``[..., K]`` raw retrieved similarities (``-inf`` = none)
            and their labels.
    """
    if kind == "all-scaled":
        return scores * (temperature / memory_temperature), labels, mask
    if kind != "ext-raw":
        raise ValueError(f"--memory-distribution must be one of {PPRIME_KINDS}, got {kind!r}")
    if ext_scores is None:
        raise ValueError("--memory-distribution ext-raw needs external memory (--eval-memory ...+ext)")
    return ext_scores / memory_temperature, ext_labels, torch.isfinite(ext_scores)


def _mix_logs(lam: Union[float, Tensor]) -> Tuple[Union[float, Tensor], Union[float, Tensor]]:
    """``(log(1-λ), log λ)`` for a scalar or a per-row tensor ``λ``."""
    if isinstance(lam, Tensor):
        return torch.log1p(-lam), torch.log(lam)
    return (math.log1p(-lam) if lam < 1 else NEG_INF), (math.log(lam) if lam > 0 else NEG_INF)


def interpolate_at(
    lprobs: Tensor, mem: Support, lam: Union[float, Tensor], has_memory: Optional[Tensor] = None
) -> Tensor:
    """Eq. 8 for a memory distribution given at its support: ``log((1-λ) P + λ P_mem)``
    for every word, touching only the support beyond a shift of ``P``. Rows without
    memory keep ``P``. ``λ`` is a number or a per-row tensor ``[...]`` (adaptive kNN-MT)."""
    if not isinstance(lam, Tensor) and lam <= 0.0:
        return lprobs
    if has_memory is None:
        has_memory = torch.ones(lprobs.shape[:-1], dtype=torch.bool, device=lprobs.device)
    log_keep, log_lam = _mix_logs(lam)
    if isinstance(lam, Tensor):
        log_keep, log_lam = log_keep.to(lprobs.dtype), log_lam.to(lprobs.dtype).unsqueeze(-1)
    shift = torch.where(has_memory, torch.as_tensor(log_keep, dtype=lprobs.dtype, device=lprobs.device),
                        torch.zeros((), dtype=lprobs.dtype, device=lprobs.device)).unsqueeze(-1)
    out = lprobs + shift
    before = mem.gather(lprobs)
    at = torch.logaddexp(before + shift, mem.values + log_lam)
    return mem.scatter_(out, torch.where(has_memory.unsqueeze(-1), at, before))


def interpolate(
    lprobs: Tensor, mem_lprobs: Tensor, lam: Union[float, Tensor], has_memory: Optional[Tensor] = None
) -> Tensor:
    """Eq. 8: ``log((1-λ) P + λ P_mem)`` elementwise (any shape); ``λ`` a number or a
    tensor shaped like ``lprobs``.

    Args:
        has_memory: bool tensor broadcastable to ``lprobs`` without the last dim of a
            distribution; rows without memory keep ``P`` unchanged (λ is 0 for them).
    """
    if not isinstance(lam, Tensor) and lam <= 0.0:
        return lprobs
    log_keep, log_lam = _mix_logs(lam)
    mixed = torch.logaddexp(lprobs + log_keep, mem_lprobs + log_lam)
    if has_memory is None:
        return mixed
    while has_memory.dim() < mixed.dim():
        has_memory = has_memory.unsqueeze(-1)
    return torch.where(has_memory, mixed, lprobs)
