"""Translation: TRIME-MT loss, kNN-MT / adaptive kNN-MT / TRIME-MT decoding through fairseq-generate."""
import math
import re

import numpy as np
import pytest
import torch

from helpers import REPO, run_cli
from trime_fairseq.memory.adaptive import MetaK, metak_target_log_prob, k_choices, neighbour_log_weights
from trime_fairseq.memory.combiners import AdaptiveKnnCombiner, ScoringInputs
from trime_fairseq.models.capture import get_capture

USER_DIR = str(REPO / "trime_fairseq")


def load(data, ckpt, *extra):
    from trime_fairseq.cli.tune import load as load_model

    return load_model([str(data), "--path", str(ckpt), "--task", "trime_translation", "--cpu", *extra])


def generate(data, ckpt, *extra):
    proc = run_cli([
        "fairseq_cli.generate", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
        "--path", str(ckpt), "--gen-subset", "test", "--beam", "4", "--cpu", *extra,
    ])
    hyps = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", proc.stdout, flags=re.M))
    assert len(hyps) == 12, proc.stdout[-2000:]
    return hyps


def test_trime_mt_loss_equals_brute_force(tiny_mt):
    """Memory of a target token = every target token of the other sentences of the batch."""
    from fairseq.criterions import build_criterion

    data, ckpt, _ = tiny_mt
    cfg, model, task = load(data, ckpt, "--criterion", "trime_loss")
    task.load_dataset("valid")
    ds = task.dataset("valid")
    sample = ds.collater([ds[i] for i in range(6)])
    sample["trime_memory"] = task.memory_spec(sample)
    crit = build_criterion(cfg.criterion, task)
    model.eval()
    with torch.no_grad():
        loss, _, _ = crit(model, sample)
        net_output = model(**sample["net_input"])
        g = model.trime_capture.take()
    logits, target = net_output[0], sample["target"]
    pad = task.target_dictionary.pad()
    rows, cols = target.ne(pad).nonzero(as_tuple=True)
    keys, labels = g[rows, cols], target[rows, cols]
    total = 0.0
    for i, t in zip(rows.tolist(), cols.tolist()):
        other = rows.ne(i)
        sims = (keys[other] @ g[i, t]) / math.sqrt(g.size(-1))
        y = int(target[i, t])
        num = torch.logaddexp(logits[i, t, y], torch.logsumexp(sims[labels[other] == y], 0)
                              if (labels[other] == y).any() else torch.tensor(-math.inf))
        den = torch.logaddexp(torch.logsumexp(logits[i, t], 0), torch.logsumexp(sims, 0))
        total -= float(num - den)
    assert float(loss) == pytest.approx(total, rel=1e-4)


def test_knn_mt_step_equals_brute_force_with_exact_index(tiny_mt):
    from trime_fairseq.memory.datastore import Datastore

    data, ckpt, stores = tiny_mt
    lam, temp, k = 0.4, 7.0, 8
    _, wrapped, task = load(data, ckpt, "--mt-combiner", "knn", "--datastore", str(stores["l2"]),
                            "--knn-k", str(k), "--knn-lambda", str(lam), "--knn-temperature", str(temp))
    task.load_dataset("test")
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(4)])
    wrapped.eval()
    with torch.no_grad():
        net_output = wrapped(**sample["net_input"])
        mixed = wrapped.get_normalized_probs(net_output, log_probs=True)
        wrapped.inner(**sample["net_input"])
        g = wrapped.inner.trime_capture.take()
        model_lp = torch.log_softmax(net_output[0], -1)
    store = Datastore(str(stores["l2"]))
    keys = torch.from_numpy(np.asarray(store.keys, dtype=np.float32))
    values = torch.from_numpy(np.asarray(store.values).astype(np.int64))
    q = g.reshape(-1, g.size(-1))
    dist = torch.cdist(q, keys) ** 2
    d_top, idx = dist.topk(k, largest=False)
    p_knn = torch.zeros(q.size(0), model_lp.size(-1))
    p_knn.scatter_add_(1, values[idx], torch.softmax(-d_top / temp, -1))
    expect = torch.log((1 - lam) * model_lp.exp().reshape(q.size(0), -1) + lam * p_knn)
    assert torch.allclose(mixed.reshape(q.size(0), -1), expect, atol=1e-4)


