"""Memorizing Transformer vs. TRIMELM_long at equal size, data, budget and memory.

* Memorizing Transformer: ``--arch memorizing_transformer_lm_small`` (the kNN-augmented
  layer at 3/4 depth), trained with ``--stream-batching`` and a ``--train-memory``-token
  memory; evaluated with memory sizes set by ``--model-overrides``.
* TRIMELM_long: ``transformer_lm_trime_small`` with ``trime_loss --consecutive-segments m``,
  evaluated with ``--eval-memory local+long`` of the same sizes (``trime-tune
  --memory-sizes``, one pass). Reuses the long-memory example's checkpoint with ``--reuse``.

Writes ``results.md/json`` (ppl per memory size on valid and test) and ``memory_sweep.png``.

    python examples/memorizing_vs_trime.py --run-dir runs/memorizing --reuse runs/long
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402
from trime_fairseq.cli.tune import plot_memory_sweep  # noqa: E402

logger = logging.getLogger("memorizing_vs_trime")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/memorizing", tokens_per_sample=128, eval_tokens_per_sample=128, context_window=64)
    p.add_argument("--reuse", default=None, help="run directory of examples/long_memory.py (corpus, TRIMELM_long)")
    p.add_argument("--batch-size", type=int, default=64, help="segments (rows) per update")
    p.add_argument("--consecutive-segments", type=int, default=16, help="m for TRIMELM_long")
    p.add_argument("--train-memory", type=int, default=2048, help="Memorizing Transformer memory while training")
    p.add_argument("--memory-sizes", default="0,500,1000,2000,4000,8000", help="memory sizes evaluated")
    p.add_argument("--tau", type=float, default=1.0, help="TRIME temperature at test")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, warm = ex.start_run(a)
    src = Path(a.reuse) if a.reuse else run
    common = [*common, "--batch-size", a.batch_size]
    trime_dir = src / "ckpt" / "trime_long"
    if not (trime_dir / "train_done.json").exists():
        trime_dir = run / "ckpt" / "trime_long"
    trained = {
        "trime_long": ex.train(data, trime_dir, [*common, "--criterion", "trime_loss", "--ce-warmup-updates", warm,
                                                "--consecutive-segments", a.consecutive_segments],
                               logs / "train_trime_long.log"),
        "memorizing": ex.train(data, run / "ckpt" / "memorizing",
                               [*common, "--arch", a.arch.replace("transformer_lm_trime", "memorizing_transformer_lm"),
                                "--criterion", "cross_entropy", "--stream-batching", "--memorizing-memory-size", a.train_memory],
                               logs / "train_memorizing.log"),
    }
    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)
    sizes = [int(s) for s in a.memory_sizes.split(",")]
    rows = []
    for subset in ("valid", "test"):
        sweep = ex.tune(data, trime_dir / "checkpoint_last.pt", "trime", [f"tau={a.tau}"],
                        [*ev, "--gen-subset", subset, "--memory-sizes", a.memory_sizes],
                        run / f"sweep_trime_{subset}.json", logs / f"sweep_trime_{subset}.log")
        for r in sweep["rows"][1:]:
            rows.append({"model": "TRIMELM_long", "subset": subset, "memory_size": r["memory_size"], "ppl": r["ppl"]})
        for size in sizes:
            r = ex.eval_lm(data, run / "ckpt" / "memorizing" / "checkpoint_last.pt",
                           [*ev, "--gen-subset", subset, "--model-overrides", f"{{'memorizing_memory_size': {size}}}"],
                           logs / f"eval_memorizing_{size}_{subset}.log")
            rows.append({"model": "Memorizing Transformer", "subset": subset, "memory_size": size, "ppl": r["ppl"],
                         "eval_tokens_per_s": r["tokens_per_s"]})
    table_rows = []
    for model in ("Memorizing Transformer", "TRIMELM_long"):
        for size in sizes:
            cell = {"model": model, "memory_size": size}
            for r in rows:
                if r["model"] == model and r["memory_size"] == size:
                    cell[f"{r['subset']}_ppl"] = r["ppl"]
            table_rows.append(cell)
    table = ex.markdown_table(table_rows, ["model", "memory_size", "valid_ppl", "test_ppl"],
                              ["model", "memory (tokens)", "valid ppl", "test ppl"])
    ratio = trained["memorizing"]["train_tokens_per_s"] / max(trained["trime_long"]["train_tokens_per_s"], 1e-9)
    header = (f"# Memorizing Transformer vs. TRIMELM_long (equal size, data and budget)\n\nCorpus `{data}`; "
              f"`{a.arch}`-sized models, L={a.tokens_per_sample}, {a.batch_size} rows, {a.max_update} updates; "
              f"Memorizing Transformer trained with a {a.train_memory}-token memory at "
              f"{trained['memorizing']['train_tokens_per_s']:.0f} tokens/s ({ratio:.2f}x TRIMELM_long's).\n\n")
    plot_memory_sweep([dict(r, label=r["model"]) for r in rows if r["subset"] == "valid"],
                      str(run / "memory_sweep.png"), "valid perplexity vs. memory size")
    ex.write_results(run / "results.json", {"args": vars(a), "rows": rows, "train": trained}, header + table)
    logger.info("\n%s%s", header, table)
    return {"rows": rows}


if __name__ == "__main__":
    main()
