"""Sharded datastore builds: ``N`` workers each write a contiguous shard, then one merge.

A split is read as a sequence of batches of units (``trime-build-datastore``'s order: LM
blocks or MT target sentences, see :mod:`trime_fairseq.tasks.datastore_keys`); shard ``i``
of ``N`` is the ``i``-th of ``N`` contiguous, near-equal runs of *batches*, so every batch
holds the same units as in a single-worker build and the shards, concatenated
in order, are exactly its keys and values. Each shard is an ordinary datastore directory
``OUT.shardI`` (resumable, published only when complete); its ``meta.json`` records its
place (``source["shard"]``). :func:`merge_datastores` checks that the shards come from the
same model, dictionary and settings, are complete and tile the split, and streams them
into ``OUT`` (bounded memory, resumable, renamed into place when complete).
"""
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import List, Sequence

import numpy as np

from trime_fairseq.memory.datastore import Datastore, DatastoreError, DatastoreMeta, DatastoreWriter

logger = logging.getLogger(__name__)


def shard_path(out: str, shard_id: int) -> str:
    """Where shard ``shard_id`` of the datastore ``out`` is built."""
    return f"{os.fspath(out).rstrip(os.sep)}.shard{shard_id}"


@dataclass
class ShardRange:
    """Units ``[start_unit, end_unit)`` and keys ``[start_key, end_key)`` of one shard."""

    shard_id: int
    num_shards: int
    start_unit: int
    end_unit: int
    start_key: int
    end_key: int

    @property
    def size(self) -> int:
        return self.end_key - self.start_key


def shard_range(unit_ends: Sequence[int], batch_units: int, num_shards: int, shard_id: int) -> ShardRange:
    """Shard ``shard_id`` of ``num_shards``: a contiguous run of whole batches of
    ``batch_units`` units, unit ``u`` holding keys ``[unit_ends[u-1], unit_ends[u])``."""
    if not 0 <= shard_id < num_shards:
        raise DatastoreError(f"--shard-id must be in 0..{num_shards - 1}, got {shard_id}")
    ends = np.asarray(unit_ends, dtype=np.int64)
    batches = math.ceil(len(ends) / batch_units)
    if num_shards > batches:
        raise DatastoreError(f"--num-shards {num_shards} is more than the {batches} batches of the split")
    part = np.array_split(np.arange(batches), num_shards)[shard_id]
    start_unit = int(part[0]) * batch_units
    end_unit = min((int(part[-1]) + 1) * batch_units, len(ends))

    def key(u: int) -> int:
        return int(ends[u - 1]) if u else 0

    return ShardRange(shard_id, num_shards, start_unit, end_unit, key(start_unit), key(end_unit))


def shard_meta(meta: DatastoreMeta, shard: ShardRange) -> DatastoreMeta:
    """The meta of a shard of the datastore described by ``meta`` (the whole split)."""
    source = dict(meta.source, shard={"id": shard.shard_id, "num_shards": shard.num_shards,
                                      "start": shard.start_key, "end": shard.end_key, "total": meta.size})
    return DatastoreMeta(**{**asdict(meta), "size": shard.size, "source": source})


def _open_shard(path: str, i: int) -> Datastore:
    partial = path + ".partial"
    if not os.path.isdir(path):
        state = f"unfinished (resume it by rerunning its build with --shard-id {i})" if os.path.isdir(partial) \
            else "missing (build it with --shard-id " + str(i) + ")"
        raise DatastoreError(f"--merge-shards: shard {i} ({path}) is {state}")
    try:
        return Datastore(path)
    except DatastoreError as e:
        raise DatastoreError(f"--merge-shards: shard {i} ({path}) is not a finished datastore: {e}") from None


def merged_meta(shards: Sequence[DatastoreMeta], paths: Sequence[str]) -> DatastoreMeta:
    """The meta of the whole split, after checking that the shards belong together."""
    first = shards[0]
    total = None
    position = 0
    for i, (meta, path) in enumerate(zip(shards, paths)):
        info = meta.source.get("shard")
        if not info:
            raise DatastoreError(f"--merge-shards: {path} is not a shard (built without --shard-id)")
        if info["num_shards"] != len(shards) or info["id"] != i:
            raise DatastoreError(f"--merge-shards: {path} is shard {info['id']} of {info['num_shards']}, "
                                 f"expected shard {i} of {len(shards)}")
        for name in ("model_sha256", "dictionary_sha256", "dim", "key_dtype", "value_dtype", "key_type",
                     "vocab_size", "format"):
            if getattr(meta, name) != getattr(first, name):
                raise DatastoreError(f"--merge-shards: shard {i} ({path}) differs from shard 0 in {name}")
        rest = {k: v for k, v in meta.source.items() if k != "shard"}
        if rest != {k: v for k, v in first.source.items() if k != "shard"}:
            raise DatastoreError(f"--merge-shards: shard {i} ({path}) was built from other data or settings")
        total = info["total"] if total is None else total
        if info["total"] != total or info["start"] != position or info["end"] - info["start"] != meta.size:
            raise DatastoreError(f"--merge-shards: shard {i} ({path}) covers keys {info['start']}..{info['end']}, "
                                 f"expected to start at {position}")
        position = info["end"]
    if position != total:
        raise DatastoreError(f"--merge-shards: the shards cover {position} of {total} keys")
    source = {k: v for k, v in first.source.items() if k != "shard"}
    return DatastoreMeta(**{**asdict(first), "size": total, "source": source})


def merge_datastores(paths: Sequence[str], out: str, overwrite: bool = False, chunk: int = 1 << 16) -> Datastore:
    """Concatenate the finished shards ``paths`` (in order) into the datastore ``out``.

    Streams ``chunk`` rows at a time through a :class:`DatastoreWriter` (progress after
    every chunk, so a killed merge resumes); returns the merged datastore.
    """
    if os.path.exists(out) and not overwrite:
        raise DatastoreError(f"--out {out} already exists (pass --overwrite to rebuild)")
    opened: List[Datastore] = [_open_shard(os.fspath(p), i) for i, p in enumerate(paths)]
    meta = merged_meta([ds.meta for ds in opened], [os.fspath(p) for p in paths])
    writer = DatastoreWriter(out, meta, overwrite=overwrite)
    offset = 0
    for i, ds in enumerate(opened):
        for s in range(max(writer.written - offset, 0), len(ds), chunk):
            e = min(s + chunk, len(ds))
            writer.write(np.asarray(ds.keys[s:e]), np.asarray(ds.values[s:e]))
            writer.checkpoint()
        offset += len(ds)
        logger.info("merged shard %d/%d (%d keys)", i + 1, len(opened), len(ds))
    return writer.finish()
