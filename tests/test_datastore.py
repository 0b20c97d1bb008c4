"""Datastore builder, FAISS index, kNN-LM and TRIMELM_ext scoring."""
import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import USER_DIR
from helpers import run_cli
from trime_fairseq.cli import build_datastore as bd
from trime_fairseq.memory.datastore import Datastore, DatastoreError, DatastoreWriter
from trime_fairseq.memory.index import exact_search, recall_at_k, tune_search
from trime_fairseq.memory.search_index import SearchIndex

EV = ["--tokens-per-sample", "64", "--context-window", "32", "--cpu"]


def build(data, ckpt, out, *extra):
    bd.main([str(data), "--path", str(ckpt), "--gen-subset", "train", "--out", str(out),
             "--key-dtype", "float32", "--recall-k", "8", "--recall-queries", "50", *EV, *extra])


@pytest.fixture(scope="module")
def datastore(tiny_lm, tmp_path_factory):
    data, ckpt, _ = tiny_lm
    out = tmp_path_factory.mktemp("ds") / "train"
    build(data, ckpt, out, "--max-tokens", "256")
    return data, ckpt, out


def test_keys_are_the_models_g(datastore):
    from trime_fairseq.cli.tune import load
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.models.capture import get_capture

    data, ckpt, out = datastore
    ds = Datastore(str(out))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["size"] == len(ds) and meta["value_dtype"] == "int32" and meta["key_type"] == "ffn_input"
    cfg, model, task = load([str(data), "--path", str(ckpt), "--user-dir", USER_DIR, "--task", "trime_lm",
                             "--gen-subset", "train", *EV])
    model.eval()
    stream = task.stream("train")
    assert len(ds) == len(stream) - 1
    np.testing.assert_array_equal(ds.values, stream.ids(1, len(stream)))  # values = next tokens
    blocks = StreamBlocks(stream, task.args.tokens_per_sample, 32, task.dictionary.pad())
    cap = get_capture(model)
    for i in (0, 3, len(blocks) - 1):  # each block alone, batch of one
        item = blocks.collater([blocks[i]])
        with torch.no_grad():
            model(**item["net_input"])
        g = cap.take()[0]
        keep = item["target"][0].ne(task.dictionary.pad())
        pos = item["positions"][0][keep].numpy()
        np.testing.assert_allclose(ds.keys[pos], g[keep].numpy(), rtol=1e-4, atol=1e-5)
    assert (out / "index.faiss").exists() and json.loads((out / "index.json").read_text())["recall"] >= 0.9


def test_killed_build_resumes_to_identical_files(datastore, tmp_path, monkeypatch):
    data, ckpt, out = datastore
    calls = {"n": 0}
    original = DatastoreWriter.write

    def dying_write(self, keys, values):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, keys, values)

    monkeypatch.setattr(DatastoreWriter, "write", dying_write)
    target = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(data, ckpt, target, "--max-tokens", "256", "--no-index")
    assert not target.exists() and (tmp_path / "resumed.partial").exists()
    with pytest.raises(DatastoreError, match="not a finished datastore"):
        Datastore(str(target))  # never taken for complete
    monkeypatch.setattr(DatastoreWriter, "write", original)
    build(data, ckpt, target, "--max-tokens", "256", "--no-index")
    a, b = Datastore(str(out)), Datastore(str(target))
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    assert not (tmp_path / "resumed.partial").exists()


def test_mismatched_model_dictionary_dimension_are_refused(datastore, tmp_path):
    data, ckpt, out = datastore
    meta = Datastore(str(out)).meta
    with pytest.raises(DatastoreError, match="dimension"):
        meta.check_compatible(dim=meta.dim + 1)
    with pytest.raises(DatastoreError, match="another dictionary"):
        meta.check_compatible(dictionary_sha256="0" * 64)
    with pytest.raises(DatastoreError, match="another model"):
        meta.check_compatible(model_sha256="0" * 64)
    # through fairseq-eval-lm: another checkpoint of the same architecture is refused
    other = tmp_path / "other"
    run_cli(["fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
             "--arch", "transformer_lm_trime_tiny", "--criterion", "cross_entropy", "--optimizer", "adam",
             "--lr", "1e-3", "--tokens-per-sample", "64", "--max-tokens", "512", "--max-update", "2",
             "--save-dir", str(other), "--no-epoch-checkpoints", "--cpu", "--seed", "7"])
    proc = run_cli(["fairseq_cli.eval_lm", str(data), "--path", str(other / "checkpoint_last.pt"),
                    "--user-dir", USER_DIR, "--task", "trime_lm", "--gen-subset", "valid", *EV,
                    "--eval-combiner", "knn", "--knn-lambda", "0.2", "--datastore", str(out)], check=False)
    assert proc.returncode != 0 and "another model" in proc.stderr


