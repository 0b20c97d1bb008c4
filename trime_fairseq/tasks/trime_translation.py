"""``--task trime_translation``: fairseq's translation task plus memories (Appendix B, §5.4).

Training (``fairseq-train --criterion trime_loss``): TRIME-MT. A target token's training
memory is every target token of the *other* sentences of the batch (its key the decoder's
``g``, its label the token itself); the sentence's own earlier tokens are not memory
(as in the paper; ``--mt-local-memory`` adds them). With ``--bm25-batching`` a batch holds
BM25-similar target sentences (computed once per corpus, cached). Other criteria (e.g.
``label_smoothed_cross_entropy``) ignore the memory.

Decoding (``fairseq-generate``): ``--eval-combiner`` picks how the ``--datastore`` of
(decoder ``g``, target token) pairs is used:

* ``knn``: kNN-MT (Khandelwal et al., 2021), ``(1-λ) P_MT + λ P_kNN``, ``P_kNN ∝ exp(s/T)``
  over the ``--knn-k`` neighbours (``--knn-lambda``, ``--knn-temperature``; ``s = -‖q-k‖²``
  for an L2 index).
* ``adaptive``: adaptive kNN-MT (Zheng et al., 2021) with a Meta-k network from
  ``trime-train-metak`` (``--metak-path``).
* ``trime``: Eq. 6, the vocabulary and the retrieved neighbours in one softmax
  (``--eval-temperature``; no hand-set λ). Use an inner-product index.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.data import iterators
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from trime_fairseq.memory.in_batch import MemorySpec, mark_placeholder
from trime_fairseq.memory.combiners import NoMemory
from trime_fairseq.tasks.datastore_keys import DatastoreKeys, KeyLayout
from trime_fairseq.tasks.memory_flags import (
    BM25BatchingConfig, RetrievalConfig, bm25_batches_at, build_combiner, build_retriever, cached_bm25_batches,
    check_bm25_flags, retrieval_skip)
from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)

MT_COMBINERS = ChoiceEnum(["none", "knn", "adaptive", "trime"])
BM25_GROUPINGS = ChoiceEnum(["whole", "length"])


@dataclass
class TrimeTranslationConfig(TranslationConfig, RetrievalConfig, BM25BatchingConfig):
    eval_combiner: MT_COMBINERS = field(
        default="none",
        metadata={"help": "how fairseq-generate uses --datastore: none (the MT model), knn "
                          "(kNN-MT, needs --knn-lambda), adaptive (adaptive kNN-MT, needs "
                          "--metak-path) or trime (Eq. 6 over the retrieved neighbours, "
                          "temperature --eval-temperature)"},
    )
    mt_combiner: Optional[MT_COMBINERS] = field(
        default=None,
        metadata={"help": "old name of --eval-combiner (kept for one release)"},
    )
    knn_k: int = field(default=16, metadata={"help": "neighbours retrieved from the datastore per decoding step"})
    knn_temperature: float = field(
        default=10.0, metadata={"help": "kNN-MT / adaptive kNN-MT: P_kNN ∝ exp(similarity / T)"}
    )
    metak_path: Optional[str] = field(
        default=None, metadata={"help": "adaptive kNN-MT: Meta-k network saved by trime-train-metak"}
    )
    bm25_grouping: BM25_GROUPINGS = field(
        default="length",
        metadata={"help": "--bm25-batching: whole = a BM25 group of about one batch (--max-tokens) "
                          "is one batch, its sentences in the order the group was grown (the "
                          "reference TRIME-MT), cut into consecutive runs only where padding would "
                          "exceed --max-tokens; length = groups of about two batches, each re-split "
                          "into length-sorted parts (less padding, but similar targets can land in "
                          "different batches; docs/results/translation_ablation.md compares them)"},
    )
    bm25_max_tokens: int = field(
        default=0,
        metadata={"help": "--bm25-batching: --max-tokens of the BM25 batches (0: --max-tokens). BM25 "
                          "groups pad more than length-sorted batches, so as many target tokens per "
                          "update as the ordinary batches take a larger value"},
    )
    mt_local_memory: bool = field(
        default=False,
        metadata={"help": "TRIME-MT training: also use the earlier target tokens of the same "
                          "sentence as memory (the paper uses only the other sentences)"},
    )


def combiner_flag(cfg) -> Tuple[str, str]:
    """``(combiner kind, flag the user typed)`` of ``fairseq-generate``: ``--eval-combiner``, or its
    old name ``--mt-combiner``; checks the datastore flags it needs. The combiner itself comes
    from the registry both tasks use (:func:`~trime_fairseq.tasks.memory_flags.build_combiner`)."""
    flag, name = ("--mt-combiner", str(cfg.mt_combiner)) if cfg.mt_combiner is not None else \
        ("--eval-combiner", str(cfg.eval_combiner))
    if name != "none" and not cfg.datastore:
        raise TrimeUserError(f"{flag} {name} needs --datastore (built with trime-build-datastore)")
    if cfg.knn_k < 1:
        raise TrimeUserError(f"--knn-k must be >= 1, got {cfg.knn_k}")
    retrieval_skip(cfg, name != "none")
    return name, flag


class SummaryAtEnd:
    """An epoch iterator whose epoch iterator calls ``done`` once exhausted (how the task
    logs its summary at the end of ``fairseq-generate``); the rest is the wrapped one's."""

    def __init__(self, epoch_itr, done) -> None:
        self._epoch_itr, self._done = epoch_itr, done

    def next_epoch_itr(self, *args, **kwargs):
        from trime_fairseq.tasks.trime_lm import AtEnd

        return AtEnd(self._epoch_itr.next_epoch_itr(*args, **kwargs), self._done)

    def __len__(self) -> int:
        return len(self._epoch_itr)

    def __getattr__(self, name):
        if name == "_epoch_itr" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._epoch_itr, name)


