"""``--task trime_lm``: fairseq's language modelling task plus the flags for memories.

Training: with ``--consecutive-segments m`` (> 1) batches hold runs of ``m`` consecutive
segments of a document (§4.2) and ``trime_loss`` uses long-term in-batch memory; otherwise
batches are fairseq's and memory is local.

Evaluation (``fairseq-eval-lm --task trime_lm``): blocks are read in order by the task's
own loader (results never depend on batch size). ``--eval-combiner`` picks how memory is
used (``none``, ``trime`` = Eq. 6, ``cache`` = continuous cache) and ``--eval-memory`` which
memory: ``local`` (the context window and the earlier tokens of the block) or
``local+long`` (plus up to ``--long-memory-size`` earlier tokens of the same document).
"""

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
from fairseq import utils
from fairseq.data import data_utils, iterators
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from trime_fairseq.data.stream import DocumentSegments, StreamBlocks, TokenStream
from trime_fairseq.memory.combiners import CacheCombiner, Combiner, KnnCombiner, NoMemory, TrimeCombiner
from trime_fairseq.models.memory_eval import MemoryEvalModel

logger = logging.getLogger(__name__)

EVAL_COMBINERS = ChoiceEnum(["none", "trime", "cache", "knn"])
EVAL_MEMORIES = ChoiceEnum(["local", "local+long", "local+ext", "local+long+ext"])
CACHE_REPRESENTATIONS = ChoiceEnum(["f", "g"])


@dataclass
class TrimeLMConfig(LanguageModelingConfig):
    eval_combiner: EVAL_COMBINERS = field(
        default="none",
        metadata={
            "help": "how fairseq-eval-lm uses memory: none (vanilla LM), trime (Eq. 6, "
            "one softmax over vocabulary and memory, temperature --eval-temperature), "
            "cache (continuous cache of Grave et al. 2017, needs --cache-lambda and "
            "--cache-theta) or knn (kNN-LM over --datastore, needs --knn-lambda; with "
            "--cache-lambda/--cache-theta a cache is added on top)"
        },
    )
    eval_memory: EVAL_MEMORIES = field(
        default="local",
        metadata={
            "help": "which memory the combiner reads: local = the --context-window tokens "
            "and the earlier tokens of the scored block, each labelled with its next token; "
            "local+long = also up to --long-memory-size earlier tokens of the same document; "
            "+ext = also the --knn-k nearest entries of --datastore"
        },
    )
    stream_batching: bool = field(
        default=False,
        metadata={"help": "Memorizing Transformer training: row r of every batch continues row r "
                          "of the previous batch (segments of documents in order), so a model "
                          "memory persists across steps; batch size = --batch-size"},
    )
    bm25_batching: bool = field(
        default=False,
        metadata={"help": "TRIMELM_ext (§4.3): training batches of BM25-similar segments; "
                          "trime_loss then uses all other segments of the batch as memory "
                          "(with --drop-local-prob). Batches are computed once and cached"},
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
        default=None, metadata={"help": "kNN-LM: weight of P_kNN in (1-lambda) P_LM + lambda P_kNN"}
    )
    knn_temperature: float = field(
        default=1.0, metadata={"help": "kNN-LM: P_kNN ∝ exp(similarity / T)"}
    )
    memory_lambda: float = field(
        default=0.0,
        metadata={"help": "TRIME Appendix F: interpolate Eq. 6 with the memory-only "
                          "distribution of Eq. 7 with this weight (Eq. 8); 0 = off"},
    )
    memory_temperature: Optional[float] = field(
        default=None, metadata={"help": "TRIME Appendix F: temperature tau' of Eq. 7"}
    )
    long_memory_size: int = field(
        default=0,
        metadata={
            "help": "tokens of long-term memory at test time (with --eval-memory local+long): "
            "the most recent ones of the current document before the context window; reset "
            "at document boundaries"
        },
    )
    consecutive_segments: int = field(
        default=1,
        metadata={
            "help": "training batches hold runs of m consecutive segments of a document "
            "(TRIMELM_long, §4.2); the batch (--batch-size, or --max-tokens / "
            "--tokens-per-sample) must be a multiple of m. Segments never cross document "
            "boundaries; a document shorter than m segments shares its run with the next "
            "document, and memory never crosses documents"
        },
    )
    eval_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature tau of Eq. 6: memory scores are sim(q, k) / tau"},
    )
    cache_lambda: Optional[float] = field(
        default=None,
        metadata={"help": "continuous cache: interpolation weight lambda of P_cache (0..1)"},
    )
    cache_theta: Optional[float] = field(
        default=None,
        metadata={"help": "continuous cache: flatness theta, P_cache ∝ Σ exp(theta h.h_j)"},
    )
    cache_representation: CACHE_REPRESENTATIONS = field(
        default="f",
        metadata={
            "help": "continuous cache: hidden state h, f = decoder output (Grave et al.) "
            "or g = input of the last feed-forward block"
        },
    )


