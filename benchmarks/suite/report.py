"""The report: figures against targets, time splits, setup, machine; markdown, PNG and JSON."""
import datetime
import json
import os
import platform
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from benchmarks.suite.runner import REPO, Suite
from benchmarks.suite.sizes import PREPARATION
from examples import harness as ex

# ----------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One row of the report: how to read its value from a benchmark's JSON, and its target."""

    key: str
    label: str
    step: str
    value: Callable[[dict], float]
    target: float
    op: str  # ">=" or "<="
    unit: str = "ratio"
    notes: Callable[[dict], str] = lambda r: ""
    #: the most the ratio can physically be (e.g. what the similarity products alone allow); a
    #: value above it is timing noise, not a result
    bound: Optional[Callable[[dict], float]] = None


def _peak_measure(r: dict) -> str:
    """What the training benchmark's peak memory is (process RSS, or CUDA's allocator peak)."""
    return r.get("peak_memory_measure", "peak RSS")


def _train_notes(variant: str) -> Callable[[dict], str]:
    """Absolute tokens/s and peak RSS behind a training ratio."""
    def notes(r: dict) -> str:
        text = (f"{r['tokens_per_s'][variant]:,.0f} vs {r['tokens_per_s']['cross_entropy']:,.0f} tokens/s; "
                f"{_peak_measure(r)} {r['peak_rss_mb_per_variant'][variant]:,.0f} vs "
                f"{r['peak_rss_mb_per_variant']['cross_entropy']:,.0f} MB")
        same = (r.get("ratio_vs_cross_entropy_same_batches") or {}).get(variant)
        if same:  # CE on the same document-aligned (partly padded) segments
            text += (f"; {same:.3f} × CE on the same document-aligned segments "
                     f"({r['padding_share'][variant]:.1%} of their positions are padding)")
        bound = (r.get("similarity_bound") or {}).get(variant)
        if bound:  # what the similarity products of Eq. 5 alone allow
            text += (f"; at most {bound['bound_ratio_vs_cross_entropy']:.2f} if only Eq. 5's similarity products "
                     f"cost time ({bound['products_s']:.2f} s vs {bound['ce_step_s']:.2f} s per CE step)")
            if "bound_ratio_vs_cross_entropy_with_exp" in bound:
                text += f", {bound['bound_ratio_vs_cross_entropy_with_exp']:.2f} with one exponential per similarity"
        split = (r.get("extra_time_split") or {}).get(variant)
        if split and variant != "trime_loss":  # the profile: which operators the extra time is
            text += (f"; {split['extra_ms']:+.0f} ms per step over CE's {split['base_ms']:.0f} ms, most in "
                     + ", ".join(f"{k} {v:+.0f}" for k, v in list(split["top"].items())[:3]))
        ops = r.get("op_counts") or {}
        if variant in ops and "cross_entropy" in ops:  # launch-bound on a GPU when this is large
            text += (f"; {ops[variant]['total'] / ops['cross_entropy']['total']:.2f}x CE's operators per step "
                     f"({ops[variant]['total']:,})")
        return text

    return notes


def _eval_value(r: dict) -> float:
    return next(v for k, v in r["ratio_vs_local"].items() if k != "local")


def _eval_bound(r: dict) -> float:
    """What the similarity products against the long memory alone allow (same code path
    as the local-only baseline otherwise, so a strict ceiling up to timing noise)."""
    return r["similarity_bound"]["bound_ratio_vs_local"]


