"""Token terms of Eq. 5/6 from a fairseq decoder's output layer, full or adaptive softmax.

Full softmax: the token score of ``w`` is the logit ``E_w · f(c)`` and ``tok_lse`` is the
log-partition of the logits.

Adaptive softmax (Baevski & Auli) has no single softmax. Eq. 5 reads the token term as
``exp(E_w · f)``; for a head word that is ``exp(head logit) = Z_head · p_AS(w)``
(``Z_head``: the sum of the exponentiated head logits, cluster entries included), and
extending it to a tail word ``w`` of cluster ``c`` gives ``exp(cluster logit c) ·
p_tail(w | c) = Z_head · p_AS(w)``. Those masses sum to ``Z_head`` over the vocabulary, so
with ``--adaptive-token-mass head`` (the default) the token score is
``log p_AS(w) + log Z_head`` and ``tok_lse = log Z_head``: memory competes with the head's
unnormalised mass, exactly as with a full softmax. ``normalised`` (the earlier behaviour,
kept for the ablation) uses ``log p_AS(w)`` and ``tok_lse = 0``: memory competes with 1.
Both give the same token distribution without memory.

For training we only ever compute the target's term, so the adaptive path never builds
vocabulary-sized tensors: the head softmax plus, for tail targets, their own cluster's
softmax.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trime_fairseq.memory.joint import at_least_float32  # noqa: F401  (re-exported)

#: ``--adaptive-token-mass`` choices (module docstring); the first is the default.
ADAPTIVE_TOKEN_MASSES: Tuple[str, ...] = ("head", "normalised")
DEFAULT_ADAPTIVE_TOKEN_MASS = ADAPTIVE_TOKEN_MASSES[0]
ADAPTIVE_TOKEN_MASS_HELP = (
    "adaptive softmax only: the token term of Eq. 5/6. head = Z_head * p_AS(w) (exp of the "
    "head logit for head words; cluster logit x within-cluster probability for tail words), "
    "so memory competes with the head's unnormalised mass as with a full softmax (exact "
    "Eq. 5); normalised = p_AS(w), memory competes with 1 (the earlier behaviour, for ablations)"
)


def check_adaptive_token_mass(value: str, flag: str = "--adaptive-token-mass") -> str:
    """``value`` as a plain string, or a one-line error naming ``flag``."""
    value = str(value)
    if value not in ADAPTIVE_TOKEN_MASSES:
        raise ValueError(f"{flag} must be one of {', '.join(ADAPTIVE_TOKEN_MASSES)}, got {value!r}")
    return value


def adaptive_softmax_of(model: nn.Module):
    return getattr(getattr(model, "decoder", None), "adaptive_softmax", None)


def adaptive_softmax_target_log_prob(asm: nn.Module, features: Tensor, target: Tensor) -> Tensor:
    """``log p_AS(target)`` of a fairseq ``AdaptiveSoftmax`` without full-vocabulary logits.

    Args:
        asm: ``fairseq.modules.AdaptiveSoftmax``.
        features: ``[..., d]``; target: ``[...]``.
    """
    return adaptive_target_terms(asm, features, target)[0]


def adaptive_head_log_partition(asm: nn.Module, features: Tensor) -> Tensor:
    """``log Z_head = logsumexp(head logits)`` ``[...]`` of an ``AdaptiveSoftmax`` (no
    dropout: the scoring path, where fairseq's ``get_log_prob`` applies none either)."""
    flat = features.reshape(-1, features.size(-1))  # fairseq's tied head needs contiguous rows
    return torch.logsumexp(at_least_float32(asm.head(flat)), dim=-1).view(features.shape[:-1])


def adaptive_target_terms(asm: nn.Module, features: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """``(log p_AS(target), log Z_head)`` ``[...]`` each, from one head projection (with the
    module's dropout, as in its forward), never vocabulary-sized."""
    shape = target.shape
    x = asm.dropout_module(features.reshape(-1, features.size(-1)))
    tgt = target.reshape(-1)
    head_logits = at_least_float32(asm.head(x))
    head_lse = torch.logsumexp(head_logits, dim=-1)
    head_lp = head_logits - head_lse.unsqueeze(-1)
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
    return out.view(shape), head_lse.view(shape)


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


def target_token_terms(
    model: nn.Module, net_output, target: Tensor, adaptive_mass: str = DEFAULT_ADAPTIVE_TOKEN_MASS
) -> Tuple[Tensor, Tensor]:
    """``(tok_target, tok_lse)`` ``[B, T]`` each, for training (float32).

    Adaptive softmax: ``(log p_AS + log Z_head, log Z_head)`` with ``adaptive_mass="head"``,
    ``(log p_AS, 0)`` with ``"normalised"`` (module docstring)."""
    asm = adaptive_softmax_of(model)
    if asm is not None:
        mass = check_adaptive_token_mass(adaptive_mass)
        lp, head_lse = adaptive_target_terms(asm, net_output[0], target)
        if mass == "head":
            return lp + head_lse, head_lse
        return lp, torch.zeros_like(lp)
    return _LogitTerms.apply(at_least_float32(net_output[0]), target)


def token_score_sum(model: nn.Module, net_output) -> Tensor:
    """``Σ_w s_w`` ``[B, T]`` over the vocabulary (label smoothing of the token term): a
    reduction of the logits the forward already holds. An adaptive softmax has no such
    tensor (building it would be vocabulary-sized), so it is refused."""
    if adaptive_softmax_of(model) is not None:
        raise ValueError("--label-smoothing in trime_loss needs a full softmax; the model has an "
                         "adaptive softmax (set --label-smoothing 0)")
    return at_least_float32(net_output[0]).sum(-1)


def full_token_scores(
    model: nn.Module, net_output, sample, adaptive_mass: str = DEFAULT_ADAPTIVE_TOKEN_MASS
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(tok_scores [B, T, V], tok_lse [B, T], log-probabilities [B, T, V])`` for scoring.

    With an adaptive softmax, fairseq's log-probabilities are exact at ``sample['target']``
    (the only entries ``fairseq-eval-lm`` reads; all entries without a sample); the token
    scores are them plus ``log Z_head`` and ``tok_lse = log Z_head`` (``adaptive_mass="head"``)
    or them and ``tok_lse = 0`` (``"normalised"``). With a full softmax the log-partition
    comes from the fused log-softmax (cheaper than ``logsumexp``).
    """
    asm = adaptive_softmax_of(model)
    if asm is not None:
        mass = check_adaptive_token_mass(adaptive_mass)
        lprobs = at_least_float32(model.get_normalized_probs(net_output, log_probs=True, sample=sample))
        if mass == "normalised":
            return lprobs, lprobs.new_zeros(lprobs.shape[:-1]), lprobs
        head_lse = adaptive_head_log_partition(asm, net_output[0]).to(lprobs.dtype)
        return lprobs + head_lse.unsqueeze(-1), head_lse, lprobs
    logits = at_least_float32(net_output[0])
    lprobs = F.log_softmax(logits, dim=-1)
    return logits, logits[..., 0] - lprobs[..., 0], lprobs
