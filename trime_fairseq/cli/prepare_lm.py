"""Build a document-level LM corpus (train/valid/test text + fairseq binaries).

Examples::

    # Django + SQLAlchemy documentation from PyPI sdists, sentencepiece 8k vocab
    python -m trime_fairseq.cli.prepare_lm --out data/django-sqlalchemy

    # WikiText-103 (already tokenised, keep the official splits)
    python -m trime_fairseq.cli.prepare_lm --source wikitext103 \\
        --input wikitext-103 --tokenizer none --out data/wikitext-103

Output (``--out``): ``train.txt``/``valid.txt``/``test.txt`` (one line per line of a
document, one empty line between documents), ``spm.model`` (sentencepiece only),
``bin/`` (fairseq-preprocess output: ``dict.txt``, ``train.bin`` ...) and
``corpus.json`` (settings and statistics).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from trime_fairseq.cli import LOG_FORMAT
from trime_fairseq.errors import cli_entry
from trime_fairseq.prepare.lm import (
    DEFAULT_CACHE_DIR,
    DJANGO_SQLALCHEMY,
    SOURCES,
    SPM_MODEL_TYPES,
    TOKENIZERS,
    CorpusConfig,
    build_corpus,
    format_summary,
)

PROG = "prepare_lm"
logger = logging.getLogger(PROG)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``prepare_lm``."""
    pins = ", ".join(spec.requirement for spec in DJANGO_SQLALCHEMY)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build a document-level language-modelling corpus for fairseq "
        "(split by document, tokenise, binarise with fairseq-preprocess).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", choices=SOURCES, default="django-sqlalchemy",
                        help=f"where documents come from: django-sqlalchemy = reST docs of the PyPI "
                        f"sdists ({pins}); linux-doc = long documents: the Linux 6.1 kernel documentation "
                        "(Debian linux-doc-6.1, fetched with apt-get download, or the unpacked package "
                        "as --input), one document per chapter folder of 10k-30k words; folder = every *.txt/*.md/*.rst file under --input; "
                        "textfile = blank-line-separated blocks of --input; wikitext103 = "
                        "wiki.{train,valid,test}.tokens in --input, split into articles at "
                        "' = Title = ' headings, official splits kept")
    parser.add_argument("--input", type=Path, default=None,
                        help="input directory (folder, wikitext103, optional for linux-doc) or file "
                        "(textfile); not used by django-sqlalchemy")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (written atomically via a temporary sibling)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="where downloaded sdists and .debs are cached ('sdists', 'debs' subfolders)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="sentencepiece",
                        help="sentencepiece: train a model on the train split and encode all "
                        "splits to pieces; none: text is already tokenised, split on whitespace")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="sentencepiece vocabulary size (soft limit for tiny corpora)")
    parser.add_argument("--spm-model-type", choices=SPM_MODEL_TYPES, default="unigram",
                        help="sentencepiece model type")
    parser.add_argument("--input-sentence-size", type=int, default=300_000,
                        help="sentencepiece trains on at most this many randomly sampled train lines")
    parser.add_argument("--valid-frac", type=float, default=0.05,
                        help="fraction of documents for valid (at least one; ignored for wikitext103)")
    parser.add_argument("--test-frac", type=float, default=0.05,
                        help="fraction of documents for test (at least one; ignored for wikitext103)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the document shuffle (and of sentencepiece sampling)")
    parser.add_argument("--max-docs", type=int, default=None,
                        help="use at most this many documents (a seeded random subset; for "
                        "wikitext103 the first N of each split) for quick runs")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes/threads for sentencepiece and fairseq-preprocess")
    parser.add_argument("--thresholdtokens", type=int, default=0,
                        help="passed to fairseq-preprocess: map tokens seen at most this many "
                        "times to <unk> (0 = keep all)")
    parser.add_argument("--dedup-jaccard", type=float, default=None,
                        help="drop valid/test documents that have a segment whose word n-gram "
                        "Jaccard similarity to a train segment is >= this (default: keep all, so "
                        "existing corpora stay the same); counts go to corpus.json")
    dedup = CorpusConfig.__dataclass_fields__
    parser.add_argument("--dedup-ngram", type=int, default=dedup["dedup_ngram"].default,
                        help="n of the word n-grams of --dedup-jaccard")
    parser.add_argument("--dedup-segment-words", type=int, default=dedup["dedup_segment_words"].default,
                        help="--dedup-jaccard compares segments of this many words")
    parser.add_argument("--no-binarize", action="store_true",
                        help="only write the text files; skip fairseq-preprocess")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even if --out already holds a complete corpus")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    return parser


def config_from_args(args: argparse.Namespace) -> CorpusConfig:
    """Map parsed arguments onto a :class:`CorpusConfig`."""
    return CorpusConfig(
        out=args.out,
        source=args.source,
        input=args.input,
        cache_dir=args.cache_dir,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        spm_model_type=args.spm_model_type,
        input_sentence_size=args.input_sentence_size,
        valid_frac=args.valid_frac,
        test_frac=args.test_frac,
        seed=args.seed,
        max_docs=args.max_docs,
        workers=args.workers,
        threshold_tokens=args.thresholdtokens,
        binarize=not args.no_binarize,
        force=args.force,
        dedup_jaccard=args.dedup_jaccard,
        dedup_ngram=args.dedup_ngram,
        dedup_segment_words=args.dedup_segment_words,
    )


def setup_logging(level: str) -> None:
    """Set the root level and give plain stderr handlers our format.

    Importing fairseq may already have called ``logging.basicConfig`` (at DEBUG);
    handler subclasses (e.g. pytest's capture handlers) are left untouched.
    """
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr)
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(formatter)
    root.setLevel(level)


@cli_entry(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; errors exit with a one-line ``prepare_lm: error: ...`` message."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    start = time.perf_counter()
    manifest = build_corpus(config_from_args(args))  # CorpusError: one line (cli_entry)
    logger.info("corpus in %s (%.1fs)\n%s", args.out, time.perf_counter() - start,
                format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
