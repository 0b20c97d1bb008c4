"""Test-time scoring with local memory (Eq. 6, continuous cache) against brute force."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import adaptive_log_masses, make_dictionary, make_model, random_tokens
from trime_fairseq.memory.combiners import CacheCombiner, NoMemory, TrimeCombiner
from trime_fairseq.memory.joint import interpolate, memory_log_probs
from trime_fairseq.models.memory_eval import MemoryEvalModel, memory_labels
from trime_fairseq.tasks.trime_lm import build_combiner


def context_window_sample(d, bsz=2, ctx=4, block=6, seed=0):
    """A batch shaped like fairseq's LMContextWindowDataset output: [context | block | pad]."""
    toks = random_tokens(d, bsz, ctx + block + 1, seed=seed)
    src = toks[:, :-1].clone()
    tgt = toks[:, 1:].clone()
    tgt[:, :ctx] = d.pad()  # context positions are not scored
    src[1, -2:] = d.pad()  # a shorter last row
    tgt[1, -2:] = d.pad()
    return {
        "net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)},
        "target": tgt,
        "start_indices": [ctx] * bsz,
    }


def brute_force(model, sample, pad, combine):
    """Per scored token: memory = every earlier position j with its next token as label."""
    net_output = model(**sample["net_input"])
    feats = model(**sample["net_input"], features_only=True)[0]
    src = sample["net_input"]["src_tokens"]
    logits = net_output[0]
    out = {}
    for b in range(src.size(0)):
        for t in range(src.size(1)):
            tgt = sample["target"][b, t].item()
            if tgt == pad:
                continue
            mem = []
            for j in range(t):
                label = sample["target"][b, j].item()
                if label == pad:
                    label = src[b, j + 1].item()
                mem.append((j, label))
            out[(b, t)] = combine(b, t, tgt, logits[b, t], feats[b], mem)
    return out


@pytest.mark.parametrize("softmax", ["full", "adaptive-head", "adaptive-normalised"])
def test_trime_scorer_equals_brute_force(softmax):
    """Eq. 6 with the token term exp(E_w · f): for an adaptive softmax the head's
    unnormalised mass (exact), or p_AS(w) with --adaptive-token-mass normalised."""
    d = make_dictionary(30)
    model = make_model(d, adaptive_cutoff="10,20" if softmax != "full" else None).double()
    mass = softmax.split("-")[1] if softmax != "full" else "head"
    g_store = {}
    fc1 = model.decoder.layers[-1].fc1
    handle = fc1.register_forward_pre_hook(lambda m, inp: g_store.__setitem__("g", inp[0].transpose(0, 1)))
    sample = context_window_sample(d)
    tau = 0.7
    pad = d.pad()

    def combine(b, t, tgt, logits, feats, mem):
        g = g_store["g"][b]
        dim = g.size(-1)
        if softmax != "full":  # logits are the decoder features here
            logits = adaptive_log_masses(model.decoder.adaptive_softmax, logits)
            if mass == "normalised":
                logits = logits - torch.logsumexp(logits, 0)
        num = math.exp(logits[tgt].item())
        den = torch.logsumexp(logits, 0).exp().item()
        for j, label in mem:
            e = math.exp((g[t] @ g[j]).item() / math.sqrt(dim) / tau)
            den += e
            num += e if label == tgt else 0.0
        return math.log(num / den)

    ref = brute_force(model, sample, pad, combine)
    handle.remove()
    wrapped = MemoryEvalModel(model, TrimeCombiner(tau), pad, adaptive_mass=mass)
    lprobs = wrapped.get_normalized_probs(wrapped(**sample["net_input"]), True, sample)
    for (b, t), value in ref.items():
        assert lprobs[b, t, sample["target"][b, t]].item() == pytest.approx(value, abs=1e-9)
    if softmax != "full":  # fairseq's adaptive log-probs are only valid at the targets
        return
    # a proper distribution over the vocabulary at every position
    torch.testing.assert_close(lprobs.exp().sum(-1), torch.ones(lprobs.shape[:2], dtype=lprobs.dtype))


def test_adaptive_token_masses_differ_and_are_exact_at_head_words():
    """Exact token scores: the raw head logits at head words, cluster logit + within-cluster
    log-probability at tail words, log-partition log Z_head; normalised: log p_AS, 0."""
    from trime_fairseq.models.output_layer import full_token_scores

    d = make_dictionary(30)
    model = make_model(d, adaptive_cutoff="10,20").double()
    sample = context_window_sample(d, seed=2)
    net_output = model(**sample["net_input"])
    asm = model.decoder.adaptive_softmax
    scores, lse, lprobs = full_token_scores(model, net_output, None, "head")  # no sample: every entry
    ref = adaptive_log_masses(asm, net_output[0])
    torch.testing.assert_close(scores, ref)
    torch.testing.assert_close(scores[..., :10], asm.head(net_output[0])[..., :10])
    torch.testing.assert_close(lse, torch.logsumexp(ref, -1))
    torch.testing.assert_close(lprobs, scores - lse.unsqueeze(-1))
    n_scores, n_lse, _ = full_token_scores(model, net_output, None, "normalised")
    torch.testing.assert_close(n_scores, lprobs)
    assert torch.count_nonzero(n_lse) == 0 and lse.abs().min() > 1e-3
    with pytest.raises(ValueError, match="--adaptive-token-mass"):
        full_token_scores(model, net_output, None, "raw")


