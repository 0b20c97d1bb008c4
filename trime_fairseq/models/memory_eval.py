"""Memory at test time inside ``fairseq-eval-lm``.

``fairseq-eval-lm`` scores with fairseq's ``SequenceScorer``, which calls
``model(**net_input)`` and ``model.get_normalized_probs(net_output, sample=sample)``. The
``trime_lm`` task wraps the loaded model in :class:`MemoryEvalModel`, whose
``get_normalized_probs`` returns the memory-augmented distribution of its combiner.

Local memory (``--eval-memory local``): for a query at position ``t`` of a row, every
earlier position ``j < t`` of the row, *including the ``--context-window`` tokens*, labelled
with its next token (for context tokens, the next input token: their targets are padding).
"""
from __future__ import annotations

from typing import Optional

import torch
from fairseq.models import BaseFairseqModel
from torch import Tensor

from trime_fairseq.memory.combiners import Combiner, ScoringInputs
from trime_fairseq.models.capture import get_capture
from trime_fairseq.models.output_layer import at_least_float32, full_token_scores


def memory_labels(src_tokens: Tensor, target: Tensor, pad: int) -> Tensor:
    """The next token of every input position: the target where there is one, else the
    next input token (context-window positions), else padding."""
    nxt = torch.full_like(src_tokens, pad)
    nxt[:, :-1] = src_tokens[:, 1:]
    return torch.where(target.ne(pad), target, nxt)


def local_mask(labels: Tensor, pad: int) -> Tensor:
    """``[B, T, T]``: query ``t`` sees keys ``j < t`` that have a label."""
    t = labels.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=labels.device).tril(-1)
    return causal.unsqueeze(0) & labels.ne(pad).unsqueeze(1)


def scoring_inputs(model, net_output, sample, pad: int) -> ScoringInputs:
    """Assemble :class:`ScoringInputs` for local memory from a forward of a wrapped model."""
    extra = net_output[1]
    target = sample["target"]
    if net_output[0].shape[:2] != target.shape:
        raise ValueError(
            "--softmax-batch splits the batch, which memory scoring cannot follow; "
            "leave --softmax-batch at its default or lower --max-tokens instead"
        )
    tok_scores, tok_lse = full_token_scores(model, net_output, sample)
    labels = memory_labels(sample["net_input"]["src_tokens"], target, pad)
    g, f = at_least_float32(extra["trime_g"]), at_least_float32(extra["trime_f"])
    return ScoringInputs(
        tok_scores=tok_scores,
        tok_lse=tok_lse,
        target=target,
        query_g=g,
        query_f=f,
        keys_g=g,
        keys_f=f,
        key_labels=labels,
        mask=local_mask(labels, pad),
    )


class MemoryEvalModel(BaseFairseqModel):
    """Wraps a trained fairseq LM; scores with a memory :class:`Combiner`.

    Parameters and checkpoints are the inner model's: loading, ``state_dict`` and
    ``max_positions`` are delegated, so any checkpoint of a ``transformer_lm`` loads.
    """

    def __init__(self, model: BaseFairseqModel, combiner: Combiner, pad: int) -> None:
        super().__init__()
        self.inner = model
        self.combiner = combiner
        self.pad = pad
        self.capture = get_capture(model)

    @property
    def decoder(self):
        return self.inner.decoder

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, **kwargs):
        out = self.inner(src_tokens, src_lengths=src_lengths, **kwargs)
        extra = out[1] if len(out) > 1 and isinstance(out[1], dict) else {}
        extra["trime_g"] = self.capture.take()
        extra["trime_f"] = self.capture.take_f(out)
        return (out[0], extra) + tuple(out[2:])

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        if sample is None or sample.get("target") is None:
            raise ValueError("memory scoring needs the sample's targets (fairseq-eval-lm)")
        inputs = scoring_inputs(self.inner, net_output, sample, self.pad)
        # one row at a time bounds the [T, V] temporaries of the combiner
        lprobs = torch.cat(
            [self.combiner.log_probs(inputs.rows(i, i + 1)) for i in range(inputs.target.size(0))]
        )
        return lprobs if log_probs else lprobs.exp()

    def get_targets(self, sample, net_output):
        return self.inner.get_targets(sample, net_output)

    def max_positions(self):
        return self.inner.max_positions()

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.inner.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)
