"""Token terms of Eq. 5/6 from a fairseq decoder's output layer, full or adaptive softmax.

Full softmax: the token score of ``w`` is the logit ``E_w · f(c)`` and ``tok_lse`` is the
log-partition of the logits. Adaptive softmax (Baevski & Auli) has no single softmax; its
normalised log-probability is the token score and ``tok_lse = 0``. For training we only
ever compute the target's term, so the adaptive path never builds vocabulary-sized
tensors: the head softmax plus, for tail targets, their own cluster's softmax.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trime_fairseq.memory.joint import at_least_float32  # noqa: F401  (re-exported)


def adaptive_softmax_of(model: nn.Module):
    return getattr(getattr(model, "decoder", None), "adaptive_softmax", None)


def adaptive_target_log_prob(asm: nn.Module, features: Tensor, target: Tensor) -> Tensor:
    """``log p_AS(target)`` of a fairseq ``AdaptiveSoftmax`` without full-vocabulary logits.

    Args:
        asm: ``fairseq.modules.AdaptiveSoftmax``.
        features: ``[..., d]``; target: ``[...]``.
    """
    shape = target.shape
    x = asm.dropout_module(features.reshape(-1, features.size(-1)))
    tgt = target.reshape(-1)
    head_lp = F.log_softmax(at_least_float32(asm.head(x)), dim=-1)
    cutoff = asm.cutoff
    head_idx = tgt.clone()
    tail_masks = []
    for i in range(len(cutoff) - 1):
        in_tail = (tgt >= cutoff[i]) & (tgt < cutoff[i + 1])
        head_idx[in_tail] = cutoff[0] + i
        tail_masks.append(in_tail)
    out = head_lp.gather(1, head_idx.unsqueeze(1)).squeeze(1)
    for i, in_tail in enumerate(tail_masks):
        idx = in_tail.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        tail_lp = F.log_softmax(at_least_float32(asm.tail[i](x.index_select(0, idx))), dim=-1)
        within = (tgt.index_select(0, idx) - cutoff[i]).unsqueeze(1)
        out = out.index_add(0, idx, tail_lp.gather(1, within).squeeze(1))
    return out.view(shape)


class _LogitTerms(torch.autograd.Function):
    """``(logit[target], logsumexp(logits))`` with a backward as cheap as cross entropy's.

    ``torch.logsumexp`` plus ``gather`` costs ~1.6x fairseq's fused log-softmax + NLL on
    CPU; this keeps only the log-softmax output (as CE does) and builds the gradient
    ``g_lse * softmax + scatter(g_target)`` in one pass.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor):
        lprobs = F.log_softmax(logits, dim=-1)
        idx = target.unsqueeze(-1)
        tok_target = logits.gather(-1, idx).squeeze(-1)
        tok_lse = tok_target - lprobs.gather(-1, idx).squeeze(-1)
        ctx.save_for_backward(lprobs, idx)
        return tok_target, tok_lse

    @staticmethod
    def backward(ctx, g_target: Tensor, g_lse: Tensor):
        lprobs, idx = ctx.saved_tensors
        grad = torch.exp(lprobs).mul_(g_lse.unsqueeze(-1))
        grad.scatter_add_(-1, idx, g_target.unsqueeze(-1))
        return grad, None


def target_token_terms(model: nn.Module, net_output, target: Tensor) -> Tuple[Tensor, Tensor]:
    """``(tok_target, tok_lse)`` ``[B, T]`` each, for training (float32)."""
    asm = adaptive_softmax_of(model)
    if asm is not None:
        tok_target = adaptive_target_log_prob(asm, net_output[0], target)
        return tok_target, torch.zeros_like(tok_target)
    return _LogitTerms.apply(at_least_float32(net_output[0]), target)


def full_token_scores(model: nn.Module, net_output, sample) -> Tuple[Tensor, Tensor, Tensor]:
    """``(tok_scores [B, T, V], tok_lse [B, T], log-probabilities [B, T, V])`` for scoring.

    With an adaptive softmax, fairseq's log-probabilities are exact at ``sample['target']``
    (the only entries ``fairseq-eval-lm`` reads) and ``tok_lse`` is 0. With a full softmax
    the log-partition comes from the fused log-softmax (cheaper than ``logsumexp``).
    """
    if adaptive_softmax_of(model) is not None:
        lprobs = at_least_float32(model.get_normalized_probs(net_output, log_probs=True, sample=sample))
        return lprobs, lprobs.new_zeros(lprobs.shape[:-1]), lprobs
    logits = at_least_float32(net_output[0])
    lprobs = F.log_softmax(logits, dim=-1)
    return logits, logits[..., 0] - lprobs[..., 0], lprobs
