"""The TRIME loss (Eq. 5) against brute force, CE, finite differences and causality."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import adaptive_log_masses, make_dictionary, make_model, random_tokens
from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig
from trime_fairseq.memory.in_batch import InBatchMemory, group_batch, in_batch_log_prob
from trime_fairseq.memory.joint import joint_target_log_prob
from trime_fairseq.models.capture import get_capture
from trime_fairseq.models.output_layer import adaptive_softmax_target_log_prob


def brute_force_log_prob(token_log_scores, g, target, allowed, pad, temperature=1.0, top_k=0,
                         smoothing=0.0):
    """Eq. 5 with explicit loops: token_log_scores [N, V] = log exp(E_w f) (any offset
    common to a row cancels only if it is in both terms, so pass raw logits or
    normalised log-probs as the model defines them). ``top_k``: only the k largest memory
    scores of each query count. ``smoothing`` eps: returns minus the label-smoothed loss
    (1-eps-eps/(V-1)) (-log P(y)) + eps/(V-1) sum_w -log(exp(s_w) / den) instead."""
    n, d = g.shape
    vocab = token_log_scores.size(1)
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        num = math.exp(token_log_scores[i, target[i]].item())
        den = sum(math.exp(s.item()) for s in token_log_scores[i])
        mem = []
        for j in range(n):
            if not allowed(i, j) or target[j].item() == pad:
                continue
            mem.append(((g[i] @ g[j]).item() / math.sqrt(d) / temperature, target[j].item()))
        if top_k:
            mem = sorted(mem, key=lambda m: -m[0])[:top_k]
        for score, label in mem:
            den += math.exp(score)
            if label == target[i].item():
                num += math.exp(score)
        out[i] = math.log(num) - math.log(den)
        if smoothing:
            eps_i = smoothing / (vocab - 1)
            smooth = sum(-(s.item() - math.log(den)) for s in token_log_scores[i])
            out[i] = -((1 - smoothing - eps_i) * -out[i] + eps_i * smooth)
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


@pytest.mark.parametrize("softmax,options", [
    ("full", {}),
    ("full", {"memory_top_k": 3}),
    ("full", {"label_smoothing": 0.1}),
    ("full", {"memory_top_k": 2, "label_smoothing": 0.2, "train_temperature": 10.0}),
    ("adaptive-head", {}),
    ("adaptive-head", {"memory_top_k": 3}),
    ("adaptive-normalised", {}),
])
def test_criterion_equals_brute_force_local(softmax, options):
    """Eq. 5 exactly: the token term is exp(E_w · f) (for an adaptive softmax the head's
    unnormalised mass, or p_AS with --adaptive-token-mass normalised), with the
    --memory-top-k, --label-smoothing and --train-temperature options."""
    d = make_dictionary(40)
    adaptive = softmax != "full"
    mass = softmax.split("-")[1] if adaptive else "head"
    model = make_model(d, adaptive_cutoff="12,30" if adaptive else None).double()
    tokens = random_tokens(d, 3, 11, seed=1)
    tokens[2, 8:] = d.pad()  # padding must be neither query nor memory
    sample = make_sample(tokens, d.pad())
    crit = criterion_for(d, adaptive_token_mass=mass, **options)
    loss, _, log = crit(model, sample)

    net_output = model(**sample["net_input"])
    g = get_capture(model).take()
    target = sample["target"]
    if adaptive:
        scores = adaptive_log_masses(model.decoder.adaptive_softmax, net_output[0])
        if mass == "normalised":
            scores = scores - torch.logsumexp(scores, -1, keepdim=True)
    else:
        scores = net_output[0]
    ref = 0.0
    ref_ce = 0.0
    ref_nll = 0.0
    for b in range(target.size(0)):
        lp = brute_force_log_prob(scores[b], g[b], target[b], lambda i, j: j < i, d.pad(),
                                  temperature=options.get("train_temperature", 1.0),
                                  top_k=options.get("memory_top_k", 0),
                                  smoothing=options.get("label_smoothing", 0.0))
        nll = brute_force_log_prob(scores[b], g[b], target[b], lambda i, j: j < i, d.pad(),
                                   temperature=options.get("train_temperature", 1.0),
                                   top_k=options.get("memory_top_k", 0))
        keep = target[b].ne(d.pad())
        ref -= lp[keep].sum().item()
        ref_nll -= nll[keep].sum().item()
        ref_ce -= F.log_softmax(scores[b], -1).gather(1, target[b:b + 1].T).squeeze(1)[keep].sum().item()
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert log["nll_loss"].item() == pytest.approx(ref_nll, rel=1e-9)
    assert log["ce_loss"].item() == pytest.approx(ref_ce, rel=1e-9)
    assert log["nll_loss"].item() != pytest.approx(ref_ce, rel=1e-6)  # memory really changed the loss


def test_adaptive_token_mass_changes_the_loss():
    """The two adaptive token masses give the same CE but different TRIME losses (the
    memory competes with Z_head rather than with 1)."""
    d = make_dictionary(40)
    model = make_model(d, adaptive_cutoff="12,30").double()
    sample = make_sample(random_tokens(d, 3, 11, seed=4), d.pad())
    logs = {m: criterion_for(d, adaptive_token_mass=m)(model, sample)[2] for m in ("head", "normalised")}
    assert logs["head"]["ce_loss"].item() == pytest.approx(logs["normalised"]["ce_loss"].item(), rel=1e-12)
    assert logs["head"]["loss"].item() != pytest.approx(logs["normalised"]["loss"].item(), rel=1e-6)


def test_label_smoothing_without_memory_is_fairseqs():
    """During the CE warm-up, --label-smoothing eps is fairseq's label_smoothed_nll_loss."""
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    d = make_dictionary(40)
    model = make_model(d).double()
    sample = make_sample(random_tokens(d, 2, 9, seed=5, vocab=40), d.pad())
    model.train()  # the warm-up only applies to training
    torch.manual_seed(0)
    loss, _, log = criterion_for(d, ce_warmup_updates=10, label_smoothing=0.1)(model, sample)
    assert log["ce_warmup"] == 1
    torch.manual_seed(0)
    lprobs = F.log_softmax(model(**sample["net_input"])[0], -1)
    ref, ref_nll = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), 0.1,
                                           ignore_index=d.pad())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert log["nll_loss"].item() == pytest.approx(ref_nll.item(), rel=1e-9)


