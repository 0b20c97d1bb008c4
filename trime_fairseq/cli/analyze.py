"""``trime-analyze``: the paper's analyses of a memory-augmented LM on one subset.

* Retrieval accuracy (Table 9): the share of scored tokens whose target is among the
  values of the top-K retrieved datastore entries, for each K of ``--retrieval-k``.
* Perplexity by target frequency (Table 8): tokens bucketed by how often their target
  occurs in the subset itself (the paper's "frequency on the development set");
  ``--buckets`` gives the lower bounds.

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


@cli_entry("trime-analyze")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="trime-analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrieval-k", default="1,8,64,1024", help="K values of the retrieval accuracy")
    p.add_argument("--buckets", default=DEFAULT_BUCKETS, help="descending lower bounds of frequency buckets")
    p.add_argument("--out", default=None, help="write the tables as JSON (and .md beside it)")
    ours, rest = p.parse_known_args(argv)
    try:
        ks = sorted(int(k) for k in ours.retrieval_k.split(",") if k)
        bounds = sorted((int(b) for b in ours.buckets.split(",") if b), reverse=True)
    except ValueError:
        raise TrimeUserError("--retrieval-k and --buckets take comma-separated integers") from None
    from trime_fairseq.cli.tune import iter_scored_rows, load

    cfg, model, task = load(rest)
    model.eval()
    combiner = task.combiner
    external = task.args.datastore is not None
    memory = EvalMemory.from_args(task.args)
    long_size = memory.long_size
    pad = task.dictionary.pad()
    targets, lprobs, hits = [], [], {k: [] for k in ks}
    for row in iter_scored_rows(model, task, cfg, long_size, external, max(ks) if external else None,
                                combiner.representations):
        keep = row.target[0].ne(pad)
        targets.append(row.target[0][keep])
        lprobs.append(combiner.target_log_prob(row)[0][keep])
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
    md = "\n".join(lines)
    logger.info("%s\n%s", combiner.describe(), md)
    if ours.out:
        from trime_fairseq.results import write_results

        write_results(Path(ours.out), result, md)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