def check_memory_flags(cfg) -> None:
    """Clear one-line errors for inconsistent memory flags."""
    if cfg.long_memory_size < 0:
        raise ValueError(f"--long-memory-size must be >= 0, got {cfg.long_memory_size}")
    if str(cfg.eval_memory) == "local+long" and cfg.long_memory_size == 0:
        raise ValueError("--eval-memory local+long needs --long-memory-size > 0")
    if cfg.consecutive_segments < 1:
        raise ValueError(f"--consecutive-segments must be >= 1, got {cfg.consecutive_segments}")
    uses_ext = "ext" in str(getattr(cfg, "eval_memory", "local")) or str(cfg.eval_combiner) == "knn"
    if uses_ext and not getattr(cfg, "datastore", None):
        raise ValueError("external memory (--eval-memory ...+ext or --eval-combiner knn) needs --datastore")
    if getattr(cfg, "knn_k", 1) < 1:
        raise ValueError(f"--knn-k must be >= 1, got {cfg.knn_k}")


def build_combiner(cfg) -> Combiner:
    """The combiner that the ``--eval-*`` / ``--cache-*`` flags ask for (clear errors)."""
    kind = str(cfg.eval_combiner)
    if kind == "none":
        return NoMemory()
    if kind == "trime":
        return TrimeCombiner(cfg.eval_temperature, getattr(cfg, "memory_lambda", 0.0),
                             getattr(cfg, "memory_temperature", None))
    cache = None
    if cfg.cache_lambda is not None or cfg.cache_theta is not None or kind == "cache":
        if cfg.cache_lambda is None or cfg.cache_theta is None:
            raise ValueError(f"--eval-combiner {kind} with a cache needs both --cache-lambda and --cache-theta")
        cache = CacheCombiner(cfg.cache_lambda, cfg.cache_theta, str(cfg.cache_representation))
    if kind == "cache":
        return cache
    if cfg.knn_lambda is None:
        raise ValueError("--eval-combiner knn needs --knn-lambda")
    return KnnCombiner(cfg.knn_lambda, cfg.knn_temperature, cache)


