"""In-batch memory as key ranges (RangeLayout): the same memory, losses and gradients as the
dense mask, with positives as index pairs."""
import pytest
import torch

from trime_fairseq.memory.in_batch import InBatchMemory, RangeLayout, group_batch, in_batch_log_prob
from trime_fairseq.memory.joint import NEG_INF, DenseLayout, chunked_joint_target_log_prob

PAD = 1


def memories():
    """(name, memory, key_valid, key_labels, target, n_queries): one of each layout kind."""
    torch.manual_seed(0)
    T = 12
    target = torch.randint(2, 6, (3, T))
    target[2, -2:] = PAD
    valid = target.ne(PAD)
    out = [("local", InBatchMemory("local"), valid, target, target)]
    doc = torch.tensor([[0] * 5 + [1] * 7, [4] * 12, [2] * 3 + [3] * 9])
    out.append(("long", InBatchMemory("long", doc_id=doc), valid, target, target))
    flat_t = target.reshape(1, -1)
    seg = torch.arange(3).repeat_interleave(T).unsqueeze(0)
    keep = torch.tensor([True, False, True]).repeat_interleave(T).unsqueeze(0)
    out.append(("external", InBatchMemory("external", seg_id=seg, keep_local=keep), flat_t.ne(PAD), flat_t, flat_t))
    # this worker's rows are segments 1-2 of a gathered batch whose keys are segments 0-3
    keys_t = torch.randint(2, 6, (1, 4 * T))
    key_seg = torch.arange(4).repeat_interleave(T).unsqueeze(0)
    worker = InBatchMemory("external", seg_id=key_seg[:, T:3 * T], keep_local=keep[:, :2 * T],
                           key_seg_id=key_seg, query_offset=T)
    out.append(("external, gathered", worker, keys_t.ne(PAD), keys_t, keys_t[:, T:3 * T]))
    placeholder = InBatchMemory("external", seg_id=torch.full((1, 2 * T), -1), key_seg_id=key_seg, query_offset=0)
    out.append(("external, placeholder rows", placeholder, keys_t.ne(PAD), keys_t, keys_t[:, T:3 * T]))
    return out


