"""External-memory speed, as ratios against baselines measured in the same run.

1. ``bm25``: BM25 batching of ``--bm25-segments`` real training segments (target <= 60 s).
2. ``datastore``: datastore build keys/s ÷ plain forward tokens/s over the same blocks
   (target >= 0.9), and peak RSS for two sizes (should stay flat as N grows:
   ``peak_rss_ratio_large_vs_small`` ~ 1).
3. ``ext_eval`` (needs ``--datastore`` with an index): kNN-LM scoring tokens/s ÷ vanilla
   scoring tokens/s over the same valid blocks (target >= 0.5 at recall@K >= 0.9), with
   the time split into model / search / combine and the share of searches skipped; with
   ``--retrieval-skip-feature`` also adaptive retrieval (``adaptive``: its threshold set
   so that about ``--skip-share`` of the searches are skipped).

    python benchmarks/external_speed.py DATA_BIN --path CKPT --tokens-per-sample 512 \\
        --context-window 256 [--datastore runs/ext/ds/vanilla] --out bench_ext.json
"""
import argparse
import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmarks.external_speed")


def bench_bm25(task, n_segments: int, length: int = 20, batch_size: int = 16) -> dict:
    from trime_fairseq.data.bm25 import BM25, bm25_batches
    from trime_fairseq.data.stream import DocumentSegments

    seg = DocumentSegments(task.stream("train"), length, task.dictionary.pad())
    n = min(n_segments, len(seg))
    docs = [seg[i]["source"].numpy() for i in range(n)]
    t0 = time.perf_counter()
    bm = BM25(docs)
    ids, scores = bm.neighbours(32)
    batches = bm25_batches(ids, scores, batch_size)
    seconds = time.perf_counter() - t0
    return {"segments": n, "segment_length": length, "seconds": seconds, "batches": len(batches), "target_s": 60}


