"""BM25 over token-id segments, and the BM25 batching of TRIMELM_ext (§4.3).

:class:`BM25` scores exactly like ``rank_bm25.BM25Okapi`` (same idf with its ε floor for
negative idf, same k1/b, repeated query tokens counted each time), but as one sparse
matrix, so that all-pairs neighbour search over 100k+ segments takes seconds.

:func:`bm25_batches` starts a batch from a random unused segment and grows it from the
BM25 hits of its members (the best hit of any member, or the paper's chain from the last
added member), optionally skipping segments of a member's document and near-duplicates. For speed, neighbour search uses each segment's ``query_terms`` rarest terms as
its query (BM25 with a shortened query; the scores of those terms are exact).
"""
import heapq
import logging
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm
from trime_fairseq.errors import TrimeUserError

if TYPE_CHECKING:
    from trime_fairseq.data.near_dup import NearDuplicates

logger = logging.getLogger(__name__)


class BM25:
    """``rank_bm25.BM25Okapi`` as a sparse ``[docs, vocab]`` weight matrix."""

    def __init__(self, docs: Sequence[Sequence[int]], k1: float = 1.5, b: float = 0.75,
                 epsilon: float = 0.25) -> None:
        self.k1, self.b, self.epsilon = k1, b, epsilon
        n = len(docs)
        lengths = np.array([len(d) for d in docs], dtype=np.float64)
        rows = np.repeat(np.arange(n), lengths.astype(np.int64))
        cols = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if n else np.zeros(0, np.int64)
        vocab = int(cols.max()) + 1 if len(cols) else 1
        tf = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(n, vocab))
        tf.sum_duplicates()
        df = np.bincount(tf.indices, minlength=vocab).astype(np.float64)
        present = df > 0
        idf = np.zeros(vocab)
        idf[present] = np.log(n - df[present] + 0.5) - np.log(df[present] + 0.5)
        average = idf[present].mean() if present.any() else 0.0
        idf[present & (idf < 0)] = epsilon * average
        self.idf, self.df, self.vocab, self.n = idf, df, vocab, n
        avgdl = lengths.mean() if n else 1.0
        norm = k1 * (1 - b + b * lengths / avgdl)
        data = tf.data * (k1 + 1) / (tf.data + np.repeat(norm, np.diff(tf.indptr)))
        self.weights = sp.csr_matrix((data * idf[tf.indices], tf.indices, tf.indptr), shape=(n, vocab))
        self.tf = tf

    def get_scores(self, query: Sequence[int]) -> np.ndarray:
        """Scores of every document for ``query`` (equal to ``BM25Okapi.get_scores``)."""
        q = np.asarray([t for t in query if 0 <= t < self.vocab], dtype=np.int64)
        counts = np.bincount(q, minlength=self.vocab).astype(np.float64)
        return np.asarray(self.weights @ counts).ravel()

    def neighbours(self, k: int, query_terms: int = 32, chunk: int = 2048,
                   progress: bool = True, max_df: float = 0.01):
        """``(ids, scores)``, ``[docs, k]``: the most similar other documents, best first
        (``-1`` / ``-inf`` where fewer have any term in common).

        With ``query_terms`` > 0, queries use only terms found in at most ``max_df`` of the
        documents (at least 50), at most ``query_terms`` of them, rarest first: frequent
        terms add little to BM25 but make the all-pairs search quadratic."""
        wt = self.weights.T.tocsr()  # [vocab, docs]
        out = np.full((self.n, k), -1, dtype=np.int64)
        out_scores = np.full((self.n, k), -np.inf, dtype=np.float32)
        rarity = -self.idf  # keep the rarest (highest idf) terms of each query
        bar = tqdm(total=self.n, unit="seg", desc="bm25 neighbours", disable=not progress or None)
        for s in range(0, self.n, chunk):
            q = self.tf[s:s + chunk].tocsr()
            if query_terms:
                q.data[self.df[q.indices] > max(50.0, max_df * self.n)] = 0
                q.eliminate_zeros()
                q = _keep_top_terms(q, rarity, query_terms)
            scores = (q @ wt).tocsr()  # [chunk, docs], sparse
            for r in range(scores.shape[0]):
                lo, hi = scores.indptr[r], scores.indptr[r + 1]
                cols, vals = scores.indices[lo:hi], scores.data[lo:hi]
                own = cols != s + r
                cols, vals = cols[own], vals[own]
                if len(cols) > k:
                    top = np.argpartition(-vals, k)[:k]
                    cols, vals = cols[top], vals[top]
                order = np.lexsort((cols, -vals))
                out[s + r, : len(order)] = cols[order]
                out_scores[s + r, : len(order)] = vals[order]
            bar.update(scores.shape[0])
        bar.close()
        return out, out_scores