def test_top_k_mask_keeps_the_k_best_allowed():
    from trime_fairseq.memory.joint import top_k_mask

    scores = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[False, True, True, True, True], [True, False, True, False, False]])
    got = top_k_mask(scores, mask, 2)
    assert got.tolist() == [[False, False, True, True, False], [True, False, True, False, False]]
    assert torch.equal(top_k_mask(scores, mask, 0), mask)
    assert torch.equal(top_k_mask(scores, mask, 5), mask)


def test_model_alone_weight_adds_the_model_alone_cross_entropy():
    """--model-alone-weight w: loss = Eq. 5 NLL + w * CE of the token softmax alone, in value
    and gradient; the logged NLL stays Eq. 5's, and the CE warm-up is untouched."""
    d = make_dictionary(40)
    model = make_model(d).double()
    sample = make_sample(random_tokens(d, 3, 11, seed=6, vocab=40), d.pad())

    def loss_and_grad(**cfg):
        model.zero_grad()
        loss, _, log = criterion_for(d, **cfg)(model, sample)
        loss.backward()
        return loss.detach(), log, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    base, log, grad = loss_and_grad()
    mixed, log_w, grad_w = loss_and_grad(model_alone_weight=0.5)
    assert log["loss"].item() != pytest.approx(log["ce_loss"].item(), rel=1e-6)  # memory matters here
    assert mixed.item() == pytest.approx(base.item() + 0.5 * log["ce_loss"].item(), rel=1e-12)
    assert log_w["nll_loss"].item() == pytest.approx(log["nll_loss"].item(), rel=1e-12)
    model.zero_grad()
    lprobs = F.log_softmax(model(**sample["net_input"])[0], -1)
    F.nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), ignore_index=d.pad(),
               reduction="sum").backward()
    ce_grad = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for gw, g, gc in zip(grad_w, grad, ce_grad):
        torch.testing.assert_close(gw, g + 0.5 * gc, rtol=1e-9, atol=1e-12)
    model.train()  # the warm-up only applies to training: plain CE, whatever the weight
    warm = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        warm[w] = criterion_for(d, ce_warmup_updates=10, model_alone_weight=w)(model, sample)[0].item()
    model.eval()
    assert warm[0.5] == pytest.approx(warm[0.0], rel=1e-12)