def _eval_notes(r: dict) -> str:
    name = next(k for k in r["tokens_per_s"] if k != "local")
    occ = r["mean_long_memory_occupancy"][name]
    text = (f"{r['tokens_per_s'][name]:,.0f} vs {r['tokens_per_s']['local']:,.0f} tokens/s; {name}, "
            f"mean {occ:,.0f} entries in long memory")
    bound, split = r.get("similarity_bound"), r.get("extra_time_split")
    if bound:  # what the similarity products against the memory alone allow (and with Eq. 6's exponentials)
        text += (f"; at most {bound['bound_ratio_vs_local']:.2f} if only the [{bound['tokens']:,}, {bound['dim']}] x "
                 f"[{bound['dim']}, {bound['entries']:,}] similarity products cost time")
        if "bound_ratio_vs_local_with_exp" in bound:
            text += f", {bound['bound_ratio_vs_local_with_exp']:.2f} with one exponential per similarity"
    if split:  # the profile: which operators the extra time is
        text += (f"; {split['extra_ms']:+,.0f} ms over local-only's {split['base_ms']:,.0f} ms per pass, most in "
                 + ", ".join(f"{k} {v:+,.0f}" for k, v in list(split["top"].items())[:3]))
    return text


def describe_setting(r: dict) -> str:
    """``K=64, nprobe 16, 30% skipped`` of one search setting of the ext_eval benchmark."""
    text = f"K={r['k']}" + (f", nprobe {r['nprobe']}" if r.get("nprobe") is not None else "")
    text += f", k_factor {r['k_factor']:g}" if r.get("k_factor") else ""
    return text + (f", {r['skipped']:.0%} of searches skipped" if r.get("skipped") else "")


def _ext_notes(ext: dict, which: str, base: str) -> str:
    """The chosen setting against the full search: speeds, perplexities, and the index."""
    r = ext[which]
    best, full = r["best"], r["full"]
    return (f"{best['tokens_per_s']:,.0f} tokens/s at {describe_setting(best)}: valid ppl {best['ppl']:.2f} vs "
            f"{full['ppl']:.2f} with the full search ({r['ppl_increase']:+.2%}; budget {ext['budget']:.0%}); "
            f"full search ({describe_setting(full)}): {full['ratio']:.3f} × {base}; {ext['keys']:,} keys, "
            f"{ext['index']}, recall@{ext['k']} {ext['recall'] or 0:.3f}"
            + (f" at nprobe {ext['nprobe']}" if ext.get("nprobe") is not None else ""))


def _ds_sizes(r: dict) -> List[int]:
    return r["datastore"]["sizes"]


