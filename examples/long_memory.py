"""TRIMELM_long vs. TRIMELM vs. the continuous cache extended to long-term memory.

Cf. the paper's Table 3 and Figure 3. Three models of one architecture, one budget:

* vanilla (``cross_entropy``), evaluated alone, with a local cache and with a long cache;
* TRIMELM (``trime_loss``, random segments, local memory);
* TRIMELM_long (``trime_loss --consecutive-segments m``: m consecutive segments of a
  document per batch, so training memory reaches back m·L tokens).

Short segments (L=128 by default) leave room for memory beyond attention. Memory sizes
and temperatures are tuned on valid (one pass per model with ``trime-tune
--memory-sizes``, whose ppl equal fairseq-eval-lm's, tested), test perplexities come
from ``fairseq-eval-lm``. Outputs in RUN:
``results.md/json``, ``memory_sweep.png`` (valid ppl vs. memory size) and ``results.png``.

    python examples/long_memory.py --run-dir runs/long
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trime_fairseq.cli import experiment as ex  # noqa: E402
from trime_fairseq.cli.tune import plot_memory_sweep  # noqa: E402

logger = logging.getLogger("long_memory")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/long", tokens_per_sample=128, eval_tokens_per_sample=128, context_window=64)
    p.add_argument("--batch-size", type=int, default=64, help="segments per update")
    p.add_argument("--consecutive-segments", type=int, default=16, help="m for TRIMELM_long")
    p.add_argument("--memory-sizes", default="0,500,1000,2000,4000,8000,12000",
                   help="long-term memory sizes swept on valid")
    p.add_argument("--tau-grid", default="0.75,1,1.5,2", help="TRIME temperatures tried")
    p.add_argument("--cache-lambda-grid", default="0.05,0.1,0.2", help="cache λ tried")
    p.add_argument("--cache-theta-grid", default="0.02,0.05,0.1", help="cache θ tried")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, warm = ex.start_run(a)
    common = [*common, "--batch-size", a.batch_size]
    warm = ["--ce-warmup-updates", warm]
    models = {
        "vanilla": [*common, "--criterion", "cross_entropy"],
        "trime": [*common, "--criterion", "trime_loss", *warm],
        "trime_long": [*common, "--criterion", "trime_loss", *warm,
                       "--consecutive-segments", a.consecutive_segments],
    }
    trained = {k: ex.train(data, run / "ckpt" / k, v, logs / f"train_{k}.log") for k, v in models.items()}
    ckpt = {k: run / "ckpt" / k / "checkpoint_last.pt" for k in models}
    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)
    max_size = max(int(s) for s in a.memory_sizes.split(","))
    sweep_args = [*ev, "--gen-subset", "valid", "--memory-sizes", a.memory_sizes]
    sweeps = {
        "vanilla": ex.tune(data, ckpt["vanilla"], "cache", [f"lambda={a.cache_lambda_grid}", f"theta={a.cache_theta_grid}"],
                           sweep_args, run / "sweep_vanilla_cache.json", logs / "sweep_vanilla_cache.log"),
        "trime": ex.tune(data, ckpt["trime"], "trime", [f"tau={a.tau_grid}"], sweep_args,
                         run / "sweep_trime.json", logs / "sweep_trime.log"),
        "trime_long": ex.tune(data, ckpt["trime_long"], "trime", [f"tau={a.tau_grid}"], sweep_args,
                              run / "sweep_trime_long.json", logs / "sweep_trime_long.log"),
    }

    def best(name, local_only=False):
        rows = [r for r in sweeps[name]["rows"][1:] if not local_only or r["memory_size"] == 0]
        return min(rows, key=lambda r: r["ppl"])

    def best_curve(name, label):
        """For the figure: the best setting's ppl at every memory size."""
        settings = {json.dumps({k: v for k, v in r["params"].items() if k != "memory_size"})
                    for r in sweeps[name]["rows"][1:]}
        curves = []
        for s in settings:
            pts = [r for r in sweeps[name]["rows"][1:]
                   if json.dumps({k: v for k, v in r["params"].items() if k != "memory_size"}) == s]
            curves.append(pts)
        chosen = min(curves, key=lambda pts: min(p["ppl"] for p in pts))
        return [dict(r, label=label) for r in chosen]

    curve_rows = best_curve("vanilla", "vanilla + cache") + best_curve("trime", "TRIMELM") + \
        best_curve("trime_long", "TRIMELM_long")
    plot_memory_sweep(curve_rows, str(run / "memory_sweep.png"), "valid perplexity vs. long-term memory size")

    def flags(name, row):
        p = row["params"]
        mem = ["--eval-memory", "local+long", "--long-memory-size", p["memory_size"]] if p["memory_size"] > 0 else []
        if name == "vanilla":
            return ["--eval-combiner", "cache", "--cache-lambda", p["lambda"], "--cache-theta", p["theta"], *mem]
        return ["--eval-combiner", "trime", "--eval-temperature", p["tau"], *mem]

    def chosen(name, local_only=False):
        row = best(name, local_only)
        return flags(name, row), row["ppl"]

    configs = [  # (name, model, fairseq-eval-lm flags, valid ppl from the sweep)
        ("Transformer (vanilla)", "vanilla", [], sweeps["vanilla"]["rows"][0]["ppl"]),
        ("+ continuous cache (local)", "vanilla", *chosen("vanilla", local_only=True)),
        ("+ continuous cache* (long)", "vanilla", *chosen("vanilla")),
        ("TRIMELM (local)", "trime", *chosen("trime", local_only=True)),
        ("TRIMELM (+long)", "trime", *chosen("trime")),
        ("TRIMELM_long (local)", "trime_long", *chosen("trime_long", local_only=True)),
        ("TRIMELM_long (+long)", "trime_long", *chosen("trime_long")),
    ]
    rows = []
    for name, model, fl, valid_ppl in configs:
        tag = name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p").replace("*", "")
        r = ex.eval_lm(data, ckpt[model], [*ev, *fl, "--gen-subset", "test"], logs / f"eval_{tag}_test.log")
        row = {"system": name, "flags": " ".join(map(str, fl)), "train_tokens_per_s": trained[model]["train_tokens_per_s"],
               "valid_ppl": valid_ppl, "test_ppl": r["ppl"], "test_eval_tokens_per_s": r["tokens_per_s"]}
        rows.append(row)
        logger.info("%s: valid %.2f test %.2f (%s)", name, row["valid_ppl"], row["test_ppl"], row["flags"])
    table = ex.markdown_table(rows, ["system", "valid_ppl", "test_ppl", "test_eval_tokens_per_s", "flags"],
                              ["model", "valid ppl", "test ppl", "eval tokens/s", "fairseq-eval-lm flags"])
    header = (
        f"# Long-term memory (cf. TRIME Table 3 / Figure 3)\n\n"
        f"Corpus `{data}`; `{a.arch}`, L={a.tokens_per_sample}, {a.batch_size} segments per update, "
        f"{a.max_update} updates per model; TRIMELM_long: m={a.consecutive_segments}. Eval blocks of "
        f"{a.eval_tokens_per_sample} with a {a.context_window}-token context window; memory sizes "
        f"({a.memory_sizes}) and temperatures tuned on valid (max {max_size}).\n\n"
    )
    result = {"args": vars(a), "rows": rows, "train": trained, "sweeps": sweeps}
    ex.write_results(run / "results.json", result, header + table)
    ex.bar_plot(rows, run / "results.png", "Long-term memory")
    logger.info("\n%s%s", header, table)
    return result


if __name__ == "__main__":
    main()