@pytest.mark.parametrize("options,message", [
    ({"memory_top_k": -1}, "--memory-top-k"),
    ({"model_alone_weight": -0.5}, "--model-alone-weight"),
    ({"label_smoothing": 1.0}, "--label-smoothing"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        criterion_for(make_dictionary(10), **options)


def test_label_smoothing_with_adaptive_softmax_is_refused():
    d = make_dictionary(40)
    model = make_model(d, adaptive_cutoff="12,30")
    sample = make_sample(random_tokens(d, 2, 9, seed=5), d.pad())
    with pytest.raises(ValueError, match="--label-smoothing"):
        criterion_for(d, label_smoothing=0.1)(model, sample)


def test_adaptive_target_log_prob_matches_fairseq():
    d = make_dictionary(40)
    model = make_model(d, adaptive_cutoff="12,30")
    x = torch.randn(2, 7, 32)
    target = random_tokens(d, 2, 7, vocab=40)
    asm = model.decoder.adaptive_softmax
    full = asm.get_log_prob(x, None)
    ours = adaptive_softmax_target_log_prob(asm, x, target)
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


@pytest.mark.parametrize("chunk,ckpt", [(3, 0), (3, 1 << 30), (100, 0)])
def test_top_k_external_equals_brute_force(chunk, ckpt):
    """TRIME-MT's memory (the other sentences of the batch) with the top-k memory scores
    per query, chunked and checkpointed alike, against explicit loops; gradients flow."""
    torch.manual_seed(2)
    B, L, dim, pad, k = 3, 6, 4, 1, 4
    target = torch.randint(2, 6, (B, L))
    target[2, 4:] = pad
    reps = torch.randn(B, L, dim, dtype=torch.float64, requires_grad=True)
    tt, tl = torch.randn(B, L, dtype=torch.float64), torch.randn(B, L, dtype=torch.float64) + 2
    spec = {"mode": "external", "keep_local": torch.zeros(B, dtype=torch.bool)}
    (a, b, r, t), mem = group_batch((tt, tl, reps, target), spec, target)
    got = in_batch_log_prob(a, b, r, t, mem, pad, temperature=10.0, chunk_size=chunk, checkpoint_above=ckpt,
                            top_k=k).view(B, L)
    for i in range(B):
        for p in range(L):
            if target[i, p] == pad:
                continue
            mem_scores = [(float(reps[i, p] @ reps[j, q]) / math.sqrt(dim) / 10.0, int(target[j, q]))
                          for j in range(B) if j != i for q in range(L) if target[j, q] != pad]
            mem_scores = sorted(mem_scores, key=lambda m: -m[0])[:k]
            num = math.exp(tt[i, p]) + sum(math.exp(s) for s, y in mem_scores if y == int(target[i, p]))
            den = math.exp(tl[i, p]) + sum(math.exp(s) for s, _ in mem_scores)
            assert float(got[i, p]) == pytest.approx(math.log(num / den), rel=1e-10)
    (got * target.ne(pad)).sum().backward()
    assert reps.grad.abs().sum() > 0


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


@pytest.mark.parametrize("top_k", [0, 2])
@pytest.mark.parametrize("keep", [10**9, 0, 24])  # every chunk kept, none, the first (2 x 2 x 6 entries) only
def test_chunked_joint_gradients_of_both_outputs(top_k, keep):
    """The hand-written backward of the chunked Eq. 5 (log-prob and log-partition outputs,
    with and without top-k memory, similarities kept, recomputed, or the first chunk kept and
    the second recomputed) against finite differences."""
    from trime_fairseq.memory.joint import chunked_joint_target_log_prob

    torch.manual_seed(3)
    G, T, K, d = 2, 5, 6, 3
    q = torch.randn(G, T, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(G, K, d, dtype=torch.float64, requires_grad=True)
    tt = torch.randn(G, T, dtype=torch.float64, requires_grad=True)
    tl = (tt.detach() + 1.0).requires_grad_(True)
    labels = torch.randint(0, 3, (G, K))
    target = torch.randint(0, 3, (G, T))
    mask = torch.rand(G, T, K) > 0.3

    def fn(tt, tl, q, k):
        lp, den = chunked_joint_target_log_prob(
            tt, tl, q, k, labels, target, lambda q0, q1, e: mask[:, q0:q1, :e].clone(),
            [(0, 2, K), (2, 5, K)], temperature=0.7, recompute_above=keep, top_k=top_k)
        fn.kept = [c is not None for c in lp.grad_fn.kept]  # the chunks the backward reads from the forward
        return (lp * torch.linspace(0.5, 1.5, T)).sum() + 0.3 * den.sum()

    assert torch.autograd.gradcheck(fn, (tt, tl, q, k), eps=1e-6, atol=1e-6)
    assert fn.kept == {10**9: [True, True], 0: [False, False], 24: [True, False]}[keep]
