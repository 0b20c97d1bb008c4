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
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.data import data_utils, iterators
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from trime_fairseq.memory.in_batch import mark_placeholder
from trime_fairseq.data.stream import DocumentSegments, StreamBlocks, TokenStream, shard_rows
from trime_fairseq.memory.combiners import NoMemory
from trime_fairseq.memory.joint import DEFAULT_PPRIME
from trime_fairseq.models.memory_eval import MemoryEvalModel
from trime_fairseq.models.output_layer import (
    ADAPTIVE_TOKEN_MASS_HELP, ADAPTIVE_TOKEN_MASSES, DEFAULT_ADAPTIVE_TOKEN_MASS, check_adaptive_token_mass)
from trime_fairseq.tasks.datastore_keys import DatastoreKeys, KeyLayout
from trime_fairseq.tasks.memory_flags import (  # noqa: F401  (build_combiner: the task's registry)
    EVAL_MEMORY_CHOICES, BM25BatchingConfig, EvalMemory, RetrievalConfig, bm25_batches_at, bm25_segments_name,
    build_combiner, build_retriever, cached_bm25_batches, check_bm25_flags, retrieval_skip)
from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)

EVAL_COMBINERS = ChoiceEnum(["none", "trime", "cache", "knn"])
EVAL_MEMORIES = ChoiceEnum(list(EVAL_MEMORY_CHOICES))
CACHE_REPRESENTATIONS = ChoiceEnum(["f", "g"])
ADAPTIVE_TOKEN_MASS = ChoiceEnum(list(ADAPTIVE_TOKEN_MASSES))


