"""Adaptive retrieval: the datastore is not searched where the model is confident.

Skipped queries must get exactly the distribution without external memory, the rule at
its never-skip value must change nothing, the counters must count, and trime-tune's
simulated skipping must equal a real skipped search."""
import math
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import USER_DIR
from helpers import run_cli
from trime_fairseq.errors import TrimeUserError
from trime_fairseq.memory.retriever import RetrievalSkip

EV = ["--tokens-per-sample", "64", "--context-window", "32", "--cpu"]


# ----------------------------------------------------------------------------- the rule alone


def test_rule_features_and_thresholds():
    v = 6
    uniform = torch.full((1, v), -math.log(v))
    peaked = torch.log_softmax(torch.tensor([[8.0, 0, 0, 0, 0, 0]]), -1)
    lp = torch.cat([uniform, peaked])
    ent = RetrievalSkip("entropy", 1.0)
    assert ent.values(lp)[0].item() == pytest.approx(math.log(v))
    assert ent.values(lp)[1].item() < 0.1
    assert ent.mask(lp).tolist() == [False, True]
    top = RetrievalSkip("max-prob", 0.5)
    assert top.values(lp)[0].item() == pytest.approx(1 / v)
    assert top.mask(lp).tolist() == [False, True]
    # the never-skip ends: entropy 0 and max-prob 1
    assert not RetrievalSkip("entropy", 0.0).mask(lp).any()
    assert not RetrievalSkip("max-prob", 1.0).mask(lp).any()
    # an -inf log-probability (adaptive softmax tails, masked words) keeps the entropy finite
    with_zero = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    assert RetrievalSkip("entropy", 1.0).values(with_zero)[0].item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("feature, threshold, message", [
    (None, 0.5, "--retrieval-skip-threshold 0.5 needs --retrieval-skip-feature"),
    ("entropy", None, "--retrieval-skip-feature entropy needs --retrieval-skip-threshold"),
    ("entropy", -1.0, "--retrieval-skip-threshold must be a number >= 0"),
    ("max-prob", 1.5, "max-prob is a probability in [0, 1]"),
    ("entropy", float("nan"), "--retrieval-skip-threshold must be a number >= 0"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(feature, threshold, message):
    with pytest.raises(TrimeUserError) as err:
        RetrievalSkip.from_args(SimpleNamespace(retrieval_skip_feature=feature, retrieval_skip_threshold=threshold))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_off_by_default_and_needs_a_datastore():
    from trime_fairseq.tasks.memory_flags import retrieval_skip

    assert RetrievalSkip.from_args(SimpleNamespace()) is None
    assert RetrievalSkip.from_args(SimpleNamespace(retrieval_skip_feature=None, retrieval_skip_threshold=None)) is None
    on = SimpleNamespace(retrieval_skip_feature="entropy", retrieval_skip_threshold=1.0)
    assert retrieval_skip(on, True) == RetrievalSkip("entropy", 1.0)
    with pytest.raises(TrimeUserError, match="needs external memory"):
        retrieval_skip(on, False)


# ----------------------------------------------------------------------------- with a datastore


@pytest.fixture(scope="module")
def datastore(tiny_lm, tmp_path_factory):
    from trime_fairseq.cli import build_datastore as bd

    data, ckpt, _ = tiny_lm
    out = tmp_path_factory.mktemp("ds") / "train"
    bd.main([str(data), "--path", str(ckpt), "--gen-subset", "train", "--out", str(out), "--key-dtype", "float32",
             "--recall-k", "8", "--recall-queries", "50", "--max-tokens", "256", *EV])
    return data, ckpt, out


def loaded(datastore, k=16):
    from trime_fairseq.cli.tune import load
    from trime_fairseq.memory.datastore import Datastore
    from trime_fairseq.memory.retriever import Retriever

    data, ckpt, out = datastore
    cfg, model, task = load([str(data), "--path", str(ckpt), "--user-dir", USER_DIR, "--task", "trime_lm",
                             "--gen-subset", "valid", *EV])
    return model.eval(), task, Retriever(Datastore(str(out)), k=k)


def rows_of(model, task, retriever, n_blocks=4):
    """``[(row index, start, ScoringInputs)]`` of the first blocks of valid."""
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.memory.combiners import NoMemory
    from trime_fairseq.models.memory_eval import MemoryEvalModel, scored_rows, scoring_inputs

    pad = task.dictionary.pad()
    blocks = StreamBlocks(task.stream("valid"), task.args.tokens_per_sample, 32, pad)
    sample = blocks.collater([blocks[i] for i in range(n_blocks)])
    with torch.no_grad():
        x = scoring_inputs(model, MemoryEvalModel(model, NoMemory(), pad)(**sample["net_input"]), sample, pad)
        return list(scored_rows(x, sample, pad, None, retriever))


def combiners():
    from trime_fairseq.memory.combiners import CacheCombiner, KnnCombiner, TrimeCombiner

    return {
        "knn": KnnCombiner(0.3, 2.0),
        "knn+cache": KnnCombiner(0.3, 2.0, CacheCombiner(0.2, 0.5)),
        "trime": TrimeCombiner(1.3),
        "trime+pprime": TrimeCombiner(1.3, 0.3, 2.0),  # published P' over the retrieved entries
        "trime+pprime-all": TrimeCombiner(1.3, 0.3, 2.0, "all-scaled"),
    }


def test_skipped_rows_get_exactly_the_distribution_without_external_memory(datastore):
    model, task, retriever = loaded(datastore)
    full = rows_of(model, task, retriever)
    ent = torch.cat([RetrievalSkip("entropy", 0.0).values(r.tok_log_probs()[0]) for _, _, r in full])
    rule = RetrievalSkip("entropy", float(ent.median()))  # about half skipped
    retriever.skip = rule
    retriever.reset_counters()
    skipped_rows = rows_of(model, task, retriever)
    n_skipped = 0
    for (_, _, a), (_, _, b) in zip(full, skipped_rows):
        mask = rule.mask(a.tok_log_probs()[0])
        n_skipped += int(mask.sum())
        assert torch.equal(b.ext_scores[0][mask], torch.full_like(b.ext_scores[0][mask], float("-inf")))
        # the searched queries find the same neighbours (a smaller batch may round the scores
        # differently in the last bits)
        torch.testing.assert_close(b.ext_scores[0][~mask], a.ext_scores[0][~mask], rtol=0, atol=1e-4)
        assert torch.equal(b.ext_labels[0][~mask], a.ext_labels[0][~mask])
        # what trime-tune simulates is what the retriever returns
        sim = a.skip_external(mask.unsqueeze(0))
        torch.testing.assert_close(sim.ext_scores, b.ext_scores, rtol=0, atol=1e-4)
        assert torch.equal(sim.ext_labels, b.ext_labels)
        no_ext = replace(a, ext_scores=None, ext_labels=None)
        for name, comb in combiners().items():
            got, searched = comb.log_probs(b)[0], comb.log_probs(a)[0]
            if name.startswith("knn"):  # kNN-LM without neighbours: the model's (or model + cache) distribution
                cache = comb.cache
                want = (a.tok_log_probs() if cache is None else cache.log_probs(a))[0]
            else:  # TRIME ext without neighbours: TRIME over local memory only (published P': no P')
                want = comb.log_probs(no_ext)[0]
            torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(got[~mask], searched[~mask], rtol=0, atol=1e-5, msg=name)
            tgt = comb.target_log_prob(b)[0]
            torch.testing.assert_close(tgt, got.gather(-1, b.target[0].unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-5)
    total = sum(r.target.numel() for _, _, r in full)
    assert 0 < n_skipped < total
    c = retriever.counters()
    assert (c["queries"], c["skipped"], c["searched"]) == (total, n_skipped, total - n_skipped)
    assert c["skipped_share"] == pytest.approx(n_skipped / total)


def test_knn_lm_skipped_rows_are_bit_identical_to_the_model(datastore):
    """kNN-LM without neighbours keeps the model's log-probabilities as they are."""
    from trime_fairseq.memory.combiners import KnnCombiner

    model, task, retriever = loaded(datastore)
    retriever.skip = RetrievalSkip("max-prob", 0.0)  # every query skipped
    for _, _, row in rows_of(model, task, retriever, n_blocks=2):
        assert torch.equal(KnnCombiner(0.3, 2.0).log_probs(row), row.tok_log_probs())
    assert retriever.counters()["skipped_share"] == 1.0


@pytest.mark.parametrize("rule", [None, RetrievalSkip("entropy", 0.0), RetrievalSkip("max-prob", 1.0)])
def test_never_skip_thresholds_are_bit_identical_to_always_search(datastore, rule):
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.memory.combiners import KnnCombiner
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    model, task, retriever = loaded(datastore)
    pad = task.dictionary.pad()
    blocks = StreamBlocks(task.stream("valid"), task.args.tokens_per_sample, 32, pad)
    sample = blocks.collater([blocks[i] for i in range(4)])
    out = []
    for skip in (None, rule):
        retriever.skip = skip
        wrapped = MemoryEvalModel(model, KnnCombiner(0.3, 2.0), pad, retriever=retriever)
        with torch.no_grad():
            out.append(wrapped.get_normalized_probs(wrapped(**sample["net_input"]), True, sample))
        s = wrapped.summary()
        assert s["skipped"] == 0 and s["queries"] > 0
        assert all(v > 0 for v in s["time_s"].values())
    assert torch.equal(out[0], out[1])


def test_eval_lm_logs_the_split_and_equals_tune(datastore):
    """fairseq-eval-lm with the rule logs the share skipped and the time split, and its
    perplexity is trime-tune's for that threshold (tune skips by simulation, eval for real)."""
    data, ckpt, out = datastore
    common = [str(data), "--path", str(ckpt), "--user-dir", USER_DIR, "--task", "trime_lm", "--gen-subset", "valid",
              *EV, "--datastore", str(out), "--knn-k", "16"]
    sweep = run_cli(["trime_fairseq.cli.tune", *common, "--combiner", "knn", "--grid", "lambda=0.3",
                     "temperature=2", "skip_threshold=0,2.5", "--retrieval-skip-feature", "entropy"])
    found = re.findall(r"M=0\s+ppl ([0-9.]+)\s+searches skipped\s+([0-9.]+)%", sweep.stderr)
    assert len(found) == 4, sweep.stderr[-3000:]  # none, two thresholds, always-search
    (_, zero), (t_ppl, t_share), (a_ppl, _) = found[1], found[2], found[3]
    assert float(zero) == 0.0 and float(found[1][0]) == float(a_ppl)
    assert 0 < float(t_share) < 100
    assert "skips" in sweep.stderr or "no threshold within" in sweep.stderr
    proc = run_cli(["fairseq_cli.eval_lm", *common, "--eval-combiner", "knn", "--knn-lambda", "0.3",
                    "--knn-temperature", "2", "--retrieval-skip-feature", "entropy",
                    "--retrieval-skip-threshold", "2.5"])
    m = re.search(r"datastore searches skipped: ([0-9,]+) of ([0-9,]+) \(([0-9.]+)%", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert float(m.group(3)) == pytest.approx(float(t_share), abs=0.11)
    assert re.search(r"time split: model [0-9.]+s \([0-9]+%\), search [0-9.]+s", proc.stderr)
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", proc.stderr).group(1))
    assert ppl == pytest.approx(float(t_ppl), rel=1e-3)


def test_tune_choice_is_the_largest_skip_within_the_tolerance():
    from trime_fairseq.cli.tune import choose_skip, with_always_search

    grid = with_always_search([{"lambda": 0.3, "skip_threshold": t} for t in (1.0, 2.0, 3.0)])
    assert grid[-1] == {"lambda": 0.3}
    rows = [{"combiner": "none", "params": {}, "ppl": 30.0, "skipped": 0.0}]
    for p, ppl, share in zip(grid, (10.01, 10.09, 10.5, 10.0), (0.2, 0.4, 0.7, 0.0)):
        rows.append({"combiner": "knn", "params": dict(p, memory_size=0), "ppl": ppl, "skipped": share})
    (choice,) = choose_skip(rows, 0.01)
    assert choice["always_search_ppl"] == 10.0
    assert choice["chosen"]["params"]["skip_threshold"] == 2.0


# ----------------------------------------------------------------------------- translation: the same path


def test_knn_mt_skips_through_the_same_retriever(tiny_mt):
    from trime_fairseq.cli.tune import load

    data, ckpt, stores = tiny_mt
    flags = ["--mt-combiner", "knn", "--datastore", str(stores["l2"]), "--knn-k", "8", "--knn-lambda", "0.4",
             "--knn-temperature", "7"]

    def step(*extra):
        _, wrapped, task = load([str(data), "--path", str(ckpt), "--task", "trime_translation", "--cpu",
                                 *flags, *extra])
        task.load_dataset("test")
        ds = task.dataset("test")
        sample = ds.collater([ds[i] for i in range(4)])
        wrapped.eval()
        with torch.no_grad():
            net_output = wrapped(**sample["net_input"])
            lp = wrapped.get_normalized_probs(net_output, log_probs=True)
        return lp, torch.log_softmax(net_output[0].float(), -1), wrapped.retriever.counters()

    everywhere, model_lp, counters = step()
    assert counters["skipped"] == 0 and counters["queries"] == model_lp[..., 0].numel()
    top = model_lp.max(-1).values.exp()
    threshold = float(top.median())
    half, _, counters = step("--retrieval-skip-feature", "max-prob", "--retrieval-skip-threshold", str(threshold))
    skipped = top > threshold
    assert 0 < int(skipped.sum()) < skipped.numel()
    assert counters["skipped"] == int(skipped.sum())
    torch.testing.assert_close(half[skipped], model_lp[skipped], rtol=0, atol=1e-6)
    assert not torch.equal(half[skipped], everywhere[skipped])
    # the searched steps: the same neighbours (the search of a smaller batch may round differently)
    torch.testing.assert_close(half[~skipped], everywhere[~skipped], rtol=0, atol=1e-5)


def test_fairseq_generate_logs_the_split_and_the_share_skipped(tiny_mt):
    data, ckpt, stores = tiny_mt
    proc = run_cli(["fairseq_cli.generate", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
                    "--path", str(ckpt), "--gen-subset", "test", "--beam", "2", "--cpu", "--mt-combiner", "knn",
                    "--datastore", str(stores["l2"]), "--knn-k", "8", "--knn-lambda", "0.4",
                    "--retrieval-skip-feature", "max-prob", "--retrieval-skip-threshold", "0.3"])
    out = proc.stdout + proc.stderr
    assert len(re.findall(r"^H-\d+\t", proc.stdout, flags=re.M)) == 12
    m = re.search(r"decoding with memory: time split: search [0-9.]+s \([0-9]+%\), combine [0-9.]+s \([0-9]+%\); "
                  r"datastore searches skipped: ([0-9,]+) of ([0-9,]+) \([0-9.]+%; skip search where max-prob > 0.3\)",
                  out)
    assert m, out[-3000:]
    assert 0 < int(m.group(2).replace(",", ""))
