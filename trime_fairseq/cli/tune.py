"""``trime-tune``: pick the test-time memory parameters on the validation set.

One pass of the model over the subset; every grid point is scored on the same forward
outputs (the combiners' target-only path), so a grid of 20 costs little more than one
``fairseq-eval-lm`` run. Scoring follows ``fairseq-eval-lm --task trime_lm`` exactly (same
batches, ``--context-window``, scored tokens), so the numbers match it.

With ``--memory-sizes 0,1000,...`` every grid point is also scored with a long-term
memory of each size (one pass, at the largest size), and ``--plot`` draws perplexity
against memory size (the paper's Figure 3).

Examples::

    trime-tune data-bin/corpus --path ckpt/trime.pt --combiner trime \\
        --grid tau=0.5,0.75,1,1.25,1.5 --tokens-per-sample 512 --context-window 256
    trime-tune data-bin/corpus --path ckpt/vanilla.pt --combiner cache \\
        --grid lambda=0.05,0.1,0.2 theta=0.01,0.03,0.1 --out cache_grid.json
    trime-tune data-bin/corpus --path ckpt/trime_long.pt --combiner trime --grid tau=1 \\
        --memory-sizes 0,1000,2000,5000,10000 --plot fig3.png ...

Adaptive retrieval (``--retrieval-skip-feature``): ``--grid ... skip_threshold=t1,t2,...``
scores every setting at every threshold on the same cached neighbours, as if the skipped
queries had not been searched (what ``fairseq-eval-lm`` then computes, up to the float
rounding of searching a smaller batch), and also
without skipping. Each row reports the share of searches skipped; per setting, the log (and
``skip_choice`` in ``--out``) names the threshold that skips the most searches with a
perplexity at most ``--max-ppl-increase`` (default 1%) above searching every token::

    trime-tune data-bin/corpus --path ckpt/vanilla.pt --combiner knn --datastore ds/train \
        --grid lambda=0.25 temperature=10 skip_threshold=1,2,3,4,5 --retrieval-skip-feature entropy ...

Any other flag is passed to fairseq's eval-lm parser (``--max-tokens``, ``--gen-subset``...).
"""
import argparse
import itertools
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from trime_fairseq.tasks.memory_flags import EvalMemory
from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.cli.grid import LAMBDAS, SKIP_AXIS, result_grid_edges, warn_grid_edges
from trime_fairseq.errors import TrimeUserError, cli_entry
from trime_fairseq.memory.combiners import CacheCombiner, Combiner, KnnCombiner, NoMemory, TrimeCombiner
from trime_fairseq.memory.joint import DEFAULT_PPRIME, PPRIME_KINDS
from trime_fairseq.memory.retriever import SKIP_FEATURES, RetrievalSkip

logger = logging.getLogger("trime_fairseq.tune")

# per combiner: required grid axes, and optional ones with their default
GRID_KEYS: Dict[str, Tuple[Tuple[str, ...], Dict[str, float]]] = {
    "trime": (("tau",), {"memory_lambda": 0.0, "memory_tau": 1.0, "k": 0, "ext_tau": 0.0, "long_k": 0,
                         "pprime": float(PPRIME_KINDS.index(DEFAULT_PPRIME))}),
    "cache": (("lambda", "theta"), {}),
    "knn": (("lambda", "temperature"), {"k": 0, "cache_lambda": 0.0, "cache_theta": 0.0}),
}


SKIP_COMBINERS = ("trime", "knn")
#: the largest relative perplexity increase over always-search that the skip choice accepts
DEFAULT_MAX_PPL_INCREASE = 0.01


