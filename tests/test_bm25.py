"""BM25 scores equal rank-bm25's; BM25 batching groups similar segments."""
import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from trime_fairseq.data.bm25 import BM25, bm25_batches


def corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        topic = i % 5  # five topics with their own rare words, plus shared common ones
        words = list(rng.integers(0, 10, size=rng.integers(5, 20)))
        words += list(100 + 10 * topic + rng.integers(0, 10, size=rng.integers(3, 10)))
        docs.append(words)
    return docs


def test_scores_equal_rank_bm25():
    docs = corpus()
    ours = BM25(docs)
    ref = BM25Okapi([[str(t) for t in d] for d in docs])
    for q in (docs[0], docs[7][:3] + docs[7][:3], [1, 2, 2, 999], [105, 3]):
        np.testing.assert_allclose(ours.get_scores(q), ref.get_scores([str(t) for t in q]), rtol=1e-10, atol=1e-10)


def test_neighbours_are_the_top_scored_documents():
    docs = corpus(seed=1)
    bm = BM25(docs)
    ids, scores = bm.neighbours(k=5, query_terms=0, chunk=7, progress=False)
    for i in (0, 13, 59):
        full = bm.get_scores(docs[i])
        full[i] = -np.inf
        np.testing.assert_allclose(np.sort(full)[::-1][:5], scores[i], rtol=1e-6)  # stored as float32
        assert i not in ids[i]


def test_batches_group_similar_segments_and_cover_all():
    docs = corpus(n=100, seed=2)
    bm = BM25(docs)
    ids, scores = bm.neighbours(k=10, progress=False)
    batches = bm25_batches(ids, scores, batch_size=10, seed=3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(100))
    topic_purity = np.mean([np.mean(np.array(b) % 5 == np.bincount(np.array(b) % 5).argmax()) for b in batches])
    random_batches = np.array_split(np.random.default_rng(0).permutation(100), 10)
    random_purity = np.mean([np.mean(b % 5 == np.bincount(b % 5).argmax()) for b in random_batches])
    assert topic_purity >= 0.85 and topic_purity > random_purity + 0.3
    with pytest.raises(ValueError):
        bm25_batches(ids, scores, batch_size=0)
