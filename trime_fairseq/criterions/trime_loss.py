"""``--criterion trime_loss``: the TRIME training objective (Eq. 5) for language models.

Thin glue: it runs the model once, reads ``g`` with a hook, takes the token terms from the
output layer (full or adaptive softmax) and hands everything to
:func:`trime_fairseq.memory.in_batch.in_batch_log_prob`. The in-batch memory layout comes
from the batch (``sample["trime_memory"]``, set by the ``trime_lm`` task); batches without
it (e.g. fairseq's stock ``language_modeling`` task) use local memory.

Data-parallel training (``--distributed-world-size W``): local and long-term memories
live inside one worker's rows (the task keeps every run of consecutive segments on one
worker); the external (BM25) memory is the step's global batch, gathered from all workers
with gradients flowing back (``--memory-across-workers``), so ``W`` workers × ``B``
segments give the loss and gradients of 1 worker × ``W·B``.
"""

import math
from dataclasses import dataclass, field, replace

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from trime_fairseq.memory.in_batch import (
    MemorySpec, external_memory_across_workers, group_batch, in_batch_log_prob, segment_uniform)
from trime_fairseq.models.capture import get_capture
from trime_fairseq.models.output_layer import (
    ADAPTIVE_TOKEN_MASS_HELP, ADAPTIVE_TOKEN_MASSES, DEFAULT_ADAPTIVE_TOKEN_MASS, at_least_float32,
    target_token_terms, token_score_sum)
from trime_fairseq.errors import TrimeUserError

ON_OFF = ChoiceEnum(["on", "off"])
ADAPTIVE_TOKEN_MASS = ChoiceEnum(list(ADAPTIVE_TOKEN_MASSES))