def parse_grid(combiner: str, items: Sequence[str],
               keys: Dict[str, Tuple[Tuple[str, ...], Dict[str, float]]] = GRID_KEYS,
               skip_combiners: Sequence[str] = SKIP_COMBINERS) -> List[Dict[str, float]]:
    """``["tau=0.5,1"]`` -> ``[{"tau": 0.5}, {"tau": 1.0}]`` (Cartesian product), checked
    against ``keys`` (per combiner: required axes, optional ones; ``trime-tune-mt`` passes its own)."""
    required, optional = keys[combiner]
    axes: Dict[str, List[float]] = {}
    for item in items:
        if "=" not in item:
            raise TrimeUserError(f"--grid entries look like name=v1,v2,...; got {item!r}")
        name, values = item.split("=", 1)
        skip_ok = combiner in skip_combiners
        if name not in required and name not in optional and not (name == SKIP_AXIS and skip_ok):
            takes = [*required, *optional, *([SKIP_AXIS] if skip_ok else [])]
            raise TrimeUserError(f"--grid: {combiner} takes {', '.join(takes)}; got {name!r}")
        try:
            axes[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise TrimeUserError(f"--grid {name}: values must be numbers, got {values!r}") from None
        if not axes[name]:
            raise TrimeUserError(f"--grid {name}: no values")
        if name in LAMBDAS and any(not 0.0 <= v < 1.0 for v in axes[name]):
            raise TrimeUserError(
                f"--grid {name}: values must be in [0, 1), got {values} (at 1 the model's distribution gets "
                "no weight and tokens absent from memory get probability 0)")
    missing = [k for k in required if k not in axes]
    if missing:
        raise TrimeUserError(f"--grid for {combiner} needs {', '.join(missing)}=...")
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[k] for k in names))]


def make_combiner(combiner: str, point: Dict[str, float], representation: str = "f") -> Combiner:
    opt = dict(GRID_KEYS[combiner][1], **point)
    if combiner == "trime":
        kind = int(opt["pprime"])
        if kind not in range(len(PPRIME_KINDS)) or kind != opt["pprime"]:
            raise ValueError(f"--grid pprime takes {', '.join(f'{i} ({k})' for i, k in enumerate(PPRIME_KINDS))}")
        if opt["long_k"] < 0 or opt["long_k"] != int(opt["long_k"]):
            raise TrimeUserError(f"--grid long_k: values must be integers >= 0 (0: all), got {opt['long_k']:g}")
        return TrimeCombiner(opt["tau"], opt["memory_lambda"], opt["memory_tau"], PPRIME_KINDS[kind],
                             opt["ext_tau"] or None, int(opt["long_k"]))
    if combiner == "cache":
        return CacheCombiner(opt["lambda"], opt["theta"], representation)
    cache = CacheCombiner(opt["cache_lambda"], opt["cache_theta"], representation) if opt["cache_lambda"] > 0 else None
    return KnnCombiner(opt["lambda"], opt["temperature"], cache)


def iter_scored_rows(model, task, cfg, long_memory_size: int = 0, external: bool = False, k: Optional[int] = None,
                     representations: Sequence[str] = ("g", "f"), combiners: Optional[Sequence[Combiner]] = None):
    """Every scored row of ``cfg.dataset.gen_subset`` as :class:`ScoringInputs`, in reading
    order, exactly as ``fairseq-eval-lm --task trime_lm`` sees it (same blocks, context
    window, long-term memory of ``long_memory_size`` and, with ``external``, ``k``
    neighbours from ``--datastore``, checked to suit ``combiners``). One model forward per
    batch; the caller may score each row with as many combiners as it likes."""
    from fairseq import utils

    from trime_fairseq.memory.long_term import LongTermMemory
    from trime_fairseq.models.capture import to_model_device
    from trime_fairseq.models.memory_eval import MemoryEvalModel, scored_rows, scoring_inputs
    from trime_fairseq.models.output_layer import DEFAULT_ADAPTIVE_TOKEN_MASS

    pad = task.source_dictionary.pad()
    wrapped = MemoryEvalModel(model, NoMemory(), pad).eval()
    mass = str(getattr(task.args, "adaptive_token_mass", DEFAULT_ADAPTIVE_TOKEN_MASS))
    long_memory = None
    if long_memory_size > 0:
        long_memory = LongTermMemory(long_memory_size, context=task.args.tokens_per_sample + cfg.eval_lm.context_window,
                                     across_documents=bool(getattr(task.args, "memory_across_documents", False)))
    retriever = None
    if external:
        retriever = task.build_retriever(model, combiners)
        if k:
            retriever.k = min(k, len(retriever.datastore))
        retriever.check_model(model)
    task.load_dataset(cfg.dataset.gen_subset)
    itr = task.eval_lm_dataloader(
        dataset=task.dataset(cfg.dataset.gen_subset),
        max_tokens=cfg.dataset.max_tokens or 4096,
        batch_size=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(model.max_positions()),
        num_workers=0,
        context_window=cfg.eval_lm.context_window,
    )
    with torch.no_grad():
        for sample in tqdm(itr, desc="scoring", unit="batch", disable=None):
            if "net_input" not in sample:
                continue
            sample = to_model_device(sample, model)
            x = scoring_inputs(model, wrapped(**sample["net_input"]), sample, pad, mass)
            for _, _, row in scored_rows(x, sample, pad, long_memory, retriever, representations):
                yield row


