"""Top-K retrieval from a datastore for external memory (kNN-LM, TRIMELM_ext, kNN-MT).

:class:`Retriever` batches all queries of a batch into one FAISS search and returns, per
query, the similarity of each neighbour (inner product ``q·k``, or ``-‖q-k‖²`` for an L2
index) and its value (next token). With ``exact=True`` the similarities are recomputed
from the stored keys (the paper's † rows) instead of FAISS's approximations.

The index follows the queries: it is loaded on the CPU and copied to the GPU(s) on the
first search with CUDA queries, if faiss-gpu sees a GPU and ``K`` is within faiss-gpu's
limit (:data:`~trime_fairseq.memory.index.GPU_MAX_K`); otherwise it is searched on the CPU.
Results are returned on the queries' device.
"""
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from trime_fairseq.memory.datastore import Datastore, rebuild_command
from trime_fairseq.memory.index import GPU_MAX_K
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

    def search(self, queries: Tensor, positions: Optional[Tensor] = None) -> Retrieved:
        """``queries`` ``[n, d]`` -> :class:`Retrieved` with ``K`` neighbours each.

        With :attr:`exclude_self` and ``positions`` ``[n]`` (the queries' stream positions;
        entry ``i`` of an LM datastore is the token at stream position ``i`` of the split
        it was built from), each query's own entry is left out: ``K + 1`` are retrieved and
        the query's own id removed (evaluating the split the datastore was built from)."""
        import time

        t0 = time.perf_counter()
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
        self.search_seconds += time.perf_counter() - t0
        dev = queries.device
        return Retrieved(torch.from_numpy(scores).to(dev), torch.from_numpy(values).to(dev),
                         torch.from_numpy(ids).to(dev))
