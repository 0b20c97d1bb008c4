"""Eq. 5 over in-batch memory alone (forward + backward), key ranges against the dense mask.

Times :func:`~trime_fairseq.memory.in_batch.in_batch_log_prob` on a synthetic batch shaped
like training's (``--segments`` segments of ``--length`` tokens, ``--dim``-dimensional
representations, labels drawn from a Zipf distribution over ``--vocab`` words), once with
the memory described as key ranges (:class:`~trime_fairseq.memory.in_batch.RangeLayout`,
the default) and once with the dense mask and dense label comparison (the fallback), for
each memory mode. Both give the same losses; repetitions alternate, the best is kept.

    python benchmarks/in_batch_speed.py --modes external,long,local
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trime_fairseq.memory.in_batch import group_batch, in_batch_log_prob  # noqa: E402

logger = logging.getLogger("benchmarks.in_batch_speed")


def spec_for(mode: str, segments: int):
    """The ``sample["trime_memory"]`` of ``mode``: long memory in runs of 4 segments over
    documents of 1-4 segments; external memory with 90% of local memories dropped."""
    gen = torch.Generator().manual_seed(0)
    if mode == "external":
        return {"mode": "external", "keep_local": torch.rand(segments, generator=gen) > 0.9}
    if mode == "long":
        docs = torch.cumsum(torch.rand(segments, generator=gen) < 0.4, 0)
        return {"mode": "long", "segments_per_group": 4, "row_doc": docs}
    return None


def time_mode(mode: str, a: argparse.Namespace) -> Dict[str, float]:
    """Best forward + backward seconds of each layout, and the largest loss difference."""
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, a.vocab + 1)
    target = torch.from_numpy(rng.choice(a.vocab, size=(a.segments, a.length), p=p / p.sum()) + 4)
    torch.manual_seed(0)
    reps = torch.randn(a.segments, a.length, a.dim, requires_grad=True)
    tok_target = torch.randn(a.segments, a.length, requires_grad=True)
    tok_lse = (tok_target.detach() + 3).requires_grad_(True)
    spec = spec_for(mode, a.segments)

    def step(dense: bool) -> torch.Tensor:
        (tt, tl, r, t), memory = group_batch((tok_target, tok_lse, reps, target), spec, target)
        if dense:
            memory.ranges = lambda key_valid: None  # the dense mask and label comparison
        lprob = in_batch_log_prob(tt, tl, r, t, memory, 1, chunk_size=a.chunk)
        lprob.sum().backward()
        return lprob.detach()

    best = {"ranges": float("inf"), "dense": float("inf")}
    out = {}
    for _ in range(a.repeats + 1):  # the first round warms up
        for name in best:
            t0 = time.perf_counter()
            out[name] = step(name == "dense")
            best[name] = min(best[name], time.perf_counter() - t0)
    diff = float((out["ranges"] - out["dense"]).abs().max())
    logger.info("%s: ranges %.3f s, dense %.3f s (x%.2f); largest loss difference %.2g",
                mode, best["ranges"], best["dense"], best["dense"] / best["ranges"], diff)
    return {"ranges_s": best["ranges"], "dense_s": best["dense"], "speedup": best["dense"] / best["ranges"],
            "max_abs_diff": diff}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="external,long,local", help="comma-separated memory modes")
    p.add_argument("--segments", type=int, default=16, help="segments per batch")
    p.add_argument("--length", type=int, default=512, help="tokens per segment")
    p.add_argument("--dim", type=int, default=128, help="dimension of the representations g")
    p.add_argument("--vocab", type=int, default=8000, help="words the Zipf labels are drawn from")
    p.add_argument("--chunk", type=int, default=512, help="query rows per chunk (--similarity-chunk-size)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each layout once per round)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    result = {"args": vars(a), "torch_threads": torch.get_num_threads(),
              "modes": {m: time_mode(m, a) for m in a.modes.split(",")}}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