@dataclass
class TrimeLMConfig(LanguageModelingConfig, RetrievalConfig, BM25BatchingConfig):
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
    long_memory_size: int = field(
        default=0,
        metadata={
            "help": "tokens of long-term memory at test time (with --eval-memory local+long): "
            "the most recent ones of the current document before the context window; reset "
            "at document boundaries (unless --memory-across-documents)"
        },
    )
    long_memory_top_k: int = field(
        default=0,
        metadata={
            "help": "--eval-combiner trime with long-term memory: each query reads only its k most "
            "similar long-term entries (local and external memory whole), so that a larger "
            "memory offers better entries without adding every dissimilar one to Eq. 6's "
            "denominator; 0 = all of them (the paper). trime-tune: --grid long_k=..."
        },
    )
    memory_across_documents: bool = field(
        default=False,
        metadata={
            "help": "long-term memory over the stream instead of the document: no reset at "
            "document boundaries, at test time (--eval-memory local+long reads the "
            "--long-memory-size most recent tokens whatever their document, as the reference "
            "evaluates WikiText-103) and in training (--consecutive-segments: the segments are "
            "the stream cut every --tokens-per-sample tokens, unpadded and across document "
            "boundaries, and a token's memory is every earlier token of its run; --bm25-batching: "
            "BM25 groups those unpadded stream segments, as the reference does, and a segment's "
            "local memory may reach into the previous document)"
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
    adaptive_token_mass: ADAPTIVE_TOKEN_MASS = field(
        default=DEFAULT_ADAPTIVE_TOKEN_MASS,
        metadata={"help": "scoring with memory: " + ADAPTIVE_TOKEN_MASS_HELP},
    )
    cache_lambda: Optional[float] = field(
        default=None,
        metadata={"help": "continuous cache: interpolation weight lambda of P_cache (0..1)"},
    )
    cache_theta: Optional[float] = field(
        default=None,
        metadata={"help": "continuous cache: flatness theta, P_cache ∝ Σ exp(theta h.h_j)"},
    )
    exclude_self_from_datastore: bool = field(
        default=False,
        metadata={
            "help": "evaluating the split --datastore was built from (refused otherwise: every query "
            "would retrieve its own entry, whose value is its target): leave each query's own "
            "entry out of its neighbours (K+1 are retrieved, the own one dropped)"
        },
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
    if getattr(cfg, "tokens_per_sample", 1) < 1:  # fairseq-eval-lm subtracts --context-window before the task exists
        raise TrimeUserError(
            f"--context-window must be smaller than --tokens-per-sample (the block scored is "
            f"--tokens-per-sample minus --context-window = {cfg.tokens_per_sample} tokens)")
    memory = EvalMemory.from_args(cfg)
    if cfg.consecutive_segments < 1:
        raise TrimeUserError(f"--consecutive-segments must be >= 1, got {cfg.consecutive_segments}")
    if (str(cfg.eval_combiner) == "trime" and getattr(cfg, "memory_lambda", 0.0) > 0
            and str(getattr(cfg, "memory_distribution", DEFAULT_PPRIME)) == "ext-raw" and not memory.ext):
        raise TrimeUserError("--memory-lambda with --memory-distribution ext-raw needs --eval-memory ...+ext "
                         "(or use --memory-distribution all-scaled)")
    if getattr(cfg, "knn_k", 1) < 1:
        raise TrimeUserError(f"--knn-k must be >= 1, got {cfg.knn_k}")
    check_long_top_k(cfg, memory)
    retrieval_skip(cfg, memory.ext)
    check_bm25_flags(cfg)
    check_adaptive_token_mass(getattr(cfg, "adaptive_token_mass", DEFAULT_ADAPTIVE_TOKEN_MASS))


def check_long_top_k(cfg, memory: EvalMemory) -> None:
    """``--long-memory-top-k`` needs long-term memory and Eq. 6 (never a silent no-op)."""
    top_k = int(getattr(cfg, "long_memory_top_k", 0))
    if top_k < 0:
        raise TrimeUserError(f"--long-memory-top-k must be >= 0 (0: all long-term entries), got {top_k}")
    if top_k > 0 and not memory.long:
        raise TrimeUserError("--long-memory-top-k selects long-term entries: it needs --eval-memory local+long "
                             "(or local+long+ext) and --long-memory-size")
    if top_k > 0 and str(cfg.eval_combiner) != "trime":
        raise TrimeUserError(f"--long-memory-top-k applies to --eval-combiner trime, not {cfg.eval_combiner}")


def check_lm_checkpoint(model, args) -> None:
    """A checkpoint loaded for scoring must be a decoder-only LM of this dictionary."""
    from fairseq.models import FairseqEncoderDecoderModel

    if isinstance(model, FairseqEncoderDecoderModel):
        raise TrimeUserError(f"--path: the checkpoint is a translation model (--arch {getattr(args, 'arch', '?')}), "
                             "not a language model; use fairseq-generate --task trime_translation")


def blocks_per_batch(block: int, context: int, max_tokens: int, batch_size: Optional[int]) -> int:
    """Blocks of ``block`` scored tokens plus ``context`` per batch of the in-order readers."""
    return batch_size or max(1, max_tokens // (block + context))


class StreamBatchIterator(iterators.EpochBatchIterator):
    """``--stream-batching`` batches: fairseq's iterator whose saved state (in
    ``checkpoint_last.pt``) also holds the memory of the model being trained (the
    Memorizing Transformer's kNN memory continues the stream), so a resumed run scores its
    next batch with the memory the uninterrupted run had. With several data-parallel
    workers (rank 0 saves) the memory is not restored and refills."""

    def __init__(self, model, num_workers_total: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model, self.world = model, num_workers_total

    def _memory(self):
        layer = getattr(self.model, "knn_attention", None) if self.model is not None else None
        return getattr(layer, "memory", None)

    def state_dict(self):
        state = super().state_dict()
        memory = self._memory()
        if memory is not None and self.world == 1:
            state["knn_memory"] = memory.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        memory = self._memory()
        if memory is not None and "knn_memory" in state_dict:
            device = next(self.model.parameters()).device
            memory.load_state_dict(state_dict["knn_memory"], device)
            logger.info("resumed the kNN memory of the stream (%d rows)", len(state_dict["knn_memory"].get("docs", [])))


class AtEnd:
    """An iterator that calls ``done`` once it is exhausted (how the task logs its summary at
    the end of ``fairseq-eval-lm``); everything else (``len``, ``n``...) is the wrapped one's."""

    def __init__(self, itr, done) -> None:
        self._itr, self._done = itr, done

    def __iter__(self):
        yield from self._itr
        self._done()

    def __len__(self) -> int:
        return len(self._itr)

    def __getattr__(self, name):
        if name == "_itr" or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._itr, name)


@register_task("trime_lm", dataclass=TrimeLMConfig)
class TrimeLanguageModelingTask(DatastoreKeys, LanguageModelingTask):
    """Language modelling with TRIME memories (see module docstring)."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None) -> None:
        check_memory_flags(args)
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        self.combiner = build_combiner(args)
        self._streams: Dict[str, TokenStream] = {}
        self.with_positions = False  # set when the model reads token positions
        self.retriever = None  # the --datastore's, once a model opened it
        self.eval_models = []  # the memory models built for scoring (their time split is logged)

    @classmethod
    def setup_task(cls, args, **kwargs):
        check_memory_flags(args)  # before fairseq reads the dictionary or the data
        return super().setup_task(args, **kwargs)

    def build_model(self, args, from_checkpoint: bool = False):
        model = super().build_model(args, from_checkpoint)
        if getattr(model, "needs_stream_positions", False):  # e.g. the Memorizing Transformer
            self.with_positions = True
            if not from_checkpoint:  # the model being trained: its memory is part of the stream's state
                self._stream_model = model
            for ds in self.datasets.values():
                if isinstance(ds, (DocumentSegments, StreamBlocks)):
                    ds.with_positions = True
        # only models loaded for scoring (fairseq-eval-lm & co.) are wrapped, never the
        # model being trained
        if from_checkpoint:
            check_lm_checkpoint(model, args)
        if not from_checkpoint or isinstance(self.combiner, NoMemory):
            return model
        memory = EvalMemory.from_args(self.args)
        retriever = self.build_retriever(model) if memory.ext else None
        logger.info("scoring with memory: %s over %s memory (long-term size %d%s)",
                    self.combiner.describe(), memory.describe(), memory.long_size,
                    f", {retriever.k} neighbours from {self.args.datastore}" if retriever else "")
        wrapped = MemoryEvalModel(model, self.combiner, self.source_dictionary.pad(),
                                  long_memory_size=memory.long_size, retriever=retriever,
                                  across_documents=bool(self.args.memory_across_documents),
                                  adaptive_mass=str(self.args.adaptive_token_mass))
        self.eval_models.append(wrapped)
        return wrapped

    def log_eval_summary(self) -> None:
        """Where the scoring time went (model / search / combine) and the share of datastore
        searches skipped, per memory model that scored something (end of ``fairseq-eval-lm``)."""
        for i, m in enumerate(self.eval_models):
            if sum(m.timings.values()) > 0:
                logger.info("memory scoring%s: %s", f" (model {i})" if len(self.eval_models) > 1 else "",
                            m.describe_summary())

    def build_retriever(self, model, combiners=None):
        """Open ``--datastore`` and check that it belongs to this model and dictionary (and
        suits ``combiners``, default the task's)."""
        self.retriever = build_retriever(self.args, model, self.datastore_dictionary_path(),
                                         combiners if combiners is not None else [self.combiner])
        return self.retriever

    # ---- datastore ----------------------------------------------------------------------
    def datastore_dictionary_path(self) -> str:
        return os.path.join(utils.split_paths(self.args.data)[0], "dict.txt")

    def datastore_size(self, split: str) -> int:
        """Number of keys of ``split``: one per token that has a next token."""
        return max(len(self.stream(split)) - 1, 0)

    def datastore_layout(self, split: str, max_tokens: int, batch_size: Optional[int],
                         context_window: int = 0) -> KeyLayout:
        """``fairseq-eval-lm``'s blocks of ``split`` in order, ``--context-window`` tokens of
        context each (see :class:`StreamBlocks`)."""
        blocks = StreamBlocks(self.stream(split), self.args.tokens_per_sample, context_window,
                              self.source_dictionary.pad())
        return KeyLayout(
            "block", np.minimum(blocks.starts + blocks.block, self.datastore_size(split)),
            blocks_per_batch(self.args.tokens_per_sample, context_window, max_tokens, batch_size),
            lambda units: blocks.collater([blocks[i] for i in units]), blocks.pad,
            source={"tokens_per_sample": self.args.tokens_per_sample, "context_window": context_window})

    def check_datastore_split(self, split: str) -> None:
        """Refuse to score the split the datastore was built from (each query would find
        its own entry, whose value is its target) unless ``--exclude-self-from-datastore``,
        which then drops each query's own entry (see :meth:`Retriever.search`)."""
        if self.retriever is None:
            return
        meta = self.retriever.datastore.meta
        own = meta.source.get("split") == split and meta.size == self.datastore_size(split)
        if own and not self.args.exclude_self_from_datastore:
            raise TrimeUserError(
                f"--gen-subset {split}: --datastore {self.retriever.datastore.path} was built from this split, so "
                "every token would retrieve itself; evaluate another split or pass --exclude-self-from-datastore")
        self.retriever.exclude_self = own and self.args.exclude_self_from_datastore
        if self.retriever.exclude_self:
            logger.info("%s is the datastore's split: each query's own entry is left out of its neighbours", split)

    def stream(self, split: str) -> TokenStream:
        """The split as one token stream with document ids (cached)."""
        if split not in self._streams:
            path = os.path.join(utils.split_paths(self.args.data)[0], split)
            lines = data_utils.load_indexed_dataset(path, self.dictionary, self.args.dataset_impl)
            if lines is None:
                raise TrimeUserError(f"split {split}: {path}.bin/.idx not found in {self.args.data}")
            self._streams[split] = TokenStream.from_lines(lines, self.dictionary.eos())
        return self._streams[split]

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        paths = utils.split_paths(self.args.data)
        path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        if os.path.exists(path + ".bin") and os.path.getsize(path + ".bin") == 0:  # fairseq cannot mmap it
            raise TrimeUserError(f"split {split}: {path}.bin is empty, the split has no token to score or train on")
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        m = self.args.consecutive_segments
        if self.args.bm25_batching and m > 1:
            raise TrimeUserError("--bm25-batching uses m=1 (§4.3): drop --consecutive-segments")
        if self.args.stream_batching and (m > 1 or self.args.bm25_batching):
            raise TrimeUserError("--stream-batching cannot be combined with --consecutive-segments or --bm25-batching")
        if self.args.bm25_batching and split.startswith("train"):
            ds = DocumentSegments(self.stream(split), self.args.tokens_per_sample, self.dictionary.pad(), external=True,
                                  across_documents=bool(self.args.memory_across_documents))
            ds.shuffle, ds.split = True, split
            self.datasets[split] = ds
        elif self.args.stream_batching:
            ds = DocumentSegments(self.stream(split), self.args.tokens_per_sample, self.dictionary.pad())
            ds.stream_rows, ds.shuffle = True, split.startswith("train")
            ds.with_positions = self.with_positions
            self.datasets[split] = ds
        elif m > 1:
            ds = DocumentSegments(self.stream(split), self.args.tokens_per_sample, self.dictionary.pad(), group=m,
                                  across_documents=bool(self.args.memory_across_documents))
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
        # data-parallel: batches are global (W x the per-worker batch) and each worker reads
        # its contiguous rows of every one (shard_rows), so runs of consecutive segments and
        # stream rows stay on one worker and W workers x B = 1 worker x W*B
        m = dataset.group
        bsz = max_sentences or (max_tokens or 0) // self.args.tokens_per_sample
        if dataset.stream_rows:
            if bsz < 1:
                raise TrimeUserError("--stream-batching needs --batch-size (rows read in parallel)")
            rows = dataset.stream_batches(bsz * num_shards, seed, epoch, dataset.shuffle)
            return StreamBatchIterator(
                getattr(self, "_stream_model", None), num_shards,
                dataset=dataset, collate_fn=dataset.collater, batch_sampler=shard_rows(rows, num_shards, shard_id),
                seed=seed, num_workers=num_workers, epoch=epoch, buffer_size=data_buffer_size,
                disable_shuffling=True,
            )
        if dataset.external and bm25_batches_at(self.args, epoch):
            fixed = self._rank0_first(lambda: self.bm25_batches(dataset, bsz * num_shards, seed))
            return iterators.EpochBatchIterator(
                dataset=dataset, collate_fn=dataset.collater, batch_sampler=shard_rows(fixed, num_shards, shard_id),
                seed=seed, num_workers=num_workers, epoch=epoch, buffer_size=data_buffer_size,
            )
        if bsz < m:
            raise TrimeUserError(
                f"--consecutive-segments {m} is larger than the batch ({bsz} segments of "
                f"{self.args.tokens_per_sample} tokens); raise --batch-size or --max-tokens"
            )
        if bsz % m:
            raise TrimeUserError(f"the batch ({bsz} segments) must be a multiple of --consecutive-segments {m}")
        shuffle = getattr(dataset, "shuffle", False)

        def batches(ds, ep):
            return shard_rows(ds.batches(bsz * num_shards // m, seed=seed, epoch=ep, shuffle=shuffle),
                              num_shards, shard_id, m)

        return iterators.EpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=batches, seed=seed,
            num_workers=num_workers, epoch=epoch, buffer_size=data_buffer_size, disable_shuffling=not shuffle,
        )

    @staticmethod
    def _rank0_first(compute):
        """Run ``compute`` on rank 0 first (it fills an on-disk cache), then on the others."""
        from trime_fairseq.memory.distributed import world

        rank, size = world()
        if size > 1 and rank > 0:
            torch.distributed.barrier()
        out = compute()
        if size > 1 and rank == 0:
            torch.distributed.barrier()
        return out

    def bm25_batches(self, dataset: DocumentSegments, batch_size: int, seed: int):
        """BM25 batches of the training segments, computed once and cached on disk."""
        segments = [dataset[i]["source"].numpy() for i in range(len(dataset))]
        return cached_bm25_batches(self.args, segments, batch_size, seed, utils.split_paths(self.args.data)[0],
                                   bm25_segments_name(dataset.split, self.args.tokens_per_sample,
                                                      dataset.across_documents), docs=dataset.seg_docs)

    def eval_lm_dataloader(self, dataset, max_tokens: Optional[int] = 36000, batch_size=None,
                           max_positions=None, num_shards: int = 1, shard_id: int = 0,
                           num_workers: int = 1, data_buffer_size: int = 10, context_window: int = 0):
        """Blocks in reading order with their context window (see :class:`StreamBlocks`)."""
        split = next((k for k, v in self.datasets.items() if v is dataset), None)
        if split is None:
            raise TrimeUserError("eval_lm_dataloader: the dataset was not loaded by this task")
        EvalMemory.from_args(self.args).check_processes(num_shards)
        if len(self.stream(split)) < 2:
            raise TrimeUserError(f"--gen-subset {split}: the split has no token to score (is {split}.bin empty?)")
        self.check_datastore_split(split)
        blocks = StreamBlocks(self.stream(split), self.args.tokens_per_sample, context_window, self.dictionary.pad())
        blocks.with_positions = self.with_positions
        itr = self.get_batch_iterator(
            dataset=blocks, max_tokens=max_tokens, max_sentences=batch_size,
            max_positions=max_positions, ignore_invalid_inputs=True, num_shards=num_shards,
            shard_id=shard_id, num_workers=num_workers, data_buffer_size=data_buffer_size,
        ).next_epoch_itr(shuffle=False)
        return AtEnd(itr, self.log_eval_summary)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        # fairseq's placeholder batch on a worker without data stays out of the memory that
        # other workers gather
        sample = mark_placeholder(sample, ignore_grad)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
