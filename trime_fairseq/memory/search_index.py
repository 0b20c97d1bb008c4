"""One interface to a faiss search index: build / add / search / to_gpu / save / load.

Every faiss index of the plugin is a :class:`SearchIndex`: a datastore's index
(``trime-build-datastore`` builds, tunes and saves it; :class:`~trime_fairseq.memory.retriever.Retriever`
loads and searches it) and the Memorizing Transformer's per-(row, head) indexes
(:class:`~trime_fairseq.memory.knn_memory.KnnMemory`: empty, ids chosen by the caller,
id ranges removed on eviction). A saved index is ``index.faiss`` with its
:class:`~trime_fairseq.memory.index.IndexConfig` beside it as ``index.json`` (with a
``format`` version: a newer format is refused with a clear error; ``index.json`` files
written before the version was recorded are format 1).

Indexes are built and trained on the CPU; only searching moves to the GPU (:meth:`to_gpu`,
when faiss-gpu is installed and sees one). The faiss-level helpers (factories, nprobe,
refinement, recall) stay in :mod:`trime_fairseq.memory.index`.
"""
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from trime_fairseq.errors import TrimeUserError
from trime_fairseq.memory import index as faiss_index
from trime_fairseq.memory.index import INDEX_FORMAT, METRICS, IndexConfig