def test_lambda_zero_reproduces_base_and_batch_size_does_not_matter(tiny_mt):
    data, ckpt, stores = tiny_mt
    base = generate(data, ckpt, "--batch-size", "4")
    knn0 = generate(data, ckpt, "--batch-size", "4", "--mt-combiner", "knn", "--datastore", str(stores["l2"]),
                    "--knn-k", "8", "--knn-lambda", "0")
    assert knn0 == base
    knn = [generate(data, ckpt, "--batch-size", str(b), "--mt-combiner", "knn", "--datastore", str(stores["l2"]),
                    "--knn-k", "8", "--knn-lambda", "0.6") for b in (1, 5)]
    assert knn[0] == knn[1]
    assert knn[0] != base  # the datastore changes some output
    trime = [generate(data, ckpt, "--batch-size", str(b), "--mt-combiner", "trime", "--datastore",
                      str(stores["ip"]), "--knn-k", "8") for b in (1, 5)]
    assert trime[0] == trime[1]


def test_adaptive_weights_equal_explicit_mixture():
    torch.manual_seed(0)
    n, k, temp, vocab = 5, 8, 3.0, 11
    scores = -torch.rand(n, k).sort(-1).values * 10
    scores[0, 5:] = -math.inf  # fewer neighbours found
    values = torch.randint(0, vocab, (n, k))
    log_w = torch.log_softmax(torch.randn(n, len(k_choices(k))), -1)
    tok = torch.log_softmax(torch.randn(n, vocab), -1)
    target = torch.randint(0, vocab, (n,))
    expect = torch.zeros(n, vocab)
    for r in range(n):
        expect[r] = log_w[r, 0].exp() * tok[r].exp()
        for c, kk in enumerate(k_choices(k)[1:], start=1):
            s = scores[r, :kk]
            ok = torch.isfinite(s)
            p = torch.zeros(vocab)
            p.scatter_add_(0, values[r, :kk][ok], torch.softmax(s[ok] / temp, 0))
            expect[r] += log_w[r, c].exp() * (p if ok.any() else tok[r].exp())
    got_t = metak_target_log_prob(tok.gather(1, target[:, None]).squeeze(1), log_w, scores, values, target,
                                     k_choices(k), temp)
    assert torch.allclose(got_t, expect.log().gather(1, target[:, None]).squeeze(1), atol=1e-5)

    class Fixed(MetaK):
        def forward(self, s, v):
            return log_w

    comb = AdaptiveKnnCombiner(Fixed(k), temp)
    x = ScoringInputs.external_only(tok[:, None], torch.zeros(n, 1), torch.randn(n, 1, 4), scores[:, None],
                                    values[:, None], target=target[:, None])
    assert torch.allclose(comb.log_probs(x)[:, 0], expect.log(), atol=1e-5)
    assert torch.allclose(comb.target_log_prob(x)[:, 0], got_t, atol=1e-6)
    # all weight on k=0: the MT model exactly
    only_mt = torch.full_like(log_w, -math.inf)
    only_mt[:, 0] = 0
    log_a, log_lam = neighbour_log_weights(only_mt, scores, k_choices(k), temp)
    assert torch.isinf(log_lam).all() and torch.isinf(log_a).all()


def test_metak_training_and_adaptive_decoding(tiny_mt, tmp_path):
    data, ckpt, stores = tiny_mt
    out = tmp_path / "metak.pt"
    proc = run_cli(["trime_fairseq.cli.train_metak", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
                    "--path", str(ckpt), "--datastore", str(stores["l2"]), "--knn-k", "8", "--gen-subset", "valid",
                    "--out", str(out), "--epochs", "5", "--cpu"])
    report = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    assert "held_out_nll_adaptive" in report and out.exists()
    a = [generate(data, ckpt, "--batch-size", str(b), "--mt-combiner", "adaptive", "--datastore", str(stores["l2"]),
                  "--knn-k", "8", "--metak-path", str(out)) for b in (1, 5)]
    assert a[0] == a[1]
    bad = run_cli(["fairseq_cli.generate", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
                   "--path", str(ckpt), "--gen-subset", "test", "--cpu", "--mt-combiner", "adaptive",
                   "--datastore", str(stores["l2"]), "--knn-k", "4", "--metak-path", str(out)], check=False)
    assert bad.returncode != 0 and "--knn-k 8" in bad.stderr


def test_datastore_keys_are_decoder_g_of_target_positions(tiny_mt):
    from trime_fairseq.memory.datastore import Datastore

    data, ckpt, stores = tiny_mt
    _, model, task = load(data, ckpt)
    task.load_dataset("train")
    ds = task.dataset("train")
    store = Datastore(str(stores["l2"]))
    assert len(store) == int(ds.tgt_sizes.sum())
    sample = ds.collater([ds[0]])
    capture = get_capture(model)
    with torch.no_grad():
        model.eval()(**sample["net_input"])
        g = capture.take()[0]
    n = int(ds.tgt_sizes[0])
    stored = torch.from_numpy(np.asarray(store.keys[:n], dtype=np.float32))
    assert torch.allclose(stored, g.half().float(), atol=1e-3)
    assert np.array_equal(np.asarray(store.values[:n]), ds[0]["target"].numpy())