FIGURES: List[Figure] = [
    *[Figure(f"train_speed_{kind}", f"TRIME train tokens/s ÷ CE, {desc}", "train",
             lambda r, v=variant: r["ratio_vs_cross_entropy"][v], target, ">=", notes=_train_notes(variant))
      for kind, variant, desc, target in (
          ("local", "trime_loss", "local memory", 0.95),
          ("long", "trime_loss_long", "long memory (consecutive segments)", 0.95),
          ("long_stream", "trime_loss_long_stream",
           "long memory across documents (consecutive segments of the unpadded stream, as the reference)", 0.95),
          ("external", "trime_loss_ext", "external memory (BM25 batches)", 0.9),
          ("external_stream", "trime_loss_ext_stream",
           "external memory (BM25 batches of the unpadded stream segments, as the reference)", 0.9))],
    *[Figure(f"train_peak_memory_{kind}", f"peak training memory ÷ CE, {desc}", "train",
             lambda r, v=variant: r["peak_rss_ratio_vs_cross_entropy"][v], target, "<=",
             notes=lambda r, v=variant: f"{r['peak_rss_mb_per_variant'][v]:,.0f} vs "
                                        f"{r['peak_rss_mb_per_variant']['cross_entropy']:,.0f} MB "
                                        f"({_peak_measure(r)})")
      for kind, variant, desc, target in (("local", "trime_loss", "local memory", 1.1),
                                          ("long", "trime_loss_long", "long memory", 1.1),
                                          ("external", "trime_loss_ext", "external memory", 1.2))],
    Figure("eval_long_memory_full", "eval tokens/s, long memory full (one document) ÷ local only", "eval_full_memory",
           _eval_value, 0.9, ">=", notes=_eval_notes, bound=_eval_bound),
    Figure("eval_long_memory_documents", "eval tokens/s, long memory over real documents ÷ local only",
           "eval_documents", _eval_value, 0.9, ">=", notes=_eval_notes, bound=_eval_bound),
    *[Figure(key, f"{name} eval tokens/s ÷ {base}, perplexity within the budget of the full search", "ext_eval",
             lambda r, w=which: r["ext_eval"][w]["best"]["ratio"], 0.3, ">=",
             notes=lambda r, w=which, b=base: _ext_notes(r["ext_eval"], w, b))
      for key, name, which, base in (("ext_eval", "kNN-LM", "knn", "vanilla"),
                                     ("ext_eval_trime", "TRIMELM_ext", "trime_ext", "TRIME, local memory only"))],
    Figure("datastore_build", "datastore build keys/s ÷ plain forward tokens/s", "external",
           lambda r: r["datastore"]["ratio_build_vs_forward"], 0.9, ">=",
           notes=lambda r: (f"{r['datastore'][f'build_keys_per_s_{_ds_sizes(r)[-1]}']:,.0f} vs "
                            f"{r['datastore']['forward_tokens_per_s']:,.0f} per s")),
    Figure("datastore_peak_memory", "datastore build peak RSS, 4N ÷ N keys (flat in N)", "external",
           lambda r: r["datastore"]["peak_rss_ratio_large_vs_small"], 1.1, "<=",
           notes=lambda r: "N = {:,} → {:,} keys: {:,.0f} → {:,.0f} MB".format(
               *_ds_sizes(r), *(r["datastore"][f"peak_rss_mb_{n}"] for n in _ds_sizes(r)))),
    Figure("bm25_seconds", "BM25 batching time", "external", lambda r: r["bm25"]["seconds"], 60.0, "<=", unit="s",
           notes=lambda r: f"{r['bm25']['segments']:,} segments of {r['bm25']['segment_length']} tokens"),
    Figure("knn_mt_generation", "kNN-MT generation sentences/s ÷ base", "generate", lambda r: r["ratio"], 0.6, ">=",
           notes=lambda r: (f"{r['knn_sentences_per_s']:.1f} vs {r['base_sentences_per_s']:.1f} sentences/s; "
                            f"beam {r['beam']}, K={r['knn_k']}, {r['datastore_size']:,} keys ({r['index']})")),
    Figure("memorizing_train", "Memorizing Transformer train tokens/s ÷ plain (no kNN memory)", "memorizing",
           lambda r: r["memorizing_ratio_vs_no_memory"], 0.5, ">=",
           notes=lambda r: (f"{r['tokens_per_s']['memorizing']:,.0f} vs {r['tokens_per_s']['memorizing_no_memory']:,.0f} "
                            f"tokens/s; " + " ".join(r["variants"]["memorizing"][-2:]))),
]


#: how far a ratio may exceed its figure's bound before the measurement is called disturbed
NOISE = 0.05


def evaluate(suite: Suite) -> List[dict]:
    """One row per figure: value, target and pass / miss / failed, or suspect: above the
    figure's physical bound by more than :data:`NOISE`, so the timing was disturbed (rerun)."""
    rows = []
    for f in FIGURES:
        row = {"key": f.key, "figure": f.label, "target": f.target, "op": f.op, "unit": f.unit, "step": f.step}
        res = suite.results.get(f.step)
        if res is None:
            st = suite.steps.get(f.step, {})
            row.update(value=None, status="failed", notes=f"{st.get('error', 'not run')} (log: {st.get('log', '')})")
        else:
            try:
                value = float(f.value(res))
                notes = f.notes(res)
            except (KeyError, TypeError, IndexError, ValueError, StopIteration) as e:
                row.update(value=None, status="failed", notes=f"no value in the output ({type(e).__name__}: {e})")
                suite.steps[f.step].update(status="failed", error=f"missing figure {f.key}")
            else:
                ok = value >= f.target if f.op == ">=" else value <= f.target
                if f.step == "ext_eval" and (res["ext_eval"].get("recall") or 0) < 0.9:
                    ok, notes = False, notes + " (the full search's recall is below 0.9)"
                status = "pass" if ok else "miss"
                ceiling = f.bound(res) if f.bound is not None else None
                if ceiling is not None and value > ceiling + NOISE:
                    status = "suspect"
                    notes += f" (above the bound of {ceiling:.2f}: the timing was disturbed, rerun this benchmark)"
                row.update(value=value, status=status, notes=notes)
        rows.append(row)
    return rows


