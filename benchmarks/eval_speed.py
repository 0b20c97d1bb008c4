"""Evaluation throughput with long-term memory against local memory only, same model, same run.

Scores the same blocks (``--task trime_lm``'s ordered loader, as ``fairseq-eval-lm`` does)
with TRIME's Eq. 6 and (a) local memory, (b) local + a long-term memory of
``--long-memory-size`` tokens. Passes alternate so that machine noise hits both. With
``--one-document`` the split is read as a single document, so the long-term memory is
full (the worst case); otherwise it fills only as far as documents are long, and the mean
occupancy is reported. Target: ratio >= 0.9.

Where the time goes: one more pass of each variant under ``torch.profiler`` gives the
operators whose time grew over local-only scoring (``extra_time_split``), and
``similarity_bound`` is the best ratio possible if everything but the [tokens, d] x [d, M]
similarity products against the long-term memory were free.

    python benchmarks/eval_speed.py DATA_BIN --path CKPT --tokens-per-sample 512 \\
        --context-window 256 --long-memory-size 12000 --max-blocks 200
"""
import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profiling import best_seconds, extra_time_split, profile_operators  # noqa: E402
from trime_fairseq.cli.tune import load  # noqa: E402
from trime_fairseq.data.stream import StreamBlocks, TokenStream  # noqa: E402
from trime_fairseq.memory.combiners import TrimeCombiner  # noqa: E402
from trime_fairseq.models.memory_eval import MemoryEvalModel  # noqa: E402

logger = logging.getLogger("benchmarks.eval_speed")


def one_pass(wrapper: MemoryEvalModel, blocks: StreamBlocks, batch_size: int, max_blocks: int):
    """Tokens/s of forward + memory scoring over the first ``max_blocks`` blocks."""
    wrapper.long_memory = None
    n = min(len(blocks), max_blocks)
    tokens, occupancy = 0, []
    t0 = time.perf_counter()
    with torch.no_grad():
        for k in range(0, n, batch_size):
            sample = blocks.collater([blocks[i] for i in range(k, min(k + batch_size, n))])
            wrapper.get_normalized_probs(wrapper(**sample["net_input"]), True, sample)
            tokens += sample["ntokens"]
            if wrapper.long_memory is not None and wrapper.long_memory.labels is not None:
                occupancy.append(min(int(wrapper.long_memory.labels.numel()), wrapper.long_memory_size))
    return tokens / (time.perf_counter() - t0), (statistics.mean(occupancy) if occupancy else 0.0)


