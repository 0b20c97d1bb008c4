"""Test-time combiners: how a memory changes the model's next-token distribution.

All of them read one :class:`ScoringInputs` (the model's token terms, the query and key
representations, the memory labels and which keys each query may see) and return either
the full distribution (for ``fairseq-eval-lm``) or the target's log-probability only
(cheaper; for tuning sweeps). The math is in :mod:`trime_fairseq.memory.joint`.

* :class:`NoMemory`: the vanilla LM.
* :class:`TrimeCombiner`: Eq. 6, memory and vocabulary in one softmax, temperature τ.
* :class:`CacheCombiner`: the continuous cache (Grave et al., 2017):
  ``(1-λ) P_LM + λ P_cache`` with ``P_cache(w) ∝ Σ_{x_j=w} exp(θ h·h_j)``.
* :class:`KnnCombiner`: kNN-LM (Khandelwal et al., 2020): ``(1-λ) P_LM + λ P_kNN`` over the
  retrieved external entries, optionally followed by a continuous cache.

For inspection (``trime-inspect``), :meth:`Combiner.contributions` gives the mass each memory
entry adds to the final distribution.

External entries (retrieved per query from a datastore) come as ``ext_scores`` (``q·k``
or ``-‖q-k‖²``) and ``ext_labels``, ``[B, T, K]``; TRIME scales inner products like any
other memory entry (Eq. 6) and can add Appendix F's separate memory distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
from torch import Tensor

from trime_fairseq.memory.joint import (
    DEFAULT_PPRIME,
    PPRIME_KINDS,
    appendix_f_entries,
    at_least_float32,
    interpolate,
    interpolate_at,
    joint_entry_log_weights,
    joint_log_probs,
    joint_target_log_prob,
    memory_entry_log_weights,
    memory_log_probs_at,
    memory_target_log_prob,
    scaled_similarity,
    top_k_mask,
)
from trime_fairseq.errors import TrimeUserError


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
        tok_lprobs: optional ``[B, T, V]`` normalised token log-probabilities (saves a pass).
        key_rank: ``[B, K]`` age rank of long-term entries (0 = newest), -1 for local
            keys; lets a sweep restrict the long-term memory without recomputing.
        tok_target_scores: optional ``[B, T]`` token score of the target, for inputs that
            carry no vocabulary scores (:meth:`targets_only`; ``target_log_prob`` only).
    """

    tok_scores: Tensor
    tok_lse: Tensor
    target: Tensor
    query_g: Tensor
    query_f: Tensor
    keys_g: Optional[Tensor]
    keys_f: Optional[Tensor]
    key_labels: Tensor
    mask: Tensor
    key_rank: Optional[Tensor] = None
    ext_scores: Optional[Tensor] = None
    ext_labels: Optional[Tensor] = None
    tok_lprobs: Optional[Tensor] = None  # tok_scores - tok_lse, when already computed
    tok_target_scores: Optional[Tensor] = None

    _PER_QUERY = ("tok_scores", "tok_lse", "target", "query_g", "query_f", "mask", "ext_scores", "ext_labels",
                  "tok_lprobs", "tok_target_scores")

    def __post_init__(self) -> None:
        # fp16/bf16 inputs (a half-precision model, autocast) are scored in float32
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16):
                setattr(self, k, at_least_float32(v))

    @classmethod
    def external_only(cls, tok_scores: Tensor, tok_lse: Tensor, query_g: Tensor, ext_scores: Tensor,
                      ext_labels: Tensor, target: Optional[Tensor] = None,
                      tok_lprobs: Optional[Tensor] = None) -> "ScoringInputs":
        """Inputs whose only memory is retrieved entries ``[B, T, K]`` (translation: no
        local memory). ``target`` may be omitted when only :meth:`Combiner.log_probs` is used."""
        b, t, d = query_g.shape
        no_keys = query_g.new_zeros(b, 0, d)
        return cls(
            tok_scores=tok_scores, tok_lse=tok_lse,
            target=target if target is not None else torch.zeros(b, t, dtype=torch.long, device=query_g.device),
            query_g=query_g, query_f=query_g, keys_g=no_keys, keys_f=no_keys,
            key_labels=torch.zeros(b, 0, dtype=torch.long, device=query_g.device),
            mask=torch.zeros(b, t, 0, dtype=torch.bool, device=query_g.device),
            ext_scores=ext_scores, ext_labels=ext_labels, tok_lprobs=tok_lprobs,
        )

    @classmethod
    def targets_only(cls, tok_target: Tensor, tok_lse: Tensor, dim: int, ext_scores: Tensor, ext_labels: Tensor,
                     target: Tensor) -> "ScoringInputs":
        """Inputs for :meth:`Combiner.target_log_prob` from cached per-target values ``[N]``
        and retrieved neighbours ``[N, K]`` (one row of ``N`` queries of key size ``dim``; no
        vocabulary scores, no local memory): how ``trime-tune-mt`` scores a grid."""
        n = target.numel()
        x = cls.external_only(tok_target.new_zeros(1, n, 1), tok_lse.view(1, n), tok_target.new_zeros(1, n, dim),
                              ext_scores.view(1, n, -1), ext_labels.view(1, n, -1), target=target.view(1, n))
        return replace(x, tok_target_scores=tok_target.view(1, n))

    def rows(self, start: int, end: int) -> "ScoringInputs":
        """The same inputs for batch rows ``start:end`` (views, no copies)."""
        return ScoringInputs(**{
            k: None if getattr(self, k) is None else getattr(self, k)[start:end]
            for k in self.__dataclass_fields__
        })

    def queries(self, start: int, end: int) -> "ScoringInputs":
        """Only query positions ``start:end`` (all keys kept)."""
        return replace(self, **{
            k: getattr(self, k)[:, start:end] for k in self._PER_QUERY if getattr(self, k) is not None
        })

    def with_external(self, scores: Tensor, labels: Tensor) -> "ScoringInputs":
        """Attach per-query retrieved entries ``[B, T, K]`` (``-inf`` score = none)."""
        return replace(self, ext_scores=scores, ext_labels=labels)

    def skip_external(self, skipped: Tensor) -> "ScoringInputs":
        """The queries ``skipped`` ``[B, T]`` lose their retrieved entries, exactly as when
        :meth:`~trime_fairseq.memory.retriever.Retriever.search` skips them (scores ``-inf``,
        labels 0): every combiner then scores them without external memory."""
        if self.ext_scores is None:
            return self
        s = skipped.unsqueeze(-1)
        return replace(self, ext_scores=self.ext_scores.masked_fill(s, float("-inf")),
                       ext_labels=self.ext_labels.masked_fill(s, 0))

    def restrict_external(self, k: int) -> "ScoringInputs":
        """Keep only the ``k`` nearest retrieved entries (they come sorted)."""
        if self.ext_scores is None:
            return self
        return replace(self, ext_scores=self.ext_scores[..., :k], ext_labels=self.ext_labels[..., :k])

    def with_long_memory(self, keys_g: Optional[Tensor], keys_f: Optional[Tensor], labels: Tensor,
                         allowed: Tensor) -> "ScoringInputs":
        """Prepend long-term entries (``[B, M, d]`` keys, ``[B, M]`` labels, ``[B, T, M]``
        mask, newest last) to the keys. A representation given as ``None`` was not stored
        (no combiner in use reads it) and is dropped."""
        m = labels.size(1)
        rank = torch.arange(m - 1, -1, -1, device=labels.device).expand(labels.size(0), m)
        local_rank = torch.full_like(self.key_labels, -1) if self.key_rank is None else self.key_rank
        return replace(
            self,
            keys_g=None if keys_g is None else torch.cat([keys_g, self.keys_g], 1),
            keys_f=None if keys_f is None else torch.cat([keys_f, self.keys_f], 1),
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
        if self.tok_lprobs is not None:
            return self.tok_lprobs
        return self.tok_scores - self.tok_lse.unsqueeze(-1)

    def target_token_score(self) -> Tensor:
        """``s_target`` ``[B, T]``."""
        if self.tok_target_scores is not None:
            return self.tok_target_scores
        return self.tok_scores.gather(-1, self.target.unsqueeze(-1)).squeeze(-1)

    def tok_target_log_prob(self) -> Tensor:
        return self.target_token_score() - self.tok_lse


@dataclass
class Contributions:
    """What each memory entry adds to a combiner's final distribution (for inspection).

    Entries are laid out as :func:`entry_layout`: the shared keys of ``x`` (long-term, then
    local), then the retrieved external entries. With ``c_j = exp(log_weight_j)``, every
    combiner here has ``P(w) = (1 - Σ_j c_j) P_LM(w) + Σ_{j: label_j = w} c_j``.

    Attributes:
        log_weight: ``[B, T, K]`` ``log c_j`` (``-inf`` for entries the combiner did not use).
        labels: ``[B, T, K]`` the label (next token) of each entry.
        similarity: ``[B, T, K]`` the similarity the combiner compared, before any
            temperature or θ (``g·g_j/√d`` for TRIME, ``h·h_j`` for the cache, the
            datastore's ``q·k`` or ``-‖q-k‖²`` for kNN-LM).
        num_shared: how many of the K entries are shared keys (the rest are external).
    """

    log_weight: Tensor
    labels: Tensor
    similarity: Tensor
    num_shared: int


def entry_layout(x: ScoringInputs) -> Tensor:
    """Labels ``[B, T, K]`` of all memory entries of ``x``: shared keys, then external."""
    b, t = x.target.shape
    labels = x.key_labels.unsqueeze(1).expand(b, t, x.key_labels.size(-1))
    if x.ext_labels is not None:
        labels = torch.cat([labels, x.ext_labels], -1)
    return labels


def _place(x: ScoringInputs, shared: Optional[Tensor] = None, ext: Optional[Tensor] = None,
           fill: float = float("-inf")) -> Tensor:
    """Per-entry values in :func:`entry_layout` order; missing parts filled with ``fill``."""
    b, t = x.target.shape
    ks = x.key_labels.size(-1)
    ke = 0 if x.ext_labels is None else x.ext_labels.size(-1)
    dtype = x.tok_scores.dtype if x.tok_scores.is_floating_point() else torch.float32
    parts = [shared if shared is not None else x.tok_scores.new_full((b, t, ks), fill, dtype=dtype)]
    if ke:
        parts.append(ext if ext is not None else x.tok_scores.new_full((b, t, ke), fill, dtype=dtype))
    return torch.cat(parts, -1)


class Combiner:
    """Interface: ``log_probs`` ``[B, T, V]`` and ``target_log_prob`` ``[B, T]``."""

    name = "none"
    representations: tuple = ()  # which of "g"/"f" its memory keys use

    def log_probs(self, x: ScoringInputs) -> Tensor:
        raise NotImplementedError

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        raise NotImplementedError

    def contributions(self, x: ScoringInputs) -> Optional[Contributions]:
        """Per-entry mass of the final distribution (``trime-inspect``); ``None`` when the
        combiner uses no memory entry."""
        return None

    def describe(self) -> str:
        return self.name


class NoMemory(Combiner):
    """The vanilla LM: memory is ignored."""

    name = "none"

    def log_probs(self, x: ScoringInputs) -> Tensor:
        return x.tok_log_probs()

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        return x.tok_target_log_prob()


def top_long_memory(x: ScoringInputs, scores: Tensor, k: int) -> Tensor:
    """``x.mask`` with each query's long-term entries cut to its ``k`` highest-scoring ones
    (local memory untouched; ``k <= 0`` or no long-term memory: unchanged). Scores of the
    shared keys ``[B, T, K]``; the ranking is the similarity's, whatever the temperature."""
    if k <= 0 or x.key_rank is None:
        return x.mask
    is_long = (x.key_rank >= 0).unsqueeze(1)
    kept = top_k_mask(scores, x.mask & is_long, k)
    return (x.mask & ~is_long) | kept


def memory_entries(x: ScoringInputs, temperature: float, ext_temperature: Optional[float] = None,
                   long_top_k: int = 0):
    """All memory of ``x`` as ``(scores [B,T,K], labels, mask)``: shared keys (local, long)
    scored ``sim/τ`` with ``sim = g·g_j/√d``, then the retrieved external entries scored
    ``sim/τ_ext`` (``ext_temperature``; ``None`` = ``τ``, Eq. 6's one temperature).
    ``long_top_k > 0``: each query reads only its ``long_top_k`` most similar long-term
    entries (:func:`top_long_memory`)."""
    scores = scaled_similarity(x.query_g, x.keys_g, temperature)
    labels = x.key_labels.unsqueeze(1)
    mask = top_long_memory(x, scores, long_top_k)
    if x.ext_scores is not None:
        ext = x.ext_scores / (math.sqrt(x.query_g.size(-1)) * (ext_temperature or temperature))
        scores = torch.cat([scores, ext], -1)
        labels = torch.cat([labels.expand(*x.ext_labels.shape[:2], labels.size(-1)), x.ext_labels], -1)
        mask = torch.cat([mask, torch.isfinite(x.ext_scores)], -1)
    return scores, labels, mask


class TrimeCombiner(Combiner):
    """Eq. 6: ``P(w) ∝ exp(s_w) + Σ_{x_j=w} exp(sim(g, g_j)/τ)`` over all memories; with
    ``lam > 0`` also Appendix F: ``(1-λ) P + λ P'``, ``P'`` the memory-only distribution
    at temperature ``τ'`` (Eq. 7-8) over the entries that ``memory_distribution`` names
    (:func:`~trime_fairseq.memory.joint.appendix_f_entries`).

    ``ext_temperature`` (``τ_ext``) scores the retrieved external entries of Eq. 6 by
    ``sim/τ_ext`` instead of ``sim/τ``: the top-K of a large datastore are far closer to
    the query than the in-batch keys seen in training (Appendix F's shift), so they want a
    flatter scale than local memory. ``None`` = ``τ`` (the paper).

    ``long_top_k > 0``: each query reads only its ``long_top_k`` most similar long-term
    entries (local and external memory whole), so a larger long-term memory can offer better
    entries without adding the mass of every dissimilar one to Eq. 6's denominator. 0: all
    (the paper)."""

    name = "trime"
    representations = ("g",)

    def __init__(self, temperature: float = 1.0, lam: float = 0.0, memory_temperature: Optional[float] = None,
                 memory_distribution: str = DEFAULT_PPRIME, ext_temperature: Optional[float] = None,
                 long_top_k: int = 0) -> None:
        if temperature <= 0:
            raise TrimeUserError(f"--eval-temperature must be > 0, got {temperature}")
        if ext_temperature is not None and ext_temperature <= 0:
            raise TrimeUserError(f"--ext-temperature must be > 0, got {ext_temperature}")
        if long_top_k < 0:
            raise TrimeUserError(f"--long-memory-top-k must be >= 0 (0: all long-term entries), got {long_top_k}")
        if not 0.0 <= lam < 1.0:
            raise TrimeUserError(f"--memory-lambda must be in [0, 1), got {lam}: at 1 the model gets no weight "
                                 "and tokens absent from memory get probability 0")
        if lam > 0 and (memory_temperature is None or memory_temperature <= 0):
            raise TrimeUserError("--memory-lambda > 0 needs --memory-temperature > 0 (tau' of Eq. 7)")
        if str(memory_distribution) not in PPRIME_KINDS:
            raise TrimeUserError(f"--memory-distribution must be one of {PPRIME_KINDS}, got {memory_distribution!r}")
        self.temperature, self.lam, self.memory_temperature = temperature, lam, memory_temperature
        self.memory_distribution = str(memory_distribution)
        self.ext_temperature = ext_temperature
        self.long_top_k = int(long_top_k)

    def _entries(self, x: ScoringInputs):
        return memory_entries(x, self.temperature, self.ext_temperature, self.long_top_k)

    def _has_pprime(self, x: ScoringInputs) -> bool:
        """False when P' has no entries at all (published P' without a datastore)."""
        return self.memory_distribution != "ext-raw" or (x.ext_scores is not None and x.ext_scores.size(-1) > 0)

    def _similarities(self, x: ScoringInputs, scores: Tensor) -> Tensor:
        """``sim`` (before any temperature) of the entries of :meth:`_entries`' ``scores``."""
        n = x.key_labels.size(-1)
        if self.ext_temperature is None:
            return scores * self.temperature
        return torch.cat([scores[..., :n] * self.temperature, scores[..., n:] * self.ext_temperature], -1)

    def _pprime(self, x: ScoringInputs, scores: Tensor, labels: Tensor, mask: Tensor):
        if self.ext_temperature is not None and self.memory_distribution == "all-scaled":
            scores = self._similarities(x, scores) / self.temperature  # P' scales every entry by one τ'
        return appendix_f_entries(self.memory_distribution, scores, labels, mask, self.temperature,
                                  self.memory_temperature, x.ext_scores, x.ext_labels)

    def log_probs(self, x: ScoringInputs) -> Tensor:
        scores, labels, mask = self._entries(x)
        lp = joint_log_probs(x.tok_scores, x.tok_lse, scores, labels, mask)
        if self.lam > 0 and self._has_pprime(x):
            s2, l2, m2 = self._pprime(x, scores, labels, mask)
            lp = interpolate_at(lp, memory_log_probs_at(s2, l2, m2, x.vocab_size), self.lam, m2.any(-1))
        return lp

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        scores, labels, mask = self._entries(x)
        lp = joint_target_log_prob(x.target_token_score(), x.tok_lse, scores, labels, mask, x.target)
        if self.lam > 0 and self._has_pprime(x):
            s2, l2, m2 = self._pprime(x, scores, labels, mask)
            lp = interpolate(lp, memory_target_log_prob(s2, l2, m2, x.target), self.lam, m2.any(-1))
        return lp

    def contributions(self, x: ScoringInputs) -> Contributions:
        """``c_j = exp(sim_j/τ) / Z`` (Eq. 6); with Appendix F, ``(1-λ) c_j + λ c'_j`` (Eq. 7-8)."""
        scores, labels, mask = self._entries(x)
        w = joint_entry_log_weights(x.tok_lse, scores, mask)
        if self.lam > 0 and self._has_pprime(x):
            s2, _, m2 = self._pprime(x, scores, labels, mask)
            w2 = memory_entry_log_weights(s2, m2)
            if w2.size(-1) < w.size(-1):  # P' over the external entries only: the last columns
                w2 = torch.cat([w2.new_full(w2.shape[:-1] + (w.size(-1) - w2.size(-1),), float("-inf")), w2], -1)
            w = interpolate(w, w2, self.lam, m2.any(-1))
        return Contributions(w, entry_layout(x), self._similarities(x, scores), x.key_labels.size(-1))

    def describe(self) -> str:
        extra = (f", lambda={self.lam:g}, tau'={self.memory_temperature:g}, P' over {self.memory_distribution}"
                 if self.lam > 0 else "")
        ext = f", tau_ext={self.ext_temperature:g}" if self.ext_temperature is not None else ""
        top = f", long top-k={self.long_top_k}" if self.long_top_k else ""
        return f"trime(tau={self.temperature:g}{ext}{top}{extra})"


class CacheCombiner(Combiner):
    """Continuous cache: ``(1-λ) P_LM + λ P_cache``, ``P_cache ∝ Σ exp(θ h·h_j)``.

    ``h`` is ``f`` (the decoder output, as in Grave et al.) or ``g``. Queries with an empty
    cache keep ``P_LM``.
    """

    name = "cache"

    def __init__(self, lam: float, theta: float, representation: str = "f") -> None:
        if not 0.0 <= lam < 1.0:
            raise TrimeUserError(f"--cache-lambda must be in [0, 1), got {lam}: at 1 the model gets no weight "
                                 "and tokens absent from memory get probability 0")
        if theta < 0:
            raise TrimeUserError(f"--cache-theta must be >= 0, got {theta}")
        if representation not in ("f", "g"):
            raise TrimeUserError(f"--cache-representation must be 'f' or 'g', got {representation!r}")
        self.lam, self.theta, self.representation = lam, theta, representation
        self.representations = (representation,)

    def _dots(self, x: ScoringInputs) -> Tensor:
        """``h·h_j`` ``[B, T, K]`` over the shared keys."""
        q, k = (x.query_f, x.keys_f) if self.representation == "f" else (x.query_g, x.keys_g)
        return at_least_float32(torch.matmul(q, k.transpose(-1, -2)))

    def _scores(self, x: ScoringInputs) -> Tensor:
        return self.theta * self._dots(x)

    def entry_log_probs(self, x: ScoringInputs) -> Tuple[Tensor, Tensor]:
        """``(log softmax_j(θ h·h_j), h·h_j)`` per entry in :func:`entry_layout` order
        (``-inf`` / NaN for external entries, which the cache does not read)."""
        dots = self._dots(x)
        w = memory_entry_log_weights(self.theta * dots, x.mask)
        return _place(x, shared=w), _place(x, shared=dots, fill=float("nan"))

    def contributions(self, x: ScoringInputs) -> Contributions:
        """``c_j = λ softmax_j(θ h·h_j)`` over the shared keys, where the cache is not empty."""
        w, dots = self.entry_log_probs(x)
        w = interpolate(torch.full_like(w, float("-inf")), w, self.lam, x.mask.any(-1))
        return Contributions(w, entry_layout(x), dots, x.key_labels.size(-1))

    def mix(self, lprobs: Tensor, x: ScoringInputs) -> Tensor:
        """``(1-λ) P + λ P_cache`` for any distribution ``P`` ``[..., V]`` (e.g. kNN-LM's)."""
        mem = memory_log_probs_at(self._scores(x), x.key_labels.unsqueeze(1), x.mask, x.vocab_size)
        return interpolate_at(lprobs, mem, self.lam, x.mask.any(-1))

    def mix_target(self, lprob: Tensor, x: ScoringInputs) -> Tensor:
        """:meth:`mix` at the target only: ``lprob`` is ``log P(target)``."""
        mem = memory_target_log_prob(self._scores(x), x.key_labels.unsqueeze(1), x.mask, x.target)
        return interpolate(lprob, mem, self.lam, x.mask.any(-1))

    def log_probs(self, x: ScoringInputs) -> Tensor:
        return self.mix(x.tok_log_probs(), x)

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        return self.mix_target(x.tok_target_log_prob(), x)

    def describe(self) -> str:
        return f"cache(lambda={self.lam:g}, theta={self.theta:g}, h={self.representation})"


class KnnCombiner(Combiner):
    """kNN-LM: ``(1-λ) P_LM + λ P_kNN``, ``P_kNN(w) ∝ Σ_{retrieved, v_j=w} exp(s_j / T)``
    (``s_j`` = ``q·k`` or ``-‖q-k‖²``); then, optionally, a continuous cache on top."""

    name = "knn"

    def __init__(self, lam: float, temperature: float = 1.0, cache: Optional[CacheCombiner] = None) -> None:
        if not 0.0 <= lam < 1.0:
            raise TrimeUserError(f"--knn-lambda must be in [0, 1), got {lam}: at 1 the model gets no weight "
                                 "and tokens absent from memory get probability 0")
        if temperature <= 0:
            raise TrimeUserError(f"--knn-temperature must be > 0, got {temperature}")
        self.lam, self.temperature, self.cache = lam, temperature, cache
        self.representations = cache.representations if cache else ()

    def _knn(self, x: ScoringInputs):
        if x.ext_scores is None:
            raise TrimeUserError("kNN-LM needs retrieved neighbours: pass --datastore")
        return x.ext_scores / self.temperature, x.ext_labels, torch.isfinite(x.ext_scores)

    def log_probs(self, x: ScoringInputs) -> Tensor:
        s, labels, mask = self._knn(x)
        lp = interpolate_at(x.tok_log_probs(), memory_log_probs_at(s, labels, mask, x.vocab_size),
                            self.lam, mask.any(-1))
        return lp if self.cache is None else self.cache.mix(lp, x)

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        s, labels, mask = self._knn(x)
        lp = interpolate(x.tok_target_log_prob(), memory_target_log_prob(s, labels, mask, x.target),
                         self.lam, mask.any(-1))
        return lp if self.cache is None else self.cache.mix_target(lp, x)

    def contributions(self, x: ScoringInputs) -> Contributions:
        """``c_j = λ softmax_j(s_j/T)`` over the retrieved entries; with a cache on top, those
        times ``(1-λ_c)`` and the cache's own entries (:meth:`CacheCombiner.contributions`)."""
        s, _, mask = self._knn(x)
        w = memory_entry_log_weights(s, mask)
        w = _place(x, ext=interpolate(torch.full_like(w, float("-inf")), w, self.lam, mask.any(-1)))
        sims = _place(x, ext=x.ext_scores, fill=float("nan"))
        if self.cache is not None:
            cache_w, dots = self.cache.entry_log_probs(x)
            w = interpolate(w, cache_w, self.cache.lam, x.mask.any(-1))
            sims = torch.where(torch.isnan(sims), dots, sims)
        return Contributions(w, entry_layout(x), sims, x.key_labels.size(-1))

    def describe(self) -> str:
        c = f" + {self.cache.describe()}" if self.cache else ""
        return f"knn(lambda={self.lam:g}, T={self.temperature:g}){c}"


class AdaptiveKnnCombiner(Combiner):
    """Adaptive kNN-MT (:mod:`trime_fairseq.memory.adaptive`): a trained Meta-k network sets,
    per step, the weight of the MT model and of the 1, 2, 4, ... K nearest neighbours."""

    name = "adaptive"

    def __init__(self, metak, temperature: float = 10.0) -> None:
        if temperature <= 0:
            raise TrimeUserError(f"--knn-temperature must be > 0, got {temperature}")
        self.metak, self.temperature = metak.eval(), temperature

    def _weights(self, x: ScoringInputs):
        if x.ext_scores is None:
            raise TrimeUserError("adaptive kNN-MT needs retrieved neighbours: pass --datastore")
        s, v = x.ext_scores, x.ext_labels
        if next(self.metak.parameters()).device != s.device:  # loaded on the CPU; the model may be on a GPU
            self.metak.to(s.device)
        log_w = self.metak(s.reshape(-1, s.size(-1)), v.reshape(-1, v.size(-1))).view(*s.shape[:-1], -1)
        return log_w, s, v

    def log_probs(self, x: ScoringInputs) -> Tensor:
        from trime_fairseq.memory.adaptive import neighbour_log_weights

        log_w, s, v = self._weights(x)
        flat = log_w.reshape(-1, log_w.size(-1))
        log_a, log_lam = neighbour_log_weights(flat, s.reshape(-1, s.size(-1)), self.metak.ks, self.temperature)
        log_a, log_lam = log_a.view_as(s), log_lam.view(s.shape[:-1])
        found = torch.isfinite(log_a)
        mem = memory_log_probs_at(log_a, v, found, x.vocab_size)
        return interpolate_at(x.tok_log_probs(), mem, log_lam.exp(), found.any(-1))

    def target_log_prob(self, x: ScoringInputs) -> Tensor:
        from trime_fairseq.memory.adaptive import metak_target_log_prob

        log_w, s, v = self._weights(x)
        shape = x.target.shape
        out = metak_target_log_prob(
            x.tok_target_log_prob().reshape(-1), log_w.reshape(-1, log_w.size(-1)), s.reshape(-1, s.size(-1)),
            v.reshape(-1, v.size(-1)), x.target.reshape(-1), self.metak.ks, self.temperature)
        return out.view(shape)

    def describe(self) -> str:
        return f"adaptive-knn(K={self.metak.max_k}, T={self.temperature:g})"
