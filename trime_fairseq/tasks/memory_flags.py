"""Flags shared by the LM and translation tasks: external-memory retrieval and BM25 batching.

Both tasks inherit these dataclasses, so ``--datastore``, ``--knn-k``... mean the same in
``fairseq-eval-lm --task trime_lm`` and ``fairseq-generate --task trime_translation``, and
:func:`build_retriever` opens a datastore the same way for both.
"""

import logging
import os
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from trime_fairseq.data.bm25 import GROW_MODES

from trime_fairseq.errors import TrimeUserError
from trime_fairseq.memory.combiners import (
    AdaptiveKnnCombiner, CacheCombiner, Combiner, KnnCombiner, NoMemory, TrimeCombiner)
from trime_fairseq.memory.joint import DEFAULT_PPRIME, PPRIME_KINDS
from trime_fairseq.memory.retriever import SKIP_FEATURES, RetrievalSkip

logger = logging.getLogger(__name__)

BM25_GROW = ChoiceEnum(list(GROW_MODES))
ON_OFF = ChoiceEnum(["on", "off"])
SKIP_FEATURE_CHOICES = ChoiceEnum(list(SKIP_FEATURES))
PPRIME_CHOICES = ChoiceEnum(list(PPRIME_KINDS))
# defaults of the LM ablation (docs/results/external_memory_ablation.md)
DEFAULT_BM25_GROW = "heap"
DEFAULT_BM25_EXCLUDE_SAME_DOC = "off"
DEFAULT_BM25_MAX_JACCARD: Optional[float] = None


#: every test-time combiner; each task offers those that apply to it (``--eval-combiner``)
COMBINER_KINDS = ("none", "trime", "cache", "knn", "adaptive")


def build_combiner(cfg, kind: Optional[str] = None, flag: str = "--eval-combiner") -> Combiner:
    """The one combiner registry of ``fairseq-eval-lm`` and ``fairseq-generate``: the
    combiner ``kind`` (default ``cfg.eval_combiner``) with its settings from ``cfg``; a
    missing setting is a one-line error naming ``flag``.

    ``none``: the model alone; ``trime``: Eq. 6 (+ Appendix F with ``--memory-lambda``);
    ``cache``: continuous cache; ``knn``: kNN-LM / kNN-MT (+ a cache with ``--cache-*``);
    ``adaptive``: adaptive kNN-MT with a Meta-k network (``--metak-path``).
    """
    kind = str(kind or cfg.eval_combiner)
    if kind == "none":
        return NoMemory()
    if kind == "trime":
        return TrimeCombiner(cfg.eval_temperature, getattr(cfg, "memory_lambda", 0.0),
                             getattr(cfg, "memory_temperature", None),
                             str(getattr(cfg, "memory_distribution", DEFAULT_PPRIME)),
                             getattr(cfg, "ext_temperature", None), int(getattr(cfg, "long_memory_top_k", 0)))
    if kind == "adaptive":
        from trime_fairseq.models.memory_generate import load_metak

        metak = load_metak(getattr(cfg, "metak_path", None), flag)
        if metak.max_k != cfg.knn_k:
            raise TrimeUserError(f"--metak-path {cfg.metak_path} was trained with --knn-k {metak.max_k}, "
                                 f"not {cfg.knn_k}")
        return AdaptiveKnnCombiner(metak, cfg.knn_temperature)
    if kind not in ("cache", "knn"):
        raise TrimeUserError(f"{flag} {kind}: choose from {', '.join(COMBINER_KINDS)}")
    cache = None
    lam, theta = getattr(cfg, "cache_lambda", None), getattr(cfg, "cache_theta", None)
    if lam is not None or theta is not None or kind == "cache":
        if lam is None or theta is None:
            raise TrimeUserError(f"{flag} {kind} with a cache needs both --cache-lambda and --cache-theta")
        cache = CacheCombiner(lam, theta, str(getattr(cfg, "cache_representation", "f")))
    if kind == "cache":
        return cache
    if cfg.knn_lambda is None:
        raise TrimeUserError(f"{flag} knn needs --knn-lambda (weight of P_kNN, e.g. 0.5)")
    return KnnCombiner(cfg.knn_lambda, cfg.knn_temperature, cache)