def similarity_bound(blocks: StreamBlocks, batch_size: int, local_tokens_per_s: float, entries: float, dim: int,
                     repeats: int = 3) -> dict:
    """Tokens/s ÷ local-only if the long-term memory cost nothing but its similarity products:
    one batch's scored tokens against ``entries`` keys of dimension ``dim`` (the mean
    occupancy), ``t_local / (t_local + t_products)``; and if it cost only those and the one
    exponential per similarity that Eq. 6's softmax cannot do without (``..._with_exp``)."""
    sample = blocks.collater([blocks[i] for i in range(min(batch_size, len(blocks)))])
    tokens = int(sample["ntokens"])
    q, k = torch.randn(tokens, dim), torch.randn(max(1, int(entries)), dim)
    best = best_seconds(lambda: q @ k.T, repeats)
    with_exp = best_seconds(lambda: (q @ k.T).exp_(), repeats)
    t_local = tokens / local_tokens_per_s
    return {"tokens": tokens, "entries": int(entries), "dim": dim, "products_s": best, "local_batch_s": t_local,
            "bound_ratio_vs_local": t_local / (t_local + best), "products_exp_s": with_exp,
            "bound_ratio_vs_local_with_exp": t_local / (t_local + with_exp)}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s", force=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-memory-size", type=int, default=12000, help="long-term memory tokens")
    p.add_argument("--tau", type=float, default=1.0, help="Eq. 6 temperature")
    p.add_argument("--max-blocks", type=int, default=200, help="blocks scored per pass")
    p.add_argument("--passes", type=int, default=3, help="alternating passes per variant")
    p.add_argument("--one-document", action="store_true", help="read the split as one document (memory full)")
    p.add_argument("--out", default=None, help="write the result as JSON")
    ours, rest = p.parse_known_args(argv)
    cfg, model, task = load(rest)
    model.eval()
    split = cfg.dataset.gen_subset
    stream = task.stream(split)
    if ours.one_document:
        stream = TokenStream(stream.tokens, np.zeros(1, dtype=np.int64))
    pad = task.source_dictionary.pad()
    blocks = StreamBlocks(stream, task.args.tokens_per_sample, cfg.eval_lm.context_window, pad)
    bsz = cfg.dataset.batch_size or max(1, (cfg.dataset.max_tokens or 4096) // (task.args.tokens_per_sample + cfg.eval_lm.context_window))
    variants = {
        "local": MemoryEvalModel(model, TrimeCombiner(ours.tau), pad),
        f"local+long({ours.long_memory_size})": MemoryEvalModel(model, TrimeCombiner(ours.tau), pad, ours.long_memory_size),
    }
    speeds = {k: [] for k in variants}
    occ = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(ours.passes):
        for name, w in variants.items():
            tps, occ[name] = one_pass(w, blocks, bsz, ours.max_blocks)
            speeds[name].append(tps)
            logger.info("pass %d %-22s %.0f tokens/s (mean long-memory occupancy %.0f)", i, name, tps, occ[name])
    base = statistics.median(speeds["local"])
    own = {name: profile_operators(lambda w=w: one_pass(w, blocks, bsz, ours.max_blocks))[1]
           for name, w in variants.items()}
    long_name = next(k for k in variants if k != "local")
    result = {
        "tokens_per_s": {k: statistics.median(v) for k, v in speeds.items()},
        "ratio_vs_local": {k: statistics.median(v) / base for k, v in speeds.items()},
        "mean_long_memory_occupancy": occ,
        "one_document": ours.one_document,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
        "batch_size": bsz,
        "extra_time_split": extra_time_split(own["local"], own[long_name]),
        "similarity_bound": similarity_bound(blocks, bsz, base, occ[long_name], int(model.decoder.embed_dim)),
    }
    result["rows"] = [{"system": k, "tokens_per_s": result["tokens_per_s"][k], "ratio_vs_local": result["ratio_vs_local"][k],
                       "mean_long_memory_occupancy": occ[k]} for k in variants]
    logger.info("%s", json.dumps(result, indent=2))
    if ours.out:
        from trime_fairseq.results import write_results

        write_results(Path(ours.out), result, markdown(result))
    return result


def markdown(result: dict) -> str:
    """The throughput table, the bound and the profile's growth over local-only scoring."""
    lines = ["| memory | tokens/s | ratio vs local | mean long-memory entries |", "|---|---:|---:|---:|"]
    lines += [f"| {r['system']} | {r['tokens_per_s']:,.0f} | {r['ratio_vs_local']:.3f} | "
              f"{r['mean_long_memory_occupancy']:,.0f} |" for r in result["rows"]]
    b, x = result["similarity_bound"], result["extra_time_split"]
    lines.append(f"\nSimilarity products alone ([{b['tokens']:,}, {b['dim']}] x [{b['dim']}, {b['entries']:,}] per batch): "
                 f"{b['products_s']:.3f} s against {b['local_batch_s']:.3f} s of local-only scoring, so the ratio is at "
                 f"most {b['bound_ratio_vs_local']:.3f}; with one exponential per similarity "
                 f"({b['products_exp_s']:.3f} s), at most {b['bound_ratio_vs_local_with_exp']:.3f}.")
    lines.append(f"\nProfile of one pass: {x['extra_ms']:+,.0f} ms of operator time over local-only's "
                 f"{x['base_ms']:,.0f} ms; grew most: " + ", ".join(f"{k} {v:+,.0f} ms" for k, v in x["top"].items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
