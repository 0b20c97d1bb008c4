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


def test_main_job_writes_table_json_and_plot(corpus, tmp_path):
    run_example("main_job", "--run-dir", str(tmp_path), "--data", str(corpus), *TINY, "--max-tokens", "256",
                "--warmup-updates", "2", "--tau-grid", "1,2", "--cache-lambda-grid", "0.1",
                "--cache-theta-grid", "0.1")
    result = json.loads((tmp_path / "results.json").read_text())
    names = [r["system"] for r in result["rows"]]
    assert names[0].startswith("Transformer") and any(n.startswith("TRIMELM (") for n in names)
    assert all(r["valid_ppl"] > 1 and r["test_ppl"] > 1 for r in result["rows"])
    assert (tmp_path / "results.png").stat().st_size > 1000
    assert "| model |" in (tmp_path / "results.md").read_text()
    page = json.loads((tmp_path / "inspect" / "trime_valid_doc4.json").read_text())
    assert page["meta"]["combiner"].startswith("trime(") and page["summary"]["tokens"] > 0
    assert (tmp_path / "inspect" / "trime_valid_doc4.html").exists()


def test_long_memory_example(corpus, tmp_path):
    run_example("long_memory", "--run-dir", str(tmp_path), "--data", str(corpus), *TINY, "--batch-size", "8",
                "--consecutive-segments", "4", "--memory-sizes", "0,100", "--tau-grid", "1",
                "--cache-lambda-grid", "0.1", "--cache-theta-grid", "0.1")
    result = json.loads((tmp_path / "results.json").read_text())
    assert len(result["rows"]) == 7
    assert (tmp_path / "memory_sweep.png").exists()
    # the valid ppl in the table come from trime-tune's sweep: fairseq-eval-lm gives the same
    row = next(r for r in result["rows"] if r["system"] == "TRIMELM_long (+long)")
    assert "--long-memory-size" in row["flags"]
    out = run_cli(["fairseq_cli.eval_lm", str(corpus), "--path", str(tmp_path / "ckpt" / "trime_long" / "checkpoint_last.pt"),
                   "--user-dir", str(REPO / "trime_fairseq"), "--task", "trime_lm", "--tokens-per-sample", "32",
                   "--context-window", "16", "--max-tokens", "4096", "--cpu", "--gen-subset", "valid",
                   *row["flags"].split()])
    assert float(out.stderr.split("Perplexity: ")[-1].split()[0]) == pytest.approx(row["valid_ppl"], rel=1e-3)


def test_tune_is_reused_only_for_the_same_arguments(tmp_path, monkeypatch):
    from trime_fairseq.cli import experiment as ex

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


def test_external_memory_example(corpus, tmp_path):
    run_example("external_memory", "--run-dir", str(tmp_path), "--data", str(corpus), *TINY, "--batch-size", "8",
                "--knn-k", "8", "--long-memory-size", "64")
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["system"] for r in result["rows"]][2] == "kNN-LM"
    assert result["index"]["vanilla"]["metric"] == "l2" and result["index"]["trime_ext"]["metric"] == "ip"


def test_memorizing_vs_trime_example(corpus, tmp_path):
    run_example("memorizing_vs_trime", "--run-dir", str(tmp_path), "--data", str(corpus), *TINY,
                "--batch-size", "8", "--consecutive-segments", "4", "--train-memory", "64", "--memory-sizes", "0,64")
    result = json.loads((tmp_path / "results.json").read_text())
    models = {(r["model"], r["subset"], r["memory_size"]) for r in result["rows"]}
    assert ("Memorizing Transformer", "test", 64) in models and ("TRIMELM_long", "valid", 0) in models
    assert (tmp_path / "memory_sweep.png").exists()
