"""The example pipelines run end to end at toy size (the real runs are long; see README)."""
import json

import pytest

from helpers import REPO, run_cli

TINY = ["--arch", "transformer_lm_trime_tiny", "--max-update", "4", "--tokens-per-sample", "32",
        "--eval-tokens-per-sample", "32", "--context-window", "16"]


def run_example(name, *args):
    return run_cli([f"examples.{name}", *args])


@pytest.fixture(scope="module")
def corpus(tiny_lm):
    return tiny_lm[0]


def test_lm_examples_main_job_then_external_memory_then_its_ablation(corpus, tmp_path):
    """Three example pipelines end to end in one run directory, each model trained once:
    the main job; external_memory reusing its vanilla and TRIMELM models; the ablation
    reusing both and the kNN-LM datastore, in lanes (with and without datastores), then
    its table from what finished."""
    run = tmp_path / "lm"
    run_example("main_job", "--run-dir", str(run), "--data", str(corpus), *TINY, "--max-tokens", "256",
                "--warmup-updates", "2", "--tau-grid", "1,2", "--cache-lambda-grid", "0.1",
                "--cache-theta-grid", "0.1")
    result = json.loads((run / "results.json").read_text())
    names = [r["system"] for r in result["rows"]]
    assert names[0].startswith("Transformer") and any(n.startswith("TRIMELM (") for n in names)
    assert all(r["valid_ppl"] > 1 and r["test_ppl"] > 1 for r in result["rows"])
    assert (run / "results.png").stat().st_size > 1000
    assert "| model |" in (run / "results.md").read_text()
    page = json.loads((run / "inspect" / "trime_valid_doc4.json").read_text())
    assert page["meta"]["combiner"].startswith("trime(") and page["summary"]["tokens"] > 0
    assert (run / "inspect" / "trime_valid_doc4.html").exists()

    trained = {m: (run / "ckpt" / m / "train_done.json").stat().st_mtime_ns for m in ("vanilla", "trime")}
    run_example("external_memory", "--run-dir", str(run), "--data", str(corpus), *TINY, "--batch-size", "8",
                "--knn-k", "8", "--long-memory-size", "64", "--ext-flags", "--bm25-exclude-same-doc on",
                "--out", str(tmp_path / "page"))
    assert {m: (run / "ckpt" / m / "train_done.json").stat().st_mtime_ns for m in trained} == trained  # reused
    result = json.loads((run / "results.json").read_text())
    assert [r["system"] for r in result["rows"]][2] == "kNN-LM"
    assert [r["key"] for r in result["rows"]] == [
        "vanilla", "cache", "knnlm", "knnlm_cache", "trimelm_nomem", "trimelm", "trimelm_ext_nomem",
        "trimelm_ext_nolong", "trimelm_ext"]
    assert all(r["valid_ppl"] > 1 and r["test_ppl"] > 1 for r in result["rows"])
    assert result["index"]["vanilla"]["metric"] == "l2" and result["index"]["trime_ext"]["metric"] == "ip"
    assert json.loads((tmp_path / "page.json").read_text())["rows"] == result["rows"]
    assert list(run.glob("bm25_train_*_xdoc.npz"))  # the option reached the training run

    args = ["--run-dir", str(run), "--data", str(corpus), *TINY, "--knn-k", "8", "--datastore-fraction", "1",
            "--out", str(tmp_path / "abl")]
    run_example("external_memory_ablation", *args, "--only", "vanilla,ext_all")
    run_example("external_memory_ablation", *args, "--only", "trime,ext_base,ext_xdoc,ext_ce,ext_stream",
                "--no-ext-eval")
    run_example("external_memory_ablation", *args, "--report")
    result = json.loads((tmp_path / "abl.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"vanilla", "cache", "knnlm", "knnlm_cache", "trimelm_nomem", "trimelm", "ext_base",
                         "ext_xdoc", "ext_ce", "ext_all", "ext_stream"}
    for r in rows.values():
        assert r["valid_ppl"] is None or r["valid_ppl"] > 1
    assert rows["ext_all"]["model_alone_valid_ppl"] > 1 and rows["ext_all"]["valid_ppl_pprime_published"] > 1
    assert rows["ext_base"]["valid_ppl"] is None and rows["ext_ce"]["local_valid_ppl"] > 1  # no datastore lane
    assert "--model-alone-weight" in rows["ext_ce"]["flags"]
    comp = result["batch_composition"]
    assert comp["ext_xdoc"]["with_same_doc_mate"] <= comp["ext_base"]["with_same_doc_mate"]
    assert "ext_ce" not in comp  # a loss-only variant batches as ext_base does
    assert "ext_stream" in comp and list(run.glob("bm25_train_L*_stream_*.npz"))  # stream segments, own batches
    assert rows["ext_stream"]["local_valid_ppl"] > 1
    assert "| model |" in (run / "ablation.md").read_text()


@pytest.mark.slow
def test_long_memory_examples_table_then_figure3_then_memorizing_vs_trime(corpus, tmp_path):
    """long_memory's table, then its Figure 3 (adding the Memorizing Transformer) and
    memorizing_vs_trime in the same run directory, each model trained once."""
    run = tmp_path / "long"
    run_example("long_memory", "--run-dir", str(run), "--data", str(corpus), *TINY, "--batch-size", "8",
                "--consecutive-segments", "4", "--memory-sizes", "0,100", "--tau-grid", "1",
                "--cache-lambda-grid", "0.1", "--cache-theta-grid", "0.1")
    result = json.loads((run / "results.json").read_text())
    assert len(result["rows"]) == 7
    assert (run / "memory_sweep.png").exists()
    # the valid ppl in the table come from trime-tune's sweep: fairseq-eval-lm gives the same
    row = next(r for r in result["rows"] if r["system"] == "TRIMELM_long (+long)")
    assert "--long-memory-size" in row["flags"]
    out = run_cli(["fairseq_cli.eval_lm", str(corpus), "--path", str(run / "ckpt" / "trime_long" / "checkpoint_last.pt"),
                   "--user-dir", str(REPO / "trime_fairseq"), "--task", "trime_lm", "--tokens-per-sample", "32",
                   "--context-window", "16", "--max-tokens", "4096", "--cpu", "--gen-subset", "valid",
                   *row["flags"].split()])
    assert float(out.stderr.split("Perplexity: ")[-1].split()[0]) == pytest.approx(row["valid_ppl"], rel=1e-3)

    fig = tmp_path / "figure3"
    run_example("long_memory", "--run-dir", str(run), "--data", str(corpus), *TINY, "--batch-size", "8",
                "--consecutive-segments", "4", "--memory-sizes", "0,50,100", "--tau-grid", "1,2",
                "--cache-lambda-grid", "0.1", "--cache-theta-grid", "0.1", "--memorizing", "--train-memory", "64",
                "--memorizing-sizes", "0,100", "--test-from", "sweep", "--parallel", "2", "--across-documents",
                "--more-consecutive-segments", "2", "--long-top-k-grid", "0,4", "--distance-analysis",
                "--figure3", str(fig))
    result = json.loads(fig.with_suffix(".json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"trimelm_long", "trimelm", "cache_long", "memorizing", "trimelm_long_stream",
                         "trimelm_long_m2", "trimelm_long_topk"}
    # another training memory: its own model, trained with its own m
    assert "'consecutive_segments': 2," in (run / "logs" / "train_trime_long_m2.log").read_text()
    # memory by distance for the TRIME rows at the largest size (buckets at the memory sizes below it)
    for key in ("trimelm_long", "trimelm", "trimelm_long_m2", "trimelm_long_stream", "trimelm_long_topk"):
        dist = rows[key]["memory_by_distance"]
        assert [d["memory"] for d in dist] == ["local", "0-50", ">=50"]
        assert all(0 <= d["on_target"] <= d["mass"] < 1 for d in dist) and dist[0]["mass"] > 0
    assert "memory_by_distance" not in rows["cache_long"]
    assert "| TRIMELM_long | local |" in fig.with_suffix(".md").read_text()
    # the same model read with the stream's memory: equal with local memory only, its own flag beyond
    stream, per_doc = rows["trimelm_long_stream"], rows["trimelm_long"]
    # (the same sums over differently laid-out, masked memories: equal up to float rounding)
    assert stream["valid_ppl"][0] == pytest.approx(per_doc["valid_ppl"][0], rel=1e-6)
    assert all("--memory-across-documents" in f for f in stream["flags"][1:])
    assert not any("--memory-across-documents" in f for f in per_doc["flags"])
    # top-k long-term memory: k chosen with τ per size among 0 (all) and 4; with k = 0 in the
    # grid it can only match or beat the plain row on valid, and its flags name the k chosen
    top = rows["trimelm_long_topk"]
    assert all(t <= p * (1 + 1e-9) for t, p in zip(top["valid_ppl"], per_doc["valid_ppl"]))
    assert top["valid_ppl"][0] == pytest.approx(per_doc["valid_ppl"][0], rel=1e-9)
    assert all(("--long-memory-top-k 4" in f) == (p["long_k"] == 4)
               for f, p in zip(top["flags"][1:], top["settings"][1:]))
    for r in rows.values():
        assert r["memory_tokens"][0] == 0
        assert len(r["memory_tokens"]) == len(r["valid_ppl"]) == len(r["test_ppl"])
        assert all(p > 1 for p in r["valid_ppl"] + r["test_ppl"])
    assert rows["trimelm"]["memory_tokens"] == [0, 50, 100] and rows["memorizing"]["memory_tokens"] == [0, 100]
    assert len(rows["memorizing"]["gates"]) == 2 and all(0 < g < 1 for g in rows["memorizing"]["gates"])
    # valid ppl at each size is the best over the grid at that size in the valid sweep
    sweep = json.loads((run / "sweep_trime.json").read_text())
    for size, ppl in zip(rows["trimelm"]["memory_tokens"], rows["trimelm"]["valid_ppl"]):
        assert ppl == min(r["ppl"] for r in sweep["rows"][1:] if r["memory_size"] == size)
    # test numbers read from the test sweep equal fairseq-eval-lm's at the largest size
    for key, check in result["test_confirmed_by_fairseq_eval_lm"].items():
        assert check["trime_tune"] == pytest.approx(check["fairseq_eval_lm"], rel=2e-3), key
        assert rows[key]["test_ppl"][-1] == check["trime_tune"]
    assert result["corpus"]["valid"]["documents"] == 16 and result["corpus"]["train"]["documents"] == 24
    stats = result["corpus"]["test"]
    assert stats["min_tokens_per_document"] <= stats["median_tokens_per_document"] <= stats["max_tokens_per_document"]
    assert fig.with_suffix(".png").stat().st_size > 1000 and "| TRIMELM_long | test |" in fig.with_suffix(".md").read_text()

    trained = (run / "ckpt" / "memorizing" / "train_done.json").stat().st_mtime_ns
    run_example("memorizing_vs_trime", "--run-dir", str(run), "--data", str(corpus), *TINY,
                "--batch-size", "8", "--consecutive-segments", "4", "--train-memory", "64", "--memory-sizes", "0,64")
    assert (run / "ckpt" / "memorizing" / "train_done.json").stat().st_mtime_ns == trained  # reused
    result = json.loads((run / "results.json").read_text())
    models = {(r["model"], r["subset"], r["memory_size"]) for r in result["rows"]}
    assert ("Memorizing Transformer", "test", 64) in models and ("TRIMELM_long", "valid", 0) in models
    assert (run / "memory_sweep.png").exists()


def test_tune_is_reused_only_for_the_same_arguments(tmp_path, monkeypatch):
    from examples import harness as ex

    calls = []

    def fake_run(module, argv, log):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        (tmp_path / "sweep.json").write_text(json.dumps({"rows": [], "grid": argv[argv.index("--grid") + 1]}))
        assert out.endswith("sweep.json")

    monkeypatch.setattr(ex, "run_logged", fake_run)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_text("weights")
    args = (tmp_path, ckpt, "trime")
    first = ex.tune(*args, ["tau=1"], ["--gen-subset", "valid"], tmp_path / "sweep.json", tmp_path / "log")
    again = ex.tune(*args, ["tau=1"], ["--gen-subset", "valid"], tmp_path / "sweep.json", tmp_path / "log")
    assert len(calls) == 1 and again == first
    ex.tune(*args, ["tau=2"], ["--gen-subset", "valid"], tmp_path / "sweep.json", tmp_path / "log")
    assert len(calls) == 2  # another grid: rerun
    import os

    os.utime(ckpt, (1, 1))  # another checkpoint: rerun
    ex.tune(*args, ["tau=2"], ["--gen-subset", "valid"], tmp_path / "sweep.json", tmp_path / "log")
    assert len(calls) == 3


def test_parallel_commands_share_the_cores(tmp_path, monkeypatch):
    """run_parallel gives each command cores // workers torch threads (oversubscribed
    commands ran ~3x slower), leaves a single command and the user's own setting alone."""
    from examples import harness as ex

    seen = []

    class FakeCommand:
        returncode, cpu_s = 0, 1.0

        def poll(self):
            return 0

    def fake_start(module, args, log, env):
        seen.append(env.get("OMP_NUM_THREADS"))
        log.write_text("")
        return FakeCommand()

    monkeypatch.setattr(ex.launch, "start", fake_start)
    monkeypatch.setattr(ex.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    job = lambda: ex.run_logged("fairseq_cli.train", [], tmp_path / "log", show=False)  # noqa: E731
    ex.run_parallel({"a": job, "b": job}, 2)
    assert seen == ["2", "2"]
    ex.run_parallel({"a": job}, 2)  # one job: all the cores
    job()  # outside run_parallel: torch's default again
    assert seen[2:] == [None, None]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    ex.run_parallel({"a": job, "b": job}, 4)
    assert seen[4:] == ["3", "3"]  # the user's setting is inherited, not overridden


def test_more_consecutive_segments_than_a_batch_holds_keep_the_training_tokens():
    from argparse import Namespace

    from examples.long_memory import same_tokens_larger_batch

    a = Namespace(batch_size=64, max_update=480, ce_warmup_frac=0.05)
    assert same_tokens_larger_batch(a, 64) == []
    flags = same_tokens_larger_batch(a, 128)
    got = dict(zip(flags[::2], flags[1::2]))
    assert got["--batch-size"] == 128 and got["--max-update"] == 240  # 128 x 240 = 64 x 480 segments
    assert got["--warmup-updates"] == 30 and got["--ce-warmup-updates"] == 12
    assert dict(zip(*[iter(same_tokens_larger_batch(a, 100))] * 2))["--batch-size"] == 128


def test_tool_output_is_reused_only_for_the_same_arguments_and_files(tmp_path, monkeypatch):
    import os

    from examples import harness as ex

    calls = []

    def fake_run(module, argv, log):
        calls.append(argv)
        (tmp_path / "out.json").write_text(json.dumps({"call": len(calls)}))

    monkeypatch.setattr(ex, "run_logged", fake_run)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_text("weights")
    out = tmp_path / "out.json"
    assert ex.run_tool("m", [ckpt, "--grid", "tau=1"], out, tmp_path / "log") == {"call": 1}
    assert ex.run_tool("m", [ckpt, "--grid", "tau=1"], out, tmp_path / "log") == {"call": 1}  # reused
    assert ex.run_tool("m", [ckpt, "--grid", "tau=1,2"], out, tmp_path / "log") == {"call": 2}  # other grid
    os.utime(ckpt, (1, 1))  # another checkpoint
    assert ex.run_tool("m", [ckpt, "--grid", "tau=1,2"], out, tmp_path / "log") == {"call": 3}
    # the output named among the arguments (as the tools take it) is not an input
    assert ex.run_tool("m", [ckpt, "--out", out], out, tmp_path / "log") == {"call": 4}
    assert ex.run_tool("m", [ckpt, "--out", out], out, tmp_path / "log") == {"call": 4}  # reused


def test_generate_is_reused_only_for_the_same_arguments_and_checkpoint(tmp_path, monkeypatch):
    import os

    from examples import harness as ex

    calls = []

    def fake_generate(data, ckpt, args, log):
        calls.append(args)
        return {"hyps": [f"hyp {len(calls)}"], "sentences": 1, "seconds": 1.0, "sentences_per_s": 1.0}

    monkeypatch.setattr(ex, "generate", fake_generate)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_text("weights")
    log = tmp_path / "logs" / "generate_x.log"
    first = ex.cached_generate(tmp_path, ckpt, ["--beam", 5], log)
    again = ex.cached_generate(tmp_path, ckpt, ["--beam", 5], log)
    assert len(calls) == 1 and again["hyps"] == first["hyps"] == ["hyp 1"]
    assert ex.cached_generate(tmp_path, ckpt, ["--beam", 4], log)["hyps"] == ["hyp 2"]  # other flags: rerun
    os.utime(ckpt, (1, 1))  # another checkpoint: rerun
    assert ex.cached_generate(tmp_path, ckpt, ["--beam", 4], log)["hyps"] == ["hyp 3"]


@pytest.mark.slow
def test_trime_mt_max_tokens_matches_the_base_models_batches(tmp_path):
    """examples/translation.py gives TRIME-MT the --max-tokens at which its BM25 batches are
    no more than the base model's length-sorted batches, and 128 tokens less would give more."""
    import argparse
    import sys

    from helpers import write_tiny_parallel

    sys.path.insert(0, str(REPO / "examples"))
    from translation import batches_per_epoch, matched_max_tokens

    data = write_tiny_parallel(tmp_path / "corpus", n_train=400)
    a = argparse.Namespace(arch="transformer_mt_trime_tiny", max_tokens=256, bm25_grouping="length", seed=1)
    found = matched_max_tokens(data, a, tmp_path)
    bm25 = ["--bm25-batching", "--bm25-grouping", "length", "--bm25-cache-dir", tmp_path]
    base = batches_per_epoch(data, a.arch, 256, 1)
    assert batches_per_epoch(data, a.arch, found, 1, bm25) <= base < batches_per_epoch(data, a.arch, found - 128, 1, bm25)
    assert json.loads((tmp_path / "matched_max_tokens.json").read_text())["trime_max_tokens"] == found
    assert matched_max_tokens(data, a, tmp_path) == found  # cached


def test_translation_page_lists_every_trime_mt_recipe_of_the_run_dir(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from translation import recipe_rows

    def result(name, weight, bleu):
        return {"args": {"trime_name": name, "model_alone_weight": weight, "trime_temperature": 10.0},
                "valid_curves": {"trime": [{"updates": 10, "valid_nll": 5.0 - weight}]},
                "rows": [{"key": "base", "domain": "general", "bleu": 1.0},
                         {"key": "trime_mt_nomem", "domain": "general", "bleu": bleu - 1},
                         {"key": "trime_mt", "domain": "general", "bleu": bleu},
                         {"key": "trime_mt", "domain": "in-domain", "bleu": bleu + 1}]}

    (tmp_path / "results.json").write_text(json.dumps(result("trime", 0.0, 10.0)))
    (tmp_path / "results_other.json").write_text(json.dumps(result("other", 1.0, 20.0)))
    rows = recipe_rows(tmp_path, tmp_path / "results_new.json", result("new", 0.5, 30.0))
    assert [r["trime_name"] for r in rows] == ["new", "trime", "other"]  # the current one first
    assert rows[0] == {"trime_name": "new", "valid_nll": 4.5, "recipe": "trime-temperature 10.0, model-alone-weight 0.5",
                       "general_nomem": 29.0, "general": 30.0, "in-domain": 31.0}
    rows = recipe_rows(tmp_path, tmp_path / "results.json", result("trime", 0.0, 10.0))
    assert [r["trime_name"] for r in rows] == ["trime", "other"]  # its own old file is not listed twice


def test_valid_curve_reads_bleu_and_nll_of_each_validation(tmp_path):
    """examples/translation.py's BLEU-against-updates parser: fairseq-train JSON lines of
    label-smoothed CE (nll_loss) and trime_loss (ce_loss = model alone, nll_loss = Eq. 5)."""
    import math
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from translation import valid_curve

    log = tmp_path / "train.log"
    log.write_text(
        '2026 | INFO | train_inner | {"epoch": 1, "loss": "9.1", "num_updates": "50"}\n'
        '2026 | INFO | valid | {"epoch": 1, "valid_loss": "8.5", "valid_nll_loss": "8.0", "valid_bleu": "1.25", '
        '"valid_num_updates": "100"}\n'
        '2026 | INFO | valid | {"epoch": 2, "valid_loss": "6.5", "valid_nll_loss": "6.0", "valid_ce_loss": "7.0", '
        '"valid_bleu": "4.5", "valid_num_updates": "200"}\n')
    points = valid_curve(log)
    assert [p["updates"] for p in points] == [100, 200]
    assert points[0]["valid_bleu"] == 1.25 and points[0]["valid_nll"] == pytest.approx(8.0 * math.log(2))
    assert "valid_trime_nll" not in points[0]
    assert points[1]["valid_nll"] == pytest.approx(7.0 * math.log(2))
    assert points[1]["valid_trime_nll"] == pytest.approx(6.0 * math.log(2))

    from translation import train_tokens_per_update

    inner = '2026 | INFO | train_inner | {"wpb": "%s", "num_updates": "%d"}\n'
    log.write_text(inner % ("100", 50) + inner % ("300", 100))
    assert train_tokens_per_update(log) == 200.0  # mean of the progress lines
    log.write_text(log.read_text() + '2026 | INFO | train | {"train_wpb": "250.5", "train_num_updates": "100"}\n')
    assert train_tokens_per_update(log) == 250.5  # the epoch summary wins


def test_translation_generate_flags_follow_the_tuned_point():
    """The decode flags of a ``trime-tune-mt`` grid point (used for the tuned systems and for
    each value of ``--bleu-lambdas``): Appendix F's flags only where its λ > 0."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from translation import knn_generate_flags, trime_generate_flags

    ds = ["--datastore", "d", "--knn-k", 16]
    assert knn_generate_flags({"lambda": 0.7, "temperature": 10.0}, ds) == [
        "--eval-combiner", "knn", "--knn-lambda", 0.7, "--knn-temperature", 10.0, *ds]
    with_f = trime_generate_flags({"tau": 40.0, "memory_lambda": 0.6, "memory_tau": 3.0}, ds)
    assert with_f[with_f.index("--memory-lambda") + 1] == 0.6 and with_f[with_f.index("--eval-temperature") + 1] == 40.0
    assert "--memory-lambda" not in trime_generate_flags({"tau": 40.0, "memory_lambda": 0.0, "memory_tau": 3.0}, ds)


def test_translation_coordinate_search_tunes_one_setting_at_a_time():
    """``--bleu-lambdas`` then ``--bleu-temperature-factors``: λ is chosen at the starting
    temperature, then the temperature at that λ (first best on ties); every point is scored
    once and reported, so the λ-only and the joint choice are both visible."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from translation import coordinate_search

    calls = []

    def score(p):  # best at lambda 0.7, temperature 20; lambda 0.8 and 0.9 tie, both worse
        calls.append(dict(p))
        return -abs(p["lambda"] - 0.7) * (1 if p["lambda"] < 0.8 else 0) - abs(p["temperature"] - 20) / 100 \
            - (0.5 if p["lambda"] >= 0.8 else 0)

    start = {"lambda": 0.5, "temperature": 10.0, "k": 16}
    steps, scored = coordinate_search(start, [("lambda", [0.5, 0.7, 0.8, 0.9]), ("temperature", [5.0, 10.0, 20.0])],
                                      score)
    assert steps == [{"lambda": 0.7, "temperature": 10.0, "k": 16}, {"lambda": 0.7, "temperature": 20.0, "k": 16}]
    assert [(p["lambda"], p["temperature"]) for p in scored] == [
        (0.5, 10.0), (0.7, 10.0), (0.8, 10.0), (0.9, 10.0), (0.7, 5.0), (0.7, 10.0), (0.7, 20.0)]
    assert all(p["k"] == 16 for p in calls) and len(calls) == 7
    assert scored[-1]["score"] == score({"lambda": 0.7, "temperature": 20.0, "k": 16})
    tie, _ = coordinate_search(start, [("lambda", [0.9, 0.8])], lambda p: 1.0)
    assert tie == [{"lambda": 0.9, "temperature": 10.0, "k": 16}]  # the first of equal scores


def test_translation_bleu_axes_add_eq6_tau_after_the_memory_temperature():
    """``--bleu-tau-factors``: TRIME-MT's temperature step tries Appendix F's τ' and then
    Eq. 6's τ (each its NLL-tuned value times the factors); without
    ``--bleu-temperature-factors`` only λ is searched."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from translation import bleu_axes, coordinate_search

    tp = {"tau": 2.5, "memory_lambda": 0.4, "memory_tau": 3.0}
    axes = bleu_axes(tp, "memory_lambda", "memory_tau", [0.4, 0.6], [0.5, 2], [0.5, 1, 2])
    assert axes == [("memory_lambda", [0.4, 0.6]), ("memory_tau", [1.5, 6.0]), ("tau", [1.25, 2.5, 5.0])]
    assert bleu_axes(tp, "memory_lambda", "memory_tau", [0.4], [], [0.5]) == [("memory_lambda", [0.4])]
    kp = {"lambda": 0.7, "temperature": 10.0}
    assert bleu_axes(kp, "lambda", "temperature", [0.7], [1], ()) == [("lambda", [0.7]), ("temperature", [10.0])]
    steps, _ = coordinate_search(tp, axes, lambda p: -abs(p["tau"] - 1.25) - abs(p["memory_lambda"] - 0.6))
    assert steps[-1] == {"tau": 1.25, "memory_lambda": 0.6, "memory_tau": 1.5}  # τ' ties: the first


def test_paired_bootstrap_separates_a_real_difference_from_none():
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from harness import paired_bootstrap

    refs = [f"the {w} sat on the mat today" for w in ("cat", "dog", "bird", "cow", "fox", "owl")] * 5
    worse = [r.replace("on the", "in a") for r in refs]
    close = [refs[0]] + worse[1:]  # one sentence of 30 better
    small = paired_bootstrap(worse, close, refs, samples=200)
    assert small["system_bleu"] > small["baseline_bleu"] and small["p_value"] > 0.05
    better = paired_bootstrap(worse, refs, refs, samples=200)
    assert better["system_bleu"] == 100.0 and better["p_value"] < 0.05


@pytest.mark.slow
def test_translation_ablation_example(tmp_path):
    """Two variants at toy size: every row has validation BLEU and NLL, and the TRIME-MT
    row also the Eq. 5 NLL with in-batch memory."""
    from helpers import write_tiny_parallel

    data = write_tiny_parallel(tmp_path / "corpus")
    run_example("translation_ablation", "--corpus", str(data.parent), "--run-dir", str(tmp_path / "run"),
                "--results", "none", "--arch", "transformer_mt_trime_tiny", "--max-update", "4",
                "--max-tokens", "400", "--variants", "base,recipe")
    result = json.loads((tmp_path / "run" / "ablation.json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"base", "recipe"}
    assert all(r["updates"] == 4 and r["valid_nll"] > 0 and r["valid_bleu"] >= 0 for r in rows.values())
    assert rows["recipe"]["valid_trime_nll"] > 0 and "valid_trime_nll" not in rows["base"]
    assert all(r["train_tokens_per_update"] > 0 for r in rows.values())
    assert "| variant |" in (tmp_path / "run" / "ablation.md").read_text()


@pytest.mark.slow
def test_adaptive_softmax_ablation_example(corpus, tmp_path):
    """Both training token masses, each scored without memory and with Eq. 6 under both
    masses on a validation subset; the eval flag reaches the scorer (the masses differ)."""
    run_example("adaptive_softmax_ablation", "--run-dir", str(tmp_path), "--data", str(corpus), "--results", "none",
                "--arch", "transformer_lm_trime_wt103_7m", "--cutoff", "10,20", "--max-update", "2",
                "--tokens-per-sample", "32", "--eval-tokens-per-sample", "32", "--context-window", "16",
                "--max-tokens", "256", "--warmup-updates", "1", "--valid-lines", "12")
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["train_mass"]: r for r in result["rows"]}
    assert set(rows) == {"head", "normalised"}
    for r in rows.values():
        assert r["valid_ppl_nomem"] > 1 and r["valid_ppl_head"] > 1 and r["valid_ppl_normalised"] > 1
        assert r["valid_ppl_head"] != pytest.approx(r["valid_ppl_normalised"], rel=1e-6)
    assert (tmp_path / "data_valid12" / "valid.idx").exists()


def test_adaptive_retrieval_example(corpus, tmp_path):
    out = tmp_path / "result"
    run_example("adaptive_retrieval", "--run-dir", str(tmp_path / "run"), "--data", str(corpus),
                "--arch", "transformer_lm_trime_tiny", "--max-update", "2", "--tokens-per-sample", "32",
                "--max-tokens", "256", "--eval-tokens-per-sample", "32", "--context-window", "16",
                "--datastore-shards", "2", "--datastore-max-tokens", "256", "--valid-tokens", "300", "--knn-k", "8", "--lambdas", "0.3",
                "--temperatures", "1", "--skip-shares", "0.2,0.5", "--extra-shares", "0.5", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["system"].split(",")[0].split(" (")[0]: r for r in result["rows"]}
    assert {"Transformer", "kNN-LM"} <= set(rows)
    for r in result["rows"]:
        assert r["valid_ppl"] > 1 and r["tokens_per_s"] > 0 and 0 <= r["skipped"] <= 1
    skipping = [r for r in result["rows"] if "feature" in r]
    assert skipping and any(r["skipped"] > 0 for r in skipping)
    for r in skipping:  # eval-lm's perplexity and share are trime-tune's for the same threshold
        assert r["valid_ppl"] == pytest.approx(r["tune_ppl"], rel=1e-3)
        assert r["skipped"] == pytest.approx(r["tune_skipped"], abs=1e-6)
        assert set(r["time_split_s"]) == {"model", "search", "combine"}
    assert "| system | valid ppl | searches skipped |" in out.with_suffix(".md").read_text()


def test_publish_writes_the_run_and_the_results_page(tmp_path, caplog):
    import logging
    import sys

    sys.path.insert(0, str(REPO))
    from examples import harness as ex

    result = {"rows": [1, 2]}
    with caplog.at_level(logging.INFO):
        outs = ex.publish(result, "# page", tmp_path / "run" / "results.json", str(tmp_path / "docs" / "page"))
    assert outs == [tmp_path / "run" / "results.json", tmp_path / "docs" / "page.json"]
    for out in outs:
        assert json.loads(out.read_text()) == result and out.with_suffix(".md").read_text() == "# page\n"
    assert "# page" in caplog.text
    assert ex.publish(result, "x", tmp_path / "only.json", "none") == [tmp_path / "only.json"]


@pytest.mark.parametrize("name", ["memorizing_param_scale", "knn_param_scale"])
def test_memorizing_params_read_new_and_old_checkpoints(tmp_path, name):
    import math
    import sys

    import torch

    sys.path.insert(0, str(REPO))
    from examples import harness as ex

    state = {"cfg": {"model": {name: 10.0}},
             "model": {"decoder.layers.1.self_attn.mem_gate": torch.tensor([0.0, 0.1]),
                       "decoder.layers.1.self_attn.mem_log_scale": torch.tensor([0.1, 0.0])}}
    torch.save(state, tmp_path / "ckpt.pt")
    params = ex.memorizing_params(tmp_path / "ckpt.pt")
    assert params["gate"] == [0.5, round(1 / (1 + math.exp(-1.0)), 3)]
    assert params["scale"] == [round(math.e, 2), 1.0]


def test_translation_eq6_by_temperature_takes_the_lambda_zero_rows():
    """Eq. 6 alone against τ: only Appendix F's λ = 0 points, the best per τ, τ ascending."""
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    from translation import eq6_by_temperature

    rows = [{"params": {}, "nll": 3.3}]
    for tau, nll in ((10, 3.26), (1.25, 2.92), (2.5, 3.11)):
        rows += [{"params": {"tau": tau, "memory_lambda": 0.0, "memory_tau": t}, "nll": nll + t / 100} for t in (3, 1)]
        rows += [{"params": {"tau": tau, "memory_lambda": 0.4, "memory_tau": 3}, "nll": 2.0}]
    curve = eq6_by_temperature({"rows": rows, "best": {"params": {}, "nll": 2.0}})
    assert [p["tau"] for p in curve] == [1.25, 2.5, 10]
    assert [round(p["valid_nll"], 3) for p in curve] == [2.93, 3.12, 3.27]
