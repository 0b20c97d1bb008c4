"""Appendix F (Eq. 7-8): P' over the external neighbours with raw similarities (published)
or over every memory entry with scaled ones, checked against a brute-force loop."""
import math
from argparse import Namespace

import pytest
import torch

from trime_fairseq.memory.combiners import ScoringInputs, TrimeCombiner
from trime_fairseq.memory.joint import appendix_f_entries

V, B, T, K, D = 7, 2, 4, 5, 6


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    qg = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    x = ScoringInputs(
        tok_scores=logits, tok_lse=torch.logsumexp(logits, -1), target=torch.randint(0, V, (B, T), generator=g),
        query_g=qg, query_f=qg, keys_g=qg, keys_f=qg, key_labels=torch.randint(0, V, (B, T), generator=g),
        mask=torch.ones(T, T, dtype=torch.bool).tril(-1).expand(B, T, T).clone(),
    )
    ext = torch.randn(B, T, K, generator=g, dtype=torch.float64).sort(-1, descending=True).values * 4
    ext[0, 2, 3:] = -math.inf
    ext[1, 1] = -math.inf  # nothing retrieved for this query
    return x.with_external(ext, torch.randint(0, V, (B, T, K), generator=g))


def brute(x, tau, lam, tau2, kind, ext_tau=None):
    """log((1-λ) P + λ P') per query and word, by explicit loops (P from Eq. 6, checked
    separately by :func:`test_ext_temperature_scales_only_the_retrieved_entries`)."""
    joint = TrimeCombiner(tau, ext_temperature=ext_tau).log_probs(x).exp()
    out = torch.empty(B, T, V, dtype=torch.float64)
    sq = math.sqrt(D)
    for b in range(B):
        for t in range(T):
            entries = []  # (score, label)
            if kind == "all-scaled":
                entries += [(float(x.query_g[b, t] @ x.keys_g[b, j]) / (sq * tau2), int(x.key_labels[b, j]))
                            for j in range(T) if x.mask[b, t, j]]
                entries += [(float(x.ext_scores[b, t, j]) / (sq * tau2), int(x.ext_labels[b, t, j]))
                            for j in range(K) if math.isfinite(x.ext_scores[b, t, j])]
            else:
                entries += [(float(x.ext_scores[b, t, j]) / tau2, int(x.ext_labels[b, t, j]))
                            for j in range(K) if math.isfinite(x.ext_scores[b, t, j])]
            if not entries:
                out[b, t] = joint[b, t].log()
                continue
            z = sum(math.exp(s) for s, _ in entries)
            pmem = torch.zeros(V, dtype=torch.float64)
            for s, w in entries:
                pmem[w] += math.exp(s) / z
            out[b, t] = ((1 - lam) * joint[b, t] + lam * pmem).log()
    return out


@pytest.mark.parametrize("kind", ["ext-raw", "all-scaled"])
def test_pprime_matches_brute_force(kind):
    x = inputs()
    comb = TrimeCombiner(0.8, 0.3, 2.5, kind)
    ref = brute(x, 0.8, 0.3, 2.5, kind)
    torch.testing.assert_close(comb.log_probs(x), ref)
    torch.testing.assert_close(comb.target_log_prob(x), ref.gather(-1, x.target.unsqueeze(-1)).squeeze(-1))
    assert "P' over " + kind in comb.describe()


def test_the_two_variants_differ_and_published_is_default():
    x = inputs(1)
    published = TrimeCombiner(1.0, 0.4, 3.0)
    assert published.memory_distribution == "ext-raw"
    a = published.target_log_prob(x)
    b = TrimeCombiner(1.0, 0.4, 3.0, "all-scaled").target_log_prob(x)
    assert (a - b).abs().max() > 1e-3
    # a query with no neighbour keeps Eq. 6 under the published P' (local memory is not in P')
    plain = TrimeCombiner(1.0).target_log_prob(x)
    assert a[1, 1] == pytest.approx(float(plain[1, 1]))
    assert b[1, 1] != pytest.approx(float(plain[1, 1]))