def bench_datastore(cfg, model, task, max_blocks: int) -> dict:
    from trime_fairseq.memory.datastore import DatastoreMeta, DatastoreWriter

    context = cfg.eval_lm.context_window
    from trime_fairseq.tasks.datastore_keys import DEFAULT_KEY_MAX_TOKENS

    max_tokens = cfg.dataset.max_tokens or DEFAULT_KEY_MAX_TOKENS

    def iter_keys(blocks: int):  # the first ``blocks`` blocks of the split, as trime-build-datastore reads them
        return task.iter_datastore_keys(model, "train", max_tokens, None, context,
                                        end_key=blocks * task.args.tokens_per_sample)
    t0 = time.perf_counter()  # baseline: the same forward passes, nothing stored
    n_fwd = sum(len(b.values) for b in iter_keys(max_blocks))
    forward_tps = n_fwd / (time.perf_counter() - t0)
    result = {"forward_tokens_per_s": forward_tps}
    for blocks in (max_blocks // 4, max_blocks):
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with tempfile.TemporaryDirectory() as tmp:
            n = sum(len(b.values) for b in iter_keys(blocks))
            dim = model.decoder.layers[-1].fc1.in_features
            meta = DatastoreMeta(size=n, dim=dim, key_dtype="float16", value_dtype="int32", key_type="ffn_input",
                                 model_sha256="bench", dictionary_sha256="bench", vocab_size=len(task.dictionary), source={})
            writer = DatastoreWriter(os.path.join(tmp, "ds"), meta)
            t0 = time.perf_counter()
            for keys, values, *_ in iter_keys(blocks):
                writer.write(keys.float().numpy(), values.numpy())
                writer.checkpoint()
            writer.finish()
            tps = n / (time.perf_counter() - t0)
        result[f"build_keys_per_s_{n}"] = tps
        result[f"peak_rss_growth_mb_{n}"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        result[f"peak_rss_mb_{n}"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.setdefault("sizes", []).append(n)
    result["ratio_build_vs_forward"] = tps / forward_tps
    # the process's peak after building 4x the keys ÷ its peak after the smaller build: flat = ~1
    result["peak_rss_ratio_large_vs_small"] = result[f"peak_rss_mb_{n}"] / result[f"peak_rss_mb_{result['sizes'][0]}"]
    result["target_ratio"] = 0.9
    return result


def bench_ext_eval(cfg, model, task, datastore: str, k: int, max_blocks: int, lam: float, temp: float,
                   skip_feature: Optional[str] = None, skip_share: float = 0.0) -> dict:
    """kNN-LM ÷ vanilla scoring speed with the time split and the share of searches skipped;
    with ``skip_feature`` also adaptive retrieval, its threshold set on these blocks so that
    about ``skip_share`` of the searches are skipped."""
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.memory.combiners import KnnCombiner, NoMemory
    from trime_fairseq.memory.datastore import Datastore
    from trime_fairseq.memory.retriever import RetrievalSkip, Retriever
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    pad = task.dictionary.pad()
    blocks = StreamBlocks(task.stream("valid"), task.args.tokens_per_sample, cfg.eval_lm.context_window, pad)
    bsz = max(1, (cfg.dataset.max_tokens or 4096) // (task.args.tokens_per_sample + cfg.eval_lm.context_window))
    n = min(len(blocks), max_blocks)
    retriever = Retriever(Datastore(datastore), k=k)
    features = []

    def run(wrapper, collect: bool = False):
        tokens, nll, t0 = 0, 0.0, time.perf_counter()
        with torch.no_grad():
            for s in range(0, n, bsz):
                sample = blocks.collater([blocks[i] for i in range(s, min(s + bsz, n))])
                lp = wrapper.get_normalized_probs(wrapper(**sample["net_input"]), True, sample)
                tgt = sample["target"]
                keep = tgt.ne(pad)
                nll -= float(lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)[keep].sum())
                tokens += sample["ntokens"]
                if collect and skip_feature:
                    features.append(RetrievalSkip(skip_feature, 0.0).values(lp)[keep])
        return tokens / (time.perf_counter() - t0), math.exp(nll / max(1, tokens))

    def measured(name, wrapper, v_tps):
        retriever.reset_counters()
        tps, ppl = run(wrapper)
        split = dict(wrapper.timings)
        return {f"{name}_tokens_per_s": tps, f"{name}_ppl": ppl, "ratio": tps / v_tps, "time_split_s": split,
                "skipped": retriever.counters()["skipped_share"]}

    vanilla = MemoryEvalModel(model, NoMemory(), pad)
    run(vanilla, collect=True)  # warm-up (and the features of the skip rule)
    v_tps, v_ppl = run(MemoryEvalModel(model, NoMemory(), pad))
    knn = measured("knn", MemoryEvalModel(model, KnnCombiner(lam, temp), pad, retriever=retriever), v_tps)
    out = {
        "vanilla_tokens_per_s": v_tps, "vanilla_ppl": v_ppl, **knn, "target_ratio": 0.5,
        "k": retriever.k, "keys": len(retriever.datastore), "index": retriever.config.factory,
        "nprobe": retriever.config.nprobe, "recall": retriever.config.recall,
    }
    if skip_feature:
        values = torch.cat(features)
        q = skip_share if skip_feature == "entropy" else 1.0 - skip_share
        threshold = float(values.quantile(min(max(q, 0.0), 1.0)))
        retriever.skip = RetrievalSkip(skip_feature, threshold)
        adaptive = measured("knn", MemoryEvalModel(model, KnnCombiner(lam, temp), pad, retriever=retriever), v_tps)
        adaptive["rule"] = retriever.skip.describe()
        adaptive["ratio_vs_knn"] = adaptive["knn_tokens_per_s"] / knn["knn_tokens_per_s"]
        out["adaptive"] = adaptive
        retriever.skip = None
    return out


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s", force=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="bm25,datastore,ext_eval", help="which parts to run")
    p.add_argument("--bm25-segments", type=int, default=100_000, help="segments for the BM25 timing")
    p.add_argument("--blocks", type=int, default=200, help="blocks for datastore and eval timing")
    p.add_argument("--datastore", default=None, help="datastore (with index) for the ext_eval part")
    p.add_argument("--knn-k", type=int, default=1024, help="neighbours")
    p.add_argument("--knn-lambda", type=float, default=0.25, help="kNN-LM lambda")
    p.add_argument("--knn-temperature", type=float, default=10.0, help="kNN-LM temperature")
    p.add_argument("--retrieval-skip-feature", choices=["entropy", "max-prob"], default=None,
                   help="ext_eval: also time adaptive retrieval with this feature")
    p.add_argument("--skip-share", type=float, default=0.5,
                   help="ext_eval with --retrieval-skip-feature: the threshold is set on the timed blocks "
                   "so that about this share of the searches is skipped")
    p.add_argument("--out", default=None, help="write JSON here")
    ours, rest = p.parse_known_args(argv)
    from trime_fairseq.cli.tune import load

    cfg, model, task = load(rest)
    model.eval()
    parts = ours.only.split(",")
    result = {}
    if "bm25" in parts:
        result["bm25"] = bench_bm25(task, ours.bm25_segments)
        logger.info("bm25: %s", result["bm25"])
    if "datastore" in parts:
        result["datastore"] = bench_datastore(cfg, model, task, ours.blocks)
        logger.info("datastore: %s", result["datastore"])
    if "ext_eval" in parts and ours.datastore:
        result["ext_eval"] = bench_ext_eval(cfg, model, task, ours.datastore, ours.knn_k, ours.blocks,
                                            ours.knn_lambda, ours.knn_temperature,
                                            ours.retrieval_skip_feature, ours.skip_share)
        logger.info("ext_eval: %s", result["ext_eval"])
    print(json.dumps(result, indent=2))
    if ours.out:
        from trime_fairseq.results import atomic_write

        atomic_write(Path(ours.out), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
