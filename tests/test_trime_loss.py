"""The TRIME loss (Eq. 5) against brute force, CE, finite differences and causality."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import make_dictionary, make_model, random_tokens
from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig
from trime_fairseq.memory.in_batch import InBatchMemory, group_batch, in_batch_log_prob
from trime_fairseq.memory.joint import joint_target_log_prob
from trime_fairseq.models.capture import get_capture
from trime_fairseq.models.output_layer import adaptive_target_log_prob


def brute_force_log_prob(token_log_scores, g, target, allowed, pad, temperature=1.0):
    """Eq. 5 with explicit loops: token_log_scores [N, V] = log exp(E_w f) (any offset
    common to a row cancels only if it is in both terms, so pass raw logits or
    normalised log-probs as the model defines them)."""
    n, d = g.shape
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        num = math.exp(token_log_scores[i, target[i]].item())
        den = sum(math.exp(s.item()) for s in token_log_scores[i])
        for j in range(n):
            if not allowed(i, j) or target[j].item() == pad:
                continue
            e = math.exp((g[i] @ g[j]).item() / math.sqrt(d) / temperature)
            den += e
            if target[j].item() == target[i].item():
                num += e
        out[i] = math.log(num) - math.log(den)
    return out


def criterion_for(task_dict, **cfg):
    task = SimpleNamespace(target_dictionary=task_dict, source_dictionary=task_dict)
    base = dict(ce_warmup_updates=0, train_temperature=1.0, similarity_chunk_size=2048,
                checkpoint_similarity_above=1 << 26, drop_local_prob=0.0, sentence_avg=False)
    base.update(cfg)
    return TrimeLoss(TrimeLossConfig(**base), task)


def make_sample(tokens, pad):
    src = tokens[:, :-1].clone()
    tgt = tokens[:, 1:].clone()
    return {
        "net_input": {"src_tokens": src, "src_lengths": torch.full((src.size(0),), src.size(1))},
        "target": tgt,
        "ntokens": int(tgt.ne(pad).sum()),
    }


@pytest.mark.parametrize("adaptive", [False, True])
def test_criterion_equals_brute_force_local(adaptive):
    d = make_dictionary(40)
    model = make_model(d, adaptive_cutoff="12,30" if adaptive else None).double()
    tokens = random_tokens(d, 3, 11, seed=1)
    tokens[2, 8:] = d.pad()  # padding must be neither query nor memory
    sample = make_sample(tokens, d.pad())
    crit = criterion_for(d)
    loss, _, log = crit(model, sample)

    net_output = model(**sample["net_input"])
    g = get_capture(model).take()
    target = sample["target"]
    if adaptive:
        scores = model.decoder.adaptive_softmax.get_log_prob(net_output[0], None)
    else:
        scores = net_output[0]
    ref = 0.0
    ref_ce = 0.0
    for b in range(target.size(0)):
        lp = brute_force_log_prob(scores[b], g[b], target[b], lambda i, j: j < i, d.pad())
        keep = target[b].ne(d.pad())
        ref -= lp[keep].sum().item()
        ref_ce -= F.log_softmax(scores[b], -1).gather(1, target[b:b + 1].T).squeeze(1)[keep].sum().item()
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert log["ce_loss"].item() == pytest.approx(ref_ce, rel=1e-9)
    assert loss.item() != pytest.approx(ref_ce, rel=1e-6)  # memory really changed the loss


def test_adaptive_target_log_prob_matches_fairseq():
    d = make_dictionary(40)
    model = make_model(d, adaptive_cutoff="12,30")
    x = torch.randn(2, 7, 32)
    target = random_tokens(d, 2, 7, vocab=40)
    asm = model.decoder.adaptive_softmax
    full = asm.get_log_prob(x, None)
    ours = adaptive_target_log_prob(asm, x, target)
    torch.testing.assert_close(ours, full.gather(-1, target.unsqueeze(-1)).squeeze(-1))


def test_equals_cross_entropy_without_memory():
    d = make_dictionary(40)
    model = make_model(d)
    tokens = random_tokens(d, 2, 9, seed=3, vocab=40)
    sample = make_sample(tokens, d.pad())
    # during CE warm-up the loss is exactly the cross entropy
    crit = criterion_for(d, ce_warmup_updates=10)
    model.train()
    torch.manual_seed(0)
    loss, _, log = crit(model, sample)
    assert log["ce_warmup"] == 1
    assert loss.item() == pytest.approx(log["ce_loss"].item(), rel=1e-6)
    # a memory with no entry (every key masked) falls back to the token term exactly
    tok_target = torch.randn(5)
    tok_lse = tok_target + torch.rand(5) + 0.1
    scores = torch.randn(5, 4)
    lp = joint_target_log_prob(tok_target, tok_lse, scores, torch.zeros(5, 4, dtype=torch.long),
                               torch.zeros(5, 4, dtype=torch.bool), torch.zeros(5, dtype=torch.long))
    assert torch.equal(lp, tok_target - tok_lse)
    # positives absent but memory present: the numerator is the token term alone
    mask = torch.ones(5, 4, dtype=torch.bool)
    lp2 = joint_target_log_prob(tok_target, tok_lse, scores, torch.ones(5, 4, dtype=torch.long),
                                mask, torch.zeros(5, dtype=torch.long))
    expected = tok_target - torch.logaddexp(tok_lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(lp2, expected)


@pytest.mark.parametrize("mode", ["local", "long", "external"])
@pytest.mark.parametrize("chunk,ckpt", [(2, 0), (2, 1 << 30), (64, 0)])
def test_gradients_match_finite_differences(mode, chunk, ckpt):
    torch.manual_seed(0)
    B, L, dim, pad = 4, 5, 3, 1
    target = torch.randint(2, 5, (B, L))
    target[3, 4] = pad
    reps = torch.randn(B, L, dim, dtype=torch.float64, requires_grad=True)
    tok_t = torch.randn(B, L, dtype=torch.float64, requires_grad=True)
    tok_l = (tok_t.detach() + 1.0).requires_grad_(True)
    spec = {"local": None,
            "long": {"mode": "long", "segments_per_group": 2, "row_doc": torch.tensor([0, 0, 1, 2])},
            "external": {"mode": "external", "keep_local": torch.tensor([True, False, True, True])}}[mode]

    def fn(tt, tl, r):
        (a, b, c, t), mem = group_batch((tt, tl, r, target), spec, target)
        lp = in_batch_log_prob(a, b, c, t, mem, pad, chunk_size=chunk, checkpoint_above=ckpt).reshape(B, L)
        return (lp * target.ne(pad)).sum()

    assert torch.autograd.gradcheck(fn, (tok_t, tok_l, reps), eps=1e-6, atol=1e-6)
    # the memory side receives gradient too (keys are not detached)
    fn(tok_t, tok_l, reps).backward()
    assert reps.grad[:, 0].abs().sum() > 0


def test_chunking_does_not_change_the_result():
    torch.manual_seed(1)
    G, T, dim = 2, 37, 8
    target = torch.randint(2, 6, (G, T))
    reps = torch.randn(G, T, dim)
    tt, tl = torch.randn(G, T), torch.randn(G, T) + 2
    full = in_batch_log_prob(tt, tl, reps, target, InBatchMemory("local"), 1, chunk_size=1000)
    for chunk in (1, 5, 36):
        torch.testing.assert_close(
            in_batch_log_prob(tt, tl, reps, target, InBatchMemory("local"), 1, chunk_size=chunk), full
        )


def test_future_tokens_never_change_earlier_losses():
    d = make_dictionary(40)
    model = make_model(d).double()
    tokens = random_tokens(d, 2, 13, seed=5)
    capture = get_capture(model)

    def per_position(tok):
        sample = make_sample(tok, d.pad())
        net_output = model(**sample["net_input"])
        g = capture.take()
        logits = net_output[0]
        tgt = sample["target"]
        tt = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        return in_batch_log_prob(tt, torch.logsumexp(logits, -1), g, tgt, InBatchMemory("local"), d.pad())

    before = per_position(tokens)
    t = 7
    changed = tokens.clone()
    changed[:, t + 1:] = torch.flip(changed[:, t + 1:], dims=[1]) % 8 + d.nspecial  # new future
    after = per_position(changed)
    # positions < t predict tokens <= t, which are unchanged
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, t + 1:], before[:, t + 1:])


def test_bad_criterion_settings_are_named():
    d = make_dictionary(10)
    with pytest.raises(ValueError, match="--ce-warmup-updates"):
        criterion_for(d, ce_warmup_updates=-1)
    with pytest.raises(ValueError, match="--drop-local-prob"):
        criterion_for(d, drop_local_prob=1.5)
    with pytest.raises(ValueError, match="--similarity-chunk-size"):
        criterion_for(d, similarity_chunk_size=0)


def test_model_without_last_ffn_is_refused():
    d = make_dictionary(10)
    crit = criterion_for(d)

    class NotATransformer(torch.nn.Module):
        def forward(self, src_tokens, src_lengths):
            return (torch.zeros(1),)

    sample = make_sample(random_tokens(d, 1, 4), d.pad())
    with pytest.raises(ValueError, match="decoder.layers"):
        crit(NotATransformer(), sample)


def test_logit_terms_gradient():
    from trime_fairseq.models.output_layer import _LogitTerms

    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda x: _LogitTerms.apply(x, t), (x,))
    tt, lse = _LogitTerms.apply(x, t)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    torch.testing.assert_close(tt, x.gather(-1, t.unsqueeze(-1)).squeeze(-1))