@pytest.mark.parametrize("case", memories(), ids=lambda c: c[0])
def test_ranges_are_the_dense_mask(case):
    _, memory, valid, labels, target = case
    n_queries, n_keys = target.size(1), valid.size(1)
    lo, hi, tail = memory.ranges(valid)
    k = torch.arange(n_keys)
    from_ranges = valid[:, None, :] & (((k >= lo[..., None]) & (k < hi[..., None])) | (k >= tail[..., None]))
    dense = memory.mask(0, n_queries, n_keys, valid)
    assert torch.equal(from_ranges, dense)
    # chunk by chunk: in-place masking in the layout's window, and the positives as pairs
    cached = RangeLayout(lo, hi, tail, valid, labels, target, max_pair_share=1.0)
    uncached = RangeLayout(lo, hi, tail, valid, labels, target, max_pair_share=1.0, mask_cache_bytes=0)
    # twice each: the second fill of a chunk (the backward's recompute) reads the kept mask
    for layout, q0, q1 in [(layout, *c) for layout in (cached, cached, uncached) for c in ((0, 5), (5, n_queries))]:
        k_end = memory.key_end(q1, n_keys)
        k0, k1 = layout.window(q0, q1, k_end)
        assert not dense[:, q0:q1, :k0].any() and not dense[:, q0:q1, k1:].any()
        scores = torch.zeros(valid.size(0), q1 - q0, k1 - k0)
        layout.fill_(scores, q0, q1, k0)
        assert torch.equal(scores.ne(NEG_INF), dense[:, q0:q1, k0:k1])
        block, row = layout.pairs(q0, q1, k0, k1)
        positive = torch.zeros_like(scores, dtype=torch.bool).view(-1)
        positive[block] = True
        expected = dense[:, q0:q1, k0:k1] & labels[:, None, k0:k1].eq(target[:, q0:q1, None])
        assert torch.equal(positive.view_as(scores), expected)
        assert torch.equal(row, block // (k1 - k0))
    kept = [t for m in uncached._masks.values() for t in m[1:] if t is not None]
    assert not kept and len(cached._masks) == 2  # only masks with nothing to mask fit a budget of 0
    capped = RangeLayout(lo, hi, tail, valid, labels, target, max_pairs=0)
    assert capped.pairs(0, 5, *capped.window(0, 5, memory.key_end(5, n_keys))) is None


def test_documents_split_in_two_runs_fall_back_to_the_dense_mask():
    doc = torch.tensor([[0, 0, 1, 1, 0, 0]])
    memory = InBatchMemory("long", doc_id=doc)
    valid = torch.ones(1, 6, dtype=torch.bool)
    assert memory.ranges(valid) is None
    assert isinstance(memory.layout(valid, doc, doc), DenseLayout)


@pytest.mark.parametrize("case", memories(), ids=lambda c: c[0])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("share", [1.0, 0.0])  # positives as pairs / compared densely
def test_range_layout_gives_the_dense_losses_and_gradients(case, keep, share):
    _, memory, valid, labels, target = case
    torch.manual_seed(1)
    groups, n_queries, n_keys, dim = valid.size(0), target.size(1), valid.size(1), 3
    queries = torch.randn(groups, n_queries, dim, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(groups, n_keys, dim, dtype=torch.float64, requires_grad=True)
    tt = torch.randn(groups, n_queries, dtype=torch.float64, requires_grad=True)
    tl = (tt.detach() + 1.0).requires_grad_(True)
    chunks = [(q0, min(q0 + 5, n_queries), memory.key_end(min(q0 + 5, n_queries), n_keys))
              for q0 in range(0, n_queries, 5)]
    ranged = RangeLayout(*memory.ranges(valid), valid, labels, target, max_pair_share=share)
    dense = DenseLayout(lambda q0, q1, k_end: memory.mask(q0, q1, k_end, valid))

    def fn(layout):
        def f(tt, tl, q, k):
            lp, den = chunked_joint_target_log_prob(tt, tl, q, k, labels, target, layout, chunks, temperature=0.7,
                                                    recompute_above=10 ** 9 if keep else 0)
            return (lp * torch.linspace(0.5, 1.5, n_queries)).sum() + 0.3 * den.sum()
        return f

    inputs = (tt, tl, queries, keys)
    got, want = fn(ranged)(*inputs), fn(dense)(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got, inputs)
    for a, b in zip(grads, torch.autograd.grad(want, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if share:  # the sparse positives' own backward (the dense one is checked in test_trime_loss)
        assert torch.autograd.gradcheck(fn(ranged), inputs, eps=1e-6, atol=1e-6)


def test_in_batch_loss_uses_ranges_and_matches_dense():
    """The criterion's path (group_batch -> in_batch_log_prob) for BM25-like batches."""
    torch.manual_seed(2)
    B, L, dim = 4, 16, 8
    target = torch.randint(2, 40, (B, L))  # enough labels for the pairs to be sparse
    target[3, -3:] = PAD
    reps = torch.randn(B, L, dim, dtype=torch.float64, requires_grad=True)
    tt, tl = torch.randn(B, L, dtype=torch.float64), torch.randn(B, L, dtype=torch.float64) + 2
    spec = {"mode": "external", "keep_local": torch.tensor([True, False, True, False])}
    (a, b, r, t), memory = group_batch((tt, tl, reps, target), spec, target)
    layout = memory.layout(t.ne(PAD), t, t)
    assert isinstance(layout, RangeLayout) and layout.pairs(0, 16, 0, B * L) is not None
    got = in_batch_log_prob(a, b, r, t, memory, PAD, chunk_size=16)
    memory_dense = InBatchMemory("external", seg_id=memory.seg_id, keep_local=memory.keep_local)
    memory_dense.ranges = lambda key_valid: None  # force the dense mask
    want = in_batch_log_prob(a, b, r, t, memory_dense, PAD, chunk_size=16)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
