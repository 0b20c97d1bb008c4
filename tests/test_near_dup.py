"""Token n-gram Jaccard near-duplicate detection (trime_fairseq.data.near_dup)."""
import numpy as np
import pytest

from trime_fairseq.data.near_dup import NearDuplicates, jaccard, max_jaccard, ngram_hashes, ngram_sets


def test_jaccard_of_ngram_sets():
    a, b = np.arange(20), np.arange(10, 30)
    # 16 5-grams each; windows starting at 10..15 are shared
    assert jaccard(ngram_hashes(a), ngram_hashes(b)) == pytest.approx(6 / 26)
    assert jaccard(ngram_hashes(a), ngram_hashes(a.copy())) == 1.0
    assert jaccard(ngram_hashes(a), ngram_hashes(a + 100)) == 0.0
    assert len(ngram_hashes([3, 3, 3, 3, 3, 3, 3])) == 1  # distinct n-grams
    assert len(ngram_hashes([1, 2])) == 1  # shorter than n: the whole sequence
    # order matters (n-grams, not bags of tokens)
    assert jaccard(ngram_hashes(a, 2), ngram_hashes(a[::-1], 2)) == 0.0
    with pytest.raises(ValueError):
        ngram_hashes(a, 0)


def test_max_jaccard_equals_brute_force():
    rng = np.random.default_rng(0)
    corpus = [rng.integers(0, 30, rng.integers(3, 60)) for _ in range(40)]
    queries = [rng.integers(0, 30, 40) for _ in range(7)] + [corpus[5][:30].copy(), np.array([999, 998])]
    cs, qs = ngram_sets(corpus, 3), ngram_sets(queries, 3)
    best, arg = max_jaccard(qs, cs, chunk=4)
    for i, q in enumerate(qs):
        brute = [jaccard(q, c) for c in cs]
        assert best[i] == pytest.approx(max(brute))
        if best[i] > 0:
            assert brute[arg[i]] == pytest.approx(max(brute))
    assert arg[-1] == -1 and best[-1] == 0  # nothing shared
    assert best[-2] > 0.5 and arg[-2] == 5


def test_near_duplicates_threshold_and_memo():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 500, 100)
    b = a.copy()
    b[50] = 9999  # 5 of 96 5-grams change
    nd = NearDuplicates([a, b, rng.integers(0, 500, 100)], n=5, threshold=0.8)
    assert nd.is_dup(0, 1) and nd.is_dup(1, 0) and not nd.is_dup(0, 2)
    assert nd.tests == 2  # (0, 1) was memoised
    assert nd.dup_of_any(1, [2, 0]) and not nd.dup_of_any(2, [0, 1])
    with pytest.raises(ValueError):
        NearDuplicates([a], threshold=0)


@pytest.mark.slow
def test_near_dups_command_counts_heldout_copies(tmp_path):
    import json
    import random

    from helpers import run_cli

    from trime_fairseq.cli.near_dups import main

    rnd = random.Random(0)
    docs = [[" ".join(f"w{rnd.randint(0, 300)}" for _ in range(12)) for _ in range(3)] for _ in range(8)]
    splits = {"train": docs[:6], "valid": [docs[1], docs[6]], "test": [docs[7]]}  # valid copies a train doc
    for split, ds in splits.items():
        (tmp_path / f"{split}.txt").write_text("".join("\n".join(d) + "\n\n" for d in ds))
    run_cli(["fairseq_cli.preprocess", "--only-source", "--trainpref", str(tmp_path / "train.txt"),
             "--validpref", str(tmp_path / "valid.txt"), "--testpref", str(tmp_path / "test.txt"),
             "--destdir", str(tmp_path / "bin"), "--workers", "1"])
    out = tmp_path / "nd.json"
    r = main([str(tmp_path / "bin"), "--tokens-per-sample", "16", "--thresholds", "0.5,1", "--out", str(out)])
    assert r["train_segments"] > 6
    v, t = r["splits"]["valid"], r["splits"]["test"]
    # the copied document's segments are cut exactly as in train: identical n-gram sets
    assert v["thresholds"]["1"]["segments"] >= 2 and t["thresholds"]["0.5"]["segments"] == 0
    assert v["thresholds"]["0.5"]["segments"] < v["segments"]
    assert json.loads(out.read_text())["splits"]["valid"]["thresholds"] == v["thresholds"]
    assert "| valid |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(out)])  # not a fairseq-preprocess folder


def test_batch_composition_counts_same_document_and_copies():
    from trime_fairseq.data.near_dup import batch_composition

    rng = np.random.default_rng(3)
    a = rng.integers(0, 100, 30)
    segs = [a, a.copy(), rng.integers(100, 200, 30), rng.integers(200, 300, 30)]
    docs = np.array([0, 1, 1, 2])
    out = batch_composition([np.array([0, 1]), np.array([2, 3])], docs, ngram_sets(segs), thresholds=(0.5,))
    assert out["segments"] == 4
    assert out["with_same_doc_mate"] == 0.0  # 1 and 2 share a document but not a batch
    assert out["with_near_dup_mate"]["0.5"] == 0.5 and out["mean_best_jaccard"] == pytest.approx(0.5)
    out = batch_composition([np.array([1, 2, 0]), np.array([3])], docs, ngram_sets(segs), thresholds=(0.5,))
    assert out["with_same_doc_mate"] == 0.5 and out["with_near_dup_mate"]["0.5"] == 0.5
