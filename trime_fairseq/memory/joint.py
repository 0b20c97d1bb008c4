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

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

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
    # one exponential pass serves both sums: shift by the (detached) largest allowed score
    scores = mem_scores.masked_fill(~mem_mask, NEG_INF)
    shift = scores.amax(dim=-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(scores - shift)  # masked -> 0
    num = torch.logaddexp(tok_target, _log_or_neg_inf(weights.mul(positive).sum(-1)) + shift.squeeze(-1))
    den = torch.logaddexp(tok_lse, _log_or_neg_inf(weights.sum(-1)) + shift.squeeze(-1))
    return (num - den, den) if with_log_partition else num - den


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


def memory_target_log_prob(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, target: Tensor
) -> Tensor:
    """``log P_mem(target)`` of Eq. 7 for one target per row: ``[N]``."""
    positive = mem_mask & mem_labels.eq(target.unsqueeze(-1))
    total = masked_logsumexp(mem_scores, mem_mask)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    return masked_logsumexp(mem_scores, positive) - total


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
