"""TRIMELM_ext ablation: what the in-batch memory holds (BM25 batching options) and which
P' Appendix F uses, each measured on valid against kNN-LM / TRIMELM at the same budget.

Every model has the same number of updates (``--max-update``) of the same number of tokens
(16 x 512 or 8 x 1024). For each TRIMELM_ext variant: its model alone, and TRIMELM_ext
(local + external memory) tuned on valid over τ, the retrieved entries' own temperature
τ_ext (``--ext-temperature``; 0 in the grid = τ, the paper's single temperature), λ, τ' and
both P' variants (``--memory-distribution``: ``ext-raw`` = published, ``all-scaled`` = ours
before).
Datastores hold the first ``1/--datastore-fraction`` of the training tokens (shard 0 of
``trime-build-datastore --num-shards``), to fit the budget; the kNN-LM reference uses the
same subset.

    python examples/external_memory_ablation.py --data runs/corpus/bin --run-dir runs/abl
    # parallel lanes share the run directory; a final call without --only writes the table
    python examples/external_memory_ablation.py ... --only ext_base,ext_xdoc

Writes ``RUN/ablation.json`` and ``RUN/ablation.md`` (``--out X`` copies the JSON to ``X.json``).
"""
import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("external_memory_ablation")

OFF = ["--bm25-grow", "heap", "--bm25-exclude-same-doc", "off", "--bm25-max-jaccard", "2"]
MODEL_ALONE = ["--model-alone-weight", "1"]
BM25_FLAGS = ("--bm25-",)  # the variant flags that shape the batches (the rest are loss flags)
#: the one batching flag without a value: BM25 groups the unpadded stream segments
STREAM = "--memory-across-documents"


def flag_pairs(flags: list) -> Tuple[List[tuple], bool]:
    """A variant's ``(flag, value)`` pairs, and whether it batches the stream (:data:`STREAM`)."""
    rest = [f for f in flags if f != STREAM]
    return list(zip(rest[::2], rest[1::2])), len(rest) < len(flags)


def variants(jaccard: float) -> Dict[str, dict]:
    """name -> (description, BM25 flags, segment length, segments per batch)."""
    return {
        "ext_base": ("heap, no exclusion (before this change)", OFF, 512, 16),
        "ext_xdoc": ("+ same-document exclusion", [*OFF, "--bm25-exclude-same-doc", "on"], 512, 16),
        "ext_dedup": (f"+ near-duplicate exclusion (5-gram J >= {jaccard:g})",
                      [*OFF, "--bm25-max-jaccard", jaccard], 512, 16),
        "ext_chain": ("chain growth instead of heap", [*OFF, "--bm25-grow", "chain"], 512, 16),
        "ext_long": ("8 segments of 1024 (heap, no exclusion)", OFF, 1024, 8),
        "ext_stream": ("unpadded stream segments (heap, no exclusion; --memory-across-documents, as the "
                       "reference)", [*OFF, STREAM], 512, 16),
        "ext_all": ("chain + same-document + near-duplicate exclusion",
                    [*OFF, "--bm25-grow", "chain", "--bm25-exclude-same-doc", "on", "--bm25-max-jaccard", jaccard],
                    512, 16),
        "ext_xdoc_dedup": ("heap + same-document + near-duplicate exclusion",
                           [*OFF, "--bm25-exclude-same-doc", "on", "--bm25-max-jaccard", jaccard], 512, 16),
        # not batching: the loss (--model-alone-weight of trime_loss) and a cap on memory per query
        "ext_ce": ("+ model-alone CE in the loss (weight 1)", [*OFF, *MODEL_ALONE], 512, 16),
        "ext_topk": ("+ top-32 memory entries per query", [*OFF, "--memory-top-k", 32], 512, 16),
        "ext_xdoc_ce": ("+ same-document exclusion + model-alone CE (weight 1)",
                        [*OFF, "--bm25-exclude-same-doc", "on", *MODEL_ALONE], 512, 16),
    }