def score_grid(
    models_and_task, cfg, combiners: List[Combiner], memory_sizes: Sequence[int] = (0,),
    neighbours: Optional[Sequence[int]] = None, skips: Optional[Sequence[Optional[RetrievalSkip]]] = None,
    searches: Optional[dict] = None,
) -> Tuple[List[List[float]], List[List[int]]]:
    """Summed target log-probabilities ``[combiner][memory size]`` over the subset, and the
    number of tokens each sum covers. Tokens are counted as ``fairseq-eval-lm`` counts them:
    a token whose log-probability is infinite is left out of both the sum and the count
    (fairseq's "skipping tokens with inf scores"), so ``exp(-sum / count)`` is the
    perplexity ``fairseq-eval-lm`` reports for the same flags. ``neighbours[i]`` (0 = all)
    restricts combiner ``i`` to its nearest retrieved entries: retrieval runs once per
    batch at the largest K and every grid point reuses it (no second search).

    ``skips[i]`` (adaptive retrieval) scores combiner ``i`` as if the retriever had skipped
    the queries its rule picks (:meth:`ScoringInputs.skip_external`: the same inputs as a
    real skipped search); ``searches``, if given, receives ``queries`` (datastore queries of
    the subset) and ``skipped`` (per combiner, how many of them its rule skips)."""
    model, task = models_and_task
    pad = task.source_dictionary.pad()
    neighbours = list(neighbours or [0] * len(combiners))
    skips = list(skips or [None] * len(combiners))
    rules = {s: i for i, s in enumerate(dict.fromkeys(s for s in skips if s is not None))}
    n_queries, n_skipped = 0, [0] * len(combiners)
    external = EvalMemory.from_args(task.args).ext or any(isinstance(c, KnnCombiner) for c in combiners)
    k = max(neighbours) or None
    sums = [[0.0] * len(memory_sizes) for _ in combiners]
    counts = [[0] * len(memory_sizes) for _ in combiners]
    reps = sorted({r for c in combiners for r in c.representations})
    for row in iter_scored_rows(model, task, cfg, max(memory_sizes), external, k, reps, combiners):
        keep = row.target.ne(pad)
        tok = row.tok_log_probs() if rules else None  # one log-softmax per row, shared by the rules
        masks = [rule.mask(tok) for rule in rules]
        n_queries += row.target.numel()
        for i, rule in enumerate(skips):
            if rule is not None:
                n_skipped[i] += int(masks[rules[rule]].sum())
        for j, size in enumerate(memory_sizes):
            sized = row.restrict_long_memory(size)
            for i, comb in enumerate(combiners):
                x = sized.restrict_external(neighbours[i]) if neighbours[i] else sized
                if skips[i] is not None:
                    x = x.skip_external(masks[rules[skips[i]]])
                lp = comb.target_log_prob(x)
                counted = keep & torch.isfinite(lp)
                sums[i][j] += float(lp[counted].sum())
                counts[i][j] += int(counted.sum())
    if searches is not None:
        searches.update(queries=n_queries, skipped=n_skipped)
    return sums, counts


