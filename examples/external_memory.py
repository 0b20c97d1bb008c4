"""External memory: kNN-LM (± cache) vs. TRIMELM vs. TRIMELM_ext (cf. TRIME Table 2 / Table 12).

Models (one architecture and budget): vanilla (``cross_entropy``), TRIMELM (``trime_loss``)
and TRIMELM_ext (``trime_loss --bm25-batching --drop-local-prob 0.9``). Checkpoints of the
main job are reused when ``--reuse`` points at its run directory.

For the vanilla model and for TRIMELM_ext a datastore of all training tokens is built
(``trime-build-datastore``: L2 for kNN-LM as in Khandelwal et al., inner product for
TRIME), with an index tuned to recall@1024 >= 0.9. Interpolation weights, temperatures
and memory sizes are tuned on valid with ``trime-tune`` (one retrieval per batch reused
for the whole grid); test numbers come from ``fairseq-eval-lm``.

    python examples/external_memory.py --run-dir runs/ext --reuse runs/main
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trime_fairseq.cli import experiment as ex  # noqa: E402

logger = logging.getLogger("external_memory")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/ext", help="where checkpoints, datastores and results go")
    p.add_argument("--reuse", default=None, help="run directory of the main job (reuse corpus and checkpoints)")
    p.add_argument("--arch", default="transformer_lm_trime_small", help="architecture")
    p.add_argument("--tokens-per-sample", type=int, default=512, help="training segment length")
    p.add_argument("--batch-size", type=int, default=16, help="segments per update")
    p.add_argument("--max-update", type=int, default=320, help="updates per model")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--drop-local-prob", type=float, default=0.9, help="p of §4.3")
    p.add_argument("--eval-tokens-per-sample", type=int, default=512, help="eval block incl. context")
    p.add_argument("--context-window", type=int, default=256, help="eval context window")
    p.add_argument("--knn-k", type=int, default=1024, help="neighbours retrieved")
    p.add_argument("--long-memory-size", type=int, default=4000, help="long memory for TRIMELM_ext (+long)")
    p.add_argument("--seed", type=int, default=1, help="training seed")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    ex.setup_logging()
    a = parse_args(argv)
    run = Path(a.run_dir)
    logs = run / "logs"
    src = Path(a.reuse) if a.reuse else run
    if not (src / "corpus" / "bin" / "dict.txt").exists():
        ex.run_logged("trime_fairseq.cli.prepare_lm", ["--out", src / "corpus"], logs / "prepare.log")
    data = src / "corpus" / "bin"
    common = [
        "--task", "trime_lm", "--arch", a.arch, "--tokens-per-sample", a.tokens_per_sample,
        "--max-update", a.max_update, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", a.lr,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", max(1, a.max_update // 8),
        "--warmup-init-lr", "1e-7", "--clip-norm", "1.0", "--seed", a.seed, "--log-interval", "20",
        "--validate-interval-updates", a.max_update, "--cpu", "--num-workers", "0",
    ]
    warm = ["--ce-warmup-updates", max(1, a.max_update // 20)]
    tokens = ["--max-tokens", a.batch_size * a.tokens_per_sample]
    specs = {
        "vanilla": [*common, *tokens, "--criterion", "cross_entropy"],
        "trime": [*common, *tokens, "--criterion", "trime_loss", *warm],
        "trime_ext": [*common, "--batch-size", a.batch_size, "--criterion", "trime_loss", *warm,
                      "--bm25-batching", "--drop-local-prob", a.drop_local_prob, "--bm25-cache-dir", run],
    }
    ckpt, trained = {}, {}
    for name, args in specs.items():
        reused = src / "ckpt" / name
        if a.reuse and (reused / "train_done.json").exists():
            ckpt[name] = reused / "checkpoint_last.pt"
            trained[name] = json.loads((reused / "train_done.json").read_text())
            continue
        trained[name] = ex.train(data, run / "ckpt" / name, args, logs / f"train_{name}.log")
        ckpt[name] = run / "ckpt" / name / "checkpoint_last.pt"

    ev = ["--tokens-per-sample", a.eval_tokens_per_sample, "--context-window", a.context_window,
          "--max-tokens", 4096, "--cpu", "--num-workers", "0"]
    stores = {"vanilla": ("l2", run / "ds" / "vanilla"), "trime_ext": ("ip", run / "ds" / "trime_ext")}
    for name, (metric, out) in stores.items():
        if not (out / "index.json").exists():
            ex.run_logged("trime_fairseq.cli.build_datastore",
                          [data, "--path", ckpt[name], "--gen-subset", "train", "--out", out, "--metric", metric,
                           "--recall-k", a.knn_k, "--overwrite", *ev], logs / f"datastore_{name}.log")
    index_info = {k: json.loads((v / "index.json").read_text()) for k, (_, v) in stores.items()}

    valid = [*ev, "--gen-subset", "valid"]
    ds_v = ["--datastore", stores["vanilla"][1], "--knn-k", a.knn_k]
    ds_t = ["--datastore", stores["trime_ext"][1], "--knn-k", a.knn_k]
    t_cache = ex.tune(data, ckpt["vanilla"], "cache", ["lambda=0.05,0.1,0.2", "theta=0.02,0.05,0.1"], valid,
                      run / "tune_cache.json", logs / "tune_cache.log")["best"]["params"]
    t_knn = ex.tune(data, ckpt["vanilla"], "knn", ["lambda=0.1,0.2,0.3,0.4", "temperature=1,3,10,30"],
                    [*valid, *ds_v], run / "tune_knn.json", logs / "tune_knn.log")["best"]["params"]
    t_knn_cache = ex.tune(data, ckpt["vanilla"], "knn", [f"lambda={t_knn['lambda']}", f"temperature={t_knn['temperature']}",
                                                        "cache_lambda=0.05,0.1,0.2", f"cache_theta={t_cache['theta']}"],
                          [*valid, *ds_v], run / "tune_knn_cache.json", logs / "tune_knn_cache.log")["best"]["params"]
    t_trime = ex.tune(data, ckpt["trime"], "trime", ["tau=0.75,1,1.5"], valid,
                      run / "tune_trime.json", logs / "tune_trime.log")["best"]["params"]
    t_ext = ex.tune(data, ckpt["trime_ext"], "trime", ["tau=0.75,1,1.5", "memory_lambda=0,0.1,0.3", "memory_tau=1,3"],
                    [*valid, *ds_t, "--eval-memory", "local+ext"], run / "tune_ext.json", logs / "tune_ext.log")["best"]["params"]
    t_ext_long = ex.tune(data, ckpt["trime_ext"], "trime", [f"tau={t_ext['tau']}", f"memory_lambda={t_ext['memory_lambda']}",
                                                            f"memory_tau={t_ext['memory_tau']}"],
                         [*valid, *ds_t, "--eval-memory", "local+long+ext", "--long-memory-size", a.long_memory_size,
                          "--memory-sizes", f"0,{a.long_memory_size // 4},{a.long_memory_size}"],
                         run / "tune_ext_long.json", logs / "tune_ext_long.log")["best"]["params"]

    def cache_flags(p):
        return ["--cache-lambda", p["lambda"], "--cache-theta", p["theta"]]

    def trime_flags(p):
        return ["--eval-combiner", "trime", "--eval-temperature", p["tau"], "--memory-lambda", p.get("memory_lambda", 0),
                *(["--memory-temperature", p["memory_tau"]] if p.get("memory_lambda", 0) else [])]

    knn = ["--eval-combiner", "knn", "--knn-lambda", t_knn["lambda"], "--knn-temperature", t_knn["temperature"], *ds_v]
    configs = [
        ("Transformer (vanilla)", "vanilla", []),
        ("+ continuous cache", "vanilla", ["--eval-combiner", "cache", *cache_flags(t_cache)]),
        ("kNN-LM", "vanilla", knn),
        ("kNN-LM + continuous cache", "vanilla",
         ["--eval-combiner", "knn", "--knn-lambda", t_knn_cache["lambda"], "--knn-temperature", t_knn_cache["temperature"],
          "--cache-lambda", t_knn_cache["cache_lambda"], "--cache-theta", t_knn_cache["cache_theta"], *ds_v]),
        ("TRIMELM", "trime", trime_flags(t_trime)),
        ("TRIMELM_ext (w/o M_long)", "trime_ext", [*trime_flags(t_ext), "--eval-memory", "local+ext", *ds_t]),
    ]
    if t_ext_long.get("memory_size", 0) > 0:
        configs.append(("TRIMELM_ext", "trime_ext", [*trime_flags(t_ext_long), "--eval-memory", "local+long+ext",
                                                     "--long-memory-size", t_ext_long["memory_size"], *ds_t]))
    rows = []
    for name, model, flags in configs:
        row = {"system": name, "flags": " ".join(map(str, flags))}
        for subset in ("valid", "test"):
            tag = "".join(c if c.isalnum() else "_" for c in name.lower())
            r = ex.eval_lm(data, ckpt[model], [*ev, *flags, "--gen-subset", subset], logs / f"eval_{tag}_{subset}.log")
            row[f"{subset}_ppl"], row[f"{subset}_eval_tokens_per_s"] = r["ppl"], r["tokens_per_s"]
        rows.append(row)
        logger.info("%s: valid %.2f test %.2f", name, row["valid_ppl"], row["test_ppl"])
    table = ex.markdown_table(rows, ["system", "valid_ppl", "test_ppl", "test_eval_tokens_per_s"],
                              ["model", "valid ppl", "test ppl", "eval tokens/s"])
    header = (f"# External memory (cf. TRIME Table 2 / 12)\n\nCorpus `{data}`; datastores of all "
              f"{index_info['vanilla']['size']:,} training tokens; index recall@{a.knn_k}: "
              + ", ".join(f"{k} {v['factory']} nprobe={v['nprobe']} recall={v['recall']:.3f}" for k, v in index_info.items())
              + "\n\n")
    result = {"args": vars(a), "rows": rows, "index": index_info, "train": trained,
              "tuned": {"cache": t_cache, "knn": t_knn, "knn_cache": t_knn_cache, "trime": t_trime,
                        "trime_ext": t_ext, "trime_ext_long": t_ext_long}}
    ex.atomic_write(run / "results.md", header + table + "\n")
    ex.atomic_write(run / "results.json", json.dumps(result, indent=2, default=str))
    ex.bar_plot(rows, run / "results.png", "External memory")
    logger.info("\n%s%s", header, table)
    return result


if __name__ == "__main__":
    main()
