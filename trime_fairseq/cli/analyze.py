"""``trime-analyze``: the paper's analyses of a memory-augmented LM on one subset.

* Retrieval accuracy (Table 9): the share of scored tokens whose target is among the
  values of the top-K retrieved datastore entries, for each K of ``--retrieval-k``.
* Perplexity by target frequency (Table 8): tokens bucketed by how often their target
  occurs in the subset itself (the paper's "frequency on the development set");
  ``--buckets`` gives the lower bounds.
* Memory by distance: for combiners that score memory entries (TRIME's Eq. 6, the cache),
  the probability mass the final distribution gives to local-memory entries and to
  long-term entries of each age (``--distance-buckets``: lower bounds, in tokens before
  the block's context window), per scored token, and the part of it that lands on the
  target. Their ratio, the precision of that stretch of memory, shows whether more
  memory adds evidence or mostly mass on wrong words (why a Figure 3 curve turns up).

The model is scored with the memory flags of the ``trime_lm`` task (``--eval-combiner``,
``--eval-memory``, ``--datastore``...), exactly as ``fairseq-eval-lm`` would.

    trime-analyze DATA --path ckpt.pt --gen-subset valid --tokens-per-sample 512 \\
        --context-window 256 --eval-combiner trime --eval-memory local+ext --datastore ds/train \\
        --retrieval-k 1,8,64,1024 --out analysis.json
"""
import argparse
import logging
import math
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from trime_fairseq.tasks.memory_flags import EvalMemory
from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.errors import TrimeUserError, cli_entry

logger = logging.getLogger("trime_fairseq.analyze")

DEFAULT_BUCKETS = "10000,1000,100,10"  # descending lower bounds of the target-frequency buckets
DEFAULT_DISTANCE_BUCKETS = "0,2000,4000,8000"  # ascending lower bounds of long-term memory age (tokens)
LOCAL = "local"  #: the name of the local-memory row of the distance table


def frequency_buckets(counts: np.ndarray, bounds: Sequence[int]) -> List[str]:
    """Labels like ``>10000``, ``1000-10000``, ``<=10`` for descending lower ``bounds``."""
    labels = []
    for i, lo in enumerate(bounds):
        labels.append(f">{lo}" if i == 0 else f"{lo}-{bounds[i - 1]}")
    labels.append(f"<={bounds[-1]}")
    return labels