def choose_skip(rows: List[dict], max_increase: float = DEFAULT_MAX_PPL_INCREASE) -> List[dict]:
    """Adaptive retrieval: per setting (every grid parameter but ``skip_threshold``, and the
    memory size), the grid point that skips the largest share of searches with a perplexity
    within ``max_increase`` (relative) of the same setting searching every query. Returns
    one entry per setting: the always-search perplexity, the chosen point (or ``None``)."""
    groups: Dict[str, dict] = {}
    for r in rows:
        if r["combiner"] == "none":
            continue
        key = json.dumps({k: v for k, v in r["params"].items() if k != SKIP_AXIS}, sort_keys=True)
        g = groups.setdefault(key, {"setting": {k: v for k, v in r["params"].items() if k != SKIP_AXIS},
                                    "always_search_ppl": None, "points": []})
        if SKIP_AXIS in r["params"]:
            g["points"].append(r)
        else:
            g["always_search_ppl"] = r["ppl"]
    out = []
    for g in groups.values():
        if not g["points"] or g["always_search_ppl"] is None:
            continue
        limit = g["always_search_ppl"] * (1 + max_increase)
        ok = [r for r in g["points"] if r["ppl"] <= limit]
        best = max(ok, key=lambda r: (r["skipped"], -r["ppl"]), default=None)
        out.append({"setting": g["setting"], "always_search_ppl": g["always_search_ppl"],
                    "max_ppl": limit, "chosen": best})
    return out


