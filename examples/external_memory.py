"""External memory: kNN-LM (± cache) vs. TRIMELM vs. TRIMELM_ext (cf. TRIME Table 2 / Table 12).

Models (one architecture and budget): vanilla (``cross_entropy``), TRIMELM (``trime_loss``)
and TRIMELM_ext (``trime_loss --bm25-batching --drop-local-prob 0.9 --model-alone-weight 1``). Checkpoints of the
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

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("external_memory")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/ext", tokens_per_sample=512)
    p.add_argument("--reuse", default=None, help="run directory of the main job (reuse corpus and checkpoints)")
    p.add_argument("--reuse-as", nargs="*", default=[], metavar="MODEL=NAME",
                   help="with --reuse: checkpoints named differently there, e.g. trime_ext=ext_ce (the "
                   "ablation example's variant trained as this example's TRIMELM_ext)")
    p.add_argument("--batch-size", type=int, default=16, help="segments per update")
    p.add_argument("--drop-local-prob", type=float, default=0.9, help="p of §4.3")
    p.add_argument("--model-alone-weight", type=float, default=1.0,
                   help="TRIMELM_ext's --model-alone-weight (trime_loss): Eq. 5 + w x the model-alone CE, so "
                   "the large BM25 in-batch memory does not leave the model alone degenerate "
                   "(docs/results/external_memory_model_alone.md); 0 = the paper's loss")
    p.add_argument("--knn-k", type=int, default=1024, help="neighbours retrieved")
    p.add_argument("--long-memory-size", type=int, default=4000, help="long memory for TRIMELM_ext (+long)")
    p.add_argument("--ext-batch-size", type=int, default=None,
                   help="segments per TRIMELM_ext batch (default: --batch-size); with "
                   "--ext-tokens-per-sample, fewer and longer segments at the same tokens per update")
    p.add_argument("--ext-tokens-per-sample", type=int, default=None, help="TRIMELM_ext segment length")
    p.add_argument("--ext-flags", default="",
                   help="extra fairseq-train flags of TRIMELM_ext (BM25 batching options, e.g. "
                   "'--bm25-exclude-same-doc on'); the defaults are the task's")
    p.add_argument("--out", default=None, help="also write the results to OUT.json / OUT.md (e.g. docs/results/external_memory)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, warm = ex.start_run(a)
    src = Path(a.reuse) if a.reuse else run
    warm = ["--ce-warmup-updates", warm]
    tokens = ["--max-tokens", a.batch_size * a.tokens_per_sample]
    specs = {
        "vanilla": [*common, *tokens, "--criterion", "cross_entropy"],
        "trime": [*common, *tokens, "--criterion", "trime_loss", *warm],
        "trime_ext": [*common, "--batch-size", a.ext_batch_size or a.batch_size, "--criterion", "trime_loss", *warm,
                      "--bm25-batching", "--drop-local-prob", a.drop_local_prob, "--bm25-cache-dir", run,
                      "--model-alone-weight", a.model_alone_weight,
                      *(["--tokens-per-sample", a.ext_tokens_per_sample] if a.ext_tokens_per_sample else []),
                      *a.ext_flags.split()],
    }
    aliases = dict(item.split("=", 1) for item in a.reuse_as)
    unknown = sorted(set(aliases) - set(specs))
    if unknown:
        raise SystemExit(f"--reuse-as: no model {', '.join(unknown)} here; choose from {', '.join(specs)}")
    ckpt, trained = {}, {}
    for name, args in specs.items():
        reused = src / "ckpt" / aliases.get(name, name)
        if a.reuse and (reused / "train_done.json").exists():
            ckpt[name] = reused / "checkpoint_last.pt"
            trained[name] = json.loads((reused / "train_done.json").read_text())
            continue
        trained[name] = ex.train(data, run / "ckpt" / name, args, logs / f"train_{name}.log")
        ckpt[name] = run / "ckpt" / name / "checkpoint_last.pt"

    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)
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
    # one pass per model and memory set: every grid point reuses the same retrieval
    sweeps = {
        "cache": ex.tune(data, ckpt["vanilla"], "cache", ["lambda=0.1,0.2,0.3,0.4,0.5", "theta=0.05,0.1,0.2,0.3,0.5,1"],
                         valid,
                         run / "tune_cache.json", logs / "tune_cache.log"),
        "trime": ex.tune(data, ckpt["trime"], "trime", ["tau=0.9,1,1.1,1.25"], valid,
                         run / "tune_trime.json", logs / "tune_trime.log"),
    }
    theta = sweeps["cache"]["best"]["params"]["theta"]
    sweeps["knn"] = ex.tune(data, ckpt["vanilla"], "knn", ["lambda=0.2,0.3,0.4,0.5,0.6,0.7,0.8", "temperature=0.3,1,3,10",
                                                          "cache_lambda=0,0.1,0.2,0.3,0.4", f"cache_theta={theta}"],
                            [*valid, *ds_v], run / "tune_knn.json", logs / "tune_knn.log")
    # ext_tau: retrieved entries at their own temperature (0 = tau, Eq. 6 as published);
    # Appendix F: P' over the external neighbours, raw inner product / tau' (published; the
    # paper's tau' is 10.5) -- tau' values for raw similarities, which are sqrt(d) larger
    sweeps["ext"] = ex.tune(data, ckpt["trime_ext"], "trime", ["tau=1,1.1,1.5,2", "ext_tau=0,2,3,4,6",
                                                              "memory_lambda=0,0.1,0.3,0.5", "memory_tau=10.5"],
                            [*valid, *ds_t, "--eval-memory", "local+long+ext", "--long-memory-size", a.long_memory_size,
                             "--memory-sizes", f"0,{a.long_memory_size}"], run / "tune_ext.json", logs / "tune_ext.log")

    def best(name, **fixed):
        return ex.best_point(sweeps[name]["rows"], **fixed)

    def trime_flags(p):
        mem = ["--eval-memory", "local+long+ext", "--long-memory-size", p["memory_size"]] if p.get("memory_size") else []
        lam = ["--memory-lambda", p["memory_lambda"], "--memory-temperature", p["memory_tau"]] if p.get("memory_lambda") else []
        ext_tau = ["--ext-temperature", p["ext_tau"]] if p.get("ext_tau") else []
        return ["--eval-combiner", "trime", "--eval-temperature", p["tau"], *ext_tau, *lam, *mem]

    def knn_flags(p):
        cache = ["--cache-lambda", p["cache_lambda"], "--cache-theta", p["cache_theta"]] if p.get("cache_lambda") else []
        return ["--eval-combiner", "knn", "--knn-lambda", p["lambda"], "--knn-temperature", p["temperature"], *cache, *ds_v]

    vanilla_ppl = sweeps["cache"]["rows"][0]["ppl"]
    configs = [
        ("vanilla", "Transformer (vanilla)", "vanilla", [], vanilla_ppl),
        ("cache", "+ continuous cache", "vanilla",
         ["--eval-combiner", "cache", "--cache-lambda", best("cache")["params"]["lambda"], "--cache-theta", theta],
         best("cache")["ppl"]),
        ("knnlm", "kNN-LM", "vanilla", knn_flags(best("knn", cache_lambda=0)["params"]),
         best("knn", cache_lambda=0)["ppl"]),
        ("knnlm_cache", "kNN-LM + continuous cache", "vanilla", knn_flags(best("knn")["params"]), best("knn")["ppl"]),
        ("trimelm_nomem", "TRIMELM, model alone", "trime", [], sweeps["trime"]["rows"][0]["ppl"]),
        ("trimelm", "TRIMELM", "trime", trime_flags(best("trime")["params"]), best("trime")["ppl"]),
        ("trimelm_ext_nomem", "TRIMELM_ext, model alone", "trime_ext", [], sweeps["ext"]["rows"][0]["ppl"]),
        ("trimelm_ext_nolong", "TRIMELM_ext (w/o M_long)", "trime_ext",
         [*trime_flags(best("ext", memory_size=0)["params"]), "--eval-memory", "local+ext", *ds_t],
         best("ext", memory_size=0)["ppl"]),
        ("trimelm_ext", "TRIMELM_ext", "trime_ext",
         [*trime_flags(best("ext", memory_size=a.long_memory_size)["params"]), *ds_t],
         best("ext", memory_size=a.long_memory_size)["ppl"]),
    ]
    rows = []
    for key, name, model, flags, valid_ppl in configs:
        tag = "".join(c if c.isalnum() else "_" for c in name.lower())
        r = ex.cached_eval(data, ckpt[model], [*ev, *flags, "--gen-subset", "test"], run / "evals" / f"{key}_test.json",
                           logs / f"eval_{tag}_test.log")
        rows.append({"key": key, "system": name, "flags": " ".join(map(str, flags)), "valid_ppl": valid_ppl,
                     "test_ppl": r["ppl"], "test_eval_tokens_per_s": r["tokens_per_s"]})
        logger.info("%s: valid %.2f test %.2f", name, valid_ppl, r["ppl"])
    table = ex.markdown_table(rows, ["system", "valid_ppl", "test_ppl", "test_eval_tokens_per_s"],
                              ["model", "valid ppl", "test ppl", "eval tokens/s"])
    header = (f"# External memory (cf. TRIME Table 2 / 12)\n\nValid ppl from `trime-tune` (equal to "
              f"fairseq-eval-lm's), test ppl from fairseq-eval-lm. Corpus `{data}`; datastores of all "
              f"{index_info['vanilla']['size']:,} training tokens; index recall@{a.knn_k}: "
              + ", ".join(f"{k} {v['factory']} nprobe={v['nprobe']} recall={v['recall']:.3f}" for k, v in index_info.items())
              + "\n\n")
    # TRIMELM_ext with one temperature for every memory entry (Eq. 6 as published) against
    # the retrieved entries at their own (--ext-temperature), per long-memory size
    def ext_best(size, one_tau, **fixed):
        r = ex.best_point(sweeps["ext"]["rows"], own_ext_tau=not one_tau, memory_size=size, **fixed)
        return {"valid_ppl": r["ppl"], "params": r["params"]} if r else None

    temps = {f"long_{size}": {"one_tau_lambda0": ext_best(size, True, memory_lambda=0),
                              "one_tau": ext_best(size, True),
                              "ext_tau_lambda0": ext_best(size, False, memory_lambda=0),
                              "ext_tau": ext_best(size, False)}
             for size in (0, a.long_memory_size)}
    result = {"args": vars(a), "rows": rows, "index": index_info, "train": trained,
              "best": {k: v["best"] for k, v in sweeps.items()}, "ext_temperature": temps}
    ex.bar_plot(rows, run / "results.png", "External memory")
    ex.publish(result, header + table, run / "results.json", a.out, logger)
    return result


if __name__ == "__main__":
    main()