def time_splits(suite: Suite) -> List[dict]:
    """Where the memory-augmented scorers spend their time (model / search / combine)."""
    rows = []
    ext = suite.results.get("ext_eval", {}).get("ext_eval")
    if ext:
        for name, which, kind in (("kNN-LM eval", "knn", "full"), ("kNN-LM eval", "knn", "best"),
                                  ("TRIMELM_ext eval", "trime_ext", "full"), ("TRIMELM_ext eval", "trime_ext", "best")):
            r = ext[which][kind]
            split = r["time_split_s"]
            total = sum(split.values())
            how = "full search" if kind == "full" else "cheapest within the budget"
            rows.append({"scorer": f"{name}, {how} ({describe_setting(r)}; {ext['keys']:,} keys)", "total_s": total,
                         **{k: split[k] / total for k in ("model", "search", "combine")},
                         "skipped": r.get("skipped", 0.0)})
    gen = suite.results.get("generate")
    if gen:
        split = gen["knn_time_split"]
        rows.append({"scorer": f"kNN-MT generation (beam {gen['beam']}, K={gen['knn_k']}, {gen['datastore_size']:,} keys)",
                     "total_s": gen["sentences"] * suite.size.gen_passes / gen["knn_sentences_per_s"],
                     **{k: split[k] for k in ("model", "search", "combine")}, "skipped": gen.get("skipped", 0.0)})
    return rows


def search_sweeps(suite: Suite) -> List[dict]:
    """Every search setting the ext_eval benchmark tried, per scorer: its perplexity against
    the full search, its speed against the scorer's baseline, and whether it was kept."""
    ext = suite.results.get("ext_eval", {}).get("ext_eval")
    rows = []
    for name, which in (("kNN-LM", "knn"), ("TRIMELM_ext", "trime_ext")) if ext else ():
        r = ext[which]
        full_ppl = r["full"]["ppl"]
        for kind, row in [("full search", r["full"]), *[("cheaper", x) for x in r["sweep"]],
                          *[("fewer searches", x) for x in r["skip_sweep"]], ("kept", r["best"])]:
            rows.append({"scorer": name, "kind": kind, "setting": describe_setting(row), "ppl": row["ppl"],
                         "vs_full": row["ppl"] / full_ppl - 1, "tokens_per_s": row["tokens_per_s"],
                         "ratio": row["ratio"],
                         "within_budget": row.get("within_budget", row["ppl"] <= full_ppl * (1 + ext["budget"]))})
    return rows


# ----------------------------------------------------------------------------- report


def machine_info(load_start: Sequence[float]) -> dict:
    import fairseq
    import faiss
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
        "fairseq": fairseq.__version__, "commit": commit,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(row: dict) -> str:
    v = row["value"]
    if v is None:
        return "—"
    return f"{v:.1f} s" if row["unit"] == "s" else f"{v:.3f}"


