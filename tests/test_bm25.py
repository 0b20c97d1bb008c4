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


# ----------------------------------------------------------------- batching options


def line_neighbours(n=12, k=3):
    """Segment i's hits are i+1, i+2, ... (scores falling with distance), wrapping."""
    ids = np.array([[(i + d) % n for d in range(1, k + 1)] for i in range(n)])
    scores = np.array([[10.0 - d for d in range(1, k + 1)] for _ in range(n)], dtype=np.float32)
    return ids, scores


def test_heap_default_is_unchanged_without_constraints():
    docs = corpus(n=100, seed=2)
    ids, scores = BM25(docs).neighbours(k=10, progress=False)
    stats = {}
    a = bm25_batches(ids, scores, 10, seed=3, stats=stats)
    b = bm25_batches(ids, scores, 10, seed=3, grow="heap")
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == len(b) == 10
    assert stats["skipped_doc"] == stats["skipped_dup"] == stats["relaxed"] == 0
    with pytest.raises(ValueError, match="bm25-grow"):
        bm25_batches(ids, scores, 10, grow="tree")


def test_chain_follows_the_last_added_segments_best_hit():
    # the batch starts at segment s (the seed's first draw); s's hits are s+1 and s+2,
    # s+1's best hit is s+3, s+3's is s+4: chain walks s, s+1, s+3, s+4 while heap takes
    # the best hit of any member: s, s+1, s+2 (still on s's list), s+3
    n = 9
    s = int(np.random.default_rng(7).permutation(n)[0])

    def lab(i):
        return (s + i) % n

    ids = np.full((n, 2), -1)
    scores = np.full((n, 2), -np.inf, dtype=np.float32)
    ids[lab(0)], scores[lab(0)] = [lab(1), lab(2)], [5, 4.9]
    ids[lab(1)], scores[lab(1)] = [lab(3), lab(0)], [1, 0.5]
    ids[lab(3)], scores[lab(3)] = [lab(4), lab(0)], [1, 0.5]
    chain = bm25_batches(ids, scores, 4, seed=7, grow="chain")
    heap = bm25_batches(ids, scores, 4, seed=7, grow="heap")
    assert chain[0].tolist() == [lab(0), lab(1), lab(3), lab(4)]
    assert heap[0].tolist() == [lab(0), lab(1), lab(2), lab(3)]
    for batches in (chain, heap):
        assert sorted(np.concatenate(batches).tolist()) == list(range(n))


def test_same_document_segments_never_share_a_batch():
    ids, scores = line_neighbours(n=12, k=4)
    docs = np.arange(12) // 2  # pairs of consecutive segments are one document
    plain = bm25_batches(ids, scores, 3, seed=0)
    assert any(len(set(docs[b])) < len(b) for b in plain)  # the hits are the same document
    stats = {}
    batches = bm25_batches(ids, scores, 3, seed=0, docs=docs, stats=stats)
    assert sorted(np.concatenate(batches).tolist()) == list(range(12))
    assert all(len(set(docs[b])) == len(b) for b in batches)
    assert stats["skipped_doc"] > 0
    # one document only: the constraint cannot hold and is relaxed, nothing is lost
    stats = {}
    one = bm25_batches(ids, scores, 3, seed=0, docs=np.zeros(12, int), stats=stats)
    assert sorted(np.concatenate(one).tolist()) == list(range(12)) and stats["relaxed"] > 0
    with pytest.raises(ValueError, match="docs"):
        bm25_batches(ids, scores, 3, docs=np.zeros(5, int))


def test_near_duplicates_never_share_a_batch():
    from trime_fairseq.data.near_dup import NearDuplicates

    rng = np.random.default_rng(0)
    base = [rng.integers(0, 1000, 40) for _ in range(6)]
    segs = []
    for b in base:  # each base text and a copy with 2 tokens changed
        segs.append(b)
        c = b.copy()
        c[[5, 30]] = 2000
        segs.append(c)
    ids, scores = BM25(segs).neighbours(k=5, query_terms=0, progress=False)
    plain = bm25_batches(ids, scores, 3, seed=1)
    pair = np.arange(12) // 2
    assert any(len(set(pair[b])) < len(b) for b in plain)  # copies are each other's best hit
    near = NearDuplicates(segs, n=5, threshold=0.5)
    assert near.is_dup(0, 1) and not near.is_dup(0, 2)
    batches = bm25_batches(ids, scores, 3, seed=1, near_dups=near)
    assert sorted(np.concatenate(batches).tolist()) == list(range(12))
    assert all(len(set(pair[b])) == len(b) for b in batches)