def with_always_search(grid: List[Dict[str, float]]) -> List[Dict[str, float]]:
    """``grid`` plus, for every setting swept over ``skip_threshold``, the same setting
    without it (searching every query): the reference of :func:`choose_skip`."""
    out = list(grid)
    seen = {json.dumps(p, sort_keys=True) for p in grid}
    for p in grid:
        if SKIP_AXIS in p:
            base = {k: v for k, v in p.items() if k != SKIP_AXIS}
            key = json.dumps(base, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(base)
    return out


def skip_rules(grid: List[Dict[str, float]], feature: Optional[str], rest: Sequence[str]) -> List[Optional[RetrievalSkip]]:
    """The skip rule of every grid point (``None``: searches every query), checked."""
    if any(a == "--retrieval-skip-threshold" or a.startswith("--retrieval-skip-threshold=") for a in rest):
        raise TrimeUserError(f"trime-tune sweeps --retrieval-skip-threshold: give its values as --grid {SKIP_AXIS}=...")
    swept = any(SKIP_AXIS in p for p in grid)
    if swept and feature is None:
        raise TrimeUserError(f"--grid {SKIP_AXIS}=... needs --retrieval-skip-feature ({' or '.join(SKIP_FEATURES)})")
    if feature is not None and not swept:
        raise TrimeUserError(f"--retrieval-skip-feature {feature} needs --grid {SKIP_AXIS}=... (the thresholds to try)")
    return [RetrievalSkip(feature, p[SKIP_AXIS]) if SKIP_AXIS in p else None for p in grid]


def plot_memory_sweep(rows: List[dict], path: str, title: str = "") -> None:
    """Perplexity against long-term memory size, one line per setting (cf. Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        lines.setdefault(r["label"] if "label" in r else r["combiner"], []).append((r["memory_size"], r["ppl"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, pts in lines.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("long-term memory size (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "perplexity vs. memory size", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    from trime_fairseq.results import save_figure

    save_figure(fig, path)


PLUGIN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perplexity(nll_sum: float, tokens: int) -> float:
    """``exp(nll_sum / tokens)``; ``inf`` for no token or beyond float range (a grid point
    whose memory term swamps the model, e.g. a tiny temperature), never an overflow error."""
    if not tokens or nll_sum / tokens > 700.0:
        return float("inf")
    return math.exp(nll_sum / tokens)


def with_plugin(argv: Sequence[str]) -> List[str]:
    """``argv`` plus ``--user-dir trime_fairseq --task trime_lm`` unless already given."""
    argv = list(argv)
    if "--user-dir" not in argv:
        argv += ["--user-dir", PLUGIN_DIR]
    if "--task" not in argv:
        argv += ["--task", "trime_lm"]
    return argv


def load(argv: Sequence[str]):
    """fairseq's eval-lm parser over ``argv`` (plugin added); returns ``(cfg, model, task)``.

    As in ``fairseq-eval-lm``, the model is cast to half precision with ``--fp16`` and moved
    to the GPU when one is visible, unless ``--cpu``."""
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_eval_lm_parser()
    args = options.parse_args_and_arch(parser, input_args=with_plugin(argv))
    cfg = convert_namespace_to_omegaconf(args)
    if cfg.eval_lm.context_window > 0:
        cfg.task.tokens_per_sample -= cfg.eval_lm.context_window
    task = tasks.setup_task(cfg.task)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [cfg.common_eval.path], arg_overrides=eval(cfg.common_eval.model_overrides), task=task
    )
    model = models[0]
    if cfg.common.fp16:
        model.half()
    if torch.cuda.is_available() and not cfg.common.cpu:
        model.cuda()
    return cfg, model, task


@cli_entry("trime-tune")
def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    setup_cli_logging()
    parser = argparse.ArgumentParser(
        prog="trime-tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--combiner", choices=sorted(GRID_KEYS), required=True,
                        help="trime (grid over tau [ext_tau memory_lambda memory_tau k long_k pprime]; ext_tau = "
                        "--ext-temperature, 0 = tau; long_k = --long-memory-top-k, 0 = all; pprime = "
                        + ", ".join(f"{i}: {k}" for i, k in enumerate(PPRIME_KINDS))
                        + " of --memory-distribution), cache (lambda "
                        "theta) or knn (lambda temperature [k cache_lambda cache_theta])")
    parser.add_argument("--grid", nargs="+", required=True,
                        help="name=v1,v2,... per parameter; k = neighbours kept of --knn-k retrieved; "
                        f"{SKIP_AXIS} = --retrieval-skip-threshold values (adaptive retrieval, with "
                        "--retrieval-skip-feature; every setting is also scored searching every query)")
    parser.add_argument("--retrieval-skip-feature", choices=SKIP_FEATURES, default=None,
                        help=f"adaptive retrieval: the feature the --grid {SKIP_AXIS}=... values threshold "
                        "(as fairseq-eval-lm's flag of the same name)")
    parser.add_argument("--max-ppl-increase", type=float, default=DEFAULT_MAX_PPL_INCREASE,
                        help=f"with --grid {SKIP_AXIS}=...: report, per setting, the threshold that skips "
                        "the most searches with a perplexity at most this much (relative) above searching "
                        "every query")
    parser.add_argument("--cache-representation", choices=["f", "g"], default="f",
                        help="continuous cache hidden state (f = decoder output)")
    parser.add_argument("--memory-sizes", default="0",
                        help="comma-separated long-term memory sizes (tokens) to score every grid "
                        "point with; 0 = local memory only (--long-memory-size defaults to the largest)")
    parser.add_argument("--plot", default=None, help="PNG of perplexity vs. memory size")
    parser.add_argument("--out", default=None, help="write all grid points and the best as JSON")
    ours, rest = parser.parse_known_args(argv)
    try:
        sizes = sorted({int(v) for v in ours.memory_sizes.split(",") if v})
    except ValueError:
        raise TrimeUserError(f"--memory-sizes takes comma-separated integers, got {ours.memory_sizes!r}") from None
    if not sizes or sizes[0] < 0:
        raise TrimeUserError("--memory-sizes must be non-negative integers")
    if sizes[-1] > 0 and "--long-memory-size" not in rest:  # --memory-sizes is the long-term memory scored
        rest = [*rest, "--long-memory-size", str(sizes[-1])]
    grid = with_always_search(parse_grid(ours.combiner, ours.grid))
    skips = [None] + skip_rules(grid, ours.retrieval_skip_feature, rest)
    if ours.max_ppl_increase < 0:
        raise TrimeUserError(f"--max-ppl-increase must be >= 0, got {ours.max_ppl_increase}")
    combiners = [make_combiner(ours.combiner, p, ours.cache_representation) for p in grid]
    cfg, model, task = load(rest)
    ks = [0] + [int(p.get("k", 0)) for p in grid]
    external = EvalMemory.from_args(task.args).ext or ours.combiner == "knn"
    if any(ks) and not external:
        raise TrimeUserError("--grid k=... needs external memory (--eval-memory ...+ext or --combiner knn)")
    if any(skips) and not external:
        raise TrimeUserError(f"--grid {SKIP_AXIS}=... skips datastore searches: it needs external memory "
                             "(--eval-memory ...+ext or --combiner knn)")
    searches: dict = {}
    sums, counts = score_grid((model, task), cfg, [NoMemory(), *combiners], sizes, ks, skips, searches)
    skipped = [n / searches["queries"] if searches.get("queries") else 0.0 for n in searches.get("skipped", [])]
    total = counts[0][0]  # the model alone scores every token
    if total == 0:
        raise TrimeUserError(f"--gen-subset {cfg.dataset.gen_subset}: no token to score")
    rows = [{"params": {}, "combiner": "none", "memory_size": 0, "ppl": perplexity(-sums[0][0], total), "tokens": total,
             "skipped": 0.0}]
    for point, comb, per_size, per_count, rule, share in zip(grid, combiners, sums[1:], counts[1:], skips[1:],
                                                             skipped[1:] or [0.0] * len(grid)):
        for size, s, n in zip(sizes, per_size, per_count):
            desc = comb.describe() + (f" k={int(point['k'])}" if point.get("k") else "") + \
                (f" [{rule.describe()}]" if rule is not None else "")
            if n < total:
                logger.warning("%s M=%d: %d of %d tokens have probability 0 and are left out, as "
                               "fairseq-eval-lm does", desc, size, total - n, total)
            rows.append({"params": dict(point, memory_size=size), "combiner": desc, "memory_size": size,
                         "ppl": perplexity(-s, n), "tokens": n, "skipped": share})
    # a point that gives some token probability 0 is never "best": its perplexity leaves them out
    best = min((r for r in rows[1:] if r["tokens"] == total), key=lambda r: r["ppl"], default=None) or \
        min(rows[1:], key=lambda r: r["ppl"])
    for r in rows:
        logger.info("%-40s M=%-6d ppl %.3f  searches skipped %5.1f%%%s", r["combiner"], r["memory_size"], r["ppl"],
                    100 * r["skipped"], "  <- best" if r is best else "")
    result = {"subset": cfg.dataset.gen_subset, "tokens": total, "rows": rows, "best": best}
    result["grid_edges"] = result_grid_edges(result)
    warn_grid_edges(result["grid_edges"], "trime-tune")
    if any(skips):
        result["retrieval_skip_feature"] = ours.retrieval_skip_feature
        result["skip_choice"] = choose_skip(rows, ours.max_ppl_increase)
        for c in result["skip_choice"]:
            r = c["chosen"]
            logger.info("%s: always-search ppl %.3f; %s", json.dumps(c["setting"]), c["always_search_ppl"],
                        "no threshold within %.1f%%" % (100 * ours.max_ppl_increase) if r is None else
                        "--retrieval-skip-feature %s --retrieval-skip-threshold %g skips %.1f%% of searches at ppl "
                        "%.3f (within %.1f%%)" % (ours.retrieval_skip_feature, r["params"][SKIP_AXIS],
                                                  100 * r["skipped"], r["ppl"], 100 * ours.max_ppl_increase))
    if ours.plot:
        plot_memory_sweep(rows[1:], ours.plot)
    if ours.out:
        tmp = ours.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, ours.out)
    print(json.dumps(best["params"]))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
