"""Long-term memory: consecutive-segment batching, the long-memory loss, eval with long memory."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_dictionary, make_model
from test_trime_loss import brute_force_log_prob, criterion_for
from trime_fairseq.data.stream import DocumentSegments, StreamBlocks, TokenStream
from trime_fairseq.memory.combiners import CacheCombiner, TrimeCombiner
from trime_fairseq.memory.long_term import LongTermMemory, MemoryOrderError
from trime_fairseq.models.capture import get_capture
from trime_fairseq.models.memory_eval import MemoryEvalModel


class Lines:
    """A stand-in for fairseq's indexed dataset of lines."""

    def __init__(self, lines):
        self.lines = [torch.tensor(l, dtype=torch.long) for l in lines]
        self.sizes = np.array([len(l) for l in lines])

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        return self.lines[i]


def make_stream(d, doc_lengths, seed=0):
    """Documents of random lines, separated by empty lines (a lone eos), as fairseq writes."""
    rnd = np.random.RandomState(seed)
    lines = []
    for n in doc_lengths:
        left = n
        while left > 0:
            k = max(2, min(left, rnd.randint(3, 7)))  # never a lone eos inside a document
            lines.append(list(rnd.randint(d.nspecial, d.nspecial + 6, size=k - 1)) + [d.eos()])
            left -= k
        lines.append([d.eos()])
    return TokenStream.from_lines(Lines(lines), d.eos())


def test_stream_document_ids():
    d = make_dictionary(20)
    s = make_stream(d, [10, 7, 12])
    assert s.num_docs == 3
    # ids are non-decreasing, change exactly after each separator line
    assert (np.diff(s.docs) >= 0).all()
    change = np.flatnonzero(np.diff(s.docs)) + 1
    assert (s.tokens[change - 1] == d.eos()).all() and (s.tokens[change - 2] == d.eos()).all()