def batchings(var: Dict[str, tuple]) -> List[str]:
    """The variants that batch differently: the first of those with the same BM25 flags,
    segment length and batch size (loss-only variants share their batches)."""
    seen, out = set(), []
    for name, (_, flags, length, bsz) in var.items():
        pairs, stream = flag_pairs(flags)
        key = (tuple(str(f) for pair in pairs if str(pair[0]).startswith(BM25_FLAGS) for f in pair),
               stream, length, bsz)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/ext_ablation", tokens_per_sample=512, max_update=120)
    p.add_argument("--drop-local-prob", type=float, default=0.9, help="p of §4.3")
    p.add_argument("--jaccard", type=float, default=0.5, help="near-duplicate threshold of the dedup variants")
    p.add_argument("--knn-k", type=int, default=256, help="neighbours retrieved")
    p.add_argument("--datastore-fraction", type=int, default=4, help="datastores hold 1/N of train (shard 0 of N; 1 = all of train)")
    p.add_argument("--valid-docs", type=int, default=None,
                   help="score valid on its first N documents only (a data folder with the same train "
                   "and dictionary is made in RUN/data); default: all of valid")
    p.add_argument("--no-ext-eval", action="store_true",
                   help="train and score the models alone and with local memory only (no datastore); "
                   "a later run without this flag adds the external-memory scores")
    p.add_argument("--report", action="store_true",
                   help="only write the table from what earlier runs finished (trains and scores nothing)")
    p.add_argument("--only", default=None, help="comma-separated models to run (default: all, then the table)")
    p.add_argument("--out", default=None, help="also copy the results to OUT.json (e.g. docs/results/external_memory_ablation)")
    return p.parse_args(argv)