class SearchIndex:
    """A faiss index and its :class:`IndexConfig` (see module docstring)."""

    def __init__(self, index, config: IndexConfig) -> None:
        self.index, self.config = index, config
        self.on_gpu = False

    # --- creating ----------------------------------------------------------------------------

    @classmethod
    def build(cls, keys: np.ndarray, factory: str, metric: str = "ip", train_size: int = 100_000,
              chunk: int = 100_000, seed: int = 1, where: str = "keys",
              fix: str = "rebuild the datastore") -> "SearchIndex":
        """Train on a random sample of ``keys`` (``[N, d]``, any float dtype), add in chunks;
        a non-finite key is a user error (``where``: the keys' file, ``fix``: what to do)."""
        n, dim = keys.shape
        self = cls(cls._new(dim, factory, metric, "--index-factory"),
                   IndexConfig(factory=factory, metric=metric, dim=dim, size=n, train_size=min(train_size, n)))
        if not self.is_trained:
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=min(train_size, n), replace=False))
            self.train(_finite(keys[sample], lambda i: int(sample[i]), where, fix))
        for s in range(0, n, chunk):
            self.add(_finite(keys[s:s + chunk], lambda i: s + i, where, fix))
        return self

    @classmethod
    def empty(cls, dim: int, factory: str, metric: str = "ip", flag: str = "--index-factory") -> "SearchIndex":
        """An empty index that takes caller-chosen ids (:meth:`add` with ``ids``) and can
        drop id ranges (:meth:`remove_range`). IVF indexes keep ids natively; anything else
        (``Flat``, ``HNSW32``, ...) is wrapped in an ``IndexIDMap2``."""
        faiss = faiss_index.faiss_module()
        index = cls._new(dim, factory, metric, flag)
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap2(index)
        return cls(index, IndexConfig(factory=factory, metric=metric, dim=dim, size=0, train_size=0))

    @staticmethod
    def _new(dim: int, factory: str, metric: str, flag: str):
        try:
            return faiss_index.faiss_module().index_factory(dim, factory, faiss_index.metric_type(metric))
        except RuntimeError as e:
            raise TrimeUserError(f"{flag} {factory!r} is not a valid faiss index_factory string: {e}") from None

    # --- contents ----------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def nlist(self) -> int:
        """Inverted lists (0 for an index without any)."""
        return faiss_index.ivf_nlist(self.index)

    def train(self, keys: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(keys, dtype=np.float32))

    def add(self, keys: np.ndarray, ids: Optional[np.ndarray] = None) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if ids is None:
            self.index.add(keys)
        else:
            self.index.add_with_ids(keys, np.ascontiguousarray(ids, dtype=np.int64))

    def remove_range(self, lo: int, hi: int) -> bool:
        """Remove ids in ``[lo, hi)``; False if the index cannot remove (e.g. HNSW: rebuild it)."""
        if hi <= lo:
            return True
        try:
            self.index.remove_ids(faiss_index.faiss_module().IDSelectorRange(int(lo), int(hi)))
        except RuntimeError:
            return False
        return True

    def reset(self) -> None:
        """Drop every entry (a trained IVF index keeps its quantizer)."""
        self.index.reset()

    # --- searching ---------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` ``[n, k]`` of faiss (distances for L2; id -1 where none)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def set_nprobe(self, nprobe: int) -> None:
        faiss_index.set_nprobe(self.index, nprobe)
        self.config.nprobe = nprobe

    def set_k_factor(self, k_factor: float) -> bool:
        """Re-rank ``k_factor·K`` candidates in a refinement index; False if it has none."""
        if not faiss_index.set_k_factor(self.index, k_factor):
            return False
        self.config.k_factor = float(k_factor)
        return True

    def tune(self, keys: np.ndarray, queries: np.ndarray, k: int, target: float, k_factor: float = 1.0) -> float:
        """Pick nprobe (and ``k_factor``) for recall@``k`` ``target`` on ``queries``
        (:func:`~trime_fairseq.memory.index.tune_search`); recorded in :attr:`config`.
        Returns the recall reached."""
        nprobe, k_factor, recall = faiss_index.tune_search(self.index, keys, queries, k, target, self.config.metric,
                                                           k_factor=k_factor)
        self.config.nprobe, self.config.k_factor, self.config.recall, self.config.recall_k = nprobe, k_factor, recall, k
        return recall

    def to_gpu(self) -> bool:
        """Copy the index to every visible GPU when faiss-gpu sees one (once); True if it is
        now searched there (an index faiss-gpu cannot hold stays on the CPU)."""
        if not self.on_gpu and faiss_index.gpu_available():
            moved = faiss_index.index_to_gpu(self.index)
            self.index, self.on_gpu = moved, moved is not self.index
        return self.on_gpu

    # --- on disk -----------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """``index.faiss`` and ``index.json`` (the config) in ``directory``, each atomically."""
        faiss = faiss_index.faiss_module()
        d = Path(directory)
        faiss.write_index(self.index, str(d / "index.faiss.tmp"))
        os.replace(d / "index.faiss.tmp", d / "index.faiss")
        (d / "index.json.tmp").write_text(json.dumps(asdict(self.config), indent=2))
        os.replace(d / "index.json.tmp", d / "index.json")

    @classmethod
    def load(cls, directory: str, nprobe: Optional[int] = None, use_gpu: bool = True, size: Optional[int] = None,
             dim: Optional[int] = None, fix: str = "rebuild it with trime-build-datastore ... --index-only"
             ) -> "SearchIndex":
        """The index saved in ``directory``; with ``use_gpu``, moved to the GPU only when
        faiss-gpu sees one.

        ``index.json`` and ``index.faiss`` are checked: readable, of a known format, and the
        index holds ``size`` keys of dimension ``dim`` (the datastore's) under the metric
        ``index.json`` records; a problem is a one-line user error naming the file and ending
        with ``fix``."""
        faiss = faiss_index.faiss_module()
        d = Path(directory)
        what = f"--datastore {directory}"
        if not (d / "index.faiss").exists():
            raise TrimeUserError(f"{what}: {d / 'index.faiss'} is missing (built with --no-index?); {fix}")
        try:
            config = IndexConfig(**json.loads((d / "index.json").read_text()))
        except FileNotFoundError:
            raise TrimeUserError(f"{what}: {d / 'index.json'} is missing; {fix}") from None
        except (OSError, ValueError, TypeError) as e:
            raise TrimeUserError(f"{what}: {d / 'index.json'} is not a valid index description ({e}); {fix}") from None
        if not isinstance(config.format, int) or config.format > INDEX_FORMAT:
            raise TrimeUserError(f"{what}: {d / 'index.json'} is index format {config.format!r}, this version reads "
                                 f"format {INDEX_FORMAT} and older; upgrade trime-fairseq or {fix}")
        if config.metric not in METRICS:
            raise TrimeUserError(f"{what}: {d / 'index.json'} names metric {config.metric!r}; {fix}")
        try:
            index = faiss.read_index(str(d / "index.faiss"))
        except RuntimeError as e:  # truncated or not a faiss file
            reason = str(e).strip().splitlines()[-1][:120] if str(e).strip() else "unreadable"
            raise TrimeUserError(f"{what}: {d / 'index.faiss'} is damaged or truncated ({reason}); {fix}") from None
        problems = []
        if index.metric_type != faiss_index.metric_type(config.metric):
            problems.append(f"its metric is not {config.metric} as index.json says")
        if dim is not None and index.d != dim:
            problems.append(f"it has dimension {index.d}, the keys {dim}")
        if size is not None and (index.ntotal != size or config.size != size):
            problems.append(f"it holds {index.ntotal} keys, the datastore {size}")
        if problems:
            raise TrimeUserError(f"{what}: {d / 'index.faiss'} does not match the datastore ({'; '.join(problems)}); "
                                 f"{fix}")
        self = cls(index, config)
        faiss_index.set_nprobe(index, nprobe or config.nprobe)
        faiss_index.set_k_factor(index, config.k_factor)
        if use_gpu:
            self.to_gpu()
        return self


def _finite(keys: np.ndarray, key_id, where: str, fix: str) -> np.ndarray:
    """``keys`` as contiguous float32, refusing a non-finite one (``key_id(i)``: its number)."""
    part = np.ascontiguousarray(keys, dtype=np.float32)
    bad = ~np.isfinite(part).all(axis=1)
    if bad.any():
        raise TrimeUserError(f"{where}: key {key_id(int(np.flatnonzero(bad)[0]))} is not finite (NaN/inf); {fix}")
    return part
