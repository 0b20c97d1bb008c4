"""Adaptive retrieval for kNN-LM: how many datastore searches can be skipped, and what it costs.

Steps (each reused when its output exists, so a rerun only redoes what is missing):

1. a vanilla LM (``fairseq-train --criterion cross_entropy``, ``--max-update`` updates);
2. a datastore over shard 0 of ``--datastore-shards`` of train (``trime-build-datastore
   --num-shards N --shard-id 0``, then ``--index-only`` with an exact ``Flat`` index);
3. a slice of valid (its first ``--valid-tokens`` tokens, whole lines) binarised beside
   the run with the corpus' own dictionary;
4. ``trime-tune --combiner knn`` on the slice: lambda x temperature, and for each feature
   (``entropy``, ``max-prob``) a grid of ``skip_threshold`` values (the feature's quantiles
   on the slice that skip about ``--skip-shares`` of the searches); trime-tune reports per
   point the perplexity and the share of searches skipped, and per setting the largest
   skip within ``--max-ppl-increase`` of searching every token (chosen on valid only);
5. ``fairseq-eval-lm`` on the slice: vanilla, kNN-LM searching every token, and kNN-LM at
   the chosen thresholds (and a few more): perplexity, share skipped, tokens/s and the time
   split (model / search / combine) that ``fairseq-eval-lm`` logs at its end.

    python examples/adaptive_retrieval.py --data runs/main/corpus/bin --run-dir runs/adaptive \\
        --out docs/results/adaptive_retrieval
"""
import argparse
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("adaptive_retrieval")

_SPLIT = re.compile(r"time split: model ([0-9.]+)s \([0-9]+%\), search ([0-9.]+)s \([0-9]+%\), "
                    r"combine ([0-9.]+)s \([0-9]+%\)(?:; datastore searches skipped: ([0-9,]+) of ([0-9,]+))?")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/adaptive", tokens_per_sample=256, max_update=80, eval_tokens_per_sample=256,
                       context_window=128)
    p.add_argument("--max-tokens", type=int, default=4096, help="training tokens per update")
    p.add_argument("--datastore-shards", type=int, default=10,
                   help="the datastore is shard 0 of this many (contiguous runs of batches of train)")
    p.add_argument("--datastore-max-tokens", type=int, default=8192, help="tokens per batch of the datastore build")
    p.add_argument("--valid-tokens", type=int, default=12000, help="tokens of the valid slice")
    p.add_argument("--knn-k", type=int, default=1024, help="neighbours retrieved")
    p.add_argument("--lambdas", default="0.3,0.45,0.6", help="kNN-LM lambda grid")
    p.add_argument("--temperatures", default="1,3", help="kNN-LM temperature grid")
    p.add_argument("--skip-shares", default="0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6,0.8",
                   help="the skip_threshold grid of each feature: the feature's quantiles on the valid slice "
                   "that skip about these shares of the searches")
    p.add_argument("--max-ppl-increase", type=float, default=0.01, help="tolerance of the skip choice")
    p.add_argument("--extra-shares", default="0.3,0.6",
                   help="also evaluate, per feature, the thresholds whose tuned skip share is nearest these")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = p.parse_args(argv)
    if a.data is None:
        p.error("--data is required (a binarised LM corpus with train and valid)")
    return a