def test_cache_scorer_equals_brute_force():
    d = make_dictionary(30)
    model = make_model(d).double()
    sample = context_window_sample(d, seed=3)
    lam, theta = 0.3, 0.05
    pad = d.pad()

    def combine(b, t, tgt, logits, feats, mem):
        p_lm = F.softmax(logits, 0)[tgt].item()
        if not mem:
            return math.log(p_lm)
        w = [math.exp(theta * (feats[t] @ feats[j]).item()) for j, _ in mem]
        p_cache = sum(wi for wi, (_, label) in zip(w, mem) if label == tgt) / sum(w)
        return math.log((1 - lam) * p_lm + lam * p_cache)

    ref = brute_force(model, sample, pad, combine)
    wrapped = MemoryEvalModel(model, CacheCombiner(lam, theta, "f"), pad)
    lprobs = wrapped.get_normalized_probs(wrapped(**sample["net_input"]), True, sample)
    for (b, t), value in ref.items():
        assert lprobs[b, t, sample["target"][b, t]].item() == pytest.approx(value, abs=1e-9)


def test_target_only_path_matches_full_distribution():
    """The tuning sweeps use target_log_prob; it must equal the full distribution's entry."""
    d = make_dictionary(30)
    model = make_model(d, adaptive_cutoff="10,20").double()
    sample = context_window_sample(d, seed=4)
    for combiner in (NoMemory(), TrimeCombiner(0.5), CacheCombiner(0.2, 0.1, "g")):
        wrapped = MemoryEvalModel(model, combiner, d.pad())
        net_output = wrapped(**sample["net_input"])
        from trime_fairseq.models.memory_eval import scoring_inputs

        x = scoring_inputs(model, net_output, sample, d.pad())
        full = combiner.log_probs(x).gather(-1, x.target.unsqueeze(-1)).squeeze(-1)
        keep = x.target.ne(d.pad())
        torch.testing.assert_close(combiner.target_log_prob(x)[keep], full[keep])


def test_memory_labels_use_next_input_for_context():
    src = torch.tensor([[5, 6, 7, 8, 1]])
    tgt = torch.tensor([[1, 1, 8, 9, 1]])
    assert memory_labels(src, tgt, pad=1).tolist() == [[6, 7, 8, 9, 1]]


def test_interpolate_keeps_lm_without_memory():
    lp = torch.log_softmax(torch.randn(3, 5), -1)
    mem = memory_log_probs(torch.randn(3, 2), torch.tensor([[0, 1]]).expand(3, 2),
                           torch.tensor([[True, True], [False, False], [True, False]]), 5)
    has = torch.tensor([True, False, True])
    out = interpolate(lp, mem, 0.4, has)
    torch.testing.assert_close(out[1], lp[1])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3))


def test_memory_flags_without_parameters_are_refused():
    from types import SimpleNamespace

    cfg = SimpleNamespace(eval_combiner="cache", cache_lambda=None, cache_theta=0.1,
                          cache_representation="f", eval_temperature=1.0)
    with pytest.raises(ValueError, match="--cache-lambda"):
        build_combiner(cfg)
    cfg = SimpleNamespace(eval_combiner="trime", eval_temperature=0.0)
    with pytest.raises(ValueError, match="--eval-temperature"):
        build_combiner(cfg)
    with pytest.raises(ValueError, match="--cache-lambda"):
        CacheCombiner(1.5, 0.1)


def test_adaptive_token_mass_flag_is_checked():
    from types import SimpleNamespace

    from trime_fairseq.tasks.trime_lm import check_memory_flags

    cfg = SimpleNamespace(long_memory_size=0, eval_memory="local", consecutive_segments=1, eval_combiner="trime",
                          adaptive_token_mass="raw")
    with pytest.raises(ValueError, match="--adaptive-token-mass"):
        check_memory_flags(cfg)
    cfg.adaptive_token_mass = "normalised"
    check_memory_flags(cfg)


def test_head_log_partition_with_tied_adaptive_head_and_strided_features():
    """fairseq's tied head (adaptive input weights) views its input: features straight from
    the decoder (time-major, transposed) must work and give the same result."""
    from trime_fairseq.models.output_layer import adaptive_head_log_partition

    d = make_dictionary(30)
    model = make_model(d, adaptive_cutoff="10,20", adaptive_input=True, tie_adaptive_weights=True,
                       adaptive_input_cutoff="10,20", adaptive_input_factor=4, adaptive_softmax_factor=4).double()
    asm = model.decoder.adaptive_softmax
    x = torch.randn(7, 3, model.decoder.output_embed_dim, dtype=torch.float64).transpose(0, 1)  # strided
    assert not x.is_contiguous()
    got = adaptive_head_log_partition(asm, x)
    assert got.shape == (3, 7)
    torch.testing.assert_close(got, torch.logsumexp(asm.head(x.contiguous().view(-1, x.size(-1))), -1).view(3, 7))
