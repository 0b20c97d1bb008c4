"""``trime-build-datastore``: keys ``g`` and values (next tokens) of a split, then a FAISS index.

Runs a trained model over a split exactly as ``fairseq-eval-lm`` reads it (blocks in
order, ``--context-window`` tokens of context) and stores, for every scored token, the
input of the last feed-forward block (the query TRIME and kNN-LM compare) and the token
that follows. Keys stream to a memory-mapped file, so memory does not grow with the
split; a killed build resumes where it stopped (rerun the same command).

    trime-build-datastore DATA_BIN --path ckpt.pt --gen-subset train \\
        --tokens-per-sample 512 --context-window 256 --out ds/train
    # then (or with --index-factory here): index + recall@K report
    trime-build-datastore DATA_BIN --path ckpt.pt --out ds/train --index-only --target-recall 0.9

Any other flag goes to fairseq's eval-lm parser (``--max-tokens``, ``--batch-size``...).
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

logger = logging.getLogger("trime_fairseq.build_datastore")


def parse(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog="trime-build-datastore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="datastore directory to create")
    p.add_argument("--key-dtype", choices=["float16", "float32"], default="float16", help="storage type of keys")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished datastore")
    p.add_argument("--index-only", action="store_true", help="skip the keys, (re)build the index of --out")
    p.add_argument("--no-index", action="store_true", help="store keys/values only")
    p.add_argument("--index-factory", default="auto", help="faiss index_factory string (auto: by size)")
    p.add_argument("--metric", choices=["ip", "l2"], default="ip", help="inner product (TRIME) or L2 (kNN-LM)")
    p.add_argument("--index-train-size", type=int, default=100_000, help="keys sampled to train the index")
    p.add_argument("--recall-k", type=int, default=1024, help="K of the recall@K check")
    p.add_argument("--recall-queries", type=int, default=500, help="held-out queries (from --recall-subset)")
    p.add_argument("--recall-subset", default="valid", help="split whose g are the recall queries")
    p.add_argument("--target-recall", type=float, default=0.9, help="pick the smallest nprobe reaching it")
    ours, rest = p.parse_known_args(argv)
    return ours, rest, p


def iter_keys(model, task, split: str, context: int, max_tokens: int, batch_size: Optional[int],
              start_block: int = 0, max_blocks: Optional[int] = None):
    """Yield ``(keys [n, d], values [n], blocks done)`` per batch, in stream order."""
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.models.capture import get_capture

    pad = task.source_dictionary.pad()
    blocks = StreamBlocks(task.stream(split), task.args.tokens_per_sample, context, pad)
    capture = get_capture(model)
    per_block = task.args.tokens_per_sample + context
    bsz = batch_size or max(1, max_tokens // per_block)
    end = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    with torch.no_grad():
        for k in range(start_block, end, bsz):
            sample = blocks.collater([blocks[i] for i in range(k, min(k + bsz, end))])
            model(**sample["net_input"])
            g = capture.take()
            keep = sample["target"].ne(pad)
            yield g[keep], sample["target"][keep], min(k + bsz, end)


def build_keys(ours, cfg, model, task, ckpt_path: str) -> None:
    from trime_fairseq.memory.datastore import (
        DatastoreMeta, DatastoreWriter, file_fingerprint, model_fingerprint, value_dtype_for)

    split = cfg.dataset.gen_subset
    stream = task.stream(split)
    n = max(len(stream) - 1, 0)
    dim = model.decoder.layers[-1].fc1.in_features
    dict_path = os.path.join(task.args.data.split(":")[0], "dict.txt")
    meta = DatastoreMeta(
        size=n, dim=dim, key_dtype=ours.key_dtype, value_dtype=str(value_dtype_for(len(task.dictionary))),
        key_type="ffn_input", model_sha256=model_fingerprint(model),
        dictionary_sha256=file_fingerprint(dict_path), vocab_size=len(task.dictionary),
        source={"data": task.args.data, "split": split, "tokens_per_sample": task.args.tokens_per_sample,
                "context_window": cfg.eval_lm.context_window, "checkpoint": os.path.abspath(ckpt_path)},
    )
    writer = DatastoreWriter(ours.out, meta, overwrite=ours.overwrite)
    block = task.args.tokens_per_sample
    start_block = writer.written // block  # batches end on block boundaries
    if start_block * block != writer.written:
        raise RuntimeError("datastore progress is not on a block boundary; delete the .partial directory")
    t0 = time.perf_counter()
    done = writer.written
    bar = tqdm(total=n, initial=done, unit="key", unit_scale=True, desc="datastore", disable=None)
    for keys, values, _ in iter_keys(model, task, split, cfg.eval_lm.context_window,
                                      cfg.dataset.max_tokens or 8192, cfg.dataset.batch_size, start_block):
        writer.write(keys.float().numpy(), values.numpy())
        writer.checkpoint()
        bar.update(len(values))
    bar.close()
    elapsed = time.perf_counter() - t0
    ds = writer.finish()
    logger.info("datastore %s: %d keys of dim %d (%s) in %.1fs, %.0f keys/s",
                ours.out, len(ds), dim, ours.key_dtype, elapsed, (len(ds) - done) / max(elapsed, 1e-9))


def build_index_for(ours, cfg, model, task) -> dict:
    from trime_fairseq.memory.datastore import Datastore
    from trime_fairseq.memory.index import IndexConfig, build_index, default_factory, save_index, tune_nprobe

    ds = Datastore(ours.out)
    factory = default_factory(len(ds), ds.meta.dim) if ours.index_factory == "auto" else ours.index_factory
    t0 = time.perf_counter()
    logger.info("building index %s (%s) over %d keys", factory, ours.metric, len(ds))
    index = build_index(ds.keys, factory, ours.metric, ours.index_train_size)
    seconds = time.perf_counter() - t0
    queries = []
    for keys, _, _ in iter_keys(model, task, ours.recall_subset, cfg.eval_lm.context_window,
                                 cfg.dataset.max_tokens or 8192, cfg.dataset.batch_size, max_blocks=64):
        queries.append(keys.float().numpy())
        if sum(len(q) for q in queries) >= ours.recall_queries:
            break
    q = np.concatenate(queries)[: ours.recall_queries]
    rng = np.random.default_rng(0)
    q = q[rng.permutation(len(q))]
    k = min(ours.recall_k, len(ds))
    nprobe, recall = tune_nprobe(index, ds.keys, q, k, ours.target_recall, ours.metric)
    config = IndexConfig(factory=factory, metric=ours.metric, dim=ds.meta.dim, size=len(ds),
                         train_size=min(ours.index_train_size, len(ds)), nprobe=nprobe, recall=recall,
                         recall_k=k, build_seconds=seconds)
    save_index(index, config, ours.out)
    logger.info("index saved: nprobe %d gives recall@%d %.3f on %d %s queries", nprobe, k, recall, len(q), ours.recall_subset)
    return vars(config)


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"),
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", force=True)
    ours, rest, parser = parse(argv)
    from trime_fairseq.cli.tune import load
    from trime_fairseq.memory.datastore import DatastoreError

    cfg, model, task = load(rest)
    model.eval()
    try:
        if not ours.index_only:
            build_keys(ours, cfg, model, task, cfg.common_eval.path)
        if not ours.no_index:
            print(json.dumps(build_index_for(ours, cfg, model, task)))
    except (DatastoreError, ValueError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