def test_index_recall_and_nprobe():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((40, 16)).astype(np.float32)
    exact_s, exact_i = exact_search(keys, queries, 10, chunk=700)  # chunked == unchunked
    import faiss

    flat = faiss.IndexFlatIP(16)
    flat.add(keys)
    _, ref = flat.search(queries, 10)
    np.testing.assert_array_equal(exact_i, ref)
    index = SearchIndex.build(keys, "IVF32,Flat", "ip", train_size=2000)
    recall = index.tune(keys, queries, 10, target=0.9)
    assert recall >= 0.9 and 1 <= index.config.nprobe <= 32 and index.config.k_factor == 1
    assert (index.config.recall, index.config.recall_k, index.config.size, index.nlist) == (recall, 10, 3000, 32)
    assert recall_at_k(exact_i, exact_i) == 1.0


def test_search_index_saves_its_config_beside_it_and_versions_it(tmp_path):
    """index.faiss + index.json; an index.json written before the format was recorded loads
    (format 1), a newer format is a one-line user error; ids chosen by the caller can be
    removed in ranges."""
    import json

    from trime_fairseq.errors import TrimeUserError

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((200, 8)).astype(np.float32)
    index = SearchIndex.build(keys, "Flat", "ip")
    index.save(str(tmp_path))
    saved = json.loads((tmp_path / "index.json").read_text())
    assert saved["format"] == 1 and saved["factory"] == "Flat" and saved["size"] == 200
    del saved["format"]  # as written by earlier versions
    (tmp_path / "index.json").write_text(json.dumps(saved))
    loaded = SearchIndex.load(str(tmp_path), use_gpu=False, size=200, dim=8)
    np.testing.assert_array_equal(loaded.search(keys[:5], 3)[1], index.search(keys[:5], 3)[1])
    (tmp_path / "index.json").write_text(json.dumps({**saved, "format": 2}))
    with pytest.raises(TrimeUserError, match="index format 2, this version reads format 1"):
        SearchIndex.load(str(tmp_path), use_gpu=False)
    mutable = SearchIndex.empty(8, "Flat")
    mutable.add(keys[:10], np.arange(100, 110))
    assert mutable.remove_range(100, 104) and mutable.ntotal == 6
    assert set(mutable.search(keys[:10], 6)[1].ravel().tolist()) == set(range(104, 110))


