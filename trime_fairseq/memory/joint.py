"""The TRIME joint softmax (Eq. 5-8 of Zhong et al., 2022) as pure tensor functions.

Every memory-augmented probability in this package (training loss, ``fairseq-eval-lm``
scoring, tuning sweeps, the continuous-cache and kNN baselines) is computed here.

Notation used throughout:

* ``tok_scores`` ``[..., V]``: token scores. With a full softmax these are the raw logits
  ``E_w . f(c)`` and ``tok_lse = logsumexp(tok_scores)``. With an adaptive softmax there are
  no single-softmax logits; the normalised log-probabilities play their role and
  ``tok_lse = 0`` (Eq. 5 then reads ``P(w) ∝ p_AS(w) + Σ exp(sim)``).
* ``mem_scores`` ``[..., K]``: ``sim(g(c), g(c_j)) / τ`` for K memory candidates.
* ``mem_labels`` ``[..., K]``: the next token ``x_j`` of each candidate.
* ``mem_mask`` ``[..., K]``: which candidates are in the memory of this query. Masked
  entries are set to ``-inf`` and every log-sum-exp also contains a finite token term,
  so rows with an empty (or no positive) memory fall back to the token term exactly and
  gradients stay finite.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


def scaled_similarity(query: Tensor, keys: Tensor, temperature: float = 1.0) -> Tensor:
    """``sim(q, k) / τ = q·k / (√d τ)`` (scaled dot product, §3), batched.

    Args:
        query: ``[..., Q, d]``; keys: ``[..., K, d]`` (same leading dims).
    Returns:
        ``[..., Q, K]``.
    """
    scale = 1.0 / (math.sqrt(query.size(-1)) * temperature)
    return torch.matmul(query * scale, keys.transpose(-1, -2))


def masked_logsumexp(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``log Σ_{mask} exp(scores)``; ``-inf`` where the mask is empty (no NaN gradients
    as long as the result is later combined with a finite term)."""
    return torch.logsumexp(scores.masked_fill(~mask, NEG_INF), dim=dim)


def joint_target_log_prob(
    tok_target: Tensor,
    tok_lse: Tensor,
    mem_scores: Tensor,
    mem_labels: Tensor,
    mem_mask: Tensor,
    target: Tensor,
) -> Tensor:
    """``log P(target | c)`` under Eq. 5 (training) / Eq. 6 (testing, scores already / τ).

    ``P(w|c) = [exp(s_w) + Σ_{j∈M, x_j=w} exp(m_j)] / [Σ_v exp(s_v) + Σ_{j∈M} exp(m_j)]``

    Args:
        tok_target: ``[N]`` token score of the target (``s_target``).
        tok_lse: ``[N]`` ``log Σ_v exp(s_v)`` (0 for normalised scores).
        mem_scores, mem_labels, mem_mask: ``[N, K]``.
        target: ``[N]``.
    Returns:
        ``[N]`` log-probabilities.
    """
    positive = mem_mask & mem_labels.eq(target.unsqueeze(-1))
    num = torch.logaddexp(tok_target, masked_logsumexp(mem_scores, positive))
    den = torch.logaddexp(tok_lse, masked_logsumexp(mem_scores, mem_mask))
    return num - den


def label_logsumexp_at(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, vocab_size: int
) -> Tuple[Tensor, Tensor]:
    """``log Σ_{j∈M, x_j=w} exp(m_j)`` evaluated at each entry's own label ``w = x_k``.

    Returns ``(labels [N, K], values [N, K])``: entries sharing a label get the same value;
    masked entries point at label 0 with the value for label 0 (``-inf`` unless it is in
    memory), so scattering the results back is consistent. Only ``[N, K]`` work plus one
    ``[N, V]`` scratch buffer.
    """
    scores = mem_scores.masked_fill(~mem_mask, NEG_INF)
    labels = torch.broadcast_to(mem_labels, scores.shape).masked_fill(~mem_mask, 0).long()
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked entries -> 0
    sums = scores.new_zeros(scores.shape[:-1] + (vocab_size,))
    sums.scatter_add_(-1, labels, weights)
    return labels, torch.log(sums.gather(-1, labels)) + row_max


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
    den = torch.logaddexp(tok_lse, masked_logsumexp(mem_scores, mem_mask)).unsqueeze(-1)
    labels, mem_at = label_logsumexp_at(mem_scores, mem_labels, mem_mask, tok_scores.size(-1))
    out = tok_scores - den
    return out.scatter_(-1, labels, torch.logaddexp(tok_scores.gather(-1, labels), mem_at) - den)