@pytest.mark.parametrize("flags, message", [
    (["--mt-combiner", "knn"], "--knn-lambda"),
    (["--mt-combiner", "adaptive"], "--metak-path"),
    (["--mt-combiner", "trime", "--knn-k", "0"], "--knn-k"),
])
def test_bad_flags_are_clear_errors(tiny_mt, flags, message):
    data, ckpt, stores = tiny_mt
    proc = run_cli(["fairseq_cli.generate", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
                    "--path", str(ckpt), "--gen-subset", "test", "--cpu", "--datastore", str(stores["l2"]), *flags],
                   check=False)
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize("combiner, store, params", [("knn", "l2", {"lambda": 0.3, "temperature": 5.0}),
                                                     ("trime", "ip", {"tau": 2.0}),
                                                     ("trime", "ip", {"tau": 2.0, "memory_lambda": 0.4,
                                                                      "memory_tau": 3.0})])
def test_tune_mt_on_cached_neighbours_equals_decoder_distribution(tiny_mt, combiner, store, params):
    """trime-tune-mt scores grid points on one cached retrieval; the numbers must equal the
    reference NLL under the distribution fairseq-generate decodes with."""
    from trime_fairseq.cli.tune_mt import collect, score_grid

    data, ckpt, stores = tiny_mt
    flags = ["--knn-lambda", str(params["lambda"]), "--knn-temperature", str(params["temperature"])] \
        if combiner == "knn" else ["--eval-temperature", str(params["tau"])]
    if "memory_lambda" in params:  # Appendix F: Eq. 8 with the published P' over the neighbours
        flags += ["--memory-lambda", str(params["memory_lambda"]), "--memory-temperature", str(params["memory_tau"])]
    _, wrapped, task = load(data, ckpt, "--mt-combiner", combiner, "--datastore", str(stores[store]),
                            "--knn-k", "8", *flags)
    wrapped.eval()
    cached = collect(wrapped.inner, task, "valid", 4096, None)
    tuned = score_grid(cached, combiner, [params])[1]["nll"]
    ds = task.dataset("valid")
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ds), 7):
            sample = ds.collater([ds[i] for i in range(s, min(s + 7, len(ds)))])
            lp = wrapped.get_normalized_probs(wrapped(**sample["net_input"]), log_probs=True)
            keep = sample["target"].ne(task.target_dictionary.pad())
            total -= float(lp.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)[keep].sum())
            count += int(keep.sum())
    assert tuned == pytest.approx(total / count, rel=1e-4)


def test_tune_mt_appendix_f_grid():
    """TRIME-MT's optional Appendix F axes: tau' is read only where lambda > 0, so lambda = 0
    is one grid point whatever tau' is; lambda must be in [0, 1)."""
    from trime_fairseq.cli.tune_mt import parse_grid, score_grid
    from trime_fairseq.errors import TrimeUserError

    grid = parse_grid("trime", ["tau=1,2", "memory_lambda=0,0.5", "memory_tau=1,10"])
    n, k = 6, 4
    torch.manual_seed(0)
    cached = {"tok_target": -torch.rand(n) * 3, "tok_lse": torch.zeros(n), "dim": torch.tensor(8),
              "scores": torch.randn(n, k), "values": torch.randint(0, 5, (n, k)), "target": torch.randint(0, 5, (n,))}
    rows = score_grid(cached, "trime", grid)
    points = [r["params"] for r in rows[1:]]
    assert len(points) == 2 * (1 + 2)  # per tau: lambda 0 once, lambda 0.5 with each tau'
    assert all(p["memory_tau"] == 1 for p in points if p["memory_lambda"] == 0)
    nll = {(p["tau"], p["memory_lambda"], p["memory_tau"]): r["nll"] for p, r in zip(points, rows[1:])}
    assert nll[(1, 0.5, 1)] != pytest.approx(nll[(1, 0.5, 10)]) and nll[(1, 0.5, 1)] != pytest.approx(nll[(1, 0, 1)])
    with pytest.raises(TrimeUserError, match="memory_lambda"):
        parse_grid("trime", ["tau=1", "memory_lambda=1"])
    with pytest.raises(TrimeUserError, match="takes tau, memory_lambda, memory_tau"):
        parse_grid("trime", ["tau=1", "lambda=0.5"])


