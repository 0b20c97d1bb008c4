"""Top-K retrieval from a datastore for external memory (kNN-LM, TRIMELM_ext, kNN-MT).

:class:`Retriever` batches all queries of a batch into one FAISS search and returns, per
query, the similarity of each neighbour (inner product ``q·k``, or ``-‖q-k‖²`` for an L2
index) and its value (next token). With ``exact=True`` the similarities are recomputed
from the stored keys (the paper's † rows) instead of FAISS's approximations.

The index follows the queries: it is loaded on the CPU and copied to the GPU(s) on the
first search with CUDA queries, if faiss-gpu sees a GPU and ``K`` is within faiss-gpu's
limit (:data:`~trime_fairseq.memory.index.GPU_MAX_K`); otherwise it is searched on the CPU.
Results are returned on the queries' device.

Adaptive retrieval ("search less"): with a :class:`RetrievalSkip` in :attr:`Retriever.skip`
and the model's token log-probabilities of each query, the queries where the model is
confident (low entropy, or high max-probability) are not searched at all; their rows come
back empty (``-inf`` scores), which every combiner reads as "no external neighbour", i.e.
the distribution without external memory. Only the other queries reach FAISS. The
retriever counts the queries it was given and those it skipped (:meth:`Retriever.counters`).
"""
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from trime_fairseq.memory.datastore import Datastore, rebuild_command
from trime_fairseq.memory.index import GPU_MAX_K, blas_for_small_batches
from trime_fairseq.memory.search_index import SearchIndex
from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)


@dataclass
class Retrieved:
    """``[n, K]`` similarities (``-inf`` where fewer than K were found) and values."""

    scores: Tensor
    values: Tensor
    ids: Tensor

    def top(self, k: int) -> "Retrieved":
        return Retrieved(self.scores[:, :k], self.values[:, :k], self.ids[:, :k])


#: the features a skip decision can read (``--retrieval-skip-feature``)
SKIP_FEATURES: Tuple[str, ...] = ("entropy", "max-prob")


@dataclass(frozen=True)
class RetrievalSkip:
    """When to leave a query out of the datastore search (adaptive retrieval).

    * ``entropy``: skip when the entropy (nats) of the model's next-token distribution is
      below ``threshold`` (``>= 0``; 0 never skips).
    * ``max-prob``: skip when the model's largest next-token probability is above
      ``threshold`` (in ``[0, 1]``; 1 never skips).
    """

    feature: str
    threshold: float

    def __post_init__(self) -> None:
        if self.feature not in SKIP_FEATURES:
            raise TrimeUserError(f"--retrieval-skip-feature must be one of {', '.join(SKIP_FEATURES)}, "
                                 f"got {self.feature!r}")
        t = self.threshold
        if not (isinstance(t, (int, float)) and math.isfinite(t)) or t < 0:
            raise TrimeUserError(f"--retrieval-skip-threshold must be a number >= 0, got {t}")
        if self.feature == "max-prob" and t > 1:
            raise TrimeUserError(f"--retrieval-skip-threshold with --retrieval-skip-feature max-prob is a "
                                 f"probability in [0, 1], got {t}")

    @classmethod
    def from_args(cls, args) -> Optional["RetrievalSkip"]:
        """The skip rule of ``--retrieval-skip-feature``/``--retrieval-skip-threshold``
        (``None``: search every query); one flag without the other is an error."""
        feature = getattr(args, "retrieval_skip_feature", None)
        threshold = getattr(args, "retrieval_skip_threshold", None)
        feature = None if feature is None or str(feature) in ("", "None") else str(feature)
        if feature is None and threshold is None:
            return None
        if feature is None:
            raise TrimeUserError(f"--retrieval-skip-threshold {threshold} needs --retrieval-skip-feature "
                                 f"({' or '.join(SKIP_FEATURES)})")
        if threshold is None:
            raise TrimeUserError(f"--retrieval-skip-feature {feature} needs --retrieval-skip-threshold")
        return cls(feature, float(threshold))

    @classmethod
    def for_share(cls, feature: str, values: Tensor, share: float) -> "RetrievalSkip":
        """The rule that skips about ``share`` of the queries whose feature ``values`` (of
        :meth:`values`) are given: a quantile of them (entropy: skip below; max-prob: above)."""
        q = share if feature == "entropy" else 1.0 - share
        return cls(feature, float(values.float().quantile(min(max(q, 0.0), 1.0))))

    def values(self, tok_lprobs: Tensor) -> Tensor:
        """The feature ``[...]`` of token log-probabilities ``[..., V]``."""
        lp = tok_lprobs.detach().float()
        if self.feature == "max-prob":
            return lp.max(-1).values.exp()
        return torch.special.entr(lp.exp()).sum(-1)

    @property
    def never_skips(self) -> bool:
        """The threshold skips nothing whatever the distribution (entropy 0, max-prob 1): the
        retriever then searches exactly as without a rule."""
        return self.threshold == (0.0 if self.feature == "entropy" else 1.0)

    def mask(self, tok_lprobs: Tensor) -> Tensor:
        """``True`` where the query is not searched."""
        return self.skips(self.values(tok_lprobs))

    def skips(self, values: Tensor) -> Tensor:
        """``True`` where the feature ``values`` (of :meth:`values`) skip the search."""
        return values > self.threshold if self.feature == "max-prob" else values < self.threshold

    def describe(self) -> str:
        op = ">" if self.feature == "max-prob" else "<"
        return f"skip search where {self.feature} {op} {self.threshold:g}"