def train_args(a) -> List:
    """The examples' shared training flags; a vanilla model without validation."""
    return [*ex.train_flags(a.arch, a.tokens_per_sample, a.max_update, a.lr, a.seed, max(1, a.max_update // 4)),
            "--criterion", "cross_entropy", "--max-tokens", a.max_tokens, "--disable-validation"]


def eval_args(a) -> List:
    return ["--gen-subset", "valid", "--tokens-per-sample", a.eval_tokens_per_sample,
            "--context-window", a.context_window, "--max-tokens", 4096, "--cpu", "--num-workers", "0"]


def ensure_checkpoint(a, run: Path, data: Path, logs: Path) -> Path:
    ckpt = run / "ckpt" / "checkpoint_last.pt"
    if ckpt.exists():
        logger.info("reusing %s (delete it to retrain)", ckpt)
    else:
        ex.train(data, run / "ckpt", train_args(a), logs / "train.log")
    return ckpt


def ensure_datastore(a, run: Path, data: Path, ckpt: Path, logs: Path) -> Path:
    """Shard 0 of ``--datastore-shards`` of train, with an exact (Flat) inner-product index."""
    out = run / "ds"
    shard = Path(f"{out}.shard0")
    common = [data, "--path", ckpt, "--user-dir", ex.REPO_PKG, "--task", "trime_lm", "--gen-subset", "train",
              "--tokens-per-sample", a.eval_tokens_per_sample, "--context-window", a.context_window,
              "--max-tokens", a.datastore_max_tokens, "--cpu"]
    if not (shard / "meta.json").exists():
        ex.run_logged("trime_fairseq.cli.build_datastore", [*common, "--out", out, "--num-shards", a.datastore_shards,
                                                            "--shard-id", 0], logs / "datastore.log")
    if not (shard / "index.faiss").exists():
        ex.run_logged("trime_fairseq.cli.build_datastore", [*common, "--out", shard, "--index-only", "--index-factory",
                                                            "Flat", "--recall-queries", 100, "--recall-k", a.knn_k],
                      logs / "index.log")
    return shard


def valid_slice(data: Path, out: Path, tokens: int) -> Dict[str, int]:
    """The first whole lines of ``data/valid`` holding at least ``tokens`` tokens, as
    ``out/valid.{bin,idx}`` with ``data``'s dictionary (byte for byte: datastores check it)."""
    import shutil

    from fairseq.data import data_utils, indexed_dataset

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "dict.txt", out / "dict.txt")
    lines = data_utils.load_indexed_dataset(str(data / "valid"), None)
    if not (out / "valid.idx").exists():
        builder = indexed_dataset.make_builder(str(out / "valid.bin.tmp"), impl="mmap", vocab_size=len(
            (data / "dict.txt").read_text().splitlines()) + 4)
        n = 0
        for i in range(len(lines)):
            if n >= tokens:
                break
            builder.add_item(lines[i])
            n += len(lines[i])
        builder.finalize(str(out / "valid.idx.tmp"))
        (out / "valid.bin.tmp").rename(out / "valid.bin")
        (out / "valid.idx.tmp").rename(out / "valid.idx")
    sliced = data_utils.load_indexed_dataset(str(out / "valid"), None)
    return {"lines": len(sliced), "tokens": int(sum(len(sliced[i]) for i in range(len(sliced))))}


def eval_run(data: Path, ckpt: Path, args: List, log: Path) -> dict:
    """``fairseq-eval-lm`` on the slice: perplexity, tokens/s, time split, share skipped
    (kept beside the log and reused while the arguments and the checkpoint are the same)."""
    saved = log.with_suffix(".json")
    key = {"argv": [str(x) for x in [data, ckpt, *args]], "checkpoint_mtime": ckpt.stat().st_mtime, "cpu": 1}
    if saved.exists():
        old = json.loads(saved.read_text())
        if old.get("key") == key:
            logger.info("reusing %s (delete it to rerun)", saved)
            return old["result"]
    # with CPU seconds of the fairseq-eval-lm command: unlike wall-clock tokens/s, not
    # inflated by other jobs sharing the machine (the runs are single-threaded)
    r = ex.eval_lm(data, ckpt, args, log)
    r["load_average"] = os.getloadavg()[0]
    m = _SPLIT.findall(log.read_text())
    if m:
        model, search, combine, skipped, queries = m[-1]
        r["time_split_s"] = {"model": float(model), "search": float(search), "combine": float(combine)}
        if queries:
            r["skipped"] = int(skipped.replace(",", "")) / max(1, int(queries.replace(",", "")))
    r.setdefault("skipped", 0.0)
    r["command"] = " ".join(shlex.quote(str(c)) for c in
                            ["fairseq-eval-lm", data, "--path", ckpt, "--user-dir", "trime_fairseq", "--task",
                             "trime_lm", *args])
    ex.atomic_write(saved, json.dumps({"key": key, "result": r}, indent=2))
    return r


def skip_grids(a, sl: Path, ckpt: Path) -> Dict[str, List[float]]:
    """Per feature, the thresholds that skip about ``--skip-shares`` of the valid slice's
    searches (quantiles of the feature over its scored tokens: one model pass, no search)."""
    import torch

    from trime_fairseq.cli.tune import iter_scored_rows, load
    from trime_fairseq.memory.retriever import SKIP_FEATURES, RetrievalSkip

    cfg, model, task = load([str(sl), "--path", str(ckpt), *map(str, eval_args(a))])
    model.eval()
    pad = task.source_dictionary.pad()
    values: Dict[str, list] = {f: [] for f in SKIP_FEATURES}
    for row in iter_scored_rows(model, task, cfg, representations=()):
        keep = row.target.ne(pad)
        for f in values:
            values[f].append(RetrievalSkip(f, 0.0).values(row.tok_log_probs())[keep])
    shares = [float(x) for x in a.skip_shares.split(",") if x]
    grids = {}
    for f, v in values.items():
        v = torch.cat(v)
        grids[f] = sorted({round(RetrievalSkip.for_share(f, v, s).threshold, 4) for s in shares})
        logger.info("%s on the valid slice: mean %.3f; thresholds %s", f, float(v.mean()), grids[f])
    return grids


def nearest(rows: List[dict], share: float) -> dict:
    return min(rows, key=lambda r: (abs(r["skipped"] - share), r["ppl"]))


def main(argv=None) -> dict:
    a = parse_args(argv)
    ex.setup_logging()
    run, data = Path(a.run_dir), Path(a.data)
    logs = run / "logs"
    ckpt = ensure_checkpoint(a, run, data, logs)
    ds = ensure_datastore(a, run, data, ckpt, logs)
    sl = run / "valid_slice"
    slice_info = valid_slice(data, sl, a.valid_tokens)
    ev = eval_args(a)
    knn = ["--datastore", ds, "--knn-k", a.knn_k]
    tuned = {}
    grids = skip_grids(a, sl, ckpt)
    for i, (feature, thresholds) in enumerate(grids.items()):
        if i == 0:  # lambda x temperature with the first feature's thresholds
            grid = [f"lambda={a.lambdas}", f"temperature={a.temperatures}"]
        else:  # the best lambda / temperature of the first sweep, the other feature's thresholds
            best = tuned["entropy"]["best_always"]["params"]
            grid = [f"lambda={best['lambda']:g}", f"temperature={best['temperature']:g}"]
        tuned[feature] = ex.tune(sl, ckpt, "knn", [*grid, "skip_threshold=" + ",".join(f"{t:g}" for t in thresholds)],
                                 [*ev, *knn, "--retrieval-skip-feature", feature,
                                  "--max-ppl-increase", a.max_ppl_increase],
                                 run / f"tune_{feature}.json", logs / f"tune_{feature}.log")
        always = [r for r in tuned[feature]["rows"][1:] if "skip_threshold" not in r["params"]]
        tuned[feature]["best_always"] = min(always, key=lambda r: r["ppl"])
    best = tuned["entropy"]["best_always"]["params"]
    lam, temp = best["lambda"], best["temperature"]
    knn += ["--eval-combiner", "knn", "--knn-lambda", lam, "--knn-temperature", temp]
    setting = {"lambda": lam, "temperature": temp}

    rows = []
    vanilla = eval_run(sl, ckpt, ev, logs / "eval_vanilla.log")
    rows.append({"system": "Transformer (no datastore)", **vanilla})
    always = eval_run(sl, ckpt, [*ev, *knn], logs / "eval_knn.log")
    rows.append({"system": f"kNN-LM, every token searched (λ={lam:g}, T={temp:g})", **always})
    choices = {}
    for feature, t in tuned.items():
        points = [r for r in t["rows"][1:] if "skip_threshold" in r["params"]
                  and r["params"]["lambda"] == lam and r["params"]["temperature"] == temp]
        choice = next((c for c in t.get("skip_choice", []) if c["setting"]["lambda"] == lam
                       and c["setting"]["temperature"] == temp), None)
        chosen = choice["chosen"] if choice else None
        choices[feature] = chosen["params"]["skip_threshold"] if chosen else None
        picks = ([chosen] if chosen else []) + [nearest(points, float(s)) for s in a.extra_shares.split(",") if s]
        seen = set()
        for p in picks:
            th = p["params"]["skip_threshold"]
            if th in seen:
                continue
            seen.add(th)
            r = eval_run(sl, ckpt, [*ev, *knn, "--retrieval-skip-feature", feature, "--retrieval-skip-threshold", th],
                         logs / f"eval_knn_{feature}_{th:g}.log")
            op = "<" if feature == "entropy" else ">"
            rows.append({"system": f"kNN-LM, skip where {feature} {op} {th:g}" + (" (chosen)" if p is chosen else ""),
                         "feature": feature, "threshold": th, "tune_ppl": p["ppl"], "tune_skipped": p["skipped"],
                         **r})
    for r in rows:
        r["valid_ppl"] = r.pop("ppl")
        r["speed_vs_vanilla"] = r["tokens_per_s"] / vanilla["tokens_per_s"]
        r["speed_vs_always"] = r["tokens_per_s"] / always["tokens_per_s"]
        r["cpu_vs_always"] = r["cpu_s"] / always["cpu_s"]
        split = r.get("time_split_s")
        if split:
            total = sum(split.values())
            r["time_share"] = {k: v / total for k, v in split.items()}
    result = {
        "rows": rows,
        "command": " ".join(shlex.quote(c) for c in ["python", "examples/adaptive_retrieval.py", *map(str, argv
                                                                                                    or sys.argv[1:])]),
        "setting": setting, "chosen_thresholds": choices, "max_ppl_increase": a.max_ppl_increase,
        "skip_grids": grids,
        "train_updates": a.max_update, "arch": a.arch,
        "machine": {"cpus": os.cpu_count(), "eval_cpu_s_total": sum(r["cpu_s"] for r in rows)},
        "valid_slice": slice_info, "datastore": {"path": str(ds), "keys": json.loads((ds / "meta.json").read_text())["size"],
                                                 "index": "Flat (exact)", "k": a.knn_k,
                                                 "fraction_of_train": f"shard 0 of {a.datastore_shards}"},
        "train": {"command": "fairseq-train " + " ".join(shlex.quote(str(c)) for c in [data, *train_args(a)])},
        "tune": {f: {"rows": [r for r in t["rows"] if r["combiner"] != "none"], "skip_choice": t.get("skip_choice")}
                 for f, t in tuned.items()},
    }
    if a.out:
        ex.write_results(Path(a.out + ".json"), result, markdown(result))
    print(json.dumps({r["system"]: {k: r[k] for k in ("valid_ppl", "skipped", "tokens_per_s")} for r in rows}, indent=2))
    return result


def markdown(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        share = r.get("time_share") or {}
        rows.append({**r, "skipped_pct": f"{100 * r['skipped']:.1f}%",
                     "split": " / ".join(f"{100 * share[k]:.0f}%" for k in ("model", "search", "combine"))
                     if share else ""})
    table = ex.markdown_table(rows, ["system", "valid_ppl", "skipped_pct", "tokens_per_s", "speed_vs_always",
                                     "cpu_s", "cpu_vs_always", "split"],
                              ["system", "valid ppl", "searches skipped", "tokens/s (wall)", "× always-search",
                               "CPU s (process)", "CPU × always-search", "model / search / combine (wall)"])
    st = result["setting"]
    curves = []
    for feature, t in result["tune"].items():
        points = [r for r in t["rows"] if r["params"].get("lambda") == st["lambda"]
                  and r["params"].get("temperature") == st["temperature"]]
        always = next(r["ppl"] for r in points if "skip_threshold" not in r["params"])
        for r in sorted(points, key=lambda r: r["skipped"]):
            if "skip_threshold" in r["params"]:
                op = "<" if feature == "entropy" else ">"
                curves.append({"rule": f"{feature} {op} {r['params']['skip_threshold']:g}",
                               "skipped": f"{100 * r['skipped']:.1f}%", "ppl": r["ppl"],
                               "increase": f"{100 * (r['ppl'] / always - 1):+.1f}%"})
    curve = ex.markdown_table(curves, ["rule", "skipped", "ppl", "increase"],
                              ["skip the search where", "searches skipped", "valid ppl (trime-tune)",
                               "vs always-search"])
    chosen = ", ".join(f"{f} {v:g}" if v is not None else f"{f}: none" for f, v in result["chosen_thresholds"].items())
    loads = [r["load_average"] for r in result["rows"] if r.get("load_average")]
    load = (f"1-minute load average {min(loads):.1f}–{max(loads):.1f} at the end of the runs" if loads
            else "their load was not recorded")
    ds, sl, m = result["datastore"], result["valid_slice"], result["machine"]
    return "\n".join([
        "# Adaptive retrieval for kNN-LM: skipping the datastore search where the model is confident",
        "",
        f"kNN-LM (λ={st['lambda']:g}, T={st['temperature']:g}, K={ds['k']}, tuned on the valid slice) over a "
        f"datastore of {ds['keys']:,} training tokens ({ds['fraction_of_train']} of train, {ds['index']} "
        f"index), scored on the first {sl['tokens']:,} tokens of valid ({sl['lines']} lines) with "
        "`fairseq-eval-lm`. Perplexity, share of searches skipped, tokens/s and the time split are what "
        "`fairseq-eval-lm` logs; thresholds were tuned with `trime-tune` on the same valid slice "
        f"(largest skip within {100 * result['max_ppl_increase']:.0f}% of always-search: {chosen}). "
        "No test data was used.",
        "",
        table,
        "",
        "## The trade-off (trime-tune, one retrieval pass, skipping simulated exactly)",
        "",
        curve,
        "",
        "## Budget and caveats",
        "",
        f"* The model is a deliberately small CPU run: `{result['arch']}` trained for {result['train_updates']} "
        f"updates (valid-slice perplexity {result['rows'][0]['valid_ppl']:.0f}). Its "
        "next-token distribution is close to flat (see the thresholds: the entropy quantiles lie within a "
        "fraction of a nat), so its confidence says little about where the datastore helps, and kNN-LM "
        "helps almost everywhere (it halves the perplexity). Whether a trained model's confidence "
        "separates the tokens the datastore fixes better is not measured here: the numbers show the "
        "mechanism, its exactness and its speed, not what a real model gains.",
        f"* Timing: {m['cpus']} CPU cores shared with other jobs ({load}), every run single-threaded "
        "(`OMP_NUM_THREADS=1`) and niced. Wall-clock tokens/s and the time split move with the load (a run "
        "that shared its core can come out slower than one that skipped less); the CPU seconds of each "
        "`fairseq-eval-lm` command (forked from a server that imported fairseq, so without its start-up) "
        "move less, but contention "
        "shows in them too. Each row was run once.",
        f"* CPU spent: the {len(result['rows'])} `fairseq-eval-lm` runs above took "
        f"{m['eval_cpu_s_total'] / 60:.1f} CPU minutes (training, the datastore and the two `trime-tune` "
        "runs are not counted here).",
        "* faiss's exhaustive search of a batch of fewer than ~1000 queries takes a sequential path about "
        "4× slower per query (K=1024); while skipping, the retriever forces its BLAS path for any batch "
        "of ≥ 20 queries, so the search time falls with the share skipped.",
        "",
        "## Command",
        "",
        f"`{result['command']}`",
        "",
        f"Model: `{result['train']['command']}`",
        "",
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
