"""``trime-build-datastore``: keys ``g`` and values (next tokens) of a split, then a FAISS index.

With ``--task trime_translation`` the keys are the decoder's ``g`` at every target position
of the split (teacher forcing, sentences in order) and the values the target tokens: the
kNN-MT datastore. Both tasks read keys with ``task.iter_datastore_keys``
(:mod:`trime_fairseq.tasks.datastore_keys`), so every option below works for both.

Runs a trained model over a split exactly as ``fairseq-eval-lm`` reads it (blocks in
order, ``--context-window`` tokens of context) and stores, for every scored token, the
input of the last feed-forward block (the query TRIME and kNN-LM compare) and the token
that follows. Keys stream to a memory-mapped file, so memory does not grow with the
split; a killed build resumes where it stopped (rerun the same command).

    trime-build-datastore DATA_BIN --path ckpt.pt --gen-subset train \\
        --tokens-per-sample 512 --context-window 256 --out ds/train
    # then (or with --index-factory here): index + recall@K report
    trime-build-datastore DATA_BIN --path ckpt.pt --out ds/train --index-only --target-recall 0.9

Sharded builds (``trime_fairseq.memory.shards``): worker ``I`` of ``N`` (any process or
machine sharing the output folder) builds its contiguous run of batches into
``OUT.shardI`` with ``--num-shards N --shard-id I`` (resumable, with its own progress);
``--merge-shards N`` then checks and concatenates the shards into ``OUT`` and builds the
index once. ``--num-shards N`` alone runs the N shard builds as local processes
(``--workers`` at a time), merges and indexes. The result equals a single-worker build
with the same flags.

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
from tqdm import tqdm

from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.errors import TrimeUserError, cli_entry

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
    p.add_argument("--refine-k-factor", type=float, default=2.0,
                   help="indexes with a refinement stage (RFlat, Refine(...), as the auto index has): "
                        "candidates re-ranked with exact keys per neighbour; doubled (up to 16) while "
                        "--target-recall is not reached")
    p.add_argument("--num-shards", type=int, default=1,
                   help="split the build into N shards (contiguous runs of batches); without --shard-id, "
                        "build them all with local processes, then merge and index")
    p.add_argument("--shard-id", type=int, default=None,
                   help="build only shard I of --num-shards into OUT.shardI (keys/values, no index)")
    p.add_argument("--workers", type=int, default=None,
                   help="with --num-shards and no --shard-id: shard builds run at a time (default: all)")
    p.add_argument("--merge-shards", type=int, default=None,
                   help="merge the finished OUT.shard0..N-1 into OUT, then build the index")
    p.add_argument("--keep-shards", action="store_true", help="keep the shard directories after a merge")
    ours, rest = p.parse_known_args(argv)
    return ours, rest, p


def build_keys(ours, cfg, model, task, ckpt_path: str) -> None:
    from trime_fairseq.memory.datastore import (
        DatastoreMeta, DatastoreWriter, file_fingerprint, model_fingerprint, value_dtype_for)
    from trime_fairseq.tasks.datastore_keys import DEFAULT_KEY_MAX_TOKENS

    split, context = cfg.dataset.gen_subset, cfg.eval_lm.context_window
    max_tokens = cfg.dataset.max_tokens or DEFAULT_KEY_MAX_TOKENS
    layout = task.datastore_layout(split, max_tokens, cfg.dataset.batch_size, context)
    dim = model.decoder.layers[-1].fc1.in_features
    vocab = len(task.target_dictionary)
    source = {"data": (task.cfg or task.args).data, "split": split, "checkpoint": os.path.abspath(ckpt_path),
              **layout.source}
    meta = DatastoreMeta(
        size=layout.size, dim=dim, key_dtype=ours.key_dtype, value_dtype=str(value_dtype_for(vocab)),
        key_type="ffn_input", model_sha256=model_fingerprint(model),
        dictionary_sha256=file_fingerprint(task.datastore_dictionary_path()), vocab_size=vocab, source=source,
    )
    out, start_key, end_key, desc = ours.out, 0, layout.size, "datastore"
    if ours.shard_id is not None:  # this worker's contiguous run of batches
        from trime_fairseq.memory.datastore import Datastore
        from trime_fairseq.memory.shards import shard_meta, shard_path, shard_range

        shard = shard_range(layout.unit_ends, layout.batch_units, ours.num_shards, ours.shard_id)
        meta, out = shard_meta(meta, shard), shard_path(ours.out, ours.shard_id)
        start_key, end_key, desc = shard.start_key, shard.end_key, f"shard {ours.shard_id}/{ours.num_shards}"
        if os.path.isdir(out) and not ours.overwrite and Datastore(out).meta == meta:
            logger.info("shard %d already built in %s", ours.shard_id, out)
            return
    writer = DatastoreWriter(out, meta, overwrite=ours.overwrite)
    batches = task.iter_datastore_keys(model, split, max_tokens, cfg.dataset.batch_size, context,
                                       start_key=start_key + writer.written, end_key=end_key)
    t0 = time.perf_counter()
    done = writer.written
    bar = tqdm(total=meta.size, initial=done, unit="key", unit_scale=True, desc=desc, disable=None)
    for keys, values, *_ in batches:
        writer.write(keys.float().cpu().numpy(), values.cpu().numpy())
        writer.checkpoint()
        bar.update(len(values))
    bar.close()
    elapsed = time.perf_counter() - t0
    ds = writer.finish()
    logger.info("datastore %s: %d keys of dim %d (%s) in %.1fs, %.0f keys/s",
                out, len(ds), dim, ours.key_dtype, elapsed, (len(ds) - done) / max(elapsed, 1e-9))


def build_index_for(ours, cfg, model, task) -> dict:
    from trime_fairseq.memory.datastore import Datastore
    from trime_fairseq.memory.index import datastore_index_factory
    from trime_fairseq.memory.search_index import SearchIndex
    from trime_fairseq.tasks.datastore_keys import DEFAULT_KEY_MAX_TOKENS

    ds = Datastore(ours.out)
    factory = datastore_index_factory(len(ds), ds.meta.dim) if ours.index_factory == "auto" else ours.index_factory
    t0 = time.perf_counter()
    logger.info("building index %s (%s) over %d keys", factory, ours.metric, len(ds))
    index = SearchIndex.build(ds.keys, factory, ours.metric, ours.index_train_size,
                              where=f"--out {ours.out}: {ds.path / 'keys.npy'}", fix=ds.fix)
    index.config.build_seconds = time.perf_counter() - t0
    queries = []
    found = task.iter_datastore_keys(model, ours.recall_subset, cfg.dataset.max_tokens or DEFAULT_KEY_MAX_TOKENS,
                                     cfg.dataset.batch_size, cfg.eval_lm.context_window,
                                     max_keys=ours.recall_queries)
    for keys, *_ in found:
        queries.append(keys.float().cpu().numpy())
        if sum(len(q) for q in queries) >= ours.recall_queries:
            break
    q = np.concatenate(queries)[: ours.recall_queries]
    rng = np.random.default_rng(0)
    q = q[rng.permutation(len(q))]
    k = min(ours.recall_k, len(ds))
    recall = index.tune(ds.keys, q, k, ours.target_recall, k_factor=ours.refine_k_factor)
    index.save(ours.out)
    logger.info("index saved: nprobe %d, k_factor %g give recall@%d %.3f on %d %s queries",
                index.config.nprobe, index.config.k_factor, k, recall, len(q), ours.recall_subset)
    return vars(index.config)


def check_shard_flags(ours) -> None:
    """One-line errors for inconsistent sharding flags."""
    if ours.num_shards < 1:
        raise TrimeUserError(f"--num-shards must be >= 1, got {ours.num_shards}")
    if ours.shard_id is not None and ours.num_shards < 2:
        raise TrimeUserError("--shard-id needs --num-shards N > 1")
    if ours.shard_id is not None and (ours.merge_shards or ours.index_only):
        raise TrimeUserError("--shard-id builds one shard: drop --merge-shards / --index-only")
    if ours.merge_shards is not None and ours.merge_shards < 1:
        raise TrimeUserError(f"--merge-shards must be >= 1, got {ours.merge_shards}")
    if ours.workers is not None and ours.workers < 1:
        raise TrimeUserError(f"--workers must be >= 1, got {ours.workers}")


def run_shard_builds(argv: Sequence[str], num_shards: int, workers: int) -> None:
    """Build every shard in its own local process (``workers`` at a time), each with
    ``--shard-id`` added to this command; a failed shard stops the run (rerun to resume)."""
    import subprocess

    args = []
    skip = False
    for a in argv:  # drop --workers (and its value): each child builds one shard
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            args.append(a)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    pending, running = list(range(num_shards)), {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            cmd = [sys.executable, "-m", "trime_fairseq.cli.build_datastore", *args, "--shard-id", str(i), "--no-index"]
            logger.info("shard %d/%d: starting %s", i, num_shards, " ".join(cmd[1:]))
            running[i] = subprocess.Popen(cmd, env=env)
        for i, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[i]
            if code != 0:
                for other in running.values():
                    other.terminate()
                raise TrimeUserError(f"--num-shards: shard {i} failed (exit code {code}, its error is above); "
                                     "rerun the command to resume")
        time.sleep(0.2)


@cli_entry("trime-build-datastore")
def main(argv: Optional[Sequence[str]] = None) -> None:
    setup_cli_logging()
    raw = list(sys.argv[1:] if argv is None else argv)
    ours, rest, _ = parse(argv)
    check_shard_flags(ours)
    if ours.refine_k_factor < 1:
        raise TrimeUserError(f"--refine-k-factor must be >= 1, got {ours.refine_k_factor}")
    from trime_fairseq.cli.tune import load
    if ours.num_shards > 1 and ours.shard_id is None and ours.merge_shards is None and not ours.index_only:
        if os.path.exists(ours.out) and not ours.overwrite:
            raise TrimeUserError(f"--out {ours.out} already exists (pass --overwrite to rebuild)")
        run_shard_builds(raw, ours.num_shards, ours.workers or ours.num_shards)
        ours.merge_shards = ours.num_shards
    cfg, model, task = load(rest)
    model.eval()
    if ours.merge_shards is not None:
        merge_shards(ours)
    elif not ours.index_only:
        build_keys(ours, cfg, model, task, cfg.common_eval.path)
    if not ours.no_index and ours.shard_id is None:
        print(json.dumps(build_index_for(ours, cfg, model, task)))


def merge_shards(ours) -> None:
    """``--merge-shards N``: OUT.shard0..N-1 -> OUT (the shards are removed unless --keep-shards)."""
    import shutil

    from trime_fairseq.memory.shards import merge_datastores, shard_path

    paths = [shard_path(ours.out, i) for i in range(ours.merge_shards)]
    t0 = time.perf_counter()
    ds = merge_datastores(paths, ours.out, overwrite=ours.overwrite)
    logger.info("merged %d shards into %s: %d keys in %.1fs", len(paths), ours.out, len(ds), time.perf_counter() - t0)
    if not ours.keep_shards:
        for p in paths:
            shutil.rmtree(p)


if __name__ == "__main__":
    main(sys.argv[1:])