class Retriever:
    """Searches a datastore's FAISS index (see module docstring)."""

    def __init__(self, datastore: Datastore, k: int = 1024, nprobe: Optional[int] = None,
                 exact: bool = False, use_gpu: bool = True) -> None:
        if k < 1:
            raise TrimeUserError(f"--knn-k must be >= 1, got {k}")
        self.datastore = datastore
        self.index = SearchIndex.load(
            str(datastore.path), nprobe=nprobe, use_gpu=False, size=len(datastore), dim=datastore.meta.dim,
            fix=f"rebuild the index: {rebuild_command(str(datastore.path), datastore.meta.source, index_only=True)}")
        self.config = self.index.config
        self.use_gpu = use_gpu  # move the index to the GPU when CUDA queries come (module doc)
        self.exclude_self = False  # drop the entry whose id is the query's stream position
        datastore.check_finite()
        self.metric = self.config.metric
        self.k = min(k, len(datastore))
        self.exact = exact
        self.search_seconds = 0.0
        self.skip: Optional[RetrievalSkip] = None  # adaptive retrieval (module doc); None = search all
        self.num_queries = 0  # queries given to search()
        self.num_skipped = 0  # of those, not searched (skip rule)
        self._model_checked = False

    def check_model(self, model) -> None:
        """Refuse a datastore built from other weights (checked on first use: fairseq loads
        the weights only after the task built the model)."""
        if self._model_checked:
            return
        from trime_fairseq.memory.datastore import model_fingerprint

        self.datastore.meta.check_compatible(model_sha256=model_fingerprint(model),
                                             where=f"--datastore {self.datastore.path}")
        self._model_checked = True

    @property
    def on_gpu(self) -> bool:
        return self.index.on_gpu

    def _to_gpu(self) -> None:
        """Copy the index to the GPU(s), once, if faiss-gpu sees one and K is within its limit."""
        self.use_gpu = False  # decided once
        if self.k <= GPU_MAX_K:
            self.index.to_gpu()  # stays on the CPU if faiss-gpu cannot hold it
        logger.info("datastore index searched on the %s", "GPU" if self.on_gpu else "CPU")

    def counters(self) -> dict:
        """Queries given, skipped, searched, their share skipped and the search seconds."""
        n, s = self.num_queries, self.num_skipped
        return {"queries": n, "skipped": s, "searched": n - s, "skipped_share": s / n if n else 0.0,
                "search_s": self.search_seconds}

    def reset_counters(self) -> None:
        self.num_queries = self.num_skipped = 0
        self.search_seconds = 0.0

    def search(self, queries: Tensor, positions: Optional[Tensor] = None,
               tok_lprobs: Optional[Tensor] = None, features: Optional[Tensor] = None) -> Retrieved:
        """``queries`` ``[n, d]`` -> :class:`Retrieved` with ``K`` neighbours each.

        With :attr:`skip` and ``tok_lprobs`` ``[n, V]`` (the model's next-token
        log-probabilities at each query), or the rule's ``features`` ``[n]`` computed from
        them (:meth:`RetrievalSkip.values`; saves holding ``[n, V]`` at once), the queries
        the rule skips are not searched and get an empty row (scores ``-inf``, values 0,
        ids -1).

        With :attr:`exclude_self` and ``positions`` ``[n]`` (the queries' stream positions;
        entry ``i`` of an LM datastore is the token at stream position ``i`` of the split
        it was built from), each query's own entry is left out: ``K + 1`` are retrieved and
        the query's own id removed (evaluating the split the datastore was built from)."""
        t0 = time.perf_counter()
        n = queries.size(0)
        self.num_queries += n
        skipped = None
        skipping = self.skip is not None and not self.skip.never_skips and \
            (tok_lprobs is not None or features is not None)
        if skipping and n:
            if features is None:
                features = self.skip.values(tok_lprobs.reshape(n, -1))
            skipped = self.skip.skips(features.reshape(n)).to(queries.device)
            self.num_skipped += int(skipped.sum())
            if not bool(skipped.any()):
                skipped = None
        if skipped is None:
            found = self._search(queries, positions, fast_small=skipping)
        else:
            keep = (~skipped).nonzero(as_tuple=True)[0]
            kept = self._search(queries[keep], None if positions is None else positions[keep], fast_small=True)
            dev = queries.device
            found = Retrieved(torch.full((n, self.k), float("-inf"), device=dev),
                              torch.zeros(n, self.k, dtype=torch.long, device=dev),
                              torch.full((n, self.k), -1, dtype=torch.long, device=dev))
            found.scores[keep], found.values[keep], found.ids[keep] = kept.scores, kept.values, kept.ids
        self.search_seconds += time.perf_counter() - t0
        return found

    def _search(self, queries: Tensor, positions: Optional[Tensor], fast_small: bool = False) -> Retrieved:
        """FAISS search of every query (see :meth:`search`); ``fast_small``: the batch may be
        small (adaptive retrieval), so exhaustive search goes through BLAS even then
        (:func:`~trime_fairseq.memory.index.blas_for_small_batches`)."""
        if fast_small and not self.on_gpu:
            with blas_for_small_batches():
                return self._search(queries, positions)
        if queries.size(0) == 0:
            dev = queries.device
            return Retrieved(torch.zeros(0, self.k, device=dev), torch.zeros(0, self.k, dtype=torch.long, device=dev),
                             torch.zeros(0, self.k, dtype=torch.long, device=dev))
        if queries.is_cuda and self.use_gpu and not self.on_gpu:
            self._to_gpu()
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())  # also for the exact scores
        exclude = self.exclude_self and positions is not None
        scores, ids = self.index.search(q, self.k + 1 if exclude else self.k)
        if exclude:
            own = np.asarray(positions.detach().cpu().numpy(), dtype=np.int64)[:, None]
            drop = (ids == own) & (own >= 0)
            ids = np.where(drop, -1, ids)
            order = np.argsort(drop, axis=1, kind="stable")[:, : self.k]  # the rest keep their rank
            ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        if self.metric == "l2":
            scores = -scores
        found = ids >= 0
        safe = np.where(found, ids, 0)
        values = np.asarray(self.datastore.values[safe.reshape(-1)]).reshape(safe.shape).astype(np.int64)
        if self.exact:
            keys = np.asarray(self.datastore.keys[safe.reshape(-1)], dtype=np.float32).reshape(*safe.shape, -1)
            if self.metric == "ip":
                scores = np.einsum("nd,nkd->nk", q, keys)
            else:
                scores = -((keys - q[:, None, :]) ** 2).sum(-1)
        broken = found & ~np.isfinite(scores)
        if broken.any():
            if not np.isfinite(q).all():
                raise RuntimeError("retrieval queries hold NaN/inf: the model's output is not finite")
            key = int(ids[broken][0])
            raise TrimeUserError(f"--datastore {self.datastore.path}: key {key} is not finite (NaN/inf in "
                                 f"keys.npy); {self.datastore.fix}")
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        dev = queries.device
        return Retrieved(torch.from_numpy(scores).to(dev), torch.from_numpy(values).to(dev),
                         torch.from_numpy(ids).to(dev))