#: the values of ``--eval-memory``
EVAL_MEMORY_CHOICES = ("local", "local+long", "local+ext", "local+long+ext")


@dataclass(frozen=True)
class EvalMemory:
    """The memories a test-time combiner reads, parsed once from ``--eval-memory`` (local
    memory is always there; ``--eval-combiner knn`` implies external memory), with every
    check of the memory flags that depends on it.

    Attributes:
        long: long-term memory of the current document (``+long``), ``long_size`` tokens.
        ext: external memory: the nearest entries of ``--datastore``.
    """

    long: bool = False
    ext: bool = False
    long_size: int = 0

    @classmethod
    def from_args(cls, args) -> "EvalMemory":
        value = str(getattr(args, "eval_memory", "local"))
        if value not in EVAL_MEMORY_CHOICES:
            raise TrimeUserError(f"--eval-memory {value}: choose from {', '.join(EVAL_MEMORY_CHOICES)}")
        long = "+long" in value
        ext = "+ext" in value or str(getattr(args, "eval_combiner", "none")) == "knn"
        size = int(getattr(args, "long_memory_size", 0))
        if size < 0:
            raise TrimeUserError(f"--long-memory-size must be >= 0, got {size}")
        if long and size == 0:
            raise TrimeUserError(f"--eval-memory {value} needs --long-memory-size > 0 (tokens of long-term memory)")
        if ext and not getattr(args, "datastore", None):
            raise TrimeUserError("external memory (--eval-memory ...+ext or --eval-combiner knn) needs --datastore")
        return cls(long=long, ext=ext, long_size=size if long else 0)

    def check_processes(self, num_shards: int) -> None:
        """Long-term memory reads each document in order, in one process."""
        if num_shards > 1 and self.long:
            raise TrimeUserError("long-term memory (--eval-memory ...+long) reads each document in order: "
                                 "evaluate in one process")

    def describe(self) -> str:
        return "+".join(["local"] + (["long"] if self.long else []) + (["ext"] if self.ext else []))


@dataclass
class RetrievalConfig(FairseqDataclass):
    datastore: Optional[str] = field(
        default=None,
        metadata={"help": "datastore directory (trime-build-datastore) for external memory"},
    )
    knn_k: int = field(default=1024, metadata={"help": "neighbours retrieved from the datastore per token"})
    nprobe: Optional[int] = field(
        default=None, metadata={"help": "IVF lists searched (default: the value chosen at index build)"}
    )
    exact_distances: bool = field(
        default=False,
        metadata={"help": "recompute neighbour similarities from the stored keys instead of FAISS's"},
    )
    knn_lambda: Optional[float] = field(
        default=None, metadata={"help": "kNN-LM / kNN-MT: weight of P_kNN in (1-lambda) P_model + lambda P_kNN"}
    )
    knn_temperature: float = field(
        default=1.0, metadata={"help": "kNN-LM / kNN-MT: P_kNN ∝ exp(similarity / T)"}
    )
    eval_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature tau of Eq. 6: memory scores are sim(q, k) / tau"},
    )
    ext_temperature: Optional[float] = field(
        default=None,
        metadata={"help": "TRIME with external memory: score the retrieved --datastore entries of Eq. 6 "
                          "by sim(q, k) / tau_ext instead of / --eval-temperature (datastore neighbours "
                          "are closer to the query than the in-batch keys of training, so they often "
                          "want a larger temperature than local memory); unset = --eval-temperature, "
                          "as in the paper. trime-tune: --grid ext_tau=..."},
    )
    memory_lambda: float = field(
        default=0.0,
        metadata={"help": "TRIME Appendix F: interpolate Eq. 6 with the memory-only "
                          "distribution of Eq. 7 with this weight (Eq. 8); 0 = off"},
    )
    memory_temperature: Optional[float] = field(
        default=None, metadata={"help": "TRIME Appendix F: temperature tau' of Eq. 7"}
    )
    memory_distribution: PPRIME_CHOICES = field(
        default=DEFAULT_PPRIME,
        metadata={"help": "TRIME Appendix F: the entries of P' (Eq. 7). ext-raw (published) = the "
                          "retrieved external neighbours only, softmax of raw similarity / tau' "
                          "(no sqrt(d)); all-scaled = every memory entry (local, long, external), "
                          "sim / (sqrt(d) tau')"},
    )
    retrieval_skip_feature: Optional[SKIP_FEATURE_CHOICES] = field(
        default=None,
        metadata={"help": "adaptive retrieval: do not search --datastore for tokens where the model is "
                          "confident, judged by this feature of its next-token distribution (entropy in "
                          "nats, or max-prob); those tokens are scored without external memory. Needs "
                          "--retrieval-skip-threshold; unset = search every token"},
    )
    retrieval_skip_threshold: Optional[float] = field(
        default=None,
        metadata={"help": "adaptive retrieval: skip the search where entropy < X (X >= 0; 0 never skips) "
                          "or max-prob > X (X in [0, 1]; 1 never skips); pick X with trime-tune "
                          "--grid ... skip_threshold=..."},
    )