@dataclass
class TrimeLossConfig(FairseqDataclass):
    ce_warmup_updates: int = field(
        default=0,
        metadata={
            "help": "train with plain cross entropy (Eq. 1) for this many updates before "
            "switching to the TRIME loss (the paper uses ~5%% of all updates)"
        },
    )
    train_temperature: float = field(
        default=1.0,
        metadata={"help": "divide the memory similarity q.k/sqrt(d) by this during training "
                          "(the reference TRIME-MT recipe uses 10)"},
    )
    memory_top_k: int = field(
        default=0,
        metadata={"help": "keep only each token's k highest in-batch memory scores in Eq. 5 "
                          "(0: all; the reference TRIME-MT recipe uses 8)"},
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "label smoothing of the token term: the loss is (1-eps-eps_i) * "
                          "(-log P(target)) + eps_i * sum_w -log P(vocabulary entry w) with "
                          "eps_i = eps/(V-1) and P the joint softmax of Eq. 5 (memory entries get "
                          "no smoothing mass); without memory it is fairseq's "
                          "label_smoothed_cross_entropy. Needs a full softmax"},
    )
    model_alone_weight: float = field(
        default=0.0,
        metadata={"help": "add this multiple of the model-alone cross entropy (Eq. 1: the token "
                          "softmax without memory) to the TRIME loss. With a large in-batch memory "
                          "(BM25 batching) memory entries explain the frequent targets, Eq. 5 then "
                          "pushes their token scores down and the model alone stops being a language "
                          "model; a weight of ~1 keeps it one. 0: the paper's loss"},
    )
    adaptive_token_mass: ADAPTIVE_TOKEN_MASS = field(
        default=DEFAULT_ADAPTIVE_TOKEN_MASS, metadata={"help": ADAPTIVE_TOKEN_MASS_HELP},
    )
    similarity_chunk_size: int = field(
        default=512,
        metadata={
            "help": "query rows per chunk of the in-batch similarity matrix: forward and "
            "backward hold one chunk of similarities at a time, and causal memories skip the "
            "keys after each chunk"
        },
    )
    checkpoint_similarity_above: int = field(
        default=0,
        metadata={
            "help": "the forward keeps the in-batch similarities of its first chunks, up to this "
            "many entries (one float each), for the backward, which recomputes the other chunks "
            "one at a time. Default 0: recompute all (memory: one chunk; on CPU keeping half of "
            "a 16 x 512 BM25 batch was as fast within noise, keeping all ~5%% faster at 1.26x "
            "CE's peak memory: docs/results/train_speed_external.md)"
        },
    )
    drop_local_prob: float = field(
        default=0.0,
        metadata={
            "help": "with external (BM25) batching, drop a segment's local memory with this "
            "probability, one draw per segment per step (p of §4.3; the paper uses 0.9)"
        },
    )
    memory_across_workers: ON_OFF = field(
        default="on",
        metadata={
            "help": "with several data-parallel workers and external (BM25) batching, the "
            "in-batch memory is every segment of the step's global batch, gathered from all "
            "workers with gradients flowing back (on), or only the worker's own segments "
            "(off). Local and long-term memories never cross workers"
        },
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("trime_loss", dataclass=TrimeLossConfig)
class TrimeLoss(FairseqCriterion):
    """Eq. 5 with in-batch memories; logs the TRIME loss and the plain CE side by side."""

    def __init__(self, cfg: TrimeLossConfig, task) -> None:
        super().__init__(task)
        if cfg.ce_warmup_updates < 0:
            raise TrimeUserError(f"--ce-warmup-updates must be >= 0, got {cfg.ce_warmup_updates}")
        if cfg.train_temperature <= 0:
            raise TrimeUserError(f"--train-temperature must be > 0, got {cfg.train_temperature}")
        if cfg.similarity_chunk_size < 1:
            raise TrimeUserError(
                f"--similarity-chunk-size must be >= 1, got {cfg.similarity_chunk_size}"
            )
        if cfg.memory_top_k < 0:
            raise ValueError(f"--memory-top-k must be >= 0 (0: all), got {cfg.memory_top_k}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
        if cfg.model_alone_weight < 0:
            raise TrimeUserError(f"--model-alone-weight must be >= 0, got {cfg.model_alone_weight}")
        if not 0.0 <= cfg.drop_local_prob <= 1.0:
            raise TrimeUserError(f"--drop-local-prob must be in [0, 1], got {cfg.drop_local_prob}")
        self.cfg = cfg
        self.num_updates = 0

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates

    def drop_key(self) -> int:
        """The key of this update's ``--drop-local-prob`` draws: drawn from the random state
        at the update's first forward (fairseq seeds it alike on every worker, before any
        dropout), shared by its micro-batches."""
        if getattr(self, "_drop_key_update", None) != self.num_updates:
            self._drop_key = int(torch.randint(0, 1 << 62, (1,)).item())
            self._drop_key_update = self.num_updates
        return self._drop_key

    def uses_memory(self, training: bool) -> bool:
        """Plain CE during warm-up; validation always reports the TRIME loss."""
        return not training or self.num_updates >= self.cfg.ce_warmup_updates

    def forward(self, model, sample, reduce: bool = True):
        capture = get_capture(model)
        if self.set_num_updates not in capture.on_num_updates:
            capture.on_num_updates.append(self.set_num_updates)
        with_memory = self.uses_memory(model.training)
        spec = MemorySpec.from_sample(sample.get("trime_memory") if with_memory else None)
        external = spec.mode == "external" and model.training
        drop_key = None
        if external and self.cfg.drop_local_prob > 0:
            drop_key = self.drop_key()
        net_output = model(**sample["net_input"])
        g = capture.take()
        target = model.get_targets(sample, net_output)
        tok_target, tok_lse = target_token_terms(model, net_output, target, str(self.cfg.adaptive_token_mass))
        nonpad = target.ne(self.padding_idx)
        ce_lprob = tok_target - tok_lse
        log_partition = tok_lse

        if with_memory:
            if drop_key is not None:  # one draw per segment, wherever it sits
                draw = (segment_uniform(sample["id"], drop_key) if "id" in sample
                        else torch.rand(target.size(0), dtype=torch.float64))
                spec = replace(spec, keep_local=draw.to(target.device) >= self.cfg.drop_local_prob)
            (tt, tl, reps, tgt), memory = group_batch(
                (tok_target, tok_lse, at_least_float32(g), target), spec, target
            )
            if external and self.cfg.memory_across_workers == "on":
                memory = external_memory_across_workers(memory, reps, tgt, share=not spec.placeholder)
            lprob, log_partition = in_batch_log_prob(
                tt, tl, reps, tgt, memory, self.padding_idx,
                temperature=self.cfg.train_temperature,
                chunk_size=self.cfg.similarity_chunk_size,
                checkpoint_above=self.cfg.checkpoint_similarity_above,
                top_k=self.cfg.memory_top_k,
                with_log_partition=True,
            )
            lprob, log_partition = lprob.view_as(target), log_partition.view_as(target)
        else:
            lprob = ce_lprob

        nll_loss = -(lprob * nonpad).sum()
        loss = nll_loss
        if self.cfg.label_smoothing > 0:
            loss = self.smoothed_loss(lprob, log_partition, token_score_sum(model, net_output), nonpad,
                                      net_output[0].size(-1))
        ce_loss = -(ce_lprob * nonpad).sum()
        if with_memory and self.cfg.model_alone_weight > 0:
            loss = loss + self.cfg.model_alone_weight * ce_loss
        ntokens = sample["ntokens"]
        sample_size = sample["target"].size(0) if self.cfg.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ce_loss": ce_loss.data,
            "ntokens": ntokens,
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            "ce_warmup": 0 if with_memory else 1,
        }
        return loss, sample_size, logging_output

    def smoothed_loss(self, lprob, log_partition, score_sum, nonpad, vocab_size: int):
        """Label smoothing over the vocabulary entries of the joint softmax (see
        ``--label-smoothing``): ``log P(entry w) = s_w - log Z`` with ``Z`` Eq. 5's
        denominator, so ``Σ_w -log P(entry w) = V log Z - Σ_w s_w``."""
        eps = self.cfg.label_smoothing
        eps_i = eps / (vocab_size - 1)
        smooth = vocab_size * log_partition - score_sum
        return ((1.0 - eps - eps_i) * -lprob + eps_i * smooth).mul(nonpad).sum()

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key: str) -> float:
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("sample_size")
        ntokens = total("ntokens")
        metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
        # the TRIME NLL without label smoothing (equal to loss when --label-smoothing is 0)
        nll = total("nll_loss") if any("nll_loss" in log for log in logging_outputs) else total("loss")
        metrics.log_scalar("nll_loss", nll / ntokens / math.log(2), ntokens, round=3)
        metrics.log_scalar("ce_loss", total("ce_loss") / ntokens / math.log(2), ntokens, round=3)
        metrics.log_scalar("ce_warmup", total("ce_warmup") / max(len(logging_outputs), 1), round=2)
        metrics.log_derived("ppl", lambda m: utils.get_perplexity(m["nll_loss"].avg))
        metrics.log_derived("ce_ppl", lambda m: utils.get_perplexity(m["ce_loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False
