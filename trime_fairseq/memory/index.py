"""faiss-level helpers of :class:`~trime_fairseq.memory.search_index.SearchIndex`: index
choice, nprobe / refinement settings, exact search, recall checks and tuning.

``index.faiss`` + ``index.json`` (:class:`IndexConfig`) live in the datastore directory. Any
``faiss.index_factory`` string works; :func:`datastore_index_factory` picks one from the size.
Indexes with a refinement stage (``...,RFlat`` or ``Refine(...)``) re-rank
``k_factor·K`` candidates with the exact keys; ``k_factor`` is saved in ``index.json``.
faiss-gpu is used only when it is installed *and* sees a GPU (:func:`gpu_available`);
nothing GPU-only is called otherwise. Indexes are built and trained on the CPU; only
searching moves to the GPU (:func:`index_to_gpu`).
"""
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)

METRICS = ("ip", "l2")


def faiss_module():
    try:
        import faiss  # noqa: F401
    except ImportError as e:  # pragma: no cover - faiss is a dependency
        raise ImportError("faiss is needed for external memory: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


# faiss-gpu searches return at most this many neighbours (and probe at most this many lists)
GPU_MAX_K = 2048

#: query count from which exhaustive (Flat) search goes through BLAS; faiss-cpu 1.15's
#: default (128000) leaves batches below ~1000 queries on its sequential path, ~4x slower
#: per query at K=1024 with d=128 (measured: 2.8 ms vs 11-13 ms per query on 221k keys)
SMALL_BATCH_BLAS_THRESHOLD = 20


@contextlib.contextmanager
def blas_for_small_batches():
    """Within the block, exhaustive searches of >= :data:`SMALL_BATCH_BLAS_THRESHOLD` queries
    use BLAS (as fast per query as a large batch). Scores may differ from the sequential
    path's in the last bits, so only searches whose batches shrink use it (adaptive retrieval)."""
    faiss = faiss_module()
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = min(old, SMALL_BATCH_BLAS_THRESHOLD)
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def gpu_available() -> bool:
    """faiss was built with GPU support (faiss-gpu) *and* sees at least one GPU."""
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def index_to_gpu(index):
    """``index`` copied to every visible GPU when :func:`gpu_available`, else unchanged
    (also when faiss-gpu cannot hold this index type, e.g. fast-scan PQ: searched on the CPU)."""
    if not gpu_available():
        return index
    try:
        return faiss_module().index_cpu_to_all_gpus(index)
    except RuntimeError as e:
        logger.warning("faiss-gpu cannot hold this index (%s); searching it on the CPU", str(e).splitlines()[0])
        return index


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` keys: the power of two nearest 4·√n."""
    return int(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))


def datastore_index_factory(n: int, dim: int) -> str:
    """Exact search up to 200k keys; beyond, an inverted file (4·√N lists) whose 4-bit
    fast-scan PQ codes (2 dims per code up to d=256, 4 beyond) rank the candidates and whose
    exact keys (``RFlat``) re-rank the best ``k_factor·K``: the scores returned are exact.

    On 2.19M keys (d=128, K=1024) its search took 5x less time than ``IVF8192,Flat``'s
    (recall 0.927 vs 0.957; ``benchmarks/external_speed.py``, see the README).
    """
    if n <= 200_000:
        return "Flat"
    nlist = ivf_lists(n)
    per_code = 2 if dim <= 256 else 4
    if dim % per_code:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{dim // per_code}x4fs,RFlat"


#: the version of ``index.json``; a reader refuses a newer one (files without it are format 1)
INDEX_FORMAT = 1


@dataclass
class IndexConfig:
    """What ``index.json`` records beside a saved index (see :mod:`trime_fairseq.memory.search_index`)."""

    factory: str
    metric: str
    dim: int
    size: int
    train_size: int
    nprobe: int = 1
    recall: Optional[float] = None
    recall_k: Optional[int] = None
    build_seconds: float = 0.0
    k_factor: float = 1.0  # candidates re-ranked per neighbour by a refinement stage
    format: int = INDEX_FORMAT


def metric_type(metric: str) -> int:
    """faiss's metric constant for ``ip`` / ``l2``."""
    faiss = faiss_module()
    if metric not in METRICS:
        raise TrimeUserError(f"--metric must be one of {METRICS}, got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def set_nprobe(index, nprobe: int) -> None:
    faiss = faiss_module()
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index


def set_k_factor(index, k_factor: float) -> bool:
    """Re-rank ``k_factor·K`` candidates in a refinement index; False if ``index`` has none."""
    if k_factor < 1:
        raise TrimeUserError(f"--refine-k-factor must be >= 1, got {k_factor}")
    refine = faiss_module().downcast_index(index)
    if not hasattr(refine, "k_factor"):
        return False
    refine.k_factor = float(k_factor)
    return True


def exact_search(keys: np.ndarray, queries: np.ndarray, k: int, metric: str = "ip",
                 chunk: int = 200_000) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k over ``keys`` in chunks (bounded memory): ``(scores, ids)``."""
    faiss = faiss_module()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), 0, np.float32)
    best_i = np.full((len(q), 0), 0, np.int64)
    for s in range(0, len(keys), chunk):
        flat = faiss.IndexFlatIP(keys.shape[1]) if metric == "ip" else faiss.IndexFlatL2(keys.shape[1])
        flat.add(np.ascontiguousarray(keys[s:s + chunk], dtype=np.float32))
        d, i = flat.search(q, min(k, flat.ntotal))
        best_s = np.concatenate([best_s, d], 1)
        best_i = np.concatenate([best_i, i + s], 1)
        order = np.argsort(-best_s if metric == "ip" else best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, order, 1)
        best_i = np.take_along_axis(best_i, order, 1)
    return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the exact top-k found by the approximate search."""
    hits = sum(len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx_ids, exact_ids))
    return hits / exact_ids.size


def tune_search(index, keys: np.ndarray, queries: np.ndarray, k: int, target: float, metric: str = "ip",
                max_nprobe: int = 4096, k_factor: float = 1.0, max_k_factor: float = 16.0) -> Tuple[int, float, float]:
    """``(nprobe, k_factor, recall@k)``: the smallest power-of-two nprobe whose recall reaches
    ``target``; for a refinement index, ``k_factor`` is doubled (up to ``max_k_factor``)
    when recall stops growing with nprobe (the codes' ranking, not the probing, limits it).
    Without a setting that reaches ``target``, the best one found. An index without a
    refinement stage gets ``k_factor`` 1."""
    has_refine = set_k_factor(index, k_factor)
    k_factor = k_factor if has_refine else 1.0
    _, exact = exact_search(keys, queries, k, metric)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    limit = min(max_nprobe, ivf_nlist(index) or 1)
    best = (1, k_factor, 0.0)
    while True:
        nprobe, previous = 1, -1.0
        while True:
            set_nprobe(index, nprobe)
            _, ids = index.search(q, k)
            recall = recall_at_k(ids, exact)
            logger.info("nprobe %d, k_factor %g: recall@%d %.3f", nprobe, k_factor, k, recall)
            if recall > best[2]:
                best = (nprobe, k_factor, recall)
            if recall >= target:
                return nprobe, k_factor, recall
            if nprobe >= limit or (has_refine and nprobe >= 8 and recall - previous < 0.005):
                break
            previous, nprobe = recall, nprobe * 2
        if not has_refine or k_factor * 2 > max_k_factor:
            set_nprobe(index, best[0])
            set_k_factor(index, best[1])
            return best
        k_factor *= 2
        set_k_factor(index, k_factor)


def ivf_nlist(index) -> int:
    """Inverted lists of an IVF index (0 for other indexes)."""
    ivf = faiss_module().try_extract_index_ivf(index)
    return 0 if ivf is None else int(ivf.nlist)
