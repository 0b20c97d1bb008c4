"""External-memory speed, as ratios against baselines measured in the same run.

1. ``bm25``: BM25 batching of ``--bm25-segments`` real training segments (target <= 60 s).
2. ``datastore``: datastore build keys/s ÷ plain forward tokens/s over the same blocks
   (target >= 0.9), and peak RSS for two sizes (should stay flat as N grows:
   ``peak_rss_ratio_large_vs_small`` ~ 1).
3. ``ext_eval`` (needs ``--datastore`` with an index): kNN-LM scoring tokens/s ÷ vanilla
   and TRIMELM_ext (local + external) ÷ TRIME with local memory only, over the same valid
   blocks (target >= 0.3 each), at a perplexity within ``--budget`` (1%) of the full search
   (``--knn-k`` neighbours at the index's recall-tuned nprobe): smaller K and fewer lists
   probed ("search cheaper") and, with ``--retrieval-skip-feature``, skipped searches
   ("search less") are swept and the fastest setting within the budget is kept. Both
   perplexities, every setting tried, the time split into model / search / combine and the
   share of searches skipped are in the output.

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
from typing import List, Optional, Sequence, Tuple

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


def _nprobes(retriever) -> List[Optional[int]]:
    """The nprobe values a search-settings sweep tries: the index's own (tuned for recall at
    the full K), then every quarter of it down to 1; ``[None]`` for an index without lists."""
    from trime_fairseq.memory.index import ivf_nlist

    if not ivf_nlist(retriever.index.index):
        return [None]
    top = max(1, int(retriever.config.nprobe))
    out = [top]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 4))
    return out


def bench_ext_eval(cfg, model, task, datastore: str, k: int, max_blocks: int, lam: float, temp: float,
                   skip_feature: Optional[str] = None, budget: float = 0.01,
                   ks: Sequence[int] = (256, 64, 16), skip_shares: Sequence[float] = (0.1, 0.2, 0.3, 0.5),
                   trime_tau: float = 1.0) -> dict:
    """Retrieval-bound scoring speed against the same model without a datastore, in one run.

    For kNN-LM (÷ vanilla) and TRIMELM_ext (local + external memory, ÷ TRIME with local
    memory only): the full search (``k`` neighbours at the index's recall-tuned nprobe) gives
    the reference perplexity; then "search cheaper": the full K and every smaller K of ``ks``,
    each with nprobe cut by 4 each step, then at its fewest lists within the budget fewer
    candidates re-ranked (``k_factor`` halved, indexes with a refinement stage); then "search
    less" (with ``skip_feature``): the shares of ``skip_shares`` skipped on top of the fastest
    of those within ``budget`` of the reference.
    The fastest setting within the budget is kept. Every setting is scored on
    the same valid blocks; each chosen setting is timed once more with its time split
    (model / search / combine) and share of searches skipped."""
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.memory.combiners import KnnCombiner, NoMemory, TrimeCombiner
    from trime_fairseq.memory.datastore import Datastore
    from trime_fairseq.memory.retriever import RetrievalSkip, Retriever
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    pad = task.dictionary.pad()
    blocks = StreamBlocks(task.stream("valid"), task.args.tokens_per_sample, cfg.eval_lm.context_window, pad)
    bsz = max(1, (cfg.dataset.max_tokens or 4096) // (task.args.tokens_per_sample + cfg.eval_lm.context_window))
    n = min(len(blocks), max_blocks)
    retriever = Retriever(Datastore(datastore), k=k)
    full_k = retriever.k
    nprobes = _nprobes(retriever)  # before the sweep changes the index's nprobe
    full_nprobe = nprobes[0]  # None: the index has no inverted lists to probe
    full_k_factor = retriever.config.k_factor
    # re-ranking fewer candidates: halve k_factor down to 1 (only an index with a refinement stage)
    k_factors = [full_k_factor / 2 ** i for i in range(1, 8) if full_k_factor / 2 ** i >= 1] \
        if retriever.index.set_k_factor(full_k_factor) else []
    features = []

    def run(wrapper, collect: bool = False) -> Tuple[float, float]:
        """(tokens/s, perplexity) of one pass over the blocks."""
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

    def configure(kk: int, nprobe: Optional[int], share: float = 0.0, k_factor: Optional[float] = None) -> None:
        retriever.k = kk
        if nprobe is not None:
            retriever.index.set_nprobe(nprobe)
        if k_factors:
            retriever.index.set_k_factor(k_factor or full_k_factor)
        retriever.skip = RetrievalSkip.for_share(skip_feature, skip_values, share) if share > 0 else None

    def measured(wrapper, base_tps: float, setting: dict) -> dict:
        """One timed pass of ``wrapper`` at ``setting``, with its split and share skipped."""
        configure(setting["k"], setting["nprobe"], setting.get("skip_share", 0.0), setting.get("k_factor"))
        retriever.reset_counters()
        wrapper.timings.update(dict.fromkeys(wrapper.timings, 0.0))
        tps, ppl = run(wrapper)
        out = {**setting, "tokens_per_s": tps, "ppl": ppl, "ratio": tps / base_tps,
               "time_split_s": dict(wrapper.timings), "skipped": retriever.counters()["skipped_share"]}
        if retriever.skip is not None:
            out["rule"] = retriever.skip.describe()
        logger.info("%s: %s -> ppl %.3f, %.0f tokens/s (%.3f x its baseline), %.0f%% skipped", type(wrapper.combiner).__name__,
                    setting, ppl, tps, out["ratio"], 100 * out["skipped"])
        return out

    def cheapest(wrapper, baseline) -> dict:
        """Full search, the search-settings sweep and the skip sweep of one scorer (docstring);
        ``baseline``: the same model without a datastore, timed before the full search and
        again right before the kept setting's last pass (the ratios of each pair)."""
        base_tps = run(baseline)[0]
        full = measured(wrapper, base_tps, {"k": full_k, "nprobe": full_nprobe})
        limit = full["ppl"] * (1 + budget)

        def until_over(settings) -> List[dict]:
            """Measure ``settings`` in order (each cheaper than the last) up to the first
            one over the budget: the ones after it would only lose more."""
            rows = []
            for setting in settings:
                rows.append(measured(wrapper, base_tps, setting))
                rows[-1]["within_budget"] = rows[-1]["ppl"] <= limit
                if not rows[-1]["within_budget"]:
                    break
            return rows

        def fastest(rows: List[dict]) -> dict:
            """The setting (its keys only) of the fastest row within the budget, or ``full``'s."""
            best = max([full, *[r for r in rows if r.get("within_budget")]], key=lambda r: r["tokens_per_s"])
            return {key: best[key] for key in ("k", "nprobe", "k_factor", "skip_share") if key in best}

        sweep = []
        for kk in [full_k, *sorted((x for x in ks if x < full_k), reverse=True)]:
            # fewer lists probed (the full K starts from the full search), then, at the
            # fastest of those within the budget, fewer candidates re-ranked with the exact keys
            rows = until_over({"k": kk, "nprobe": nprobe} for nprobe in (nprobes[1:] if kk == full_k else nprobes))
            if rows and not rows[0]["within_budget"] and rows[0]["nprobe"] == nprobes[0]:
                sweep += rows
                break  # this K is over the budget at the full nprobe: a smaller K only loses more
            nprobe = min((r["nprobe"] for r in rows if r["within_budget"]), default=full_nprobe)
            rows += until_over({"k": kk, "nprobe": nprobe, "k_factor": f} for f in k_factors)
            sweep += rows
        kept = fastest(sweep)
        skips = until_over({**kept, "skip_share": share} for share in skip_shares) if skip_feature else []
        setting = fastest(sweep + skips)
        base_tps = run(baseline)[0]
        best = measured(wrapper, base_tps, setting)  # timed again, next to its baseline
        return {"full": full, "sweep": sweep, "skip_sweep": skips, "best": best, "baseline_tokens_per_s": base_tps,
                "ppl_increase": best["ppl"] / full["ppl"] - 1}

    vanilla = MemoryEvalModel(model, NoMemory(), pad)
    run(vanilla, collect=True)  # warm-up (and the features of the skip rule)
    skip_values = torch.cat(features) if features else None
    v_tps, v_ppl = run(vanilla)
    knn = cheapest(MemoryEvalModel(model, KnnCombiner(lam, temp), pad, retriever=retriever), vanilla)
    # TRIMELM_ext: Eq. 6 over local + external memory; the external entries at the kNN
    # temperature (tau_ext), since they are L2 distances of a datastore, not in-batch keys
    local = MemoryEvalModel(model, TrimeCombiner(trime_tau), pad)
    l_tps, l_ppl = run(local)
    trime = cheapest(MemoryEvalModel(model, TrimeCombiner(trime_tau, ext_temperature=temp), pad,
                                     retriever=retriever), local)
    configure(full_k, full_nprobe)
    return {
        "vanilla_tokens_per_s": v_tps, "vanilla_ppl": v_ppl, "trime_local_tokens_per_s": l_tps,
        "trime_local_ppl": l_ppl, "knn": knn, "trime_ext": trime, "budget": budget, "target_ratio": 0.3,
        "k": full_k, "keys": len(retriever.datastore), "index": retriever.config.factory,
        "nprobe": full_nprobe, "recall": retriever.config.recall,
    }


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
    p.add_argument("--budget", type=float, default=0.01,
                   help="ext_eval: the largest relative perplexity increase over the full search that a "
                   "cheaper search setting (smaller K, fewer lists probed, skipped searches) may cost")
    p.add_argument("--cheaper-k", default="256,64,16",
                   help="ext_eval: the smaller K values tried (comma-separated), each with nprobe cut by 4 per step")
    p.add_argument("--skip-shares", default="0.1,0.2,0.3,0.5",
                   help="ext_eval with --retrieval-skip-feature: the shares of searches to skip that are tried "
                   "on top of the cheapest search setting")
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
                                            ours.retrieval_skip_feature, ours.budget,
                                            [int(x) for x in ours.cheaper_k.split(",") if x],
                                            [float(x) for x in ours.skip_shares.split(",") if x])
        logger.info("ext_eval: %s", result["ext_eval"])
    print(json.dumps(result, indent=2))
    if ours.out:
        from trime_fairseq.results import atomic_write

        atomic_write(Path(ours.out), json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
