"""Test-time combiners: how a memory changes the model's next-token distribution.

All of them read one :class:`ScoringInputs` (the model's token terms, the query and key
representations, the memory labels and which keys each query may see) and return either
the full distribution (for ``fairseq-eval-lm``) or the target's log-probability only
(cheaper; for tuning sweeps). The math is in :mod:`trime_fairseq.memory.joint`.

* :class:`NoMemory`: the vanilla LM.
* :class:`TrimeCombiner`: Eq. 6, memory and vocabulary in one softmax, temperature τ.
* :class:`CacheCombiner`: the continuous cache (Grave et al., 2017):
  ``(1-λ) P_LM + λ P_cache`` with ``P_cache(w) ∝ Σ_{x_j=w} exp(θ h·h_j)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from trime_fairseq.memory.joint import (
    interpolate,
    joint_log_probs,
    joint_target_log_prob,
    memory_log_probs,
    memory_target_log_prob,
    scaled_similarity,
)


@dataclass
class ScoringInputs:
    """Everything a combiner needs for one batch. Shapes: B rows, T positions, K keys.

    Attributes:
        tok_scores: ``[B, T, V]`` token scores (logits, or adaptive-softmax log-probs).
        tok_lse: ``[B, T]`` their log-partition (0 for log-probs).
        target: ``[B, T]``.
        query_g, query_f: ``[B, T, d]`` the query's ``g`` (last-FFN input) and ``f``
            (decoder output).
        keys_g, keys_f: ``[B, K, d]`` the same for memory entries.
        key_labels: ``[B, K]`` next token of each memory entry.
        mask: ``[B, T, K]`` bool, which memory entries each query may use.
        key_rank: ``[B, K]`` age rank of long-term entries (0 = newest), -1 for local
            keys; lets a sweep restrict the long-term memory without recomputing.
    """

    tok_scores: Tensor
    tok_lse: Tensor
    target: Tensor
    query_g: Tensor
    query_f: Tensor
    keys_g: Tensor
    keys_f: Tensor
    key_labels: Tensor
    mask: Tensor
    key_rank: Optional[Tensor] = None

    _PER_QUERY = ("tok_scores", "tok_lse", "target", "query_g", "query_f", "mask")

    def rows(self, start: int, end: int) -> "ScoringInputs":
        """The same inputs for batch rows ``start:end`` (views, no copies)."""
        return ScoringInputs(**{
            k: None if getattr(self, k) is None else getattr(self, k)[start:end]
            for k in self.__dataclass_fields__
        })

    def queries(self, start: int, end: int) -> "ScoringInputs":
        """Only query positions ``start:end`` (all keys kept)."""
        return replace(self, **{k: getattr(self, k)[:, start:end] for k in self._PER_QUERY})

    def with_long_memory(self, keys_g: Tensor, keys_f: Tensor, labels: Tensor, allowed: Tensor) -> "ScoringInputs":
        """Prepend long-term entries (``[B, M, d]`` keys, ``[B, M]`` labels, ``[B, T, M]``
        mask, newest last) to the keys."""
        m = labels.size(1)
        rank = torch.arange(m - 1, -1, -1, device=labels.device).expand(labels.size(0), m)
        local_rank = torch.full_like(self.key_labels, -1) if self.key_rank is None else self.key_rank
        return replace(
            self,
            keys_g=torch.cat([keys_g, self.keys_g], 1),
            keys_f=torch.cat([keys_f, self.keys_f], 1),
            key_labels=torch.cat([labels, self.key_labels], 1),
            mask=torch.cat([allowed, self.mask], 2),
            key_rank=torch.cat([rank, local_rank], 1),
        )

    def restrict_long_memory(self, size: int) -> "ScoringInputs":
        """Keep only the ``size`` newest long-term entries."""
        if self.key_rank is None:
            return self
        too_old = self.key_rank >= size
        return replace(self, mask=self.mask & ~too_old.unsqueeze(1))

    @property
    def vocab_size(self) -> int:
        return self.tok_scores.size(-1)

    def tok_log_probs(self) -> Tensor:
        return self.tok_scores - self.tok_lse.unsqueeze(-1)

    def tok_target_log_prob(self) -> Tensor:
        return self.tok_scores.gather(-1, self.target.unsqueeze(-1)).squeeze(-1) - self.tok_lse


class Combiner:
    """Interface: ``log_probs`` ``[B, T, V]`` and ``target_log_prob`` ``[B, T]``."""

    name = "none"

    def log_probs(self, x: ScoringInputs) -> Tensor:
        raise NotImplementedError

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class NoMemory(Combiner):
    """The vanilla LM: memory is ignored."""

    name = "none"

    def log_probs(self, x: ScoringInputs) -> Tensor:
        return x.tok_log_probs()

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        return x.tok_target_log_prob()


class TrimeCombiner(Combiner):
    """Eq. 6: ``P(w) ∝ exp(s_w) + Σ_{x_j=w} exp(sim(g, g_j)/τ)``."""

    name = "trime"

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"--eval-temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _scores(self, x: ScoringInputs) -> Tensor:
        return scaled_similarity(x.query_g, x.keys_g, self.temperature)

    def log_probs(self, x: ScoringInputs) -> Tensor:
        return joint_log_probs(
            x.tok_scores, x.tok_lse, self._scores(x), x.key_labels.unsqueeze(1), x.mask
        )

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        tok_target = x.tok_scores.gather(-1, x.target.unsqueeze(-1)).squeeze(-1)
        return joint_target_log_prob(
            tok_target, x.tok_lse, self._scores(x), x.key_labels.unsqueeze(1), x.mask, x.target
        )

    def describe(self) -> str:
        return f"trime(tau={self.temperature:g})"


class CacheCombiner(Combiner):
    """Continuous cache: ``(1-λ) P_LM + λ P_cache``, ``P_cache ∝ Σ exp(θ h·h_j)``.

    ``h`` is ``f`` (the decoder output, as in Grave et al.) or ``g``. Queries with an empty
    cache keep ``P_LM``.
    """

    name = "cache"

    def __init__(self, lam: float, theta: float, representation: str = "f") -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"--cache-lambda must be in [0, 1], got {lam}")
        if theta < 0:
            raise ValueError(f"--cache-theta must be >= 0, got {theta}")
        if representation not in ("f", "g"):
            raise ValueError(f"--cache-representation must be 'f' or 'g', got {representation!r}")
        self.lam, self.theta, self.representation = lam, theta, representation

    def _scores(self, x: ScoringInputs) -> Tensor:
        q, k = (x.query_f, x.keys_f) if self.representation == "f" else (x.query_g, x.keys_g)
        return self.theta * torch.matmul(q, k.transpose(-1, -2))

    def log_probs(self, x: ScoringInputs) -> Tensor:
        mem = memory_log_probs(self._scores(x), x.key_labels.unsqueeze(1), x.mask, x.vocab_size)
        return interpolate(x.tok_log_probs(), mem, self.lam, x.mask.any(-1))

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        mem = memory_target_log_prob(self._scores(x), x.key_labels.unsqueeze(1), x.mask, x.target)
        return interpolate(x.tok_target_log_prob(), mem, self.lam, x.mask.any(-1))

    def describe(self) -> str:
        return f"cache(lambda={self.lam:g}, theta={self.theta:g}, h={self.representation})"
