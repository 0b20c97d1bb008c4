"""Adaptive kNN-MT (Zheng et al., 2021): a small Meta-k network weighs, at every decoding
step, how many of the retrieved neighbours to trust.

For ``K`` retrieved neighbours the choices are ``k ∈ {0, 1, 2, 4, ..., K}`` (0 = the MT
model alone). Meta-k reads the neighbours' similarities and, for every ``i``, the number of
distinct values among the ``i`` nearest, and outputs weights ``w_k`` (a softmax). The
prediction is the mixture

    ``P(y) = w_0 P_MT(y) + Σ_{k>0} w_k P_kNN^k(y)``,
    ``P_kNN^k(y) ∝ Σ_{j<k, v_j=y} exp(s_j / T)``

which equals ``(1-λ) P_MT + λ P_mem`` with ``λ = 1-w_0`` and ``P_mem`` putting weight
``a_j = Σ_{k>j} w_k softmax_{i<k}(s_i/T)_j`` on neighbour ``j``; so it reuses Eq. 8's
interpolation of :mod:`trime_fairseq.memory.joint` with a per-step λ.
Meta-k is trained on a validation set with the MT model frozen
(``trime-train-metak``); checkpoints hold the weights and their config.
"""
from typing import List, Tuple

import torch
from torch import Tensor, nn

from trime_fairseq.memory.joint import NEG_INF, interpolate, masked_logsumexp
from trime_fairseq.errors import TrimeUserError


def k_choices(max_k: int) -> List[int]:
    """``[0, 1, 2, 4, ..., max_k]`` (``max_k`` added last if it is not a power of two)."""
    if max_k < 1:
        raise TrimeUserError(f"--knn-k must be >= 1 for adaptive kNN-MT, got {max_k}")
    ks, k = [0], 1
    while k < max_k:
        ks.append(k)
        k *= 2
    return ks + [max_k]


def distinct_counts(values: Tensor, found: Tensor) -> Tensor:
    """``[N, K]``: number of distinct values among the ``i+1`` nearest found neighbours."""
    k = values.size(-1)
    same = values.unsqueeze(-1) == values.unsqueeze(-2)  # [N, K, K]
    earlier = torch.ones(k, k, dtype=torch.bool, device=values.device).tril(-1)
    repeat = (same & earlier & found.unsqueeze(-2)).any(-1)
    return (found & ~repeat).cumsum(-1).to(torch.float32)


class MetaK(nn.Module):
    """The Meta-k network: ``[N, K]`` neighbour similarities and values -> log ``w_k``."""

    def __init__(self, max_k: int, hidden: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.max_k, self.hidden, self.dropout = max_k, hidden, dropout
        self.ks = k_choices(max_k)
        self.net = nn.Sequential(
            nn.Linear(2 * max_k, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, len(self.ks)),
        )

    def config(self) -> dict:
        return {"max_k": self.max_k, "hidden": self.hidden, "dropout": self.dropout}

    def forward(self, scores: Tensor, values: Tensor) -> Tensor:
        """``scores`` (``-inf`` = not found), ``values``: ``[N, K]`` -> ``[N, len(ks)]``."""
        if scores.size(-1) != self.max_k:
            raise ValueError(f"Meta-k was trained for --knn-k {self.max_k}, got {scores.size(-1)} neighbours")
        found = torch.isfinite(scores)
        feats = torch.cat([scores.masked_fill(~found, 0.0), distinct_counts(values, found)], -1)
        return torch.log_softmax(self.net(feats.float()).float(), -1)  # float32 under autocast too


def neighbour_log_weights(log_w: Tensor, scores: Tensor, ks: List[int], temperature: float) -> Tuple[Tensor, Tensor]:
    """``log a_j`` ``[N, K]`` (see module docstring) and ``log(1 - w_0)`` ``[N]``.

    Missing neighbours (``-inf`` scores) get no weight; choices whose ``k`` nearest are all
    missing give their weight back to the MT model.
    """
    n, k = scores.shape
    s = scores / temperature
    found = torch.isfinite(s)
    sizes = torch.tensor(ks[1:], device=s.device)  # [C-1]
    within = torch.arange(k, device=s.device).view(1, -1) < sizes.view(-1, 1)  # [C-1, K]
    mask = within.unsqueeze(0) & found.unsqueeze(1)  # [N, C-1, K]
    lse = masked_logsumexp(s.unsqueeze(1).expand(n, len(ks) - 1, k), mask)  # [N, C-1]
    has = torch.isfinite(lse)
    log_wk = torch.where(has, log_w[:, 1:], torch.full_like(lse, NEG_INF))
    per = (log_wk - torch.where(has, lse, torch.zeros_like(lse))).unsqueeze(-1) + s.unsqueeze(1)
    log_a = masked_logsumexp(per, mask, dim=1)  # [N, K]
    return log_a, torch.logsumexp(log_wk, -1)


def metak_target_log_prob(
    tok_target_lprob: Tensor, log_w: Tensor, scores: Tensor, values: Tensor, target: Tensor,
    ks: List[int], temperature: float,
) -> Tensor:
    """``log P(target)`` of the adaptive mixture ``[N]`` (for training Meta-k and sweeps)."""
    log_a, log_lam = neighbour_log_weights(log_w, scores, ks, temperature)
    found = torch.isfinite(log_a)
    positive = found & values.eq(target.unsqueeze(-1))
    mem = masked_logsumexp(log_a, positive) - torch.where(torch.isfinite(log_lam), log_lam, torch.zeros_like(log_lam))
    lam = log_lam.exp()
    return interpolate(tok_target_lprob, mem, lam, found.any(-1))