@dataclass
class BM25BatchingConfig(FairseqDataclass):
    bm25_batching: bool = field(
        default=False,
        metadata={"help": "TRIME external memory (§4.3): training batches of BM25-similar segments "
                          "(LM) or target sentences (translation); trime_loss then uses the other "
                          "members of the batch as memory. Batches are computed once and cached"},
    )
    bm25_neighbours: int = field(
        default=32, metadata={"help": "BM25 batching: neighbours kept per segment"}
    )
    bm25_query_terms: int = field(
        default=32,
        metadata={"help": "BM25 batching: a segment queries with its rarest N distinct terms (0: all)"},
    )
    bm25_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "where BM25 batches are cached (default: the data directory)"}
    )
    bm25_grow: BM25_GROW = field(
        default=DEFAULT_BM25_GROW,
        metadata={"help": "BM25 batching: heap = add the unused segment with the best BM25 score to "
                          "any member of the batch; chain = add the best unused hit of the last "
                          "added segment (the paper's chain)"},
    )
    bm25_exclude_same_doc: ON_OFF = field(
        default=DEFAULT_BM25_EXCLUDE_SAME_DOC,
        metadata={"help": "BM25 batching (LM): on = never put two segments of one document in a batch, "
                          "so in-batch memory holds other documents only, like a test-time "
                          "datastore (which never holds the evaluated document)"},
    )
    bm25_max_jaccard: Optional[float] = field(
        default=DEFAULT_BM25_MAX_JACCARD,
        metadata={"help": "BM25 batching: never put two segments whose token n-gram Jaccard "
                          "similarity (--bm25-ngram) is >= this in a batch (near-duplicates); "
                          "unset or >1 = off"},
    )
    bm25_ngram: int = field(
        default=5, metadata={"help": "BM25 batching: n of the n-grams of --bm25-max-jaccard"}
    )
    bm25_from_epoch: int = field(
        default=1,
        metadata={"help": "--bm25-batching starts at this epoch; earlier epochs train on the task's "
                          "ordinary batches (LM: segments as for local memory; translation: fairseq's "
                          "length-sorted batches), e.g. 2 while --ce-warmup-updates fit in the first "
                          "epoch. In-batch memory is always the other members of the batch"},
    )


def check_bm25_flags(args) -> None:
    """One-line errors for the BM25 batching flags of the LM and translation tasks."""
    if int(getattr(args, "bm25_from_epoch", 1)) < 1:
        raise TrimeUserError(f"--bm25-from-epoch must be >= 1 (1: BM25 batches from the start), "
                             f"got {args.bm25_from_epoch}")
    if int(getattr(args, "bm25_max_tokens", 0)) < 0:  # translation only
        raise TrimeUserError(f"--bm25-max-tokens must be >= 0 (0: --max-tokens), got {args.bm25_max_tokens}")


