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

from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)

FORMAT = 1


# a datastore is missing, incomplete, or does not belong to the model in use: a user error
DatastoreError = TrimeUserError


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


def rebuild_command(path: str, source: Optional[Dict] = None, index_only: bool = False) -> str:
    """The ``trime-build-datastore`` command that rebuilds the datastore at ``path`` (from
    what ``meta.json`` recorded, when it could be read)."""
    s = source or {}
    parts = ["trime-build-datastore", str(s.get("data", "DATA")), "--path", str(s.get("checkpoint", "CKPT")),
             "--gen-subset", str(s.get("split", "SPLIT"))]
    if "tokens_per_sample" in s:
        parts += ["--tokens-per-sample", str(s["tokens_per_sample"]), "--context-window", str(s.get("context_window", 0))]
    parts += ["--out", str(path)] + (["--index-only"] if index_only else ["--overwrite"])
    return " ".join(parts)


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatastoreError(f"{what}: {path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatastoreError(f"{what}: {path} is not readable JSON ({e}); {fix}") from None
    if not isinstance(raw, dict):
        raise DatastoreError(f"{what}: {path} is not a JSON object; {fix}")
    return raw


def _open_array(path: Path, dtype: np.dtype, shape: tuple, what: str, fix: str) -> np.ndarray:
    """``path`` memory-mapped, checked against the dtype and shape ``meta.json`` records."""
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DatastoreError(f"{what}: {path} is missing; {fix}") from None
    except (OSError, ValueError) as e:  # truncated (mmap larger than the file), bad header
        raise DatastoreError(f"{what}: {path} is damaged or truncated ({str(e).splitlines()[0]}); {fix}") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise DatastoreError(f"{what}: {path} holds {arr.dtype} {list(arr.shape)}, meta.json says {dtype} "
                             f"{list(shape)}; {fix}")
    return arr


class Datastore:
    """A finished datastore, memory-mapped read-only. Every file is checked on open
    (``meta.json`` readable, ``keys.npy``/``values.npy`` of the recorded dtype and shape);
    a problem is a one-line :class:`DatastoreError` naming the file and the command that
    rebuilds it."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        what = f"--datastore {path}"
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            partial = self.path.with_name(self.path.name + ".partial")
            if partial.exists():
                raise DatastoreError(f"{what}: not a finished datastore (an unfinished build is in {partial}: "
                                     "rerun the same trime-build-datastore command to resume)")
            raise DatastoreError(f"{what}: no such directory; build it with trime-build-datastore")
        if not meta_path.exists():
            raise DatastoreError(f"{what}: no meta.json, not a finished datastore; "
                                 f"rebuild it: {rebuild_command(path)}")
        raw = _read_json(meta_path, what, f"rebuild it: {rebuild_command(path)}")
        fix = f"rebuild it: {rebuild_command(path, raw.get('source') if isinstance(raw.get('source'), dict) else None)}"
        if raw.get("format") != FORMAT:
            raise DatastoreError(f"{what}: {meta_path} has format {raw.get('format')}, not {FORMAT}; {fix}")
        try:
            self.meta = DatastoreMeta(**raw)
            key_dtype, value_dtype = np.dtype(self.meta.key_dtype), np.dtype(self.meta.value_dtype)
            shape_ok = int(self.meta.size) >= 0 and int(self.meta.dim) >= 1
        except (TypeError, ValueError) as e:
            raise DatastoreError(f"{what}: {meta_path} does not describe a datastore ({e}); {fix}") from None
        if not shape_ok:
            raise DatastoreError(f"{what}: {meta_path} records size {self.meta.size}, dim {self.meta.dim}; {fix}")
        self.fix = fix
        self.keys = _open_array(self.path / "keys.npy", key_dtype, (self.meta.size, self.meta.dim), what, fix)
        self.values = _open_array(self.path / "values.npy", value_dtype, (self.meta.size,), what, fix)

    def __len__(self) -> int:
        return self.meta.size

    def check_finite(self, chunk: int = 1 << 20) -> None:
        """Refuse keys holding NaN/inf (FAISS would silently never return them). One pass
        over ``keys.npy`` in chunks of ``chunk`` rows (~0.3 s per million fp16 keys of d=128)."""
        for s in range(0, len(self), chunk):
            bad = ~np.isfinite(self.keys[s:s + chunk]).all(axis=1)
            if bad.any():
                raise DatastoreError(f"--datastore {self.path}: key {s + int(np.flatnonzero(bad)[0])} in "
                                     f"{self.path / 'keys.npy'} is not finite (NaN/inf); {self.fix}")


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
        stored = keys.astype(self.keys.dtype, copy=False)
        bad = ~np.isfinite(stored).all(axis=-1)
        if bad.any():  # refuse it now rather than search NaN keys later
            first = self.written + int(np.flatnonzero(bad)[0])
            ckpt = self.meta.source.get("checkpoint", "?")
            if np.isfinite(keys[bad]).all():
                raise DatastoreError(f"--key-dtype {self.meta.key_dtype}: key {first} of --path {ckpt} does not "
                                     "fit (overflow to inf); use --key-dtype float32")
            raise DatastoreError(f"--path {ckpt}: the model produced a non-finite key (NaN/inf) for entry "
                                 f"{first}; the checkpoint is broken (did training diverge?): use another one")
        if self.written + n > self.meta.size:
            raise DatastoreError(f"datastore overflow: {self.written + n} > {self.meta.size} keys")
        self.keys[self.written:self.written + n] = stored
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
