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

Figure 3 on long documents (``--figure3 PREFIX``): the corpus is built with ``--source``
(e.g. ``linux-doc``), a Memorizing Transformer is added (``--memorizing``), and for every
memory size the valid ppl at the τ (λ, θ) chosen on valid for that size and the test ppl of
``fairseq-eval-lm`` with those flags go to ``PREFIX.json/.md/.png``, with the corpus
statistics. ``--across-documents`` adds TRIMELM_long read with the stream's memory
(``--memory-across-documents``: not reset at document boundaries)::

    python examples/long_memory.py --run-dir runs/fig3 --source linux-doc --split-frac 0.04 \
        --memorizing --memory-sizes 0,1000,2000,4000,8000,16000 --across-documents --parallel 3 \
        --figure3 docs/results/figure3
"""
import argparse
import json
import logging
import shlex
import statistics
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402
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
    p.add_argument("--source", default=None,
                   help="trime-prepare-lm --source of the corpus built in RUN/corpus (default: its default)")
    p.add_argument("--split-frac", type=float, default=None,
                   help="--valid-frac and --test-frac of the corpus built in RUN/corpus")
    p.add_argument("--memorizing", action="store_true",
                   help="also train a Memorizing Transformer (--stream-batching, --train-memory tokens of "
                        "memory) and evaluate it at every memory size")
    p.add_argument("--train-memory", type=int, default=2048, help="Memorizing Transformer memory while training")
    p.add_argument("--memorizing-flags", default="--memorizing-param-scale 10",
                   help="extra fairseq-train flags of the Memorizing Transformer")
    p.add_argument("--memorizing-sizes", default=None,
                   help="memory sizes at which the Memorizing Transformer is evaluated (one fairseq-eval-lm "
                        "pass each; default: --memory-sizes)")
    p.add_argument("--test-from", choices=("eval-lm", "sweep"), default="eval-lm",
                   help="Figure 3 test ppl of TRIME / cache models: one fairseq-eval-lm run per memory size, or "
                        "one trime-tune pass over test (equal numbers, tested) read at the settings chosen "
                        "on valid, with fairseq-eval-lm confirming the largest size")
    p.add_argument("--eval-docs", type=int, default=0,
                   help="Figure 3 on a budget: evaluate on the N shortest valid and test documents holding at "
                        "least twice the largest memory size (binarised with the corpus dictionary into "
                        "RUN/eval_docs); 0: the whole splits")
    p.add_argument("--parallel", type=int, default=1, help="models trained / evaluations run at once")
    p.add_argument("--across-documents", action="store_true",
                   help="Figure 3 also evaluates TRIMELM_long with --memory-across-documents (the stream's "
                        "memory, not reset at document boundaries) as the row trimelm_long_stream")
    p.add_argument("--more-consecutive-segments", type=int_list, default=[],
                   help="Figure 3 also trains TRIMELM_long with each of these m (comma-separated) and adds "
                        "its curve as the row trimelm_long_m<m>: how the length of the training memory "
                        "(m x L tokens) moves the best test-time memory")
    p.add_argument("--long-top-k-grid", type=int_list, default=[],
                   help="Figure 3 also reads TRIMELM_long with only each query's k most similar long-term "
                        "entries (--long-memory-top-k), k chosen on valid per size among these values "
                        "(comma-separated, with τ), as the row trimelm_long_topk")
    p.add_argument("--distance-analysis", action="store_true",
                   help="Figure 3 also runs trime-analyze on valid for each TRIME row at the largest memory "
                        "size (its chosen τ): the probability mass that local memory and each age of long-term "
                        "memory give per token, and the share of it on the target")
    p.add_argument("--figure3", default=None,
                   help="write Figure 3 to PREFIX.json/.md/.png: valid and test ppl against memory size, "
                        "τ (λ, θ) chosen per size on valid, test from fairseq-eval-lm")
    return p.parse_args(argv)


def eval_documents(corpus: Path, out: Path, n: int, min_tokens: int, logs: Path) -> Path:
    """``out/bin``: the ``n`` shortest documents of valid and test with at least ``min_tokens``
    tokens (lines end in ``</s>``), in corpus order, binarised with the corpus dictionary."""
    from trime_fairseq.prepare.lm import read_fairseq_documents

    if (out / "bin" / "test.idx").exists():
        return out / "bin"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("valid", "test"):
        docs = read_fairseq_documents(corpus / f"{split}.txt")
        sizes = [sum(len(line.split()) + 1 for line in d) for d in docs]
        long_enough = sorted((s, i) for i, s in enumerate(sizes) if s >= min_tokens)[:n]
        if not long_enough:
            raise SystemExit(f"error: no {split} document has {min_tokens} tokens (--eval-docs)")
        keep = sorted(i for _, i in long_enough)
        ex.atomic_write(out / f"{split}.txt", "\n\n".join("\n".join(docs[i]) for i in keep) + "\n")
    ex.run_logged("fairseq_cli.preprocess", ["--only-source", "--srcdict", corpus / "bin" / "dict.txt",
                                             "--validpref", out / "valid.txt", "--testpref", out / "test.txt",
                                             "--destdir", out / "bin", "--workers", 1], logs / "eval_docs.log")
    return out / "bin"


def corpus_statistics(data: Path) -> Dict[str, dict]:
    """Documents and tokens per document (as the model reads them: lines end in ``</s>``)."""
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    from trime_fairseq.data.stream import TokenStream

    d = Dictionary.load(str(data / "dict.txt"))
    stats = {}
    for split in ("train", "valid", "test"):
        if not (data / f"{split}.idx").exists():
            continue
        stream = TokenStream.from_lines(data_utils.load_indexed_dataset(str(data / split), d), d.eos())
        sizes = np.diff(np.concatenate([stream.doc_starts, [len(stream)]])).tolist()
        stats[split] = {"documents": len(sizes), "tokens": int(sum(sizes)),
                        "mean_tokens_per_document": round(statistics.mean(sizes), 1),
                        "median_tokens_per_document": float(statistics.median(sizes)),
                        "min_tokens_per_document": int(min(sizes)), "max_tokens_per_document": int(max(sizes))}
    return stats


def main(argv=None) -> dict:
    a = parse_args(argv)
    prepare = [*(["--source", a.source] if a.source else []),
               *(["--valid-frac", a.split_frac, "--test-frac", a.split_frac] if a.split_frac else [])]
    run, logs, data, common, warm = ex.start_run(a, prepare_args=prepare)
    common = [*common, "--batch-size", a.batch_size]
    warm = ["--ce-warmup-updates", warm]
    models = {
        "vanilla": [*common, "--criterion", "cross_entropy"],
        "trime": [*common, "--criterion", "trime_loss", *warm],
        "trime_long": [*common, "--criterion", "trime_loss", *warm,
                       "--consecutive-segments", a.consecutive_segments],
    }
    for m in a.more_consecutive_segments:
        models[f"trime_long_m{m}"] = [*common, "--criterion", "trime_loss", *warm, "--consecutive-segments", m,
                                      *same_tokens_larger_batch(a, m)]
    if a.memorizing:
        models["memorizing"] = [*common, "--arch", a.arch.replace("transformer_lm_trime", "memorizing_transformer_lm"),
                                "--criterion", "cross_entropy", "--stream-batching",
                                "--memorizing-memory-size", a.train_memory, *shlex.split(a.memorizing_flags)]
    trained = ex.run_parallel({k: (lambda k=k, v=v: ex.train(data, run / "ckpt" / k, v, logs / f"train_{k}.log"))
                               for k, v in models.items()}, a.parallel)
    ckpt = {k: run / "ckpt" / k / "checkpoint_last.pt" for k in models}
    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)
    max_size = max(int(s) for s in a.memory_sizes.split(","))
    if a.figure3:  # its own evaluations only (no table of test runs below)
        return figure3(a, run, logs, data, ckpt, ev, trained)
    if a.eval_docs or a.across_documents or a.more_consecutive_segments or a.long_top_k_grid:
        raise SystemExit("error: --eval-docs, --across-documents, --more-consecutive-segments and --long-top-k-grid "
                         "are for --figure3")
    sweeps = ex.run_parallel(sweep_jobs(a, run, logs, data, ckpt, ev, "valid"), a.parallel)

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
    def tag_of(name):
        return name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p").replace("*", "")

    tests = ex.run_parallel({name: (lambda name=name, model=model, fl=fl: ex.cached_eval(
        data, ckpt[model], [*ev, *fl, "--gen-subset", "test"], run / "evals" / f"{tag_of(name)}_test.json",
        logs / f"eval_{tag_of(name)}_test.log")) for name, model, fl, _ in configs}, a.parallel)
    rows = []
    for name, model, fl, valid_ppl in configs:
        r = tests[name]
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


def sweep_jobs(a, run: Path, logs: Path, data: Path, ckpt: Dict[str, Path], ev: List, subset: str):
    """One trime-tune pass per model over ``subset`` (all grid points and memory sizes)."""
    args = [*ev, "--gen-subset", subset, "--memory-sizes", a.memory_sizes]
    suffix = "" if subset == "valid" else f"_{subset}"
    jobs = {
        "vanilla": lambda: ex.tune(data, ckpt["vanilla"], "cache", [f"lambda={a.cache_lambda_grid}", f"theta={a.cache_theta_grid}"],
                                   args, run / f"sweep_vanilla_cache{suffix}.json", logs / f"sweep_vanilla_cache{suffix}.log"),
        "trime": lambda: ex.tune(data, ckpt["trime"], "trime", [f"tau={a.tau_grid}"], args,
                                 run / f"sweep_trime{suffix}.json", logs / f"sweep_trime{suffix}.log"),
        "trime_long": lambda: ex.tune(data, ckpt["trime_long"], "trime", [f"tau={a.tau_grid}"], args,
                                      run / f"sweep_trime_long{suffix}.json", logs / f"sweep_trime_long{suffix}.log"),
    }
    for m in a.more_consecutive_segments:
        name = f"trime_long_m{m}"
        jobs[name] = lambda name=name: ex.tune(data, ckpt[name], "trime", [f"tau={a.tau_grid}"], args,
                                               run / f"sweep_{name}{suffix}.json", logs / f"sweep_{name}{suffix}.log")
    if getattr(a, "long_top_k_grid", None):
        top_k = f"long_k={','.join(str(k) for k in a.long_top_k_grid)}"
        jobs[TOPK_SWEEP] = lambda: ex.tune(
            data, ckpt["trime_long"], "trime", [f"tau={a.tau_grid}", top_k], args,
            run / f"sweep_{TOPK_SWEEP}{suffix}.json", logs / f"sweep_{TOPK_SWEEP}{suffix}.log")
    if getattr(a, "across_documents", False):
        jobs[STREAM_SWEEP] = lambda: ex.tune(
            data, ckpt["trime_long"], "trime", [f"tau={a.tau_grid}"], [*args, *ACROSS_DOCUMENTS],
            run / f"sweep_{STREAM_SWEEP}{suffix}.json", logs / f"sweep_{STREAM_SWEEP}{suffix}.log")
    return jobs


def int_list(text: str) -> List[int]:
    """``"64,128"`` -> ``[64, 128]`` (argparse type: a bad value is a one-line usage error)."""
    try:
        return [int(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers, got {text!r}") from None


def same_tokens_larger_batch(a, m: int) -> List:
    """fairseq-train flags for m consecutive segments when a batch of ``--batch-size`` cannot
    hold them: batches of k·batch-size segments (k the smallest that fits m) for 1/k of the
    updates (and of the warm-ups), so the model sees the same training tokens. None needed
    when m fits."""
    k = -(-m // a.batch_size)
    if k == 1:
        return []
    updates = max(1, a.max_update // k)
    return ["--batch-size", a.batch_size * k, "--max-update", updates, "--warmup-updates", max(1, updates // 8),
            "--validate-interval-updates", updates, "--ce-warmup-updates", max(1, int(a.ce_warmup_frac * updates))]


ACROSS_DOCUMENTS = ["--memory-across-documents"]
STREAM_SWEEP = "trime_long_stream"  #: TRIMELM_long's sweep with the stream's memory (--across-documents)
TOPK_SWEEP = "trime_long_topk"  #: TRIMELM_long's sweep over τ and --long-memory-top-k (--long-top-k-grid)


def flags(name: str, row: dict, across_documents: bool = False) -> List:
    """fairseq-eval-lm flags of a sweep row (memory size, τ or λ/θ; the stream's memory with
    ``across_documents``)."""
    p = row["params"]
    mem = ["--eval-memory", "local+long", "--long-memory-size", p["memory_size"]] if p["memory_size"] > 0 else []
    if across_documents and mem:
        mem += ACROSS_DOCUMENTS
    if name == "vanilla":
        return ["--eval-combiner", "cache", "--cache-lambda", p["lambda"], "--cache-theta", p["theta"], *mem]
    if mem and p.get("long_k"):
        mem += ["--long-memory-top-k", int(p["long_k"])]
    return ["--eval-combiner", "trime", "--eval-temperature", p["tau"], *mem]


#: Figure 3's rows: (key, label, sweep, model)
FIG3_SYSTEMS = (("trimelm_long", "TRIMELM_long", "trime_long", "trime_long"), ("trimelm", "TRIMELM", "trime", "trime"),
                ("cache_long", "vanilla + continuous cache*", "vanilla", "vanilla"))
FIG3_STREAM = ("trimelm_long_stream", "TRIMELM_long, memory across documents", STREAM_SWEEP, "trime_long")
FIG3_TOPK = ("trimelm_long_topk", "TRIMELM_long, top-k long-term memory", TOPK_SWEEP, "trime_long")


def figure3(a, run: Path, logs: Path, data: Path, ckpt: Dict[str, Path], ev: List, trained: Dict[str, dict]) -> dict:
    """Valid (chosen per size on valid) and test (fairseq-eval-lm) ppl against memory size.

    The independent passes (valid sweeps, test sweeps with ``--test-from sweep``, the
    Memorizing Transformer's runs) go at once, ``--parallel`` at a time; then the test runs
    that need the settings chosen on valid."""
    sizes = sorted({int(s) for s in a.memory_sizes.split(",")})
    mem_sizes = sorted({int(s) for s in (a.memorizing_sizes or a.memory_sizes).split(",")})
    corpus, evaluated = corpus_statistics(data), None
    if a.eval_docs:
        data = eval_documents(data.parent, run / "eval_docs", a.eval_docs, 2 * max(sizes + mem_sizes), logs)
        evaluated = corpus_statistics(data)
    first = {("valid_sweep", k): f for k, f in sweep_jobs(a, run, logs, data, ckpt, ev, "valid").items()}
    if a.test_from == "sweep":
        first.update({(k, "sweep", "test"): f for k, f in sweep_jobs(a, run, logs, data, ckpt, ev, "test").items()})
    if "memorizing" in ckpt:
        for size in mem_sizes:
            for subset in ("valid", "test"):
                first["memorizing", size, subset] = (lambda size=size, subset=subset: ex.cached_eval(
                    data, ckpt["memorizing"], [*ev, "--gen-subset", subset, "--model-overrides",
                                               f"{{'memorizing_memory_size': {size}}}"],
                    run / "evals" / f"fig3_memorizing_{size}_{subset}.json",
                    logs / f"eval_fig3_memorizing_{size}_{subset}.log"))
    done = ex.run_parallel(first, a.parallel)
    sweeps = {k[1]: v for k, v in done.items() if k[0] == "valid_sweep"}
    more = tuple((f"trimelm_long_m{m}", f"TRIMELM_long, trained with m={m} ({m * a.tokens_per_sample} tokens)",
                  f"trime_long_m{m}", f"trime_long_m{m}") for m in a.more_consecutive_segments)
    systems = FIG3_SYSTEMS + more + ((FIG3_STREAM,) if a.across_documents else ()) + \
        ((FIG3_TOPK,) if a.long_top_k_grid else ())
    jobs, plan = {}, {}
    for key, _, sweep, model in systems:
        for size in sizes:
            best = min((r for r in sweeps[sweep]["rows"][1:] if r["memory_size"] == size), key=lambda r: r["ppl"])
            fl = flags(model, best, across_documents=sweep == STREAM_SWEEP)
            plan[key, size] = (best, fl)
            if a.test_from == "eval-lm" or size == sizes[-1]:
                jobs[key, size, "test"] = (lambda model=model, fl=fl, key=key, size=size: ex.cached_eval(
                    data, ckpt[model], [*ev, *fl, "--gen-subset", "test"], run / "evals" / f"fig3_{key}_{size}_test.json",
                    logs / f"eval_fig3_{key}_{size}_test.log"))
    if a.distance_analysis:  # trime-analyze at the largest size, the τ chosen there
        edges = ",".join(str(s) for s in [0, *sizes[1:-1]])
        for key, _, sweep, model in systems:
            if model == "vanilla":
                continue
            fl = plan[key, sizes[-1]][1]
            jobs[key, "distance"] = (lambda model=model, fl=fl, key=key: ex.run_tool(
                "trime_fairseq.cli.analyze",
                [data, "--path", ckpt[model], *ev, *fl, "--gen-subset", "valid", "--distance-buckets", edges,
                 "--out", run / "evals" / f"fig3_{key}_distance.json"],
                run / "evals" / f"fig3_{key}_distance.json", logs / f"analyze_fig3_{key}.log"))
    done.update(ex.run_parallel(jobs, a.parallel))

    def test_ppl(key: str, sweep: str, size: int) -> float:
        if a.test_from == "eval-lm":
            return done[key, size, "test"]["ppl"]
        chosen = plan[key, size][0]["params"]
        return next(r["ppl"] for r in done[sweep, "sweep", "test"]["rows"][1:] if r["params"] == chosen)

    rows, confirm = [], {}
    for key, label, sweep, model in systems:
        if a.test_from == "sweep":  # the one fairseq-eval-lm run per model, beside the sweep's number
            confirm[key] = {"memory_tokens": sizes[-1], "fairseq_eval_lm": done[key, sizes[-1], "test"]["ppl"],
                            "trime_tune": test_ppl(key, sweep, sizes[-1])}
        rows.append({"system": key, "label": label, "memory_tokens": sizes,
                     "valid_ppl": [plan[key, s][0]["ppl"] for s in sizes],
                     "test_ppl": [test_ppl(key, sweep, s) for s in sizes],
                     "flags": [" ".join(map(str, plan[key, s][1])) for s in sizes],
                     "settings": [plan[key, s][0]["params"] for s in sizes],
                     "no_memory_valid_ppl": sweeps[sweep]["rows"][0]["ppl"],
                     "train_tokens_per_s": trained[model]["train_tokens_per_s"]})
        if (key, "distance") in done:
            rows[-1]["memory_by_distance"] = done[key, "distance"]["memory_by_distance"]
    if "memorizing" in ckpt:
        rows.append({"system": "memorizing", "label": f"Memorizing Transformer (trained with {a.train_memory})",
                     "memory_tokens": mem_sizes,
                     "valid_ppl": [done["memorizing", s, "valid"]["ppl"] for s in mem_sizes],
                     "test_ppl": [done["memorizing", s, "test"]["ppl"] for s in mem_sizes],
                     "flags": [f"--model-overrides \"{{'memorizing_memory_size': {s}}}\"" for s in mem_sizes],
                     "train_memory": a.train_memory, "train_flags": a.memorizing_flags,
                     "gates": ex.memorizing_params(ckpt["memorizing"])["gate"],
                     "train_tokens_per_s": trained["memorizing"]["train_tokens_per_s"]})
    budget = (f"`{a.arch}`-sized models, L={a.tokens_per_sample}, {a.batch_size} segments per update, "
              f"{a.max_update} updates, lr {a.lr}; TRIMELM_long m={a.consecutive_segments}; eval blocks of "
              f"{a.eval_tokens_per_sample} with a {a.context_window}-token context window")
    result = {"rows": rows, "corpus": corpus, "evaluated_documents": evaluated, "corpus_path": str(data), "budget": budget,
              "memory_tokens": sizes, "test_from": a.test_from, "test_confirmed_by_fairseq_eval_lm": confirm,
              "args": vars(a)}
    prefix = Path(a.figure3)
    plot_figure3(rows, prefix.with_suffix(".png"))
    ex.write_results(prefix.with_suffix(".json"), result, figure3_markdown(result))
    return result


def figure3_markdown(result: dict) -> str:
    sizes = result["memory_tokens"]
    lines = ["| model | split | " + " | ".join(f"M={s}" for s in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    for r in result["rows"]:
        for split in ("valid", "test"):
            vals = dict(zip(r["memory_tokens"], r[f"{split}_ppl"]))
            best = min(vals.values())
            cells = [("" if s not in vals else f"**{vals[s]:.2f}**" if vals[s] == best else f"{vals[s]:.2f}")
                     for s in sizes]
            lines.append(f"| {r['label']} | {split} | " + " | ".join(cells) + " |")
    corpus = ["| data | split | documents | tokens | mean tokens/doc | median tokens/doc |",
              "|---|---|---:|---:|---:|---:|"]
    for name, splits in (("corpus", result["corpus"]), ("evaluated", result.get("evaluated_documents") or {})):
        for split, c in splits.items():
            corpus.append(f"| {name} | {split} | {c['documents']} | {c['tokens']:,} | "
                          f"{c['mean_tokens_per_document']:,.0f} | {c['median_tokens_per_document']:,.0f} |")
    distance = [r for r in result["rows"] if r.get("memory_by_distance")]
    if distance:
        lines += ["", f"Memory by distance (`trime-analyze` on valid, M={sizes[-1]}, τ as chosen there): "
                  "probability mass per token given to local memory and to each age of long-term memory "
                  "(tokens before the context window), the part of it on the target, and their ratio.", "",
                  "| model | memory | mass per token | on target | precision |", "|---|---|---:|---:|---:|"]
        for r in distance:
            lines += [f"| {r['label']} | {d['memory']} | {d['mass']:.3f} | {d['on_target']:.3f} | "
                      f"{'' if d['precision'] is None else format(d['precision'], '.3f')} |"
                      for d in r["memory_by_distance"]]
    return ("# Figure 3: perplexity against memory size (long documents)\n\n"
            f"Corpus `{result['corpus_path']}`; {result['budget']}.\n\n" + "\n".join(corpus) + "\n\n"
            + "\n".join(lines) + "\n\n![figure 3](figure3.png)\n")


def plot_figure3(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, split in zip(axes, ("valid", "test")):
        for r in rows:
            ax.plot(r["memory_tokens"], r[f"{split}_ppl"], marker="o", label=r["label"])
        ax.set_xlabel("memory (tokens)")
        ax.set_ylabel(f"{split} perplexity")
        ax.set_title(split, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ex.save_figure(fig, path)


if __name__ == "__main__":
    main()