def test_split_in_order_keeps_chain_order_and_fits():
    from trime_fairseq.tasks.trime_translation import _split_by_tokens, _split_in_order

    sizes = np.array([5, 9, 2, 7, 3, 8])
    batch = np.array([3, 0, 5, 2, 1, 4])
    parts = list(_split_in_order(batch, sizes, 16))
    assert [p.tolist() for p in parts] == [[3, 0], [5, 2], [1], [4]]  # consecutive runs, order kept
    by_len = list(_split_by_tokens(batch, sizes, 16))
    assert [p.tolist() for p in by_len] == [[2, 4, 0], [3, 5], [1]]  # shortest first
    for ps in (parts, by_len):
        assert sorted(np.concatenate(ps).tolist()) == sorted(batch.tolist())
        assert all(len(p) * sizes[p].max() <= 16 for p in ps)


@pytest.mark.parametrize("grouping", ["whole", "length"])
def test_bm25_grouping_batches(tiny_mt, tmp_path, grouping):
    """--bm25-grouping whole: every batch is a consecutive run of one BM25 group in the order
    the group was grown; length: groups of two batches re-split shortest first."""
    from trime_fairseq.tasks.memory_flags import cached_bm25_batches

    data, ckpt, _ = tiny_mt
    max_tokens = 60
    cfg, _model, task = load(data, ckpt, "--bm25-batching", "--bm25-grouping", grouping,
                             "--bm25-cache-dir", str(tmp_path), "--max-tokens", str(max_tokens))
    task.load_dataset("train")
    ds = task.dataset("train")
    itr = task.get_batch_iterator(ds, max_tokens=max_tokens, seed=1)
    batches = [np.asarray(b) for b in itr.frozen_batches]
    sizes = np.maximum(ds.src_sizes, ds.tgt_sizes)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(ds)))
    assert all(len(b) * sizes[b].max() <= max_tokens for b in batches)
    bsz = max(2, int((1 if grouping == "whole" else 2) * max_tokens // float(sizes.mean())))
    groups = cached_bm25_batches(task.cfg, [ds.tgt[i].numpy() for i in range(len(ds))], bsz, 1, str(tmp_path),
                                 "train_de-en")
    owner = {int(i): g for g, b in enumerate(groups) for i in b}
    position = {int(i): p for b in groups for p, i in enumerate(b)}
    for b in batches:
        assert len({owner[int(i)] for i in b}) == 1  # never mixes groups
        if grouping == "whole":
            pos = [position[int(i)] for i in b]
            assert pos == list(range(pos[0], pos[0] + len(b)))
        else:
            assert np.all(np.diff(sizes[b]) >= 0)


def test_bm25_from_epoch_and_bm25_max_tokens(tiny_mt, tmp_path):
    """--bm25-from-epoch 2: epoch 1 has fairseq's length-sorted batches, epoch 2 BM25 groups;
    --bm25-max-tokens sizes the BM25 batches only."""
    from trime_fairseq.errors import TrimeUserError

    data, ckpt, _ = tiny_mt
    common = ["--bm25-batching", "--bm25-cache-dir", str(tmp_path), "--max-tokens", "60"]
    _, _, plain_first = load(data, ckpt, *common, "--bm25-from-epoch", "2", "--bm25-max-tokens", "120")
    _, _, bm25_always = load(data, ckpt, *common, "--bm25-max-tokens", "120")
    _, _, no_bm25 = load(data, ckpt, "--max-tokens", "60")
    batches = {}
    for name, task in (("plain_first", plain_first), ("bm25_always", bm25_always), ("no_bm25", no_bm25)):
        task.load_dataset("train")
        ds = task.dataset("train")
        batches[name] = {epoch: [np.asarray(b).tolist() for b in task.get_batch_iterator(
            ds, max_tokens=60, seed=1, epoch=epoch).frozen_batches] for epoch in (1, 2)}
    sizes = np.maximum(ds.src_sizes, ds.tgt_sizes)
    assert batches["plain_first"][1] == batches["no_bm25"][1]  # epoch 1: ordinary batches
    assert batches["plain_first"][2] == batches["bm25_always"][2] != batches["no_bm25"][2]
    bm25 = batches["bm25_always"][1]
    assert max(len(b) * sizes[b].max() for b in bm25) > 60  # sized by --bm25-max-tokens
    assert all(len(b) * sizes[b].max() <= 120 for b in bm25)
    for bad, match in ((["--bm25-from-epoch", "0"], "--bm25-from-epoch"), (["--bm25-max-tokens", "-1"], "--bm25-max-tokens")):
        with pytest.raises(TrimeUserError, match=match):
            load(data, ckpt, *common, *bad)