def render(report: dict) -> str:
    """The markdown report."""
    m = report["machine"]
    mark = {"pass": "pass", "miss": "**miss**", "failed": "**FAILED**", "suspect": "**suspect**"}
    figs = [{"figure": r["figure"], "value": _fmt(r), "target": f"{r['op'].replace('>=', '≥').replace('<=', '≤')} "
             f"{r['target']:g}{' s' if r['unit'] == 's' else ''}", "result": mark[r["status"]], "notes": r["notes"]}
            for r in report["figures"]]
    splits = [{"scorer": r["scorer"], "model": f"{r['model']:.0%}", "search": f"{r['search']:.0%}",
               "combine": f"{r['combine']:.0%}", "total_s": f"{r['total_s']:.1f}",
               "skipped": f"{r.get('skipped', 0.0):.0%}"} for r in report["time_split"]]
    sweeps = [{**r, "ppl": f"{r['ppl']:.2f}", "vs_full": f"{r['vs_full']:+.2%}", "tokens_per_s": f"{r['tokens_per_s']:,.0f}",
               "ratio": f"{r['ratio']:.3f}", "within_budget": "yes" if r["within_budget"] else "no"}
              for r in report.get("search_sweeps", [])]
    steps = [{"step": k, "status": v["status"], "seconds": f"{v['seconds']:.0f}",
              "log": f"`{v['log']}`" if v["log"] else "", "error": v.get("error", "") or (f"reused from the run of {v['reused']}" if v.get("reused") else "")}
             for k, v in report["steps"].items()]
    setup = report["setup"]
    lines = [
        f"# Benchmark report ({report['size']} size)",
        "",
        f"`{report['command']}` — {m['date']}, {m['cpus']} CPUs. Every ratio is against a baseline "
        "measured in the same run, on the same model and data (variants alternate so machine noise "
        f"hits both). Load average at start {m['load_average_start']}, at end {m['load_average_end']}: "
        "the absolute speeds depend on what else ran; the ratios less so.",
        "",
        f"{report['summary']}",
        "",
        "## Figures",
        "",
        ex.markdown_table(figs, ["figure", "value", "target", "result", "notes"]),
        "",
        f"![figures against their targets]({report['plot']})",
        "",
        "## Time split of the memory-augmented scorers",
        "",
        ex.markdown_table(splits, ["scorer", "model", "search", "combine", "total_s", "skipped"],
                          ["scorer", "model", "search", "combine", "total (s)", "searches skipped"])
        if splits else "(no scorer ran)",
        "",
        "## Search settings tried (external memory, valid blocks)",
        "",
        "The full K, then each smaller K, with fewer inverted lists probed and then fewer candidates "
        "re-ranked (k_factor); then skipped searches on top of the fastest setting within the budget; the kept setting is timed "
        "once more. Ratio: against vanilla "
        "(kNN-LM) or TRIME with local memory only (TRIMELM_ext), in the same run.",
        "",
        ex.markdown_table(sweeps, ["scorer", "kind", "setting", "ppl", "vs_full", "tokens_per_s", "ratio", "within_budget"],
                          ["scorer", "what", "setting", "valid ppl", "vs full search", "tokens/s", "ratio", "within budget"])
        if sweeps else "(ext_eval did not run)",
        "",
        "## Setup",
        "",
        *[f"* {k}: {v}" for k, v in setup.items()],
        "",
        "## Steps",
        "",
        ex.markdown_table(steps, ["step", "status", "seconds", "log", "error"]),
        "",
        "## Machine",
        "",
        *[f"* {k}: {v}" for k, v in m.items()],
        "",
    ]
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> None:
    """Horizontal bars of every figure with its target marked (green pass, red miss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [[r for r in rows if r["unit"] == "ratio"], [r for r in rows if r["unit"] == "s"]]
    fig, axes = plt.subplots(2, 1, figsize=(9, 0.45 * len(rows) + 2.2),
                             gridspec_kw={"height_ratios": [max(1, len(p)) for p in panels]})
    for ax, group, xlabel in zip(axes, panels, ("ratio against the same-run baseline", "seconds")):
        ys = list(range(len(group)))[::-1]
        vals = [r["value"] if r["value"] is not None else 0.0 for r in group]
        colours = [{"pass": "tab:green", "miss": "tab:red", "suspect": "tab:orange"}.get(r["status"], "grey")
                   for r in group]
        ax.barh(ys, vals, color=colours, height=0.6)
        for y, r, v in zip(ys, group, vals):
            ax.plot([r["target"], r["target"]], [y - 0.4, y + 0.4], color="black", lw=2)
            ax.annotate("failed" if r["value"] is None else f"{v:.2f}", (v, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels([textwrap.fill(r["figure"], 42) for r in group], fontsize=7)
        ax.set_xlabel(xlabel + " (black tick: target)", fontsize=8)
    axes[0].set_title("Benchmarks: green pass, red miss, orange suspect (above its bound), grey failed", fontsize=9)
    ex.save_figure(fig, path, dpi=110)


def setup_notes(suite: Suite, size_name: str) -> dict:
    r = suite.results
    notes = {}
    if "lm_corpus" in r:
        notes["LM corpus"] = f"`{r['lm_corpus']['data']}`, {r['lm_corpus']['train_tokens']:,} training tokens"
    if "lm_checkpoint" in r:
        c = r["lm_checkpoint"]
        notes["LM checkpoint"] = (f"{c['arch']}, cross_entropy, {c['updates']} updates, L={suite.size.tokens_per_sample} "
                                  f"(evaluation: {suite.size.tokens_per_sample}-token blocks, "
                                  f"{suite.size.context} of them context)")
    if "lm_datastore" in r:
        d = r["lm_datastore"]
        notes["LM datastore"] = (f"{d['keys']:,} keys (L2, whole training split), {d['factory']}, nprobe {d['nprobe']}, "
                                 f"recall@{d['recall_k']} {d['recall'] or 0:.3f}")
        if size_name == "full" and d["keys"] < 1_000_000:
            notes["LM datastore"] += " — fewer than the 1M keys asked: the corpus has no more training tokens"
    if "mt_checkpoint" in r:
        notes["MT checkpoint"] = f"{r['mt_checkpoint']['arch']}, label-smoothed CE, {r['mt_checkpoint']['updates']} updates"
    if "mt_datastore" in r:
        d = r["mt_datastore"]
        notes["MT datastore"] = (f"{d['keys']:,} keys (L2, training targets), {d['factory']}, "
                                 f"recall@{d['recall_k']} {d['recall'] or 0:.3f}")
    bm = r.get("external", {}).get("bm25")
    if bm and size_name == "full" and bm["segments"] < 100_000:
        notes["BM25"] = f"{bm['segments']:,} segments: the corpus has fewer than the 100k asked"
    notes["work directory"] = f"`{suite.work}` (logs in `{suite.logs}`)"
    return notes


def write_report(suite: Suite, size_name: str, report_path: Path, command: str, load_start: Sequence[float]) -> dict:
    """Markdown + PNG + JSON beside each other, each written atomically."""
    figures = evaluate(suite)
    counts = {k: sum(r["status"] == k for r in figures) for k in ("pass", "miss", "failed", "suspect")}
    prep = sum(v["seconds"] for k, v in suite.steps.items() if k in PREPARATION) / 60
    bench = sum(v["seconds"] for k, v in suite.steps.items() if k not in PREPARATION) / 60
    reused = ", ".join(f"{k} ({v['reused']})" for k, v in suite.steps.items() if v.get("reused"))
    reused = f" Not rerun (--only), their last results are shown: {reused}." if reused else ""
    report = {
        "size": size_name,
        "command": command,
        "summary": (f"{counts['pass']} of {len(figures)} figures meet their target, {counts['miss']} miss, "
                    f"{counts['failed']} failed to run"
                    + (f", {counts['suspect']} suspect (above their physical bound: disturbed timing)"
                       if counts["suspect"] else "") + f". Preparation took {prep:.0f} min (artefacts already in "
                    f"the work directory are reused), the benchmarks {bench:.0f} min.{reused}"),
        "figures": figures,
        "time_split": time_splits(suite),
        "search_sweeps": search_sweeps(suite),
        "setup": setup_notes(suite, size_name),
        "steps": suite.steps,
        "machine": machine_info(load_start),
        "plot": report_path.with_suffix(".png").name,
        "raw": {k: v for k, v in suite.results.items()},
    }
    plot(figures, report_path.with_suffix(".png"))
    ex.atomic_write(report_path.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    ex.atomic_write(report_path, render(report))
    return report


