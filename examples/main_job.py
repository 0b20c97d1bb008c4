"""The main job: vanilla LM vs. vanilla + continuous cache vs. TRIMELM (paper Table 7 style).

Steps (each one a fairseq / trime command, logged under ``RUN/logs``; rerunning reuses
finished steps):

1. build the default corpus (Django + SQLAlchemy documentation, sentencepiece 8k);
2. train a vanilla LM (``cross_entropy``) and a TRIMELM (``trime_loss``, CE warm-up) with
   the same architecture, data order and number of updates;
3. tune on valid: the cache's λ and θ (vanilla model), TRIME's τ (TRIME model);
4. ``fairseq-eval-lm`` on valid and test for every system;
5. write ``results.md``, ``results.json`` and ``results.png``;
6. ``trime-inspect`` the TRIMELM (tuned τ) on one valid document:
   ``inspect/trime_valid_docN.html`` (+ ``.json``), what memory did token by token.

    python examples/main_job.py --run-dir runs/main
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("main_job")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/main", tokens_per_sample=512)
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per update")
    p.add_argument("--warmup-updates", type=int, default=40, help="learning-rate warm-up updates")
    p.add_argument("--tau-grid", default="0.75,0.9,1,1.1,1.25,1.5", help="TRIME temperatures tried on valid")
    p.add_argument("--cache-lambda-grid", default="0.1,0.2,0.3,0.4,0.5", help="cache λ values tried on valid")
    p.add_argument("--cache-theta-grid", default="0.05,0.1,0.2,0.3,0.5", help="cache θ values tried on valid")
    p.add_argument("--inspect-doc", type=int, default=4,
                   help="valid document shown by trime-inspect for the TRIMELM (-1: none)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, warm = ex.start_run(a, a.warmup_updates)
    common = [*common, "--max-tokens", a.max_tokens]
    systems = {}
    systems["vanilla"] = ex.train(data, run / "ckpt" / "vanilla", [*common, "--criterion", "cross_entropy"], logs / "train_vanilla.log")
    systems["trime"] = ex.train(
        data, run / "ckpt" / "trime",
        [*common, "--criterion", "trime_loss", "--ce-warmup-updates", warm], logs / "train_trime.log",
    )
    vanilla_ckpt = run / "ckpt" / "vanilla" / "checkpoint_last.pt"
    trime_ckpt = run / "ckpt" / "trime" / "checkpoint_last.pt"
    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)

    cache_tuned = ex.tune(data, vanilla_ckpt, "cache",
                          [f"lambda={a.cache_lambda_grid}", f"theta={a.cache_theta_grid}"],
                          [*ev, "--gen-subset", "valid"], run / "tune_cache.json", logs / "tune_cache.log")["best"]["params"]
    trime_tuned = ex.tune(data, trime_ckpt, "trime", [f"tau={a.tau_grid}"], [*ev, "--gen-subset", "valid"],
                          run / "tune_trime.json", logs / "tune_trime.log")["best"]["params"]

    configs = [
        ("Transformer (vanilla)", "vanilla", vanilla_ckpt, []),
        (f"+ continuous cache (λ={cache_tuned['lambda']:g}, θ={cache_tuned['theta']:g})", "vanilla", vanilla_ckpt,
         ["--eval-combiner", "cache", "--cache-lambda", cache_tuned["lambda"], "--cache-theta", cache_tuned["theta"]]),
        ("TRIMELM, no memory at test", "trime", trime_ckpt, []),
        (f"TRIMELM (τ={trime_tuned['tau']:g})", "trime", trime_ckpt,
         ["--eval-combiner", "trime", "--eval-temperature", trime_tuned["tau"]]),
    ]
    rows = []
    for name, trained, ckpt, flags in configs:
        row = {"system": name, "train_tokens_per_s": systems[trained]["train_tokens_per_s"]}
        for subset in ("valid", "test"):
            tag = f"{trained}_{'_'.join(map(str, flags)) or 'none'}_{subset}".replace("--", "").replace(" ", "")
            r = ex.eval_lm(data, ckpt, [*ev, *flags, "--gen-subset", subset], logs / f"eval_{tag}.log")
            row[f"{subset}_ppl"] = r["ppl"]
            row[f"{subset}_eval_tokens_per_s"] = r["tokens_per_s"]
        rows.append(row)
        logger.info("%s: valid %.2f test %.2f", name, row["valid_ppl"], row["test_ppl"])

    ce_tps = systems["vanilla"]["train_tokens_per_s"]
    table = ex.markdown_table(
        rows, ["system", "valid_ppl", "test_ppl", "train_tokens_per_s", "test_eval_tokens_per_s"],
        ["model", "valid ppl", "test ppl", "train tokens/s", "eval tokens/s"],
    )
    header = (
        f"# Main job: local memory (cf. TRIME Table 7)\n\n"
        f"Corpus: `{data}`; `{a.arch}`, L={a.tokens_per_sample}, {a.max_update} updates of "
        f"{a.max_tokens} tokens each model; eval blocks of {a.eval_tokens_per_sample} with a "
        f"{a.context_window}-token context window.\n"
        f"trime_loss trained at {systems['trime']['train_tokens_per_s'] / max(ce_tps, 1e-9):.3f}x the tokens/s of cross_entropy.\n\n"
    )
    result = {"args": vars(a), "rows": rows, "train": systems, "tuned": {"cache": cache_tuned, "trime": trime_tuned}}
    ex.write_results(run / "results.json", result, header + table)
    ex.bar_plot(rows, run / "results.png", "Local memory: vanilla / cache / TRIMELM")
    logger.info("\n%s%s\nwritten: %s", header, table, run / "results.md")
    if a.inspect_doc >= 0:  # after the results: they do not depend on it
        page = run / "inspect" / f"trime_valid_doc{a.inspect_doc}.html"
        ex.run_logged("trime_fairseq.cli.inspect", [
            data, "--path", trime_ckpt, "--user-dir", ex.REPO_PKG, "--task", "trime_lm", *ev, "--gen-subset", "valid",
            "--eval-combiner", "trime", "--eval-temperature", trime_tuned["tau"], "--doc", a.inspect_doc,
            "--out", page], logs / "inspect.log")
        logger.info("memory inspected token by token: %s", page)
    return result


if __name__ == "__main__":
    main()