def test_cache_key_holds_every_batching_option(tmp_path):
    from argparse import Namespace

    from trime_fairseq.tasks.memory_flags import bm25_cache_key, cached_bm25_batches

    base = dict(bm25_neighbours=8, bm25_query_terms=0, bm25_cache_dir=str(tmp_path), bm25_grow="heap",
                bm25_exclude_same_doc="off", bm25_max_jaccard=None, bm25_ngram=5)
    variants = [dict(), dict(bm25_grow="chain"), dict(bm25_exclude_same_doc="on"),
                dict(bm25_max_jaccard=0.5), dict(bm25_max_jaccard=0.5, bm25_ngram=3), dict(bm25_max_jaccard=0.8)]
    keys = [bm25_cache_key(Namespace(**dict(base, **v)), "train_L16", 4, 1, True) for v in variants]
    assert len(set(keys)) == len(keys)
    assert keys[0] == "bm25_train_L16_B4_k8_q0_s1"  # the pre-option name: old caches stay valid
    # without documents (translation), the same-document option does not change the batches
    assert bm25_cache_key(Namespace(**dict(base, bm25_exclude_same_doc="on")), "t", 4, 1, False) == \
        bm25_cache_key(Namespace(**base), "t", 4, 1, False)
    ids, _ = line_neighbours(n=12)
    segs = [np.array([i, i + 1, i + 2, 50 + i // 2]) for i in range(12)]
    docs = np.arange(12) // 2
    a = cached_bm25_batches(Namespace(**base), segs, 3, 1, str(tmp_path), "x", docs=docs)
    b = cached_bm25_batches(Namespace(**dict(base, bm25_exclude_same_doc="on")), segs, 3, 1, str(tmp_path), "x",
                            docs=docs)
    assert all(len(set(docs[x])) == len(x) for x in b)
    assert len(list(tmp_path.glob("bm25_x_*.npz"))) == 2
    again = cached_bm25_batches(Namespace(**dict(base, bm25_exclude_same_doc="on")), segs, 3, 1, str(tmp_path), "x",
                                docs=docs)
    assert all((p == q).all() for p, q in zip(b, again))
    assert len(a) == len(b) == 4
    with pytest.raises(ValueError, match="bm25-max-jaccard"):
        bm25_cache_key(Namespace(**dict(base, bm25_max_jaccard=0.0)), "x", 4, 1, True)


def test_lm_bm25_from_epoch_trains_epoch_one_on_ordinary_batches(tmp_path):
    """--bm25-from-epoch 2 (trime_lm): epoch 1 has the ordinary segment batches of local
    memory, epoch 2 the BM25 batches that --bm25-from-epoch 1 gives in every epoch."""
    from fairseq import options, tasks

    from helpers import write_tiny_corpus
    from trime_fairseq.cli.tune import with_plugin

    data = write_tiny_corpus(tmp_path / "corpus")

    def epoch_batches(*extra):
        argv = with_plugin([str(data), "--task", "trime_lm", "--arch", "transformer_lm_trime_tiny", "--cpu",
                            "--tokens-per-sample", "16", "--batch-size", "4", "--criterion", "trime_loss", *extra])
        task = tasks.setup_task(options.parse_args_and_arch(options.get_training_parser(), input_args=argv))
        task.load_dataset("train")
        return task, {epoch: [sorted(np.asarray(b).tolist()) for b in task.get_batch_iterator(
            task.dataset("train"), max_sentences=4, seed=1, epoch=epoch).frozen_batches] for epoch in (1, 2)}

    bm25 = ["--bm25-batching", "--bm25-cache-dir", str(tmp_path)]
    task, switched = epoch_batches(*bm25, "--bm25-from-epoch", "2")
    _, always = epoch_batches(*bm25)
    ordinary = [sorted(np.asarray(b).tolist()) for b in task.dataset("train").batches(4, seed=1, epoch=1, shuffle=True)]
    assert switched[1] == ordinary != always[1]  # epoch 1: the segments' ordinary batches
    assert switched[2] == always[2]  # then BM25 batches
    assert sorted(i for b in switched[1] for i in b) == list(range(len(task.dataset("train"))))


def test_lm_bm25_across_documents_groups_the_unpadded_stream(tmp_path):
    """--bm25-batching --memory-across-documents: BM25 groups the stream cut every L tokens
    (no padded segment; some segment spans two documents), with its own cache file."""
    from fairseq import options, tasks

    from helpers import write_tiny_corpus
    from trime_fairseq.cli.tune import with_plugin

    data = write_tiny_corpus(tmp_path / "corpus")

    def train_task(*extra):
        argv = with_plugin([str(data), "--task", "trime_lm", "--arch", "transformer_lm_trime_tiny", "--cpu",
                            "--tokens-per-sample", "16", "--batch-size", "4", "--criterion", "trime_loss",
                            "--bm25-batching", "--bm25-cache-dir", str(tmp_path), *extra])
        task = tasks.setup_task(options.parse_args_and_arch(options.get_training_parser(), input_args=argv))
        task.load_dataset("train")
        ds = task.dataset("train")
        return ds, [np.asarray(b) for b in task.get_batch_iterator(ds, max_sentences=4, seed=1, epoch=1).frozen_batches]

    per_doc, _ = train_task()
    ds, batches = train_task("--memory-across-documents")
    stream = ds.stream
    assert list(ds.starts) == list(range(0, len(stream) - 1, 16))
    assert int(ds.sizes.sum()) == len(stream) - 1 and len(ds) < len(per_doc)
    assert any(len(set(stream.docs[a:a + n + 1])) > 1 for a, n in zip(ds.starts, ds.sizes))
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    full = next(b for b in batches if (ds.sizes[b] == 16).all())
    sample = ds.collater([ds[i] for i in full])
    assert int(sample["target"].eq(ds.pad).sum()) == 0 and sample["trime_memory"]["mode"] == "external"
    assert len(list(tmp_path.glob("bm25_train_L16_stream_*.npz"))) == 1
    assert len(list(tmp_path.glob("bm25_train_L16_B*.npz"))) == 1