def valid_subset(data: Path, docs: int, out: Path, logs: Path) -> Path:
    """``out``: ``data`` with valid cut to its first ``docs`` documents (train, test and the
    dictionary are links to ``data``'s)."""
    if (out / "valid.bin").exists():
        return out
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    from trime_fairseq.data.stream import TokenStream

    d = Dictionary.load(str(data / "dict.txt"))
    stream = TokenStream.from_lines(data_utils.load_indexed_dataset(str(data / "valid"), d), d.eos())
    if docs >= stream.num_docs:
        raise SystemExit(f"error: --valid-docs {docs}: valid has only {stream.num_docs} documents")
    end = int(stream.doc_starts[docs])
    text = []
    for tok in np.split(stream.ids(0, end), np.flatnonzero(stream.ids(0, end) == d.eos()) + 1):
        if len(tok):
            text.append(d.string(tok[:-1]))  # a document break is an empty line
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "valid_subset.txt").write_text("\n".join(text) + "\n")
    ex.run_logged("fairseq_cli.preprocess", ["--only-source", "--srcdict", data / "dict.txt", "--validpref",
                                              tmp / "valid_subset.txt", "--destdir", tmp, "--workers", 1],
                  logs / "valid_subset.log")
    for split in ("train", "test"):
        for ext in ("bin", "idx"):
            (tmp / f"{split}.{ext}").symlink_to((data / f"{split}.{ext}").resolve())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def last_train_stats(log: Path) -> Dict[str, float]:
    """Joint (TRIME) and token-only CE ppl of the last logged training interval."""
    rows = [json.loads(l.split("|")[-1]) for l in log.read_text().splitlines() if "| train_inner |" in l]
    if not rows:
        return {}
    r = rows[-1]
    return {k: float(r[k]) for k in ("ppl", "ce_ppl") if k in r}


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, warm = ex.start_run(a)
    if a.valid_docs:
        data = valid_subset(data, a.valid_docs, run / "data", logs)
    warm = ["--ce-warmup-updates", warm]
    var = variants(a.jaccard)
    models = ["vanilla", "trime", *var]
    only = a.only.split(",") if a.only else models
    unknown = set(only) - set(models)
    if unknown:
        raise SystemExit(f"error: --only: unknown models {sorted(unknown)}; choose from {models}")
    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)
    valid = [*ev, "--gen-subset", "valid"]
    ckpt = {m: run / "ckpt" / m / "checkpoint_last.pt" for m in models}

    def train(name: str) -> dict:
        if name in ("vanilla", "trime"):
            crit = ["--criterion", "cross_entropy"] if name == "vanilla" else ["--criterion", "trime_loss", *warm]
            args = [*common, "--max-tokens", 16 * a.tokens_per_sample, *crit]
        else:
            _, flags, length, bsz = var[name]
            args = [*common, "--tokens-per-sample", length, "--batch-size", bsz, "--criterion", "trime_loss", *warm,
                    "--bm25-batching", "--drop-local-prob", a.drop_local_prob, "--bm25-cache-dir", run, *flags]
        out = ex.train(data, run / "ckpt" / name, args, logs / f"train_{name}.log")
        return dict(out, **last_train_stats(logs / f"train_{name}.log"))

    def datastore(name: str, metric: str) -> Path:
        out = run / "ds" / name
        if a.datastore_fraction == 1:
            if not (out / "index.json").exists():
                ex.run_logged("trime_fairseq.cli.build_datastore",
                              [data, "--path", ckpt[name], "--gen-subset", "train", "--out", out, "--metric", metric,
                               "--recall-k", a.knn_k, "--recall-queries", 200, "--overwrite", *ev],
                              logs / f"ds_{name}.log")
            return out
        shard = Path(f"{out}.shard0")
        if not (shard / "index.json").exists():
            ex.run_logged("trime_fairseq.cli.build_datastore",
                          [data, "--path", ckpt[name], "--gen-subset", "train", "--out", out, "--metric", metric,
                           "--num-shards", a.datastore_fraction, "--shard-id", 0, *ev], logs / f"ds_{name}.log")
            ex.run_logged("trime_fairseq.cli.build_datastore",
                          [data, "--path", ckpt[name], "--out", shard, "--metric", metric, "--index-only",
                           "--recall-k", a.knn_k, "--recall-queries", 200, *ev], logs / f"index_{name}.log")
        return shard

    def composition(name: str) -> dict:
        """Same-document and near-duplicate batch mates in the variant's (cached) batches."""
        from argparse import Namespace

        from trime_fairseq.cli.near_dups import split_segments_with_docs
        from trime_fairseq.data.near_dup import batch_composition, ngram_sets
        from trime_fairseq.tasks.memory_flags import BM25BatchingConfig, bm25_segments_name, cached_bm25_batches

        _, flags, length, bsz = var[name]
        pairs, stream = flag_pairs(flags)
        opts = {f.lstrip("-").replace("-", "_"): v for f, v in pairs if f.startswith(BM25_FLAGS)}
        defaults = BM25BatchingConfig()
        ns = Namespace(**{k: getattr(defaults, k) for k in defaults.__dataclass_fields__})
        ns.bm25_cache_dir = str(run)
        for k, v in opts.items():
            setattr(ns, k, float(v) if k == "bm25_max_jaccard" else v)
        segs, docs = split_segments_with_docs(str(data), "train", length, across_documents=stream)
        batches = cached_bm25_batches(ns, segs, bsz, a.seed, str(run), bm25_segments_name("train", length, stream),
                                      docs=docs)
        return batch_composition(batches, docs, ngram_sets(segs, 5))

    if a.report:
        return report(a, run, var, finished(run, logs, models, composition), hygiene(a, run),
                      {name: composition(name) for name in batchings(var)})

    results: Dict[str, dict] = {}
    for name in only:
        info = {"train": train(name)}
        if name.startswith("ext_"):
            info["composition"] = composition(name)
            logger.info("%s batches: %s", name, info["composition"])
        if name == "vanilla":
            info["cache"] = ex.tune(data, ckpt[name], "cache", ["lambda=0.1,0.2,0.3", "theta=0.1,0.2,0.3"], valid,
                                    run / f"tune_{name}_cache.json", logs / f"tune_{name}_cache.log")
            if not a.no_ext_eval:
                theta = info["cache"]["best"]["params"]["theta"]
                info["ext"] = ex.tune(data, ckpt[name], "knn", ["lambda=0.2,0.3,0.4,0.5", "temperature=1,3,10",
                                                                "cache_lambda=0,0.2,0.3", f"cache_theta={theta}"],
                                      [*valid, "--datastore", datastore(name, "l2"), "--knn-k", a.knn_k],
                                      run / f"tune_{name}.json", logs / f"tune_{name}.log")
        elif name == "trime":
            info["local"] = ex.tune(data, ckpt[name], "trime", ["tau=0.9,1,1.1,1.25"], valid,
                                    run / f"tune_{name}.json", logs / f"tune_{name}.log")
        else:
            info["local"] = ex.tune(data, ckpt[name], "trime", ["tau=0.75,1,1.25,1.5"], valid,
                                    run / f"tune_{name}_local.json", logs / f"tune_{name}_local.log")
            if not a.no_ext_eval:
                info["ext"] = ex.tune(
                    data, ckpt[name], "trime",
                    ["tau=1,1.5,2,3", "ext_tau=0,2,3,4", "memory_lambda=0,0.1,0.3", "memory_tau=1,3,10.5,30",
                     "pprime=0,1"],
                    [*valid, "--eval-memory", "local+ext", "--datastore", datastore(name, "ip"), "--knn-k", a.knn_k],
                    run / f"tune_{name}.json", logs / f"tune_{name}.log")
        results[name] = info
        first = info.get("local") or info["cache"]
        logger.info("%s: model alone %.2f, local/cache %.2f, external %s", name, first["rows"][0]["ppl"],
                    first["best"]["ppl"], f"{info['ext']['best']['ppl']:.2f}" if "ext" in info else "not run")
    if a.only:
        return results
    return report(a, run, var, results, hygiene(a, run), {name: composition(name) for name in batchings(var)})


