"""Evaluation throughput with long-term memory against local memory only, same model, same run.

Scores the same blocks (``--task trime_lm``'s ordered loader, as ``fairseq-eval-lm`` does)
with TRIME's Eq. 6 and (a) local memory, (b) local + a long-term memory of
``--long-memory-size`` tokens. Passes alternate so that machine noise hits both. With
``--one-document`` the split is read as a single document, so the long-term memory is
full (the worst case); otherwise it fills only as far as documents are long, and the mean
occupancy is reported. Target: ratio >= 0.9.

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
    result = {
        "tokens_per_s": {k: statistics.median(v) for k, v in speeds.items()},
        "ratio_vs_local": {k: statistics.median(v) / base for k, v in speeds.items()},
        "mean_long_memory_occupancy": occ,
        "one_document": ours.one_document,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
        "batch_size": bsz,
    }
    logger.info("%s", json.dumps(result, indent=2))
    if ours.out:
        from trime_fairseq.results import atomic_write

        atomic_write(Path(ours.out), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