def test_refine_index_returns_exact_scores_and_keeps_its_k_factor(tmp_path):
    """The auto index for large N (fast-scan PQ + exact re-ranking): scores of the ids it
    returns are the exact ones, a larger k_factor never lowers recall, and the tuned
    k_factor is saved in index.json and set again on load."""
    from trime_fairseq.memory.index import IndexConfig, datastore_index_factory, set_k_factor

    assert datastore_index_factory(100_000, 128) == "Flat"
    assert datastore_index_factory(2_200_000, 128) == "IVF8192,PQ64x4fs,RFlat"
    assert datastore_index_factory(2_200_000, 1024) == "IVF8192,PQ256x4fs,RFlat"
    assert datastore_index_factory(2_200_000, 127) == "IVF8192,Flat"
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((4000, 16)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    _, exact_i = exact_search(keys, queries, 20, metric="l2")
    built = SearchIndex.build(keys, "IVF16,PQ8x4fs,RFlat", "l2", train_size=4000)
    index = built.index
    recalls = []
    for k_factor in (1, 4, 16):
        assert set_k_factor(index, k_factor)
        nprobe, _, recall = tune_search(index, keys, queries, 20, target=1.01, metric="l2", k_factor=k_factor,
                                        max_k_factor=k_factor)
        recalls.append(recall)
    assert recalls[0] <= recalls[1] <= recalls[2] and recalls[2] > recalls[0]
    # tuning raises k_factor when nprobe alone cannot reach the target
    nprobe, k_factor, recall = tune_search(index, keys, queries, 20, target=recalls[2], metric="l2", k_factor=1)
    assert k_factor > 1 and recall >= recalls[2]
    d, i = index.search(queries, 20)
    np.testing.assert_allclose(d, ((queries[:, None, :] - keys[i]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    config = IndexConfig(factory="IVF16,PQ8x4fs,RFlat", metric="l2", dim=16, size=4000, train_size=4000,
                         nprobe=nprobe, recall=recalls[2], recall_k=20, k_factor=16)
    SearchIndex(index, config).save(str(tmp_path))
    set_k_factor(index, 1)
    loaded = SearchIndex.load(str(tmp_path), use_gpu=False)
    import faiss

    assert faiss.downcast_index(loaded.index).k_factor == 16 and loaded.config == config
    assert not set_k_factor(SearchIndex.build(keys, "Flat", "l2").index, 2)  # no refinement stage
    with pytest.raises(ValueError, match="--refine-k-factor"):
        set_k_factor(index, 0.5)


def brute_force_scores(model_out, ds, k, pad):
    """(per scored token) exact top-k by inner product over all keys, with values."""
    q, = model_out
    sims = q @ torch.from_numpy(np.asarray(ds.keys, dtype=np.float32)).T
    top = sims.topk(k, dim=-1)
    return top.values, torch.from_numpy(np.asarray(ds.values, dtype=np.int64))[top.indices]


def test_knn_and_trime_ext_equal_brute_force(datastore):
    from trime_fairseq.cli.tune import load
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.memory.combiners import KnnCombiner, NoMemory, TrimeCombiner
    from trime_fairseq.memory.retriever import Retriever
    from trime_fairseq.models.memory_eval import MemoryEvalModel, scored_rows, scoring_inputs

    data, ckpt, out = datastore
    cfg, model, task = load([str(data), "--path", str(ckpt), "--user-dir", USER_DIR, "--task", "trime_lm",
                             "--gen-subset", "valid", *EV])
    model.eval()
    ds = Datastore(str(out))
    k = 16
    retriever = Retriever(ds, k=k)  # exact Flat index at this size
    pad = task.dictionary.pad()
    blocks = StreamBlocks(task.stream("valid"), task.args.tokens_per_sample, 32, pad)
    sample = blocks.collater([blocks[i] for i in range(3)])
    lam, temp, tau = 0.3, 2.0, 1.3
    with torch.no_grad():
        wrapped = MemoryEvalModel(model, NoMemory(), pad)
        x = scoring_inputs(model, wrapped(**sample["net_input"]), sample, pad)
        for i, s, row in scored_rows(x, sample, pad, None, retriever):
            q = row.query_g[0]
            sims, vals = brute_force_scores((q,), ds, k, pad)
            torch.testing.assert_close(row.ext_scores[0], sims, rtol=1e-4, atol=1e-4)
            knn = KnnCombiner(lam, temp).target_log_prob(row)[0]
            trime = TrimeCombiner(tau).target_log_prob(row)[0]
            logits = row.tok_scores[0]
            d = q.size(-1)
            for t in range(q.size(0)):
                tgt = int(row.target[0, t])
                if tgt == pad:
                    continue
                p_lm = torch.softmax(logits[t], -1)[tgt].item()
                w = [math.exp(v / temp) for v in sims[t].tolist()]
                p_knn = sum(wi for wi, v in zip(w, vals[t].tolist()) if v == tgt) / sum(w)
                assert knn[t].item() == pytest.approx(math.log((1 - lam) * p_lm + lam * p_knn), abs=1e-5)
                # Eq. 6 over local (earlier positions of the row) + external entries
                num = math.exp(logits[t, tgt].item())
                den = torch.logsumexp(logits[t], 0).exp().item()
                for j in range(s + t):
                    if row.mask[0, t, j]:
                        e = math.exp((q[t] @ row.keys_g[0, j]).item() / math.sqrt(d) / tau)
                        den += e
                        num += e if int(row.key_labels[0, j]) == tgt else 0.0
                for v, lab in zip(sims[t].tolist(), vals[t].tolist()):
                    e = math.exp(v / math.sqrt(d) / tau)
                    den += e
                    num += e if lab == tgt else 0.0
                assert trime[t].item() == pytest.approx(math.log(num / den), abs=1e-5)


def ppl(proc):
    return float(re.search(r"Perplexity: ([0-9.]+)", proc.stderr).group(1))


def test_cached_retrieval_sweep_equals_fresh_runs(datastore):
    data, ckpt, out = datastore
    common = [str(data), "--path", str(ckpt), "--user-dir", USER_DIR, "--task", "trime_lm",
              "--gen-subset", "valid", *EV, "--datastore", str(out)]
    sweep = run_cli(["trime_fairseq.cli.tune", *common, "--combiner", "knn",
                     "--grid", "lambda=0.1,0.4", "temperature=1,3", "k=4,16"])
    found = re.findall(r"knn\(lambda=([0-9.]+), T=([0-9.]+)\) k=([0-9]+)\s+M=0\s+ppl ([0-9.]+)", sweep.stderr)
    assert len(found) == 8
    for lam, t, k, value in found[::3]:
        fresh = run_cli(["fairseq_cli.eval_lm", *common[:-2], "--datastore", str(out), "--eval-combiner", "knn",
                         "--knn-lambda", lam, "--knn-temperature", t, "--knn-k", k])
        assert ppl(fresh) == pytest.approx(float(value), rel=1e-3)
    trime = run_cli(["trime_fairseq.cli.tune", *common, "--combiner", "trime", "--eval-memory", "local+ext",
                     "--grid", "tau=1", "memory_lambda=0,0.3", "memory_tau=2", "k=16"])
    found = re.findall(r"M=0\s+ppl ([0-9.]+)", trime.stderr)
    fresh = run_cli(["fairseq_cli.eval_lm", *common, "--eval-combiner", "trime", "--eval-memory", "local+ext",
                     "--memory-lambda", "0.3", "--memory-temperature", "2", "--knn-k", "16"])
    assert ppl(fresh) == pytest.approx(float(found[-1]), rel=1e-3)


def test_trime_ext_training_with_bm25_batches(tiny_lm, tmp_path):
    data, _, _ = tiny_lm
    base = ["fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
            "--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--optimizer", "adam",
            "--lr", "3e-3", "--tokens-per-sample", "16", "--batch-size", "8", "--max-update", "4",
            "--save-dir", str(tmp_path / "ckpt"), "--no-epoch-checkpoints", "--cpu",
            "--bm25-batching", "--drop-local-prob", "0.9", "--bm25-cache-dir", str(tmp_path),
            "--log-format", "json", "--log-interval", "1"]
    out = run_cli(base)
    cached = list(tmp_path.glob("bm25_train_*.npz"))
    assert len(cached) == 1
    saved = np.load(cached[0])
    batches = np.split(saved["order"], saved["bounds"])
    assert sorted(np.concatenate(batches).tolist()) == list(range(int(saved["num_segments"])))
    assert all(len(b) <= 8 for b in batches)
    assert "BM25 batching" in out.stderr + out.stdout
    again = run_cli([*base, "--save-dir", str(tmp_path / "ckpt2")])
    assert "BM25 batches from cache" in again.stderr + again.stdout
    bad = run_cli([*base, "--consecutive-segments", "2"], check=False)
    assert bad.returncode != 0 and "--bm25-batching" in bad.stderr.strip().splitlines()[-1]


def test_external_in_batch_memory_loss_equals_brute_force():
    from helpers import make_dictionary, make_model, random_tokens
    from test_trime_loss import brute_force_log_prob, criterion_for, make_sample
    from trime_fairseq.models.capture import get_capture

    d = make_dictionary(30)
    model = make_model(d).double()
    tokens = random_tokens(d, 4, 9, seed=8)
    sample = make_sample(tokens, d.pad())
    keep = torch.tensor([True, False, True, False])
    sample["trime_memory"] = {"mode": "external", "keep_local": keep}
    loss, _, _ = criterion_for(d)(model, sample)  # keep_local given: no random draw (eval mode)
    cap = get_capture(model)
    logits = model(**sample["net_input"])[0]
    g = cap.take()
    B, L = sample["target"].shape
    seg = torch.arange(B).repeat_interleave(L)

    def allowed(i, j):
        if seg[i] != seg[j]:
            return True
        return bool(keep[seg[i]]) and j < i

    lp = brute_force_log_prob(logits.reshape(B * L, -1), g.reshape(B * L, -1),
                              sample["target"].reshape(-1), allowed, d.pad())
    assert loss.item() == pytest.approx(-lp.sum().item(), rel=1e-9)