def bucket_of(freq: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    out = np.full(freq.shape, len(bounds), dtype=np.int64)
    for i in reversed(range(len(bounds))):
        out[freq > bounds[i]] = i
    return out


def distance_labels(bounds: Sequence[int]) -> List[str]:
    """``local``, then ``0-2000``, ``2000-4000`` ... ``>=8000`` for ascending ``bounds``."""
    names = [LOCAL]
    for i, lo in enumerate(bounds):
        names.append(f"{lo}-{bounds[i + 1]}" if i + 1 < len(bounds) else f">={lo}")
    return names


def mass_by_distance(log_weight: torch.Tensor, labels: torch.Tensor, key_rank: Optional[torch.Tensor],
                     target: torch.Tensor, keep: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """Summed per-token probability mass ``[len(bounds) + 1, 2]`` (all of it, and the part on
    the target) of the shared memory entries (local: ``key_rank`` -1 or no rank; long-term:
    by age rank, 0 = newest), over the ``keep`` queries of one row.

    Args:
        log_weight, labels: ``[T, K]`` the first K (shared) entries of :class:`Contributions`.
        key_rank: ``[K]`` or ``None`` (local memory only); target, keep: ``[T]``.
    """
    w = torch.exp(log_weight[keep].double())  # -inf (unused entries) -> 0
    on_target = w * labels[keep].eq(target[keep].unsqueeze(-1))
    rank = key_rank if key_rank is not None else torch.full((w.size(-1),), -1, device=w.device)
    # bucket 0: local (rank -1); bucket i: bounds[i-1] <= rank < bounds[i]
    edges = torch.tensor(list(bounds), dtype=rank.dtype, device=rank.device)
    bucket = torch.where(rank < 0, 0, torch.bucketize(rank, edges, right=True)).cpu()
    per_entry = torch.stack([w.sum(0), on_target.sum(0)], -1).cpu()
    return torch.zeros(len(bounds) + 1, 2, dtype=torch.float64).index_add_(0, bucket, per_entry)


def distance_table(sums: torch.Tensor, tokens: int, bounds: Sequence[int]) -> List[dict]:
    """Rows ``{"memory", "mass", "on_target", "precision"}``: mean mass per scored token
    (precision ``None`` where a stretch of memory got no mass)."""
    rows = []
    for name, (mass, hit) in zip(distance_labels(bounds), sums.tolist()):
        rows.append({"memory": name, "mass": mass / max(tokens, 1), "on_target": hit / max(tokens, 1),
                     "precision": hit / mass if mass > 0 else None})
    return rows


@cli_entry("trime-analyze")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="trime-analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrieval-k", default="1,8,64,1024", help="K values of the retrieval accuracy")
    p.add_argument("--buckets", default=DEFAULT_BUCKETS, help="descending lower bounds of frequency buckets")
    p.add_argument("--distance-buckets", default=DEFAULT_DISTANCE_BUCKETS,
                   help="ascending lower bounds (tokens before the context window) of the long-term memory "
                   "ages of the memory-by-distance table")
    p.add_argument("--out", default=None, help="write the tables as JSON (and .md beside it)")
    ours, rest = p.parse_known_args(argv)
    try:
        ks = sorted(int(k) for k in ours.retrieval_k.split(",") if k)
        bounds = sorted((int(b) for b in ours.buckets.split(",") if b), reverse=True)
        distances = sorted({int(b) for b in ours.distance_buckets.split(",") if b})
    except ValueError:
        raise TrimeUserError("--retrieval-k, --buckets and --distance-buckets take comma-separated integers") from None
    if not distances or distances[0] != 0:
        raise TrimeUserError(f"--distance-buckets must start at 0, got {ours.distance_buckets!r}")
    from trime_fairseq.cli.tune import iter_scored_rows, load

    cfg, model, task = load(rest)
    model.eval()
    combiner = task.combiner
    external = task.args.datastore is not None
    memory = EvalMemory.from_args(task.args)
    long_size = memory.long_size
    pad = task.dictionary.pad()
    targets, lprobs, hits = [], [], {k: [] for k in ks}
    by_distance = torch.zeros(len(distances) + 1, 2, dtype=torch.float64)
    scores_entries = True
    for row in iter_scored_rows(model, task, cfg, long_size, external, max(ks) if external else None,
                                combiner.representations):
        keep = row.target[0].ne(pad)
        targets.append(row.target[0][keep])
        lprobs.append(combiner.target_log_prob(row)[0][keep])
        contrib = combiner.contributions(row) if scores_entries else None
        if contrib is None:
            scores_entries = False
        else:
            n = contrib.num_shared
            rank = None if row.key_rank is None else row.key_rank[0]
            by_distance += mass_by_distance(contrib.log_weight[0, :, :n], contrib.labels[0, :, :n], rank,
                                            row.target[0], keep, distances)
        if external:
            labels = row.ext_labels[0][keep]
            found = torch.isfinite(row.ext_scores[0][keep])
            match = (labels == row.target[0][keep].unsqueeze(-1)) & found
            for k in ks:
                hits[k].append(match[:, :k].any(-1))
    t = torch.cat(targets).cpu().numpy()
    lp = torch.cat(lprobs).double().cpu().numpy()
    freq = np.bincount(t)[t]
    b = bucket_of(freq, bounds)
    labels = frequency_buckets(freq, bounds)
    table8 = []
    for i, name in enumerate(labels):
        sel = b == i
        table8.append({"bucket": name, "tokens": int(sel.sum()),
                       "ppl": float(math.exp(-lp[sel].mean())) if sel.any() else float("nan")})
    table8.append({"bucket": "all", "tokens": len(lp), "ppl": float(math.exp(-lp.mean()))})
    result = {"combiner": combiner.describe(), "memory": str(task.args.eval_memory), "subset": cfg.dataset.gen_subset,
              "ppl_by_frequency": table8}
    lines = ["| target frequency | tokens | ppl |", "|---|---:|---:|"]
    lines += [f"| {r['bucket']} | {r['tokens']} | {r['ppl']:.2f} |" for r in table8]
    if external:
        result["retrieval_accuracy"] = {str(k): float(torch.cat(hits[k]).float().mean()) for k in ks}
        lines += ["", "| K | target among top-K values |", "|---:|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in result["retrieval_accuracy"].items()]
    if scores_entries:
        rows = distance_table(by_distance, len(lp), distances)
        result["memory_by_distance"] = rows if long_size > 0 else rows[:1]
        lines += ["", "| memory (tokens back) | mass per token | on target | precision |", "|---|---:|---:|---:|"]
        lines += [f"| {r['memory']} | {r['mass']:.4f} | {r['on_target']:.4f} | "
                  f"{'' if r['precision'] is None else format(r['precision'], '.3f')} |"
                  for r in result["memory_by_distance"]]
    md = "\n".join(lines)
    logger.info("%s\n%s", combiner.describe(), md)
    if ours.out:
        from trime_fairseq.results import write_results

        write_results(Path(ours.out), result, md)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