def test_segments_stay_inside_documents_and_runs_are_consecutive():
    d = make_dictionary(20)
    s = make_stream(d, [23, 5, 40, 9], seed=1)
    seg = DocumentSegments(s, length=8, pad=d.pad(), group=3)
    covered = []
    for i in range(len(seg)):
        item = seg[i]
        a = int(seg.starts[i])
        n = int(seg.sizes[i])
        assert len(set(s.docs[a:a + n + 1])) == 1  # source and target in one document
        assert torch.equal(item["target"][:-1], item["source"][1:])
        covered.extend(range(a, a + n))
    # every token except each document's last is a source exactly once
    expected = [p for p in range(len(s) - 1) if s.docs[p + 1] == s.docs[p]]
    assert sorted(covered) == expected
    for epoch in (1, 2):
        batches = seg.batches(groups_per_batch=2, seed=3, epoch=epoch, shuffle=True)
        for b in batches:
            assert len(b) % 3 == 0
            for k in range(0, len(b), 3):
                run = b[k:k + 3]
                assert list(run) == list(range(run[0], run[0] + 3))  # in order, consecutive
        flat = np.concatenate(batches)
        assert len(set(flat)) == len(flat) == (len(seg) // 3) * 3
    a = np.concatenate(seg.batches(2, seed=3, epoch=1, shuffle=True))
    b = np.concatenate(seg.batches(2, seed=3, epoch=2, shuffle=True))
    assert not np.array_equal(a, b)  # groups are reshuffled between epochs
    batch = seg.collater([seg[i] for i in seg.batches(2, 3, 1, True)[0]])
    assert batch["trime_memory"]["mode"] == "long" and batch["trime_memory"]["segments_per_group"] == 3


def test_segments_across_documents_are_the_unpadded_stream():
    d = make_dictionary(20)
    s = make_stream(d, [23, 5, 40, 9], seed=1)
    per_doc = DocumentSegments(s, length=8, pad=d.pad(), group=3)
    seg = DocumentSegments(s, length=8, pad=d.pad(), group=3, across_documents=True)
    # the stream cut every 8 tokens: every token but the last is a source exactly once
    assert list(seg.starts) == list(range(0, len(s) - 1, 8))
    assert (seg.sizes[:-1] == 8).all() and int(seg.sizes.sum()) == len(s) - 1
    assert len(seg) < len(per_doc)  # no segment is cut short at a document boundary
    spans = [len(set(s.docs[int(a):int(a) + int(n) + 1])) for a, n in zip(seg.starts, seg.sizes)]
    assert max(spans) > 1  # some segment runs across a boundary
    batch = seg.collater([seg[i] for i in seg.groups()[0]])
    assert int(batch["target"].eq(d.pad()).sum()) == 0
    assert batch["trime_memory"]["mode"] == "long"


@pytest.mark.parametrize("across", [False, True])
def test_long_memory_loss_equals_brute_force(across):
    d = make_dictionary(30)
    model = make_model(d).double()
    s = make_stream(d, [30, 6, 25], seed=2)
    seg = DocumentSegments(s, length=7, pad=d.pad(), group=3, across_documents=across)
    idx = np.concatenate(seg.groups()[:3])
    sample = seg.collater([seg[i] for i in idx])
    # the true documents of the rows: a run mixes documents, which see each other only across
    docs = torch.LongTensor([seg[i]["doc"] for i in idx])
    assert len(set(docs.tolist())) > 1
    same_doc = (lambda a, b: True) if across else (lambda a, b: a == b)
    crit = criterion_for(d)
    loss, _, _ = crit(model, sample)

    capture = get_capture(model)
    net_output = model(**sample["net_input"])
    g = capture.take()
    logits = net_output[0]
    target = sample["target"]
    B, L = target.shape
    ref = 0.0
    for k in range(0, B, 3):
        rows = range(k, k + 3)
        flat_logits = torch.cat([logits[r] for r in rows])
        flat_g = torch.cat([g[r] for r in rows])
        flat_t = torch.cat([target[r] for r in rows])
        flat_doc = torch.cat([docs[r].repeat(L) for r in rows])
        lp = brute_force_log_prob(
            flat_logits, flat_g, flat_t, lambda i, j: j < i and same_doc(flat_doc[i], flat_doc[j]), d.pad())
        ref -= lp[flat_t.ne(d.pad())].sum().item()
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    local_only, _, _ = crit(model, {k: v for k, v in sample.items() if k != "trime_memory"})
    assert local_only.item() != pytest.approx(loss.item(), rel=1e-6)


def eval_rows(wrapper, blocks, batch_size):
    """Run the wrapper like SequenceScorer over StreamBlocks; return {position: logprob}."""
    out = {}
    for k in range(0, len(blocks), batch_size):
        sample = blocks.collater([blocks[i] for i in range(k, min(k + batch_size, len(blocks)))])
        lp = wrapper.get_normalized_probs(wrapper(**sample["net_input"]), True, sample)
        tl = lp.gather(-1, sample["target"].unsqueeze(-1)).squeeze(-1)
        for b in range(tl.size(0)):
            for t in range(tl.size(1)):
                if sample["target"][b, t] != blocks.pad:
                    out[int(sample["positions"][b, t])] = tl[b, t].item()
    return out


@pytest.mark.parametrize("size,across,top_k", [(5, False, 0), (1000, False, 0), (5, True, 0), (1000, True, 0),
                                               (1000, False, 3), (5, True, 2)])
def test_eval_with_long_memory_equals_brute_force(size, across, top_k):
    """Eq. 6 over local + long-term memory against a per-token sum; ``top_k``: each query
    reads only its ``top_k`` most similar long-term entries (``--long-memory-top-k``)."""
    d = make_dictionary(30)
    model = make_model(d).double()
    s = make_stream(d, [37, 8, 29], seed=4)
    blocks = StreamBlocks(s, block=6, context=4, pad=d.pad())
    tau = 0.8
    # brute force: run every block alone, remember g of each scored token from its own block
    capture = get_capture(model)
    g_scored, rows = {}, []
    for i in range(len(blocks)):
        sample = blocks.collater([blocks[i]])
        logits = model(**sample["net_input"])[0][0]
        g = capture.take()[0]
        rows.append((sample, logits, g))
        for t in range(sample["target"].size(1)):
            if sample["target"][0, t] != d.pad():
                g_scored[int(sample["positions"][0, t])] = g[t]
    ref = {}
    for sample, logits, g in rows:
        src, tgt = sample["net_input"]["src_tokens"][0], sample["target"][0]
        pos, docs = sample["positions"][0], sample["doc_ids"][0]
        ctx_start = int(pos[0])
        for t in range(tgt.size(0)):
            if tgt[t] == d.pad():
                continue
            p = int(pos[t])
            num = math.exp(logits[t, tgt[t]].item())
            den = torch.logsumexp(logits[t], 0).exp().item()
            terms = []
            for j in range(t):  # local: the window and the block so far (this block's g)
                label = int(tgt[j]) if tgt[j] != d.pad() else int(src[j + 1])
                terms.append((g[t] @ g[j], label))
            older = [q for q in range(ctx_start) if (across or s.docs[q] == int(docs[t])) and q in g_scored]
            long_terms = [(g[t] @ g_scored[q], int(s.tokens[q + 1])) for q in older[-size:]]
            if top_k:  # long: same document (any: across), before the window, newest `size`
                long_terms = sorted(long_terms, key=lambda e: -e[0].item())[:top_k]
            terms += long_terms
            for sim, label in terms:
                e = math.exp(sim.item() / math.sqrt(g.size(-1)) / tau)
                den += e
                num += e if label == int(tgt[t]) else 0.0
            ref[p] = math.log(num / den)
    for bsz in (1, 3):
        wrapper = MemoryEvalModel(model, TrimeCombiner(tau, long_top_k=top_k), d.pad(), long_memory_size=size,
                                  across_documents=across)
        got = eval_rows(wrapper, blocks, bsz)
        assert set(got) == set(ref)
        for p in ref:
            assert got[p] == pytest.approx(ref[p], abs=1e-9), p
    if top_k:  # the cut changes some token's probability
        whole = eval_rows(MemoryEvalModel(model, TrimeCombiner(tau), d.pad(), long_memory_size=size,
                                          across_documents=across), blocks, 1)
        assert any(whole[p] != pytest.approx(ref[p], abs=1e-9) for p in ref)
    if across:  # the first block of the second document sees the first document
        start = int(s.doc_starts[1])
        per_doc = eval_rows(MemoryEvalModel(model, TrimeCombiner(tau), d.pad(), long_memory_size=size), blocks, 1)
        later = [p for p in ref if p >= start + 12]
        assert any(per_doc[p] != pytest.approx(ref[p], abs=1e-9) for p in later)


def test_long_memory_resets_at_document_boundaries_and_checks_order():
    mem = LongTermMemory(size=100, context=0)
    keys = {"g": torch.randn(4, 2), "f": torch.randn(4, 2)}
    mem.update(keys, torch.tensor([5, 6, 7, 8]), positions=torch.arange(4), docs=torch.tensor([0, 0, 1, 1]))
    assert mem.window(4, doc=1).labels.tolist() == [7, 8]  # doc 0 dropped
    assert mem.window(4, doc=0) is None
    assert mem.window(3, doc=1).labels.tolist() == [7]  # entries inside the window excluded
    with pytest.raises(MemoryOrderError):
        mem.update(keys, torch.tensor([1, 2, 3, 4]), positions=torch.arange(10, 14), docs=torch.ones(4, dtype=torch.long))
    mem.update(keys, torch.tensor([1, 2, 3, 4]), positions=torch.arange(4), docs=torch.zeros(4, dtype=torch.long))  # restart
    assert mem.window(4, doc=0).labels.tolist() == [1, 2, 3, 4]
    stream = LongTermMemory(size=100, context=0, across_documents=True)
    stream.update(keys, torch.tensor([5, 6, 7, 8]), positions=torch.arange(4), docs=torch.tensor([0, 0, 1, 1]))
    assert stream.window(4, doc=1).labels.tolist() == [5, 6, 7, 8]  # doc 0 kept
    assert stream.window(3, doc=7).labels.tolist() == [5, 6, 7]
    small = LongTermMemory(size=2, context=1)
    small.update(keys, torch.tensor([5, 6, 7, 8]), positions=torch.arange(4), docs=torch.zeros(4, dtype=torch.long))
    assert small.window(3, doc=0).labels.tolist() == [6, 7]


def test_cache_with_long_memory_runs_and_differs_from_local():
    d = make_dictionary(30)
    model = make_model(d).double()
    s = make_stream(d, [60], seed=5)
    blocks = StreamBlocks(s, block=6, context=2, pad=d.pad())
    local = eval_rows(MemoryEvalModel(model, CacheCombiner(0.3, 0.1), d.pad()), blocks, 2)
    long = eval_rows(MemoryEvalModel(model, CacheCombiner(0.3, 0.1), d.pad(), long_memory_size=50), blocks, 2)
    first_block = [p for p in local if p < 6]
    assert all(local[p] == pytest.approx(long[p]) for p in first_block)  # nothing older yet
    assert any(local[p] != pytest.approx(long[p]) for p in local if p > 20)


def test_bad_long_memory_flags():
    from trime_fairseq.tasks.trime_lm import check_memory_flags

    base = dict(long_memory_size=0, eval_memory="local", consecutive_segments=1)
    with pytest.raises(ValueError, match="--long-memory-size"):
        check_memory_flags(SimpleNamespace(**dict(base, long_memory_size=-5)))
    with pytest.raises(ValueError, match="--long-memory-size"):
        check_memory_flags(SimpleNamespace(**dict(base, eval_memory="local+long")))
    with pytest.raises(ValueError, match="--consecutive-segments"):
        check_memory_flags(SimpleNamespace(**dict(base, consecutive_segments=0)))
    with pytest.raises(ValueError, match="--long-memory-size"):
        LongTermMemory(size=-1)
    top = dict(base, eval_combiner="trime", long_memory_top_k=8)
    with pytest.raises(ValueError, match="--long-memory-top-k .*--eval-memory local\\+long"):
        check_memory_flags(SimpleNamespace(**top))
    with pytest.raises(ValueError, match="--long-memory-top-k must be >= 0"):
        check_memory_flags(SimpleNamespace(**dict(top, long_memory_top_k=-1)))
    with pytest.raises(ValueError, match="--long-memory-top-k applies to --eval-combiner trime"):
        check_memory_flags(SimpleNamespace(**dict(top, eval_memory="local+long", long_memory_size=10,
                                                  eval_combiner="cache")))
    check_memory_flags(SimpleNamespace(**dict(top, eval_memory="local+long", long_memory_size=10)))
    with pytest.raises(ValueError, match="--long-memory-top-k"):
        TrimeCombiner(1.0, long_top_k=-2)
    from trime_fairseq.cli.tune import make_combiner, parse_grid

    assert [make_combiner("trime", p).long_top_k for p in parse_grid("trime", ["tau=1", "long_k=0,16"])] == [0, 16]
    with pytest.raises(ValueError, match="--grid long_k"):
        make_combiner("trime", {"tau": 1.0, "long_k": 2.5})


def test_train_and_eval_long_memory_through_fairseq(tmp_path):
    from helpers import REPO, run_cli, write_tiny_corpus

    user_dir = str(REPO / "trime_fairseq")
    data = write_tiny_corpus(tmp_path / "corpus", n_docs=30)
    base = ["fairseq_cli.train", str(data), "--user-dir", user_dir, "--task", "trime_lm",
            "--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss",
            "--optimizer", "adam", "--lr", "3e-3", "--tokens-per-sample", "16", "--cpu",
            "--save-dir", str(tmp_path / "ckpt"), "--no-epoch-checkpoints", "--max-update", "6"]
    bad = run_cli([*base, "--consecutive-segments", "8", "--batch-size", "4"], check=False)
    assert bad.returncode != 0
    assert "--consecutive-segments 8 is larger than the batch" in bad.stderr.strip().splitlines()[-1]
    run_cli([*base, "--consecutive-segments", "4", "--batch-size", "8"])
    ev = ["fairseq_cli.eval_lm", str(data), "--path", str(tmp_path / "ckpt" / "checkpoint_last.pt"),
          "--user-dir", user_dir, "--task", "trime_lm", "--tokens-per-sample", "16",
          "--context-window", "8", "--gen-subset", "valid", "--cpu", "--eval-combiner", "trime"]
    ppl = {}
    for name, extra in (("local", []), ("long", ["--eval-memory", "local+long", "--long-memory-size", "200"])):
        for bsz in ("1", "7"):
            out = run_cli([*ev, *extra, "--batch-size", bsz])
            ppl[name, bsz] = float(out.stderr.split("Perplexity: ")[-1].split()[0])
    assert ppl["local", "1"] == pytest.approx(ppl["local", "7"], rel=1e-4)
    assert ppl["long", "1"] == pytest.approx(ppl["long", "7"], rel=1e-4)
    assert ppl["long", "1"] != pytest.approx(ppl["local", "1"], rel=1e-4)
    bad = run_cli([*ev, "--eval-memory", "local+long"], check=False)
    assert bad.returncode != 0 and "--long-memory-size" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["plain", "positions", "long", "external"])
def test_collated_tensors_can_be_pinned(kind):
    """fairseq's DataLoader pins batches (pin_memory=True) on GPU machines, which refuses a
    tensor whose elements share memory (an ``expand``-ed view): every collated tensor must
    own its elements. (The Memorizing Transformer's ``mem_docs`` was such a view.)"""
    tokens = torch.arange(4, 4 + 60).remainder(20).add(4).numpy()
    docs = np.repeat(np.arange(3), [25, 20, 15])
    ds = DocumentSegments(TokenStream.from_doc_ids(tokens, docs), 6, 1, group=2 if kind == "long" else 1,
                          external=kind == "external")
    ds.with_positions = kind == "positions"
    batch = ds.collater([ds[i] for i in range(4)])

    def tensors(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)

    found = list(tensors(batch))
    assert found
    for t in found:
        assert t.is_contiguous() and torch._debug_has_internal_overlap(t) != 1, t.stride()
