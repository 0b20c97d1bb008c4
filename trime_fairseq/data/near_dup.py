"""Near-duplicate detection by token n-gram Jaccard similarity.

One test serves three places: BM25 batching (``--bm25-max-jaccard``: no two near-copies in
one TRIMELM_ext batch), the data-hygiene report (``python -m trime_fairseq.cli.near_dups``:
how many valid/test segments have a near-copy in train) and ``trime-prepare-lm
--dedup-jaccard`` (drop valid/test documents that copy train).

A sequence is represented by the set of its token n-grams, each hashed to 64 bits
(collisions are negligible at these sizes); ``J(a, b) = |A ∩ B| / |A ∪ B|``. Sequences
shorter than ``n`` tokens have one n-gram: the whole sequence.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import scipy.sparse as sp

# odd 64-bit multipliers of a polynomial rolling hash (wrap-around arithmetic)
_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def ngram_hashes(tokens: Sequence[int], n: int = 5) -> np.ndarray:
    """Sorted distinct 64-bit hashes of the token ``n``-grams of ``tokens``."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    t = np.asarray(tokens, dtype=np.int64).astype(np.uint64)
    if len(t) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, len(t))
    count = len(t) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * _MULT + (t[i:i + count] + np.uint64(1)) * _MIX
            h ^= h >> np.uint64(29)
    return np.unique(h)


def ngram_sets(segments: Sequence[Sequence[int]], n: int = 5) -> List[np.ndarray]:
    """:func:`ngram_hashes` of every segment."""
    return [ngram_hashes(s, n) for s in segments]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted distinct hash arrays (0 when both are empty)."""
    if len(a) == 0 and len(b) == 0:
        return 0.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def _incidence(sets: Sequence[np.ndarray], vocab: np.ndarray) -> sp.csr_matrix:
    """Binary ``[len(sets), len(vocab)]`` matrix: which n-grams each set holds."""
    lengths = np.array([len(s) for s in sets], dtype=np.int64)
    flat = np.concatenate(sets) if len(sets) else np.zeros(0, np.uint64)
    cols = np.searchsorted(vocab, flat)
    ok = (cols < len(vocab))
    ok[ok] = vocab[cols[ok]] == flat[ok]
    rows = np.repeat(np.arange(len(sets)), lengths)
    m = sp.csr_matrix((np.ones(int(ok.sum()), dtype=np.float32), (rows[ok], cols[ok])),
                      shape=(len(sets), len(vocab)))
    m.sum_duplicates()
    return m


def max_jaccard(queries: Sequence[np.ndarray], corpus: Sequence[np.ndarray],
                chunk: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """For every query set, the highest Jaccard similarity to any corpus set and which
    corpus set reaches it (``-1`` where no n-gram is shared), as ``(best [Q], argbest [Q])``.

    Intersections of all pairs come from one sparse product per chunk of queries (only
    n-grams that occur in the corpus matter for the intersection)."""
    best = np.zeros(len(queries), dtype=np.float64)
    arg = np.full(len(queries), -1, dtype=np.int64)
    if not len(queries) or not len(corpus):
        return best, arg
    vocab = np.unique(np.concatenate(corpus))
    c_len = np.array([len(s) for s in corpus], dtype=np.float64)
    ct = _incidence(corpus, vocab).T.tocsr()
    for s in range(0, len(queries), chunk):
        part = queries[s:s + chunk]
        q_len = np.array([len(x) for x in part], dtype=np.float64)
        inter = (_incidence(part, vocab) @ ct).tocsr()  # [chunk, corpus] shared n-grams
        for r in range(inter.shape[0]):
            lo, hi = inter.indptr[r], inter.indptr[r + 1]
            if lo == hi:
                continue
            cols, vals = inter.indices[lo:hi], inter.data[lo:hi].astype(np.float64)
            j = vals / (q_len[r] + c_len[cols] - vals)
            i = int(np.argmax(j))
            best[s + r], arg[s + r] = j[i], cols[i]
    return best, arg


class NearDuplicates:
    """Pairwise near-duplicate test over a fixed list of segments, with memoised pairs:
    ``is_dup(i, j)`` is ``J(i, j) >= threshold`` on ``n``-gram sets."""

    def __init__(self, segments: Sequence[Sequence[int]], n: int = 5, threshold: float = 0.5) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"Jaccard threshold must be in (0, 1], got {threshold}")
        self.sets = ngram_sets(segments, n)
        self.threshold = threshold
        self._memo: dict = {}
        self.tests = 0

    def is_dup(self, i: int, j: int) -> bool:
        key = (i, j) if i < j else (j, i)
        hit = self._memo.get(key)
        if hit is None:
            self.tests += 1
            hit = jaccard(self.sets[i], self.sets[j]) >= self.threshold
            self._memo[key] = hit
        return hit

    def dup_of_any(self, i: int, members: Sequence[int]) -> bool:
        return any(self.is_dup(i, j) for j in members)


def batch_composition(batches: Sequence[np.ndarray], docs: np.ndarray, sets: Sequence[np.ndarray],
                      thresholds: Sequence[float] = (0.3, 0.5, 0.8)) -> dict:
    """What the in-batch memory of BM25 batches holds: the share of segments that have a
    batch mate of their own document, and a batch mate with n-gram Jaccard >= each threshold,
    plus the mean of each segment's highest Jaccard to a batch mate."""
    same_doc, best = [], []
    for b in batches:
        b = [int(i) for i in b]
        for i in b:
            others = [j for j in b if j != i]
            same_doc.append(any(docs[j] == docs[i] for j in others))
            best.append(max((jaccard(sets[i], sets[j]) for j in others), default=0.0))
    best_a = np.asarray(best)
    return {
        "segments": len(best),
        "with_same_doc_mate": float(np.mean(same_doc)) if same_doc else 0.0,
        "mean_best_jaccard": float(best_a.mean()) if len(best) else 0.0,
        "with_near_dup_mate": {f"{t:g}": float((best_a >= t).mean()) if len(best) else 0.0 for t in thresholds},
    }