def bm25_batches_at(args, epoch: int) -> bool:
    """Whether ``--bm25-batching`` makes the training batches of ``epoch`` (``--bm25-from-epoch``)."""
    return bool(getattr(args, "bm25_batching", False)) and epoch >= int(getattr(args, "bm25_from_epoch", 1))


def retrieval_skip(args, uses_datastore: bool) -> Optional[RetrievalSkip]:
    """The adaptive-retrieval rule of ``--retrieval-skip-feature/-threshold`` (``None``:
    search every query), checked: a bad value, one flag without the other, or a skip rule
    without a datastore to search is a one-line error."""
    skip = RetrievalSkip.from_args(args)
    if skip is not None and not uses_datastore:
        raise TrimeUserError("--retrieval-skip-feature skips datastore searches: it needs external memory "
                             "(--datastore with --eval-memory ...+ext or --eval-combiner knn)")
    return skip


def build_retriever(args, model, dictionary_path: str, combiners=()):
    """Open ``--datastore`` and check that it belongs to ``model`` (key size) and to the
    dictionary at ``dictionary_path``, and that its index suits ``combiners`` (TRIME's
    Eq. 6 needs inner products); the model fingerprint is checked once weights are in."""
    from trime_fairseq.memory.datastore import Datastore, file_fingerprint
    from trime_fairseq.memory.retriever import Retriever

    if not args.datastore:
        raise TrimeUserError("external memory needs --datastore (built with trime-build-datastore)")
    ds = Datastore(args.datastore)
    dim = getattr(getattr(getattr(model, "decoder", None), "layers", [None])[-1], "fc1", None)
    ds.meta.check_compatible(
        dim=dim.in_features if dim is not None else None,
        dictionary_sha256=file_fingerprint(dictionary_path),
        where=f"--datastore {args.datastore}",
    )
    retriever = Retriever(ds, k=args.knn_k, nprobe=args.nprobe, exact=args.exact_distances)
    retriever.skip = retrieval_skip(args, True)
    check_metric(retriever, combiners)
    return retriever


def check_metric(retriever, combiners) -> None:
    """TRIME (Eq. 6) scores memory by inner product: refuse an L2 index."""
    from trime_fairseq.memory.combiners import TrimeCombiner

    if retriever.metric == "l2" and any(isinstance(c, TrimeCombiner) for c in combiners):
        raise TrimeUserError(
            f"--datastore {retriever.datastore.path}: its index uses L2 distance, TRIME's Eq. 6 needs inner "
            f"products; rebuild the index with --metric ip: "
            f"{rebuild_index_hint(retriever)}")


def rebuild_index_hint(retriever) -> str:
    from trime_fairseq.memory.datastore import rebuild_command

    return rebuild_command(str(retriever.datastore.path), retriever.datastore.meta.source, index_only=True) + \
        " --metric ip"


def segments_fingerprint(segments) -> str:
    """sha256 of the segments' tokens and lengths (what BM25 batches depend on)."""
    import hashlib

    h = hashlib.sha256()
    for seg in segments:
        arr = np.ascontiguousarray(seg, dtype=np.int64)
        h.update(np.int64(len(arr)).tobytes())
        h.update(arr.tobytes())
    return h.hexdigest()


def bm25_options(args) -> dict:
    """The batching options of ``args`` (defaults for namespaces that predate them)."""
    jac = getattr(args, "bm25_max_jaccard", DEFAULT_BM25_MAX_JACCARD)
    ngram = int(getattr(args, "bm25_ngram", 5))
    if jac is not None and jac <= 0:
        raise TrimeUserError(f"--bm25-max-jaccard must be in (0, 1] (or >1 / unset for off), got {jac}")
    if ngram < 1:
        raise TrimeUserError(f"--bm25-ngram must be >= 1, got {ngram}")
    return {
        "grow": str(getattr(args, "bm25_grow", DEFAULT_BM25_GROW)),
        "exclude_same_doc": str(getattr(args, "bm25_exclude_same_doc", DEFAULT_BM25_EXCLUDE_SAME_DOC)) == "on",
        "max_jaccard": None if jac is None or jac > 1 else float(jac),
        "ngram": ngram,
    }


