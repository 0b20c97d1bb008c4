"""Training throughput of ``trime_loss`` against plain ``cross_entropy``, same model, same run.

Variants: ``cross_entropy``; ``trime_loss`` (local memory, fairseq's batches);
``memorizing`` vs ``memorizing_no_memory`` (``--memorizing SIZE``: the Memorizing
Transformer with and without its kNN memory, same weights and batches; both warm up until
the memory is full, so the timed steps search a full memory; the recall@k of faiss search
against exact search is measured on the memory and queries of one more step);
``trime_loss_long`` (``--consecutive-segments m``, long-term in-batch memory) and
``trime_loss_long_stream`` (the same with ``--memory-across-documents``: the reference's
unpadded stream segments, memory across documents) when ``--long-m`` is given;
``trime_loss_ext`` (BM25 batches, memory = the whole batch) and ``trime_loss_ext_stream``
(the same over the unpadded stream segments of ``--memory-across-documents``, as the
reference batches) with ``--ext``. With either, ``cross_entropy_document_segments`` too: CE on the document-aligned
segments those two train on (its BM25 batches with ``--ext``, else the consecutive
segments; a document's last segment is padded, and padding is not counted in tokens/s), so
their ratio against it is the memory's own cost.

Both criteria train the same architecture on the same batches (fairseq's own task,
model, criterion and batch iterator); blocks of steps alternate between them so that
machine noise hits both alike. Prints tokens/s of each, the ratio (target >= 0.95; the
median of the ratios within each block, :func:`paired_ratio`) and the
peak RSS growth of each, and writes JSON/markdown if asked. ``--device cuda`` trains on the
first GPU (peak memory is then CUDA's ``max_memory_allocated``); ``--op-counts`` adds the
operators one step of each variant dispatches (a GPU step of a small model is bound by them).

    python benchmarks/train_speed.py DATA_BIN --arch transformer_lm_trime_small \\
        --tokens-per-sample 512 --max-tokens 4096 --blocks 4 --steps 5
"""
import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.profiling import best_seconds, extra_time_split, profile_operators  # noqa: E402

logger = logging.getLogger("benchmarks.train_speed")

#: CE on document-aligned segments, the batches of the long- and external-memory variants
#: (a document's last segment is padded; CE's own batches are a packed stream)
SAME_BATCHES = "cross_entropy_document_segments"
#: TRIMELM_long on the stream cut every L tokens (``--memory-across-documents``): no padding
LONG_STREAM = "trime_loss_long_stream"
#: TRIMELM_ext over BM25 batches of the unpadded stream segments (``--memory-across-documents``)
EXT_STREAM = "trime_loss_ext_stream"
VARIANTS: Dict[str, List[str]] = {
    "cross_entropy": ["--criterion", "cross_entropy"],
    "trime_loss": ["--criterion", "trime_loss"],
}