def test_appendix_f_entries_errors_and_local_only():
    x = inputs()
    s = torch.zeros(B, T, 3)
    with pytest.raises(ValueError, match="memory-distribution"):
        appendix_f_entries("ext", s, s.long(), s.bool(), 1.0, 1.0)
    with pytest.raises(ValueError, match="ext-raw needs external"):
        appendix_f_entries("ext-raw", s, s.long(), s.bool(), 1.0, 1.0)
    with pytest.raises(ValueError, match="memory-distribution"):
        TrimeCombiner(1.0, 0.3, 1.0, "all")
    # no datastore: the published P' is empty and Eq. 8 leaves Eq. 6 alone
    local = ScoringInputs(**{k: getattr(x, k) for k in x.__dataclass_fields__ if k not in ("ext_scores", "ext_labels")})
    torch.testing.assert_close(TrimeCombiner(1.0, 0.3, 2.0).log_probs(local), TrimeCombiner(1.0).log_probs(local))


def test_task_flags_and_tune_grid():
    from trime_fairseq.cli.tune import make_combiner, parse_grid
    from trime_fairseq.tasks.trime_lm import build_combiner, check_memory_flags

    cfg = Namespace(eval_combiner="trime", eval_memory="local", memory_lambda=0.3, memory_temperature=2.0,
                    memory_distribution="ext-raw", long_memory_size=0, consecutive_segments=1, knn_k=8,
                    eval_temperature=1.0, datastore=None)
    with pytest.raises(ValueError, match="ext-raw needs --eval-memory"):
        check_memory_flags(cfg)
    cfg.memory_distribution = "all-scaled"
    check_memory_flags(cfg)
    assert build_combiner(cfg).memory_distribution == "all-scaled"
    points = parse_grid("trime", ["tau=1", "memory_lambda=0.3", "memory_tau=2", "pprime=0,1"])
    assert [make_combiner("trime", p).memory_distribution for p in points] == ["ext-raw", "all-scaled"]
    assert make_combiner("trime", {"tau": 1.0}).memory_distribution == "ext-raw"
    with pytest.raises(ValueError, match="pprime"):
        make_combiner("trime", {"tau": 1.0, "pprime": 2.0})


def test_ext_temperature_scales_only_the_retrieved_entries():
    """``--ext-temperature``: Eq. 6 with ``sim/τ`` for local entries and ``sim/τ_ext`` for
    retrieved ones is Eq. 6 at one ``τ`` on retrieved similarities multiplied by ``τ/τ_ext``."""
    x = inputs(2)
    tau, ext_tau = 0.8, 2.4
    comb = TrimeCombiner(tau, ext_temperature=ext_tau)
    rescaled = x.with_external(x.ext_scores * (tau / ext_tau), x.ext_labels)
    torch.testing.assert_close(comb.log_probs(x), TrimeCombiner(tau).log_probs(rescaled))
    torch.testing.assert_close(comb.target_log_prob(x), TrimeCombiner(tau).target_log_prob(rescaled))
    assert (comb.target_log_prob(x) - TrimeCombiner(tau).target_log_prob(x)).abs().max() > 1e-3
    torch.testing.assert_close(TrimeCombiner(tau, ext_temperature=tau).log_probs(x), TrimeCombiner(tau).log_probs(x))
    # inspection reports the same raw similarities whatever the temperatures
    torch.testing.assert_close(comb.contributions(x).similarity, TrimeCombiner(tau).contributions(x).similarity)
    assert "tau_ext=2.4" in comb.describe()
    with pytest.raises(ValueError, match="--ext-temperature must be > 0"):
        TrimeCombiner(1.0, ext_temperature=0.0)


@pytest.mark.parametrize("kind", ["ext-raw", "all-scaled"])
def test_ext_temperature_leaves_pprime_alone(kind):
    """Appendix F's P' keeps its own temperature τ' for every entry, whatever ``τ_ext``."""
    x = inputs(3)
    comb = TrimeCombiner(0.9, 0.3, 2.0, kind, ext_temperature=3.0)
    ref = brute(x, 0.9, 0.3, 2.0, kind, ext_tau=3.0)
    torch.testing.assert_close(comb.log_probs(x), ref)
    torch.testing.assert_close(comb.target_log_prob(x), ref.gather(-1, x.target.unsqueeze(-1)).squeeze(-1))


def test_ext_temperature_flag_and_grid():
    from trime_fairseq.cli.tune import make_combiner, parse_grid
    from trime_fairseq.tasks.trime_lm import build_combiner

    cfg = Namespace(eval_combiner="trime", eval_temperature=1.0, ext_temperature=2.5, memory_lambda=0.0)
    assert build_combiner(cfg).ext_temperature == 2.5
    points = parse_grid("trime", ["tau=1", "ext_tau=0,2"])
    assert [make_combiner("trime", p).ext_temperature for p in points] == [None, 2.0]
