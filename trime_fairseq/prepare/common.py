"""Building blocks shared by the corpus builders (:mod:`trime_fairseq.prepare.lm`,
:mod:`trime_fairseq.prepare.mt`): tokenisers, binarisation with ``fairseq-preprocess``, the
manifest, and the atomic, restartable build into ``--out``.

A build works in a temporary sibling of ``--out`` (named with its process id) that is renamed
into place at the end; a killed build leaves only that sibling, which the next build removes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Sequence

from tqdm import tqdm

from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)


MANIFEST_NAME = "corpus.json"


DEFAULT_CACHE_DIR = Path("~/.cache/trime_fairseq")


# a user-facing problem (bad flag value, missing input, too few documents ...)
CorpusError = TrimeUserError


def progress(iterable: Iterable, **kwargs) -> Iterable:
    """tqdm progress bar on stderr; silent when stderr is not a terminal."""
    return tqdm(iterable, disable=None, dynamic_ncols=True, **kwargs)


def collapse_whitespace(line: str) -> str:
    """Strip ``line`` and replace every run of whitespace by a single space."""
    return " ".join(line.split())


class WhitespaceTokenizer:
    """``--tokenizer none``: the text is already tokenised; split on whitespace."""

    name = "none"
    vocab_size: Optional[int] = None

    def encode(self, lines: Sequence[str]) -> List[List[str]]:
        return [line.split() for line in lines]


class SentencePieceTokenizer:
    """``--tokenizer sentencepiece``: encodes lines into sentencepiece pieces."""

    name = "sentencepiece"

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.processor = spm.SentencePieceProcessor(model_file=str(model_file))

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode(self, lines: Sequence[str]) -> List[List[str]]:
        return self.processor.encode(list(lines), out_type=str)

    @classmethod
    def train(
        cls,
        input_file: Path,
        model_prefix: Path,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        input_sentence_size: int = 300_000,
        seed: int = 1,
        num_threads: int = 2,
    ) -> "SentencePieceTokenizer":
        """Train a model on ``input_file`` (one sentence per line); writes ``<prefix>.model``.

        ``vocab_size`` is a soft limit (``hard_vocab_limit=False``) so tiny corpora
        still train; at most ``input_sentence_size`` randomly sampled lines are used.
        """
        import sentencepiece as spm

        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                input=str(input_file),
                model_prefix=str(model_prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                character_coverage=0.9995,
                hard_vocab_limit=False,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise CorpusError(f"sentencepiece training failed (check --vocab-size): {err}") from err
        return cls(Path(f"{model_prefix}.model"))


def fairseq_available() -> bool:
    """Whether ``fairseq_cli`` can be imported by this interpreter."""
    import importlib.util

    return importlib.util.find_spec("fairseq_cli") is not None


def run_preprocess(flags: Sequence[str], destdir: Path, python: str = sys.executable) -> Path:
    """``fairseq-preprocess FLAGS --destdir DESTDIR`` in a subprocess; a failure is a
    :class:`CorpusError` with the last lines of its output."""
    cmd = [python, "-m", "fairseq_cli.preprocess", *map(str, flags), "--destdir", str(destdir)]
    logger.info("binarising with fairseq-preprocess into %s", destdir)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        raise CorpusError(f"fairseq preprocess failed (exit {proc.returncode}): {tail}")
    logger.debug("fairseq preprocess output:\n%s", proc.stdout)
    return Path(destdir)


def binarize(
    split_files: Mapping[str, Path],
    destdir: Path,
    workers: int = 2,
    threshold_tokens: int = 0,
    python: str = sys.executable,
) -> Path:
    """``fairseq-preprocess --only-source`` on the split files into ``destdir``."""
    flags = ["--only-source", "--trainpref", split_files["train"], "--validpref", split_files["valid"],
             "--testpref", split_files["test"], "--workers", workers]
    if threshold_tokens > 0:
        flags += ["--thresholdtokens", threshold_tokens]
    return run_preprocess(flags, destdir, python)


def count_lines(path: Path) -> int:
    """Number of lines in a text file."""
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


def load_manifest(out: Path) -> Optional[dict]:
    """Return ``out/corpus.json`` if it exists and parses, else ``None``."""
    path = Path(out) / MANIFEST_NAME
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _work_prefix(out: Path, kind: str) -> str:
    """Prefix of the temporary siblings of ``out`` made by this process (its pid inside,
    so that a later run can tell a killed run's leftovers from a live run's)."""
    return f".{out.name}.{kind}-{os.getpid()}-"


def remove_stale_work(out: Path) -> None:
    """Remove temporary siblings of ``out`` left by a killed build (their process is gone)."""
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                logger.info("removing %s, left by a killed run (pid %s)", path, pid)
                shutil.rmtree(path, ignore_errors=True)


def _replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``, replacing an existing ``final`` directory."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=_work_prefix(final, "old"), dir=final.parent))
        os.rename(final, old / final.name)
        os.rename(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, final)


def build_atomically(cfg, build_into: Callable[[object, Path], dict],
                     incomplete: Callable[[Mapping], Optional[str]] = lambda manifest: None) -> dict:
    """Build into ``cfg.out`` through a temporary sibling renamed at the end; return the
    manifest. A complete ``cfg.out`` built with the same settings (``cfg.fingerprint()``)
    is left alone unless ``cfg.force`` or ``incomplete(manifest)`` names what it lacks.
    Shared by the LM and the translation corpus builders."""
    cfg.validate()
    out = Path(cfg.out).expanduser().resolve()
    remove_stale_work(out)
    if out.exists() and not cfg.force:
        existing = load_manifest(out)
        if existing is not None and existing.get("config") == cfg.fingerprint():
            missing = incomplete(existing)
            if missing is None:
                logger.info("%s already holds this corpus; skipping (use --force to rebuild)", out)
                return existing
            logger.info("%s lacks %s; rebuilding", out, missing)
        elif existing is not None:
            raise CorpusError(f"--out {out} holds a corpus built with different settings; "
                              "use --force to overwrite it")
        elif any(out.iterdir()):
            raise CorpusError(f"--out {out} exists and is not a complete corpus "
                              f"(no {MANIFEST_NAME}); use --force to overwrite it")
    if cfg.binarize and not fairseq_available():
        raise CorpusError("fairseq is not importable (needed to binarise); install it or pass --no-binarize")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=_work_prefix(out, "tmp"), dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp creates 0700; use normal permissions
    try:
        manifest = build_into(cfg, work)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("wrote %s", out)
    return manifest