@register_task("trime_translation", dataclass=TrimeTranslationConfig)
class TrimeTranslationTask(DatastoreKeys, TranslationTask):
    """Translation with TRIME-MT training memory and datastore decoding (module docstring)."""

    def __init__(self, cfg: TrimeTranslationConfig, src_dict, tgt_dict) -> None:
        super().__init__(cfg, src_dict, tgt_dict)
        check_bm25_flags(cfg)
        self.combiner = build_combiner(cfg, *combiner_flag(cfg))
        self.retriever = None  # the --datastore's, once a model opened it
        self.eval_models = []  # the memory models built for decoding (their time split is logged)

    # ---- models -------------------------------------------------------------------------
    def build_model(self, cfg, from_checkpoint: bool = False):
        model = super().build_model(cfg, from_checkpoint)
        if from_checkpoint:
            from fairseq.models import FairseqEncoderDecoderModel

            if not isinstance(model, FairseqEncoderDecoderModel):
                raise TrimeUserError(f"--path: the checkpoint is not a translation model (--arch "
                                     f"{getattr(cfg, 'arch', getattr(cfg, '_name', '?'))}); use a model trained "
                                     "with --task trime_translation")
        if not from_checkpoint or isinstance(self.combiner, NoMemory):
            return model
        from trime_fairseq.models.memory_generate import MemoryGenerationModel

        retriever = self.build_retriever(model)
        logger.info("decoding with %s, %d neighbours from %s%s", self.combiner.describe(), retriever.k,
                    self.cfg.datastore, f" ({retriever.skip.describe()})" if retriever.skip else "")
        wrapped = MemoryGenerationModel(model, self.combiner, retriever)
        self.eval_models.append(wrapped)
        return wrapped

    def log_eval_summary(self) -> None:
        """At the end of ``fairseq-generate``: search / combine time and the share of datastore
        searches skipped, per memory model that decoded something."""
        for i, m in enumerate(self.eval_models):
            if sum(m.timings.values()) > 0:
                logger.info("decoding with memory%s: %s", f" (model {i})" if len(self.eval_models) > 1 else "",
                            m.describe_summary())

    def target_dictionary_path(self) -> str:
        return os.path.join(utils.split_paths(self.cfg.data)[0], f"dict.{self.cfg.target_lang}.txt")

    def build_retriever(self, model, combiners=None):
        self.retriever = build_retriever(self.cfg, model, self.target_dictionary_path(),
                                         combiners if combiners is not None else [self.combiner])
        for split in list(self.datasets):  # fairseq-generate loads --gen-subset before the model
            self.check_datastore_split(split)
        return self.retriever

    def check_datastore_split(self, split: str) -> None:
        """Refuse to decode / score the split the datastore was built from: its own target
        sentence would be in memory."""
        if self.retriever is None or split not in self.datasets:
            return
        meta = self.retriever.datastore.meta
        if meta.source.get("split") == split and meta.size == self.datastore_size(split):
            raise TrimeUserError(
                f"--gen-subset {split}: --datastore {self.retriever.datastore.path} was built from this split, so "
                "each sentence's own reference is in memory; use a datastore of another split or another --gen-subset")

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        self.check_datastore_split(split)

    # ---- training memory ----------------------------------------------------------------
    def memory_spec(self, sample) -> dict:
        """``sample["trime_memory"]`` for trime_loss: one group = the whole batch, memory =
        the other sentences (plus the sentence's own prefix with ``--mt-local-memory``)."""
        bsz = sample["target"].size(0)
        keep = torch.full((bsz,), bool(self.cfg.mt_local_memory), dtype=torch.bool)
        return MemorySpec.external(keep).to_sample()

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        sample["trime_memory"] = self.memory_spec(sample)
        # fairseq's placeholder batch on a worker without data stays out of the memory that
        # other workers gather
        sample = mark_placeholder(sample, ignore_grad)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        sample["trime_memory"] = self.memory_spec(sample)
        return super().valid_step(sample, model, criterion)

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, **kwargs):
        train = self.datasets.get(self.cfg.train_subset)
        if self.eval_models and dataset is not train:  # fairseq-generate with a datastore
            itr = super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
                ignore_invalid_inputs=ignore_invalid_inputs,
                required_batch_size_multiple=required_batch_size_multiple, seed=seed, num_shards=num_shards,
                shard_id=shard_id, num_workers=num_workers, epoch=epoch, data_buffer_size=data_buffer_size,
                disable_iterator_cache=disable_iterator_cache, **kwargs)
            return SummaryAtEnd(itr, self.log_eval_summary)
        if not (dataset is train and bm25_batches_at(self.cfg, epoch)):
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
                ignore_invalid_inputs=ignore_invalid_inputs,
                required_batch_size_multiple=required_batch_size_multiple, seed=seed, num_shards=num_shards,
                shard_id=shard_id, num_workers=num_workers, epoch=epoch, data_buffer_size=data_buffer_size,
                disable_iterator_cache=disable_iterator_cache, **kwargs)
        sizes = np.maximum(dataset.src_sizes, dataset.tgt_sizes)
        max_tokens = self.cfg.bm25_max_tokens or max_tokens
        whole = str(self.cfg.bm25_grouping) == "whole"
        # whole: a group is about one batch; length: about two batches' worth, cut into
        # length-sorted parts of at most --max-tokens (about as full as fairseq's batches)
        per_batch = 1 if whole else 2
        bsz = max_sentences or max(2, int(per_batch * (max_tokens or 4096) // max(float(sizes.mean()), 1.0)))
        targets = [dataset.tgt[i].numpy() for i in range(len(dataset))]
        batches = cached_bm25_batches(self.cfg, targets, bsz, seed, utils.split_paths(self.cfg.data)[0],
                                      f"{self.cfg.train_subset}_{self.cfg.source_lang}-{self.cfg.target_lang}")
        if max_tokens:  # BM25 groups can hold long sentences: split groups that overflow
            split = _split_in_order if whole else _split_by_tokens
            batches = [part for b in batches for part in split(b, sizes, max_tokens)]
        return iterators.EpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=batches, seed=seed,
            num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size,
        )

    # ---- datastore ----------------------------------------------------------------------
    def datastore_size(self, split: str) -> int:
        """Number of keys of ``split``: one per target token (EOS included)."""
        return int(np.asarray(self.dataset(split).tgt_sizes).sum())

    def datastore_dictionary_path(self) -> str:
        return self.target_dictionary_path()

    def datastore_layout(self, split: str, max_tokens: int, batch_size: Optional[int],
                         context_window: int = 0) -> KeyLayout:
        """Teacher-forced target sentences of ``split`` in index order (no context window)."""
        if split not in self.datasets:
            self.load_dataset(split)
        ds = self.dataset(split)
        per = max(int(np.max(np.maximum(ds.src_sizes, ds.tgt_sizes))) if len(ds) else 1, 1)
        return KeyLayout("sentence", np.cumsum(np.asarray(ds.tgt_sizes, dtype=np.int64)),
                         batch_size or max(1, max_tokens // per),
                         lambda units: ds.collater([ds[i] for i in units]), self.tgt_dict.pad(), reorder=True)


def _split_in_order(batch: np.ndarray, sizes: np.ndarray, max_tokens: int):
    """Cut a batch, in its own order, into consecutive runs whose padded size (rows x
    longest) fits ``max_tokens`` (``--bm25-grouping whole``: neighbours stay together)."""
    part, longest = [], 0
    for i in batch:
        n = int(sizes[i])
        if part and max(longest, n) * (len(part) + 1) > max_tokens:
            yield np.array(part, dtype=np.int64)
            part, longest = [], 0
        part.append(int(i))
        longest = max(longest, n)
    if part:
        yield np.array(part, dtype=np.int64)


def _split_by_tokens(batch: np.ndarray, sizes: np.ndarray, max_tokens: int):
    """Cut a batch into parts whose padded size (rows x longest) fits ``max_tokens``; the
    members are taken shortest first, so parts waste as little padding as fairseq's own
    length-sorted batches (``--bm25-grouping length``)."""
    return _split_in_order(batch[np.argsort(sizes[batch], kind="stable")], sizes, max_tokens)