def memory_log_probs_at(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, vocab_size: int
) -> Tuple[Tensor, Tensor]:
    """The memory-only distribution of Eq. 7 at its support: ``(labels, log P_mem)``,
    each ``[N, K]`` (also the continuous cache's and kNN-LM's ``P_mem``)."""
    labels, at = label_logsumexp_at(mem_scores, mem_labels, mem_mask, vocab_size)
    total = masked_logsumexp(mem_scores, mem_mask).unsqueeze(-1)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    return labels, at - total


def memory_log_probs(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, vocab_size: int
) -> Tensor:
    """Eq. 7 as a dense ``[N, V]`` distribution (``-inf`` off its support; rows with an
    empty memory are all ``-inf``)."""
    labels, at = memory_log_probs_at(mem_scores, mem_labels, mem_mask, vocab_size)
    out = mem_scores.new_full(at.shape[:-1] + (vocab_size,), NEG_INF)
    return out.scatter_(-1, labels, at)


def memory_target_log_prob(
    mem_scores: Tensor, mem_labels: Tensor, mem_mask: Tensor, target: Tensor
) -> Tensor:
    """``log P_mem(target)`` of Eq. 7 for one target per row: ``[N]``."""
    positive = mem_mask & mem_labels.eq(target.unsqueeze(-1))
    total = masked_logsumexp(mem_scores, mem_mask)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    return masked_logsumexp(mem_scores, positive) - total


def interpolate_at(
    lprobs: Tensor, labels: Tensor, mem_at: Tensor, lam: float, has_memory: Optional[Tensor] = None
) -> Tensor:
    """Eq. 8 for a memory distribution given at its support ``(labels, mem_at)``:
    ``log((1-λ) P + λ P_mem)`` for every word, touching only ``[N, K]`` entries beyond a
    shift of ``P``. Rows without memory keep ``P``."""
    if lam <= 0.0:
        return lprobs
    if has_memory is None:
        has_memory = torch.ones(lprobs.shape[:-1], dtype=torch.bool, device=lprobs.device)
    keep = math.log1p(-lam) if lam < 1 else NEG_INF
    shift = torch.where(has_memory, torch.full_like(has_memory, keep, dtype=lprobs.dtype),
                        torch.zeros_like(has_memory, dtype=lprobs.dtype)).unsqueeze(-1)
    out = lprobs + shift
    at = torch.logaddexp(lprobs.gather(-1, labels) + shift, mem_at + math.log(lam))
    at = torch.where(has_memory.unsqueeze(-1), at, lprobs.gather(-1, labels))
    return out.scatter_(-1, labels, at)


def interpolate(
    lprobs: Tensor, mem_lprobs: Tensor, lam: float, has_memory: Optional[Tensor] = None
) -> Tensor:
    """Eq. 8: ``log((1-λ) P + λ P_mem)`` elementwise (any shape).

    Args:
        has_memory: bool tensor broadcastable to ``lprobs`` without the last dim of a
            distribution; rows without memory keep ``P`` unchanged (λ is 0 for them).
    """
    if lam <= 0.0:
        return lprobs
    mixed = torch.logaddexp(lprobs + math.log1p(-lam), mem_lprobs + math.log(lam)) if lam < 1 else mem_lprobs
    if has_memory is None:
        return mixed
    while has_memory.dim() < mixed.dim():
        has_memory = has_memory.unsqueeze(-1)
    return torch.where(has_memory, mixed, lprobs)