def bm25_segments_name(split: str, length: int, across_documents: bool = False) -> str:
    """The name of a split's training segments in BM25 cache files (:func:`bm25_cache_key`):
    ``train_L512``, or ``train_L512_stream`` for the stream segments of
    ``--memory-across-documents``."""
    return f"{split}_L{length}" + ("_stream" if across_documents else "")


def bm25_cache_key(args, name: str, batch_size: int, seed: int, with_docs: bool) -> str:
    """File name stem of a BM25 batching: every option that changes the batches is in it
    (options at their old defaults keep the old names, so existing caches stay valid)."""
    o = bm25_options(args)
    key = f"bm25_{name}_B{batch_size}_k{args.bm25_neighbours}_q{args.bm25_query_terms}_s{seed}"
    if o["grow"] != "heap":
        key += f"_{o['grow']}"
    if o["exclude_same_doc"] and with_docs:
        key += "_xdoc"
    if o["max_jaccard"] is not None:
        key += f"_j{o['max_jaccard']:g}n{o['ngram']}"
    return key


def cached_bm25_batches(args, segments, batch_size: int, seed: int, cache_root: str, name: str,
                        docs: Optional[np.ndarray] = None):
    """BM25 batches (:func:`trime_fairseq.data.bm25.bm25_batches`) of ``segments`` (a
    sequence of token-id arrays), computed once and cached as ``cache_root/bm25_NAME_...npz``
    (``--bm25-cache-dir`` overrides the folder). ``docs`` (document id per segment) enables
    ``--bm25-exclude-same-doc``. Returns a list of index arrays."""
    import time

    from trime_fairseq.data.bm25 import BM25, bm25_batches
    from trime_fairseq.data.near_dup import NearDuplicates

    if batch_size < 2:
        raise TrimeUserError("--bm25-batching needs at least 2 segments per batch (--batch-size or --max-tokens)")
    opts = bm25_options(args)
    root = args.bm25_cache_dir or cache_root
    if not os.path.isdir(root):
        raise TrimeUserError(f"--bm25-cache-dir {root}: no such directory")
    key = bm25_cache_key(args, name, batch_size, seed, docs is not None)
    path = os.path.join(root, key + ".npz")
    digest = segments_fingerprint(segments)
    if os.path.exists(path):
        try:
            with np.load(path) as saved:
                if int(saved["num_segments"]) == len(segments) and str(saved["segments_sha256"]) == digest:
                    logger.info("BM25 batches from cache %s", path)
                    return np.split(saved["order"], saved["bounds"])
            logger.info("BM25 cache %s was computed for other segments: recomputing", path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged / older: recompute
            logger.warning("BM25 cache %s is unreadable (%s): recomputing", path, e)
    t0 = time.perf_counter()
    bm25 = BM25(segments)
    ids, scores = bm25.neighbours(args.bm25_neighbours, args.bm25_query_terms)
    near = None
    if opts["max_jaccard"] is not None:
        near = NearDuplicates(segments, n=opts["ngram"], threshold=opts["max_jaccard"])
    stats: dict = {}
    batches = bm25_batches(ids, scores, batch_size, seed=seed, grow=opts["grow"],
                           docs=docs if opts["exclude_same_doc"] else None, near_dups=near, stats=stats)
    order = np.concatenate(batches)
    bounds = np.cumsum([len(b) for b in batches])[:-1]
    import uuid

    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz"  # unique per process: workers may race
    np.savez(tmp, order=order, bounds=bounds, num_segments=len(segments), segments_sha256=digest)
    os.replace(tmp, path)
    logger.info("BM25 batching (%s): %d segments into %d batches in %.1fs (cached in %s); %s",
                ", ".join(f"{k}={v}" for k, v in opts.items()), len(segments), len(batches),
                time.perf_counter() - t0, path, ", ".join(f"{k} {v}" for k, v in stats.items()))
    return batches