def hygiene(a, run: Path) -> dict:
    """Valid/test segments (L = --tokens-per-sample) with a near-duplicate in train, on the
    whole corpus (``trime-near-dups``); per-segment lists dropped."""
    from trime_fairseq.cli.near_dups import main as near_dups

    data = a.data or str(run / "corpus" / "bin")
    out = near_dups([data, "--tokens-per-sample", str(a.tokens_per_sample), "--thresholds", "0.1,0.3,0.5,0.8",
                     "--out", str(run / "near_dups.json")])
    for s in out["splits"].values():
        s.pop("best"), s.pop("best_train_segment")
    return out


def finished(run: Path, logs: Path, models: List[str], composition) -> Dict[str, dict]:
    """What earlier runs left in ``run``: per model whose training and first scoring finished,
    the same record as a run computes."""
    out: Dict[str, dict] = {}
    for name in models:
        done = run / "ckpt" / name / "train_done.json"
        first = run / (f"tune_{name}_cache.json" if name == "vanilla" else
                       f"tune_{name}.json" if name == "trime" else f"tune_{name}_local.json")
        if not (done.exists() and first.exists()):
            logger.info("%s: not finished, left out of the table", name)
            continue
        info = {"train": dict(json.loads(done.read_text()), **last_train_stats(logs / f"train_{name}.log"))}
        info["cache" if name == "vanilla" else "local"] = json.loads(first.read_text())
        ext = run / f"tune_{name}.json"
        if name != "trime" and ext.exists():
            info["ext"] = json.loads(ext.read_text())
        if name.startswith("ext_"):
            info["composition"] = composition(name)
        out[name] = info
    return out