def build(data: str, arch: str, extra: List[str], variant: List[str], device: str = "cpu"):
    """Task, model and criterion as ``fairseq-train`` builds them, and the epoch's batches
    (model and batches on ``device``)."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from trime_fairseq.cli.tune import with_plugin

    argv = with_plugin([data, "--arch", arch, *(["--cpu"] if device == "cpu" else []),
            "--optimizer", "adam", "--lr", "1e-3", *extra, *variant])
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    itr = task.get_batch_iterator(
        task.dataset("train"), max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size, seed=1,
        max_positions=model.max_positions(),
    ).next_epoch_itr(shuffle=False)
    batches = list(itr)
    if device == "cuda":
        model, criterion = model.cuda(), criterion.cuda()
        batches = [utils.move_to_cuda(b) for b in batches]
    return task, model, criterion, batches


def sync() -> None:
    """Wait for queued CUDA work, so wall-clock times cover it (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_steps(task, model, criterion, batches, start: int, steps: int, optim) -> float:
    """Tokens/s over ``steps`` full training steps (forward, backward, Adam)."""
    tokens = 0
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        sample = batches[(start + i) % len(batches)]
        optim.zero_grad()
        loss, _, _ = criterion(model, sample)
        loss.backward()
        optim.step()
        tokens += sample["ntokens"]
    sync()
    return tokens / (time.perf_counter() - t0)


def paired_ratio(speeds: List[float], base: List[float]) -> float:
    """The median over timed blocks of ``speeds[b] / base[b]``: each block's ratio is measured
    within a minute, so slow drifts of the machine's speed cancel (a ratio of medians mixes
    blocks timed minutes apart)."""
    return statistics.median(s / b for s, b in zip(speeds, base))


def padding_share(batches: List[dict], task) -> float:
    """The share of target positions that are padding (not counted in tokens/s)."""
    pad = task.target_dictionary.pad()
    total = sum(b["target"].numel() for b in batches)
    return sum(int(b["target"].eq(pad).sum()) for b in batches) / max(total, 1)


def op_counts(task, model, criterion, batches, start: int, optim, top: int = 12) -> dict:
    """One training step under ``torch.profiler``: the operators it dispatches (on a GPU each
    is a kernel launch or bookkeeping on the host, so a step with many small operators is
    bound by the host, not by arithmetic) and where its time goes. Returns the total count,
    the ``top`` most frequent names, and ``self_ms``: every operator's own CPU time (ms)."""
    names, own = profile_operators(lambda: time_steps(task, model, criterion, batches, start, 1, optim))
    return {"total": sum(names.values()), "top": dict(names.most_common(top)), "self_ms": own}


def similarity_chunks(variant: str, sample: dict, segments: int, chunk: int) -> Tuple[int, List[tuple]]:
    """The similarity blocks Eq. 5 computes for one batch of ``variant`` as the criterion
    does (:func:`~trime_fairseq.memory.in_batch.in_batch_log_prob`): ``(groups, [(q0, q1,
    k_end), ...])``: external memory, all the batch's queries against all its keys, in chunks
    of ``chunk`` queries (the criterion's ``--similarity-chunk-size``); long memory, each run
    of ``segments`` consecutive rows causally."""
    rows, length = sample["net_input"]["src_tokens"].shape
    ext = variant.startswith("trime_loss_ext")
    total = rows * length if ext else segments * length
    bounds = [(q0, min(q0 + chunk, total)) for q0 in range(0, total, chunk)]
    return (1, [(q0, q1, total) for q0, q1 in bounds]) if ext else (rows // segments, [(q0, q1, q1) for q0, q1 in bounds])


def similarity_bound(variant: str, sample: dict, segments: int, ce_tokens_per_s: float, model, chunk: int,
                     repeats: int = 3) -> dict:
    """The best ``variant`` can do against CE on this machine if everything but the
    similarity matrix products of Eq. 5 were free: three products per block of
    :func:`similarity_chunks` (forward; backward for queries and for keys, ``d`` = the
    model's ``g``). Returns the bound ``t_CE / (t_CE + t_products)`` with ``t_CE`` a CE step
    of the same tokens."""
    groups, chunks = similarity_chunks(variant, sample, segments, chunk)
    tokens = int(sample["net_input"]["src_tokens"].numel())
    dim = int(model.decoder.embed_dim)
    device = next(model.parameters()).device
    size = chunks[-1][1]
    q, k = torch.randn(size, dim, device=device), torch.randn(size, dim, device=device)

    def products(exp: bool = False) -> None:
        for _ in range(groups):
            for q0, q1, k_end in chunks:
                s = q[q0:q1] @ k[:k_end].T  # forward scores
                if exp:  # the one exponential per similarity Eq. 5 cannot do without
                    s.exp_()
                s @ k[:k_end]  # backward: queries
                s.T @ q[q0:q1]  # backward: keys

    best = best_seconds(products, repeats, sync)
    with_exp = best_seconds(lambda: products(exp=True), repeats, sync)
    step_ce = tokens / ce_tokens_per_s
    return {"tokens": tokens, "dim": dim, "groups": groups, "similarities": groups * sum((q1 - q0) * e for q0, q1, e in chunks),
            "products_s": best, "ce_step_s": step_ce, "bound_ratio_vs_cross_entropy": step_ce / (step_ce + best),
            "products_exp_s": with_exp, "bound_ratio_vs_cross_entropy_with_exp": step_ce / (step_ce + with_exp)}


def one_document(ours: argparse.Namespace, name: str, batches: List[dict]) -> None:
    """``--memorizing-one-doc``: every row's stream is one document (its memory fills up and stays full)."""
    if ours.memorizing_one_doc and name.startswith("memorizing"):
        for b in batches:
            b["net_input"]["mem_docs"] = torch.zeros_like(b["net_input"]["mem_docs"])


def memorizing_recall(model, sample, factories: List[str], nprobe: int) -> Dict[str, dict]:
    """recall@k of faiss search (each factory) against exact torch search, on the kNN layer's
    current memory and the queries of one more forward on ``sample``."""
    from trime_fairseq.memory.knn_memory import search_recall

    memory = model.knn_attention.memory
    seen = {}
    search = memory.topk

    def capture(queries, before, query_docs):
        seen.update(queries=queries.detach(), before=before, query_docs=query_docs)
        return search(queries, before, query_docs)

    memory.topk = capture
    try:
        with torch.no_grad():
            model(**sample["net_input"])
    finally:
        del memory.topk
    q = torch.nn.functional.normalize(seen["queries"], dim=-1)
    live = memory.count.float().mean().item()
    logger.info("memorizing: %.0f live memory entries per row on average (of %d)", live, memory.size)
    out = {}
    for factory in factories:
        t0 = time.perf_counter()
        mem = memory.with_faiss(factory, nprobe=nprobe)
        build_s = time.perf_counter() - t0
        rec = search_recall(mem, seen["queries"], seen["before"], seen["query_docs"])
        t0 = time.perf_counter()
        mem.search_slots(q, seen["before"], seen["query_docs"], "faiss")
        faiss_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        mem.search_slots(q, seen["before"], seen["query_docs"], "torch")
        torch_ms = (time.perf_counter() - t0) * 1e3
        key = factory if "IVF" not in factory else f"{factory} nprobe={nprobe}"
        out[key] = {"recall": rec, "k": memory.k, "faiss_ms": faiss_ms, "torch_ms": torch_ms, "build_s": build_s,
                    "mean_live_entries": live}
        logger.info("memorizing: faiss %s recall@%d %.3f (search %.0f ms, torch %.0f ms; build %.1f s)",
                    key, memory.k, rec, faiss_ms, torch_ms, build_s)
    return out


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="binarised LM data (fairseq-preprocess output)")
    p.add_argument("--arch", default="transformer_lm_trime_small", help="model architecture")
    p.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per variant")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--tokens-per-sample", type=int, default=512, help="segment length L")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch")
    p.add_argument("--long-m", type=int, default=0, help="also time trime_loss with m consecutive segments")
    p.add_argument("--ext", action="store_true", help="also time trime_loss with BM25 batches (external memory)")
    p.add_argument("--ext-recompute", action="store_true",
                   help="with --ext: also time the in-batch similarities recomputed in backward (recompute) and "
                        "kept from forward (keep), whatever the criterion's default")
    p.add_argument("--ext-keep", type=int, default=0,
                   help="with --ext: also time trime_loss_ext (and its stream variant) with this "
                        "--checkpoint-similarity-above (similarity entries kept from forward; the rest recomputed)")
    p.add_argument("--ext-chunk", type=int, default=0,
                   help="with --ext: also time trime_loss_ext with this --similarity-chunk-size (query rows per "
                        "chunk of the in-batch similarities; larger = fewer, larger operators)")
    p.add_argument("--memorizing", type=int, default=0,
                   help="also time the Memorizing Transformer with this memory size against itself without memory")
    p.add_argument("--memorizing-one-doc", action="store_true",
                   help="worst case: treat each row's stream as one document, so the memory is never cleared "
                        "and every timed step searches a full memory")
    p.add_argument("--memorizing-faiss", default="Flat,IVF64:Flat",
                   help="faiss factories (':' for ',') whose recall@k against exact search is reported ('': none)")
    p.add_argument("--memorizing-nprobe", type=int, default=8, help="nprobe of the IVF factories above")
    p.add_argument("--op-counts", action="store_true",
                   help="also count the operators one training step of each variant dispatches (torch.profiler)")
    p.add_argument("--out", default=None, help="write the result as JSON here (and .md beside)")
    p.add_argument("--only", default=None, help="comma-separated variants to time (cross_entropy always; with trime_loss_long or "
                        "trime_loss_ext also CE on their batches)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model trains (cuda: the first GPU; peak memory is then CUDA's max_memory_allocated)")
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # internal: one variant, report peak RSS
    ours, extra = p.parse_known_args(argv)
    extra = [*extra, "--tokens-per-sample", str(ours.tokens_per_sample)]
    variants = {k: [*v, "--max-tokens", str(ours.max_tokens)] for k, v in VARIANTS.items()}
    if ours.long_m > 1:
        variants["trime_loss_long"] = ["--criterion", "trime_loss", "--consecutive-segments", str(ours.long_m),
                                       "--batch-size", str(ours.max_tokens // ours.tokens_per_sample)]
        variants[LONG_STREAM] = [*variants["trime_loss_long"], "--memory-across-documents"]
    if ours.ext:
        variants["trime_loss_ext"] = ["--criterion", "trime_loss", "--bm25-batching", "--drop-local-prob", "0.9",
                                      "--batch-size", str(ours.max_tokens // ours.tokens_per_sample)]
        variants[EXT_STREAM] = [*variants["trime_loss_ext"], "--memory-across-documents"]
    if ours.long_m > 1 or ours.ext:  # CE on the same document-aligned segments: what the batches cost alone
        grouping = ["--bm25-batching"] if ours.ext else ["--consecutive-segments", str(ours.long_m)]
        variants[SAME_BATCHES] = ["--criterion", "cross_entropy", *grouping,
                                  "--batch-size", str(ours.max_tokens // ours.tokens_per_sample)]
    if ours.ext and ours.ext_recompute:
        variants["trime_loss_ext_recompute"] = [*variants["trime_loss_ext"], "--checkpoint-similarity-above", "0"]
        variants["trime_loss_ext_keep"] = [*variants["trime_loss_ext"], "--checkpoint-similarity-above", str(1 << 40)]
    if ours.ext and ours.ext_keep:
        for name in ("trime_loss_ext", EXT_STREAM):
            variants[f"{name}_keep{ours.ext_keep}"] = [*variants[name], "--checkpoint-similarity-above",
                                                      str(ours.ext_keep)]
    if ours.ext and ours.ext_chunk:
        variants[f"trime_loss_ext_chunk{ours.ext_chunk}"] = [*variants["trime_loss_ext"], "--similarity-chunk-size",
                                                              str(ours.ext_chunk)]
    if ours.memorizing:
        arch = ours.arch.replace("transformer_lm_trime", "memorizing_transformer_lm")
        rows = ["--stream-batching", "--batch-size", str(ours.max_tokens // ours.tokens_per_sample)]
        variants["memorizing_no_memory"] = ["--arch", arch, "--criterion", "cross_entropy", *rows, "--memorizing-memory-size", "0"]
        variants["memorizing"] = ["--arch", arch, "--criterion", "cross_entropy", *rows,
                                  "--memorizing-memory-size", str(ours.memorizing)]
    if ours.only:
        keep = set(ours.only.split(",")) | {"cross_entropy"}
        if keep & {"trime_loss_long", "trime_loss_ext"}:
            keep.add(SAME_BATCHES)
        if "trime_loss_long" in keep:
            keep.add(LONG_STREAM)
        if "trime_loss_ext" in keep:
            keep.add(EXT_STREAM)
        variants = {k: v for k, v in variants.items() if k in keep}
    if ours.threads:
        torch.set_num_threads(ours.threads)
    if ours.peak_of:  # a fresh process: its peak RSS is this variant's alone
        task, model, criterion, batches = build(ours.data, ours.arch, extra, variants[ours.peak_of], ours.device)
        one_document(ours, ours.peak_of, batches)
        model.train()
        if ours.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        time_steps(task, model, criterion, batches, 0, 2, torch.optim.Adam(model.parameters(), lr=1e-4))
        peak = (torch.cuda.max_memory_allocated() / 2**20 if ours.device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps({"peak_rss_mb": peak}))
        return {}
    peaks = {}
    for name in variants:
        if name == SAME_BATCHES:  # a speed baseline only
            continue
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--peak-of", name],
                              capture_output=True, text=True)
        if proc.returncode != 0:  # the child's own error, not just its exit status
            sys.stderr.write(proc.stderr[-6000:])
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"error: the {name} variant failed (peak-memory run): {last}")
        peaks[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    runs = {}
    warm = {name: ours.warmup_steps for name in variants}
    for name in ("memorizing", "memorizing_no_memory"):  # same batches; timed with a full memory
        if name in warm:
            warm[name] = max(ours.warmup_steps, -(-ours.memorizing // ours.tokens_per_sample))
    for name, variant in variants.items():
        torch.manual_seed(1)
        task, model, criterion, batches = build(ours.data, ours.arch, extra, variant, ours.device)
        one_document(ours, name, batches)
        model.train()
        optim = torch.optim.Adam(model.parameters(), lr=1e-4)
        time_steps(task, model, criterion, batches, 0, warm[name], optim)
        runs[name] = dict(task=task, model=model, criterion=criterion, batches=batches, optim=optim, tps=[])
    for block in range(ours.blocks):
        for name, r in runs.items():
            r["tps"].append(time_steps(r["task"], r["model"], r["criterion"], r["batches"],
                                       warm[name] + block * ours.steps, ours.steps, r["optim"]))
            logger.info("block %d %-14s %.0f tokens/s", block, name, r["tps"][-1])
    result = {
        "arch": ours.arch,
        "args": extra,
        "variants": variants,
        "tokens_per_s": {k: statistics.median(r["tps"]) for k, r in runs.items()},
        "ratio_vs_cross_entropy": {k: paired_ratio(r["tps"], runs["cross_entropy"]["tps"]) for k, r in runs.items()},
        "peak_rss_mb_per_variant": peaks,
        "memorizing_ratio_vs_no_memory": (paired_ratio(runs["memorizing"]["tps"], runs["memorizing_no_memory"]["tps"])
                                          if "memorizing" in runs else None),
        "peak_rss_ratio_vs_cross_entropy": {k: v / peaks["cross_entropy"] for k, v in peaks.items()},
        "padding_share": {k: padding_share(r["batches"], r["task"]) for k, r in runs.items()},
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if ours.device == "cuda" else "cpu",
        "peak_memory_measure": "CUDA max_memory_allocated" if ours.device == "cuda" else "process peak RSS",
    }
    if SAME_BATCHES in runs:  # the memory's own cost: against CE on the same segments
        result["ratio_vs_cross_entropy_same_batches"] = {
            k: paired_ratio(runs[k]["tps"], runs[SAME_BATCHES]["tps"]) for k in ("trime_loss_long", "trime_loss_ext")
            if k in runs}
    result["similarity_bound"] = {
        name: similarity_bound(name, runs[name]["batches"][0], max(ours.long_m, 1),
                               result["tokens_per_s"]["cross_entropy"], runs[name]["model"],
                               runs[name]["criterion"].cfg.similarity_chunk_size)
        for name in ("trime_loss_long", LONG_STREAM, "trime_loss_ext", EXT_STREAM) if name in runs}
    if ours.op_counts:
        result["op_counts"] = {name: op_counts(r["task"], r["model"], r["criterion"], r["batches"],
                                               warm[name] + ours.blocks * ours.steps, r["optim"])
                               for name, r in runs.items() if name != SAME_BATCHES}
        ops = result["op_counts"]
        result["extra_time_split"] = {name: extra_time_split(ops["cross_entropy"]["self_ms"], ops[name]["self_ms"])
                                      for name in ops if name != "cross_entropy"}
    if "memorizing" in runs and ours.memorizing_faiss:
        r = runs["memorizing"]
        result["memorizing_recall"] = memorizing_recall(
            r["model"], r["batches"][(warm["memorizing"] + ours.blocks * ours.steps) % len(r["batches"])],
            [f.replace(":", ",") for f in ours.memorizing_faiss.split(",")], ours.memorizing_nprobe)
    lines = [f"| criterion | tokens/s | ratio vs CE | peak memory (MB, {result['peak_memory_measure']}) | ratio vs CE |", "|---|---:|---:|---:|---:|"]
    for k in runs:
        peak = f"{peaks[k]:.0f} | {peaks[k] / peaks['cross_entropy']:.3f}" if k in peaks else "– | –"
        lines.append(f"| {k} | {result['tokens_per_s'][k]:.0f} | {result['ratio_vs_cross_entropy'][k]:.3f} | {peak} |")
    for factory, rec in (result.get("memorizing_recall") or {}).items():
        lines.append(f"\nmemorizing: faiss `{factory}` recall@{rec['k']} vs exact {rec['recall']:.3f} "
                     f"(search {rec['faiss_ms']:.0f} ms vs torch {rec['torch_ms']:.0f} ms per step)")
    for name, b in result["similarity_bound"].items():
        lines.append(f"\n{name}: the similarity products of Eq. 5 ({b['similarities']:,} similarities of dimension "
                     f"{b['dim']}, forward and backward) take {b['products_s']:.3f} s per step against "
                     f"{b['ce_step_s']:.3f} s for a CE step: tokens/s ÷ CE is at most "
                     f"{b['bound_ratio_vs_cross_entropy']:.3f} even if nothing else cost time, "
                     f"{b['bound_ratio_vs_cross_entropy_with_exp']:.3f} with one exponential per similarity")
    for name, x in (result.get("extra_time_split") or {}).items():
        lines.append(f"\n{name}: {x['extra_ms']:+.0f} ms of operator time per step against CE's {x['base_ms']:.0f} ms; "
                     "grew most: " + ", ".join(f"{k} {v:+.0f} ms" for k, v in x["top"].items()))
    for k, c in (result.get("op_counts") or {}).items():
        lines.append(f"\n{k}: {c['total']:,} operators per step ("
                     + ", ".join(f"{n} {v}" for n, v in list(c["top"].items())[:6]) + ")")
    result["rows"] = [{"system": k, "tokens_per_s": result["tokens_per_s"][k],
                       "ratio_vs_cross_entropy": result["ratio_vs_cross_entropy"][k],
                       **({"peak_rss_mb": peaks[k], "peak_rss_ratio_vs_cross_entropy": peaks[k] / peaks["cross_entropy"]}
                          if k in peaks else {})} for k in runs]
    table = "\n".join(lines)
    logger.info("\n%s", table)
    if ours.out:
        from trime_fairseq.results import write_results

        write_results(Path(ours.out), result, table)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