@register_task("trime_lm", dataclass=TrimeLMConfig)
class TrimeLanguageModelingTask(LanguageModelingTask):
    """Language modelling with TRIME memories (see module docstring)."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None) -> None:
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        check_memory_flags(args)
        self.combiner = build_combiner(args)
        self._streams: Dict[str, TokenStream] = {}
        self.with_positions = False  # set when the model reads token positions

    def build_model(self, args, from_checkpoint: bool = False):
        model = super().build_model(args, from_checkpoint)
        if getattr(model, "needs_stream_positions", False):  # e.g. the Memorizing Transformer
            self.with_positions = True
            for ds in self.datasets.values():
                if isinstance(ds, (DocumentSegments, StreamBlocks)):
                    ds.with_positions = True
        # only models loaded for scoring (fairseq-eval-lm & co.) are wrapped, never the
        # model being trained
        if not from_checkpoint or isinstance(self.combiner, NoMemory):
            return model
        memory = str(self.args.eval_memory)
        long_size = self.args.long_memory_size if "long" in memory else 0
        retriever = None
        if "ext" in memory or isinstance(self.combiner, KnnCombiner):
            retriever = self.build_retriever(model)
        logger.info("scoring with memory: %s over %s memory (long-term size %d%s)",
                    self.combiner.describe(), memory, long_size,
                    f", {retriever.k} neighbours from {self.args.datastore}" if retriever else "")
        return MemoryEvalModel(model, self.combiner, self.source_dictionary.pad(),
                               long_memory_size=long_size, retriever=retriever)

    def build_retriever(self, model):
        """Open ``--datastore`` and check that it belongs to this model and dictionary."""
        from trime_fairseq.memory.datastore import Datastore, file_fingerprint
        from trime_fairseq.memory.retriever import Retriever

        ds = Datastore(self.args.datastore)
        dict_path = os.path.join(utils.split_paths(self.args.data)[0], "dict.txt")
        ds.meta.check_compatible(
            dim=model.decoder.layers[-1].fc1.in_features,
            dictionary_sha256=file_fingerprint(dict_path),
            where=f"--datastore {self.args.datastore}",
        )
        return Retriever(ds, k=self.args.knn_k, nprobe=self.args.nprobe, exact=self.args.exact_distances)

    def stream(self, split: str) -> TokenStream:
        """The split as one token stream with document ids (cached)."""
        if split not in self._streams:
            path = os.path.join(utils.split_paths(self.args.data)[0], split)
            lines = data_utils.load_indexed_dataset(path, self.dictionary, self.args.dataset_impl)
            if lines is None:
                raise FileNotFoundError(f"Dataset not found: {split} ({path})")
            self._streams[split] = TokenStream.from_lines(lines, self.dictionary.eos())
        return self._streams[split]

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        m = self.args.consecutive_segments
        if self.args.bm25_batching and m > 1:
            raise ValueError("--bm25-batching uses m=1 (§4.3): drop --consecutive-segments")
        if self.args.stream_batching and (m > 1 or self.args.bm25_batching):
            raise ValueError("--stream-batching cannot be combined with --consecutive-segments or --bm25-batching")
        if self.args.bm25_batching and split.startswith("train"):
            ds = DocumentSegments(self.stream(split), self.args.tokens_per_sample, self.dictionary.pad(), external=True)
            ds.shuffle, ds.split = True, split
            self.datasets[split] = ds
        elif self.args.stream_batching:
            ds = DocumentSegments(self.stream(split), self.args.tokens_per_sample, self.dictionary.pad())
            ds.stream_rows, ds.shuffle = True, split.startswith("train")
            ds.with_positions = self.with_positions
            self.datasets[split] = ds
        elif m > 1:
            ds = DocumentSegments(self.stream(split), self.args.tokens_per_sample, self.dictionary.pad(), group=m)
            ds.with_positions = self.with_positions
            ds.shuffle = split.startswith("train")
            self.datasets[split] = ds
            logger.info("%s: %d segments of <= %d tokens from %d documents, in runs of %d",
                        split, len(ds), self.args.tokens_per_sample, self.stream(split).num_docs, m)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, **kwargs):
        if not isinstance(dataset, DocumentSegments):
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences,
                max_positions=max_positions, ignore_invalid_inputs=ignore_invalid_inputs,
                required_batch_size_multiple=required_batch_size_multiple, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                data_buffer_size=data_buffer_size, disable_iterator_cache=disable_iterator_cache, **kwargs)
        m = dataset.group
        bsz = max_sentences or (max_tokens or 0) // self.args.tokens_per_sample
        if dataset.stream_rows:
            if bsz < 1:
                raise ValueError("--stream-batching needs --batch-size (rows read in parallel)")
            rows = dataset.stream_batches(bsz, seed, epoch, dataset.shuffle)
            return iterators.EpochBatchIterator(
                dataset=dataset, collate_fn=dataset.collater, batch_sampler=rows, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                buffer_size=data_buffer_size, disable_shuffling=True,
            )
        if dataset.external:
            fixed = self.bm25_batches(dataset, bsz, seed)
            return iterators.EpochBatchIterator(
                dataset=dataset, collate_fn=dataset.collater, batch_sampler=fixed, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                buffer_size=data_buffer_size,
            )
        if bsz < m:
            raise ValueError(
                f"--consecutive-segments {m} is larger than the batch ({bsz} segments of "
                f"{self.args.tokens_per_sample} tokens); raise --batch-size or --max-tokens"
            )
        if bsz % m:
            raise ValueError(f"the batch ({bsz} segments) must be a multiple of --consecutive-segments {m}")
        shuffle = getattr(dataset, "shuffle", False)

        def batches(ds, ep):
            return ds.batches(bsz // m, seed=seed, epoch=ep, shuffle=shuffle)

        return iterators.EpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=batches, seed=seed,
            num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size, disable_shuffling=not shuffle,
        )

    def bm25_batches(self, dataset: DocumentSegments, batch_size: int, seed: int):
        """BM25 batches of the training segments, computed once and cached on disk."""
        from trime_fairseq.data.bm25 import BM25, bm25_batches

        if batch_size < 2:
            raise ValueError("--bm25-batching needs at least 2 segments per batch (--batch-size or --max-tokens)")
        root = self.args.bm25_cache_dir or utils.split_paths(self.args.data)[0]
        key = (f"bm25_{dataset.split}_L{self.args.tokens_per_sample}_B{batch_size}"
               f"_k{self.args.bm25_neighbours}_q{self.args.bm25_query_terms}_s{seed}")
        path = os.path.join(root, key + ".npz")
        if os.path.exists(path):
            saved = np.load(path)
            if int(saved["num_segments"]) == len(dataset):
                logger.info("BM25 batches from cache %s", path)
                return np.split(saved["order"], saved["bounds"])
        t0 = time.perf_counter()
        docs = [dataset[i]["source"].numpy() for i in range(len(dataset))]
        bm25 = BM25(docs)
        ids, scores = bm25.neighbours(self.args.bm25_neighbours, self.args.bm25_query_terms)
        batches = bm25_batches(ids, scores, batch_size, seed=seed)
        order = np.concatenate(batches)
        bounds = np.cumsum([len(b) for b in batches])[:-1]
        tmp = path + ".tmp.npz"
        np.savez(tmp, order=order, bounds=bounds, num_segments=len(dataset))
        os.replace(tmp, path)
        logger.info("BM25 batching: %d segments into %d batches in %.1fs (cached in %s)",
                    len(dataset), len(batches), time.perf_counter() - t0, path)
        return batches

    def eval_lm_dataloader(self, dataset, max_tokens: Optional[int] = 36000, batch_size=None,
                           max_positions=None, num_shards: int = 1, shard_id: int = 0,
                           num_workers: int = 1, data_buffer_size: int = 10, context_window: int = 0):
        """Blocks in reading order with their context window (see :class:`StreamBlocks`)."""
        split = next((k for k, v in self.datasets.items() if v is dataset), None)
        if split is None:
            raise ValueError("eval_lm_dataloader: the dataset was not loaded by this task")
        if num_shards > 1 and str(self.args.eval_memory) == "local+long":
            raise ValueError("--eval-memory local+long reads each document in order: use one process")
        blocks = StreamBlocks(self.stream(split), self.args.tokens_per_sample, context_window, self.dictionary.pad())
        blocks.with_positions = self.with_positions
        return self.get_batch_iterator(
            dataset=blocks, max_tokens=max_tokens, max_sentences=batch_size,
            max_positions=max_positions, ignore_invalid_inputs=True, num_shards=num_shards,
            shard_id=shard_id, num_workers=num_workers, data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
