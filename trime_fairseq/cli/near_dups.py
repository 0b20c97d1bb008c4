"""``trime-near-dups``: how many valid/test segments have a near-duplicate in train.

Segments are cut as for training (``--tokens-per-sample`` tokens, never across a
document); a segment is a near-duplicate when the token ``--ngram``-gram Jaccard
similarity to some train segment is at least the threshold (the same test as
``--bm25-max-jaccard``, :mod:`trime_fairseq.data.near_dup`).

    trime-near-dups runs/main/corpus/bin --tokens-per-sample 512 --ngram 5 \\
        --thresholds 0.3,0.5,0.8 --out docs/results/near_dups.json
"""
import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.data.near_dup import max_jaccard, ngram_sets

logger = logging.getLogger("trime_fairseq.near_dups")


def split_segments(data: str, split: str, length: int) -> List[np.ndarray]:
    """Token ids of the training-style segments of ``split`` in the binarised ``data``."""
    return split_segments_with_docs(data, split, length)[0]


def split_segments_with_docs(data: str, split: str, length: int,
                             across_documents: bool = False) -> Tuple[List[np.ndarray], np.ndarray]:
    """:func:`split_segments` and the document index of each segment; ``across_documents``:
    the stream cut every ``length`` tokens instead (``--memory-across-documents``)."""
    from fairseq.data import Dictionary, data_utils

    from trime_fairseq.data.stream import DocumentSegments, TokenStream

    dict_path = os.path.join(data, "dict.txt")
    if not os.path.exists(dict_path):
        raise FileNotFoundError(f"{dict_path} not found: DATA must be a fairseq-preprocess folder")
    d = Dictionary.load(dict_path)
    lines = data_utils.load_indexed_dataset(os.path.join(data, split), d)
    if lines is None:
        raise FileNotFoundError(f"split {split!r} not found in {data}")
    stream = TokenStream.from_lines(lines, d.eos())
    seg = DocumentSegments(stream, length, d.pad(), across_documents=across_documents)
    return [stream.ids(int(s), int(s) + int(n)) for s, n in zip(seg.starts, seg.sizes)], seg.seg_docs


def near_duplicate_stats(queries: Sequence[np.ndarray], train: Sequence[np.ndarray], ngram: int,
                         thresholds: Sequence[float]) -> Dict:
    """Best train Jaccard of every query segment, summarised per threshold."""
    best, arg = max_jaccard(ngram_sets(queries, ngram), ngram_sets(train, ngram))
    out = {"segments": len(queries), "mean_best_jaccard": float(best.mean()) if len(best) else 0.0,
           "thresholds": {}}
    for t in thresholds:
        hit = best >= t
        out["thresholds"][f"{t:g}"] = {"segments": int(hit.sum()), "fraction": float(hit.mean()) if len(best) else 0.0}
    out["best"] = best.tolist()
    out["best_train_segment"] = arg.tolist()
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="trime-near-dups", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq-preprocess output folder (dict.txt, train.bin, ...)")
    p.add_argument("--tokens-per-sample", type=int, default=512, help="segment length L (as in training)")
    p.add_argument("--ngram", type=int, default=5, help="n of the token n-grams")
    p.add_argument("--thresholds", default="0.3,0.5,0.8", help="Jaccard thresholds to count segments at")
    p.add_argument("--splits", default="valid,test", help="splits compared against train")
    p.add_argument("--out", default=None, help="write the counts as JSON (and a .md table beside it)")
    a = p.parse_args(argv)
    try:
        thresholds = [float(t) for t in a.thresholds.split(",") if t]
    except ValueError:
        p.error("--thresholds takes comma-separated numbers")
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        p.error("--thresholds must be in (0, 1]")
    if a.ngram < 1 or a.tokens_per_sample < 1:
        p.error("--ngram and --tokens-per-sample must be >= 1")
    try:
        train = split_segments(a.data, "train", a.tokens_per_sample)
        result = {"data": a.data, "tokens_per_sample": a.tokens_per_sample, "ngram": a.ngram,
                  "train_segments": len(train), "splits": {}}
        for split in [s for s in a.splits.split(",") if s]:
            stats = near_duplicate_stats(split_segments(a.data, split, a.tokens_per_sample), train, a.ngram,
                                         thresholds)
            result["splits"][split] = stats
            logger.info("%s: %d segments; with a train near-duplicate: %s", split, stats["segments"],
                        ", ".join(f"J>={t} {v['segments']} ({100 * v['fraction']:.1f}%)"
                                  for t, v in stats["thresholds"].items()))
    except FileNotFoundError as e:
        p.error(str(e))
    if a.out:
        lines = ["| split | segments | " + " | ".join(f"J ≥ {t:g}" for t in thresholds) + " |",
                 "|---|---:|" + "---:|" * len(thresholds)]
        for split, s in result["splits"].items():
            lines.append(f"| {split} | {s['segments']} | " + " | ".join(
                f"{v['segments']} ({100 * v['fraction']:.1f}%)" for v in s["thresholds"].values()) + " |")
        for path, text in ((a.out, json.dumps(result, indent=1)),
                           (os.path.splitext(a.out)[0] + ".md", "\n".join(lines) + "\n")):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