def report(a, run: Path, var: Dict[str, tuple], results: Dict[str, dict], near: dict, batches: Dict[str, dict]) -> dict:
    rows = []
    missing = {"cache": {"rows": [None], "best": None}, "local": {"rows": [None], "best": None}, "train": {}}
    v, t = results.get("vanilla", missing), results.get("trime", missing)

    def ext_best(info: dict, **fixed):
        return ex.best_point(info["ext"]["rows"], **fixed) if "ext" in info else None

    knn, knn_cache = ext_best(v, cache_lambda=0), ext_best(v)
    refs = [
        ("vanilla", "Transformer (vanilla)", v["cache"]["rows"][0], v["train"]),
        ("cache", "+ continuous cache", v["cache"]["best"], v["train"]),
        ("knnlm", "kNN-LM", knn, v["train"]),
        ("knnlm_cache", "kNN-LM + continuous cache", knn_cache, v["train"]),
        ("trimelm_nomem", "TRIMELM, model alone", t["local"]["rows"][0], t["train"]),
        ("trimelm", "TRIMELM (local memory)", t["local"]["best"], t["train"]),
    ]
    for key, system, best, tr in refs:
        if best is None:
            continue
        rows.append({"key": key, "system": system, "valid_ppl": best["ppl"] if best else None,
                     "params": best["params"] if best else None,
                     "train_ppl": tr.get("ppl"), "train_ce_ppl": tr.get("ce_ppl")})
    for name, (desc, flags, length, bsz) in var.items():
        if name not in results:
            continue
        r = results[name]
        one_tau = ext_best(r, memory_lambda=0, own_ext_tau=False)
        nolam = ext_best(r, memory_lambda=0, own_ext_tau=True)
        pub, ours = ext_best(r, pprime=0), ext_best(r, pprime=1)
        pub_one, ours_one = ext_best(r, pprime=0, own_ext_tau=False), ext_best(r, pprime=1, own_ext_tau=False)
        comp = r.get("composition", {})
        rows.append({
            "key": name, "system": f"TRIMELM_ext: {desc}", "segments": f"{bsz} x {length}",
            "flags": " ".join(map(str, flags)),
            "model_alone_valid_ppl": r["local"]["rows"][0]["ppl"],
            "local_valid_ppl": r["local"]["best"]["ppl"],
            "valid_ppl": min(pub["ppl"], ours["ppl"]) if pub else None,
            "valid_ppl_one_tau": one_tau["ppl"] if one_tau else None,
            "params_one_tau": one_tau["params"] if one_tau else None,
            "valid_ppl_no_pprime": nolam["ppl"] if nolam else None,
            "params_no_pprime": nolam["params"] if nolam else None,
            "valid_ppl_pprime_published_one_tau": pub_one["ppl"] if pub_one else None,
            "valid_ppl_pprime_all_scaled_one_tau": ours_one["ppl"] if ours_one else None,
            "valid_ppl_pprime_published": pub["ppl"] if pub else None,
            "params_pprime_published": pub["params"] if pub else None,
            "valid_ppl_pprime_all_scaled": ours["ppl"] if ours else None,
            "params_pprime_all_scaled": ours["params"] if ours else None,
            "train_ppl": r["train"].get("ppl"), "train_ce_ppl": r["train"].get("ce_ppl"),
            "same_doc_mate": comp.get("with_same_doc_mate"),
            "near_dup_mate_0.3": comp.get("with_near_dup_mate", {}).get("0.3"),
        })
    cols = ["system", "segments", "same_doc_mate", "near_dup_mate_0.3", "train_ppl", "train_ce_ppl",
            "model_alone_valid_ppl", "local_valid_ppl", "valid_ppl_one_tau", "valid_ppl_pprime_published_one_tau",
            "valid_ppl_pprime_all_scaled_one_tau", "valid_ppl_no_pprime", "valid_ppl_pprime_published",
            "valid_ppl_pprime_all_scaled"]
    heads = ["model", "batch", "segments with a same-doc mate", "with a J≥0.3 mate", "train ppl (joint)",
             "train CE ppl", "model alone", "local memory", "local+ext, one τ, λ=0", "one τ, P' published",
             "one τ, P' all-scaled", "local+ext, τ_ext, λ=0", "τ_ext, P' published", "τ_ext, P' all-scaled"]
    shown = [{k: ("—" if v is None else v) for k, v in r.items()} for r in rows]
    table_ext = ex.markdown_table([r for r in shown if r["key"].startswith("ext_")], cols, heads)
    table_ref = ex.markdown_table([r for r in shown if not r["key"].startswith("ext_")],
                                  ["system", "valid_ppl", "train_ppl", "train_ce_ppl"],
                                  ["model", "valid ppl", "train ppl", "train CE ppl"])
    md = (f"Budget: {a.max_update} updates of {16 * a.tokens_per_sample} tokens per model; valid = "
          f"{'the first %d documents of valid' % a.valid_docs if a.valid_docs else 'all of valid'}; datastores of "
          f"1/{a.datastore_fraction} of train; K={a.knn_k}; valid ppl from trime-tune.\n\n{table_ref}\n\n{table_ext}\n")
    lines = ["| split | segments | " + " | ".join(f"J ≥ {t}" for t in near["splits"]["valid"]["thresholds"]) + " |",
             "|---|---:|" + "---:|" * len(near["splits"]["valid"]["thresholds"])]
    for split, st in near["splits"].items():
        lines.append(f"| {split} | {st['segments']} | " + " | ".join(
            f"{v['segments']} ({100 * v['fraction']:.1f}%)" for v in st["thresholds"].values()) + " |")
    md += "\nValid/test segments with a near-duplicate in train (token 5-gram Jaccard):\n\n" + "\n".join(lines) + "\n"
    comp_rows = [{"system": var[n][0], "segments": f"{var[n][3]} x {var[n][2]}", "same": c["with_same_doc_mate"],
                  **{f"j{t}": v for t, v in c["with_near_dup_mate"].items()}, "mean": c["mean_best_jaccard"]}
                 for n, c in batches.items()]
    md += "\nWhat the training batches hold (share of segments with such a batch mate; all of train):\n\n" + \
        ex.markdown_table(comp_rows, ["system", "segments", "same", "j0.3", "j0.5", "j0.8", "mean"],
                          ["batching", "batch", "same document", "J ≥ 0.3", "J ≥ 0.5", "J ≥ 0.8",
                           "mean best J"]) + "\n"
    result = {"args": vars(a), "rows": rows, "near_duplicates": near, "batch_composition": batches,
              "results": results}
    ex.write_results(run / "ablation.json", result, md)
    if a.out:  # the JSON beside a results page (the page itself is written by hand around the tables)
        shutil.copyfile(run / "ablation.json", a.out + ".json")
    logger.info("\n%s", md)
    return result


if __name__ == "__main__":
    main()
