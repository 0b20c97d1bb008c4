"""An on-disk datastore of (key, value) pairs: keys ``g`` (the last-FFN input), values the
next tokens — the external memory of kNN-LM / TRIMELM_ext (Eq. 4) and kNN-MT.

Layout of a datastore directory::

    meta.json     shape, dtypes, key type, fingerprints of the model weights and dictionary
    keys.npy      [N, d] float16 (default) or float32, memory-mapped
    values.npy    [N] int32 (int64 when the vocabulary does not fit int32)

A build writes into ``DIR.partial/`` (with ``progress.json`` after every flushed chunk)
and renames it to ``DIR`` only when complete, so a half-written datastore is never taken
for a finished one; a killed build resumes from its last flushed chunk.
"""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

logger = logging.getLogger(__name__)

FORMAT = 1


class DatastoreError(ValueError):
    """A datastore is missing, incomplete, or does not belong to the model in use."""


def file_fingerprint(path: str, chunk: int = 1 << 22) -> str:
    """sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of a model's weights (names and values), independent of the checkpoint file."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def value_dtype_for(vocab_size: int) -> np.dtype:
    """int32 unless the vocabulary does not fit (never a type that overflows it)."""
    return np.dtype(np.int32) if vocab_size < 2**31 else np.dtype(np.int64)


@dataclass
class DatastoreMeta:
    """What ``meta.json`` records."""

    size: int
    dim: int
    key_dtype: str
    value_dtype: str
    key_type: str
    model_sha256: str
    dictionary_sha256: str
    vocab_size: int
    source: Dict
    format: int = FORMAT

    def check_compatible(self, dim: Optional[int] = None, model_sha256: Optional[str] = None,
                         dictionary_sha256: Optional[str] = None, where: str = "datastore") -> None:
        """Refuse a datastore built by another model/dictionary or of another dimension."""
        if dim is not None and dim != self.dim:
            raise DatastoreError(f"{where}: keys have dimension {self.dim}, the model's g has {dim}")
        if dictionary_sha256 is not None and dictionary_sha256 != self.dictionary_sha256:
            raise DatastoreError(f"{where}: built with another dictionary (dict.txt differs)")
        if model_sha256 is not None and model_sha256 != self.model_sha256:
            raise DatastoreError(
                f"{where}: built by another model (weights sha256 {self.model_sha256[:12]}…); "
                "rebuild it with trime-build-datastore for this checkpoint"
            )


class Datastore:
    """A finished datastore, memory-mapped read-only."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = " (an unfinished build is in " + str(partial) + ": rerun the builder to resume)" if partial.exists() else ""
            raise DatastoreError(f"--datastore {path}: no meta.json, not a finished datastore{hint}")
        raw = json.loads(meta_path.read_text())
        if raw.get("format") != FORMAT:
            raise DatastoreError(f"--datastore {path}: format {raw.get('format')} is not {FORMAT}")
        self.meta = DatastoreMeta(**raw)
        self.keys = np.load(self.path / "keys.npy", mmap_mode="r")
        self.values = np.load(self.path / "values.npy", mmap_mode="r")
        if self.keys.shape != (self.meta.size, self.meta.dim) or self.values.shape != (self.meta.size,):
            raise DatastoreError(f"--datastore {path}: array shapes do not match meta.json")

    def __len__(self) -> int:
        return self.meta.size


class DatastoreWriter:
    """Streams keys/values into ``DIR.partial`` in order; resumable; :meth:`finish` publishes."""

    def __init__(self, path: str, meta: DatastoreMeta, overwrite: bool = False) -> None:
        self.final = Path(path)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.meta = meta
        if self.final.exists():
            if not overwrite:
                raise DatastoreError(f"--out {path} already exists (pass --overwrite to rebuild)")
            shutil.rmtree(self.final)
        progress = self.partial / "progress.json"
        self.written = 0
        if progress.exists():
            state = json.loads(progress.read_text())
            if state.get("meta") == asdict(meta):
                self.written = int(state["written"])
                logger.info("resuming %s at %d / %d keys", self.partial, self.written, meta.size)
            else:
                logger.info("discarding %s: it was started with other settings", self.partial)
                shutil.rmtree(self.partial)
        elif self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        mode = "r+" if self.written > 0 else "w+"
        self.keys = np.lib.format.open_memmap(
            self.partial / "keys.npy", mode=mode, dtype=np.dtype(meta.key_dtype), shape=(meta.size, meta.dim))
        self.values = np.lib.format.open_memmap(
            self.partial / "values.npy", mode=mode, dtype=np.dtype(meta.value_dtype), shape=(meta.size,))

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        n = len(values)
        if self.written + n > self.meta.size:
            raise DatastoreError(f"datastore overflow: {self.written + n} > {self.meta.size} keys")
        self.keys[self.written:self.written + n] = keys.astype(self.keys.dtype, copy=False)
        self.values[self.written:self.written + n] = values
        self.written += n

    def checkpoint(self) -> None:
        """Flush arrays, then record progress (the order makes a crash safe)."""
        self.keys.flush()
        self.values.flush()
        tmp = self.partial / "progress.json.tmp"
        tmp.write_text(json.dumps({"written": self.written, "meta": asdict(self.meta)}))
        os.replace(tmp, self.partial / "progress.json")

    def finish(self) -> Datastore:
        if self.written != self.meta.size:
            raise DatastoreError(f"datastore incomplete: {self.written} of {self.meta.size} keys")
        self.checkpoint()
        del self.keys, self.values
        (self.partial / "progress.json").unlink()
        (self.partial / "meta.json").write_text(json.dumps(asdict(self.meta), indent=2))
        os.replace(self.partial, self.final)
        return Datastore(str(self.final))