def _keep_top_terms(q: sp.csr_matrix, rarity: np.ndarray, m: int) -> sp.csr_matrix:
    """Per row, keep the ``m`` rarest distinct terms (with their counts)."""
    rows, cols, vals = [], [], []
    for r in range(q.shape[0]):
        lo, hi = q.indptr[r], q.indptr[r + 1]
        c, v = q.indices[lo:hi], q.data[lo:hi]
        if len(c) > m:
            keep = np.argpartition(rarity[c], m)[:m]
            c, v = c[keep], v[keep]
        rows.append(np.full(len(c), r))
        cols.append(c)
        vals.append(v)
    if not rows:
        return q
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=q.shape)


GROW_MODES = ("heap", "chain")


def bm25_batches(neighbours: np.ndarray, scores: np.ndarray, batch_size: int, seed: int = 1,
                 grow: str = "heap", docs: Optional[np.ndarray] = None,
                 near_dups: Optional["NearDuplicates"] = None, stats: Optional[Dict[str, int]] = None,
                 ) -> List[np.ndarray]:
    """Greedy BM25 batching; every segment lands in exactly one batch.

    A batch starts from a random unused segment and grows, one segment at a time, until
    it holds ``batch_size``:

    * ``grow="heap"``: add the unused segment with the highest BM25 score to *any* member
      of the batch;
    * ``grow="chain"`` (the paper's construction): add the best unused hit of the *last
      added* segment.

    Either way, when no candidate is left the batch continues from a random unused
    segment. A candidate is skipped (it stays unused for later batches) when ``docs`` is
    given and it belongs to the document of a member, or when ``near_dups`` says it is a
    near-duplicate of a member. If every unused segment is excluded, the constraint is
    relaxed for that one addition (counted in ``stats["relaxed"]``).

    Args:
        neighbours, scores: from :meth:`BM25.neighbours`.
        docs: ``[segments]`` document id of each segment (same-document exclusion).
        stats: filled with counts (``skipped_doc``, ``skipped_dup``, ``random``, ``relaxed``).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if grow not in GROW_MODES:
        raise TrimeUserError(f"--bm25-grow must be one of {GROW_MODES}, got {grow!r}")
    n = len(neighbours)
    if docs is not None and len(docs) != n:
        raise ValueError(f"docs has {len(docs)} entries for {n} segments")
    counts = {"skipped_doc": 0, "skipped_dup": 0, "random": 0, "relaxed": 0}
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    used = np.zeros(n, dtype=bool)
    batches: List[np.ndarray] = []
    next_seed = 0

    def allowed(c: int, batch: List[int], batch_docs: set) -> bool:
        if docs is not None and int(docs[c]) in batch_docs:
            counts["skipped_doc"] += 1
            return False
        if near_dups is not None and near_dups.dup_of_any(c, batch):
            counts["skipped_dup"] += 1
            return False
        return True

    def random_unused(batch: List[int], batch_docs: set) -> int:
        """The next unused segment of the random order that the batch allows (or, if
        none does, the next unused one); -1 when all are used."""
        nonlocal next_seed
        while next_seed < n and used[order[next_seed]]:
            next_seed += 1
        if next_seed >= n:
            return -1
        if docs is None and near_dups is None:
            return int(order[next_seed])
        for pos in range(next_seed, n):
            c = int(order[pos])
            if not used[c] and allowed(c, batch, batch_docs):
                return c
        counts["relaxed"] += 1
        return int(order[next_seed])

    while True:
        while next_seed < n and used[order[next_seed]]:
            next_seed += 1
        if next_seed >= n:
            break
        first = int(order[next_seed])
        batch = [first]
        batch_docs = {int(docs[first])} if docs is not None else set()
        used[first] = True
        heap: List = []
        last = first

        def push(c: int) -> None:
            if grow == "chain":
                heap.clear()
            for nb, sc in zip(neighbours[c], scores[c]):
                if nb >= 0 and not used[nb]:
                    heapq.heappush(heap, (-float(sc), int(nb)))

        push(first)
        while len(batch) < batch_size:
            c = -1
            while heap:
                _, cand = heapq.heappop(heap)
                if not used[cand] and allowed(cand, batch, batch_docs):
                    c = cand
                    break
            if c < 0:  # no similar segment left: continue from a random unused one
                c = random_unused(batch, batch_docs)
                if c < 0:
                    break
                counts["random"] += 1
            used[c] = True
            batch.append(c)
            if docs is not None:
                batch_docs.add(int(docs[c]))
            last = c
            push(last)
        batches.append(np.array(batch, dtype=np.int64))
    if stats is not None:
        stats.update(counts)
    return batches
