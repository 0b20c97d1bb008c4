"""The Memorizing Transformer variant."""
import argparse
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import USER_DIR
from helpers import make_dictionary, make_model, random_tokens, run_cli
from trime_fairseq.memory.knn_memory import MEMORIZING_DEFAULTS, KnnMemory, search_recall
from trime_fairseq.models.memorizing import (
    DEPRECATED_NAMES, KnnAugmentedAttention, MemorizingTransformerLanguageModel, memorizing_tiny,
    resolve_memorizing_args)


def make_memorizing(d, memory_size=64, topk=4, seed=0):
    torch.manual_seed(seed)
    args = argparse.Namespace(tokens_per_sample=128, memorizing_memory_size=memory_size, memorizing_topk=topk, memorizing_layer=-1)
    memorizing_tiny(args)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    return MemorizingTransformerLanguageModel.build_model(args, task).eval()


def stream_inputs(tokens, docs, start_pos):
    b, t = tokens.shape
    pos = torch.arange(t).unsqueeze(0) + torch.tensor(start_pos).unsqueeze(1)
    return {"src_tokens": tokens, "src_lengths": torch.full((b,), t),
            "mem_docs": torch.tensor(docs).unsqueeze(1).expand(b, t), "mem_positions": pos}


def test_without_memory_equals_plain_transformer():
    d = make_dictionary(30)
    plain = make_model(d, seed=3)
    mem = make_memorizing(d)
    missing, unexpected = mem.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("mem_" in k for k in missing)
    x = random_tokens(d, 2, 9, seed=1)
    ref = plain(x)[0]
    torch.testing.assert_close(mem(x)[0], ref)  # no stream inputs: a plain transformer
    off = make_memorizing(d, memory_size=0)
    off.load_state_dict(plain.state_dict(), strict=False)
    for _ in range(2):  # memory size 0, even with stream inputs and a second segment
        torch.testing.assert_close(off(**stream_inputs(x, [0, 1], [0, 0]))[0], ref)
    # with memory but nothing stored yet, the first segment is also exactly the plain model
    torch.testing.assert_close(mem(**stream_inputs(x, [0, 1], [0, 0]))[0], ref)


def test_retrieval_and_memory_attention_equal_brute_force():
    torch.manual_seed(0)
    rows, heads, dim, size, k = 2, 2, 5, 10, 4  # the tiny model has 2 heads
    mem = KnnMemory(size, k)
    keys, values = torch.randn(rows, heads, 7, dim), torch.randn(rows, heads, 7, dim)
    pos = torch.arange(7).repeat(rows, 1)
    mem.update(keys, values, keep=torch.ones(rows, 7, dtype=torch.bool), positions=pos, docs=torch.zeros(rows, 7, dtype=torch.long))
    q = torch.randn(rows, heads, 3, dim)
    scores, vals, found = mem.topk(q, before=torch.tensor([7, 5]), query_docs=torch.zeros(rows, 3, dtype=torch.long))
    for r in range(rows):
        limit = [7, 5][r]  # row 1: entries at positions >= 5 are in its local window
        for h in range(heads):
            kn = F.normalize(keys[r, h, :limit], dim=-1)
            sims = F.normalize(q[r, h], dim=-1) @ kn.T
            top = sims.topk(k, dim=-1)
            torch.testing.assert_close(scores[r, h], top.values)
            torch.testing.assert_close(vals[r, h], values[r, h, :limit][top.indices])
    assert found.all()
    # the attention over retrieved entries: softmax of scale * score, then the gate
    d = make_dictionary(20)
    layer = make_memorizing(d).knn_attention
    layer.memory = mem
    layer.stream = {"before": torch.tensor([7, 5]), "docs": torch.zeros(rows, 3, dtype=torch.long)}
    with torch.no_grad():
        layer.mem_log_scale.copy_(torch.tensor([0.0, 1.0]))
    out, has = layer.memory_attention(q)
    for r in range(rows):
        for h in range(heads):
            w = torch.softmax(scores[r, h] * math.exp(float(h)), dim=-1)
            torch.testing.assert_close(out[r, h], (w.unsqueeze(-1) * vals[r, h]).sum(-2))


def test_gate_interpolates():
    d = make_dictionary(20)
    layer = make_memorizing(d).knn_attention
    local, memory = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    has = torch.tensor([True, True, False, True]).view(1, 1, 4, 1).expand(1, 2, 4, 1)
    with torch.no_grad():
        layer.mem_gate.copy_(torch.tensor([0.0, 2.0]))
    out = layer.mix(local, memory, has)
    g = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(out[0, 0, 0], 0.5 * memory[0, 0, 0] + 0.5 * local[0, 0, 0])
    torch.testing.assert_close(out[0, 1, 1], g * memory[0, 1, 1] + (1 - g) * local[0, 1, 1])
    torch.testing.assert_close(out[0, :, 2], local[0, :, 2])  # no memory found: local only


def test_gate_and_scale_init_and_param_scale_speed_up_adam():
    d = make_dictionary(20)
    args = argparse.Namespace(tokens_per_sample=128, memorizing_memory_size=16, memorizing_topk=4, memorizing_layer=-1,
                              memorizing_gate_init=0.2, memorizing_scale_init=12.0, memorizing_param_scale=10.0)
    memorizing_tiny(args)
    task = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    layer = MemorizingTransformerLanguageModel.build_model(args, task).knn_attention
    torch.testing.assert_close(layer.gate(), torch.full((2,), 0.2))
    torch.testing.assert_close(layer.memory_scale(), torch.full((2,), 12.0))
    # one Adam step of lr 1e-3 moves the gate's logit b by ~10 x 1e-3, not 1e-3
    before = torch.logit(layer.gate()).detach()
    opt = torch.optim.Adam([layer.mem_gate], lr=1e-3)
    layer.gate().sum().backward()
    opt.step()
    moved = (torch.logit(layer.gate()).detach() - before).abs()
    torch.testing.assert_close(moved, torch.full((2,), 1e-2), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="--memorizing-gate-init"):
        KnnAugmentedAttention(16, 2, 8, 2, gate_init=1.0)
    with pytest.raises(ValueError, match="--memorizing-param-scale"):
        KnnAugmentedAttention(16, 2, 8, 2, param_scale=0.0)


def test_memory_resets_per_document_and_rows_never_mix():
    d = make_dictionary(30)
    model = make_memorizing(d, memory_size=32)
    a, b = random_tokens(d, 2, 6, seed=1), random_tokens(d, 2, 6, seed=2)
    model(**stream_inputs(a, [0, 1], [0, 0]))
    mem = model.knn_attention.memory
    assert mem.count.tolist() == [6, 6] and mem.docs.tolist() == [0, 1]
    assert not mem.keys.requires_grad and not mem.values.requires_grad  # stored without gradient
    out1 = model(**stream_inputs(b, [0, 2], [6, 6]))[0]  # row 1 starts document 2
    assert mem.docs.tolist() == [0, 2] and mem.count.tolist() == [12, 6]
    # row 1's new document saw no memory: it equals a fresh model on that segment
    fresh = make_memorizing(d, memory_size=32)
    torch.testing.assert_close(fresh(**stream_inputs(b[1:], [2], [6]))[0][0], out1[1])
    # row 0 never sees row 1: changing row 1's history leaves row 0 unchanged
    other = make_memorizing(d, memory_size=32)
    a2 = a.clone()
    a2[1] = random_tokens(d, 1, 6, seed=9)[0]
    other(**stream_inputs(a2, [0, 1], [0, 0]))
    out2 = other(**stream_inputs(b, [0, 1], [6, 6]))[0]
    ref = make_memorizing(d, memory_size=32)
    ref(**stream_inputs(a, [0, 1], [0, 0]))
    torch.testing.assert_close(out2[0], ref(**stream_inputs(b, [0, 1], [6, 6]))[0][0])


def test_no_gradient_reaches_stored_memory():
    d = make_dictionary(30)
    model = make_memorizing(d, memory_size=32).train()
    a, b = random_tokens(d, 2, 6, seed=1), random_tokens(d, 2, 6, seed=2)
    model(**stream_inputs(a, [0, 1], [0, 0]))[0].sum().backward()
    model.zero_grad()
    out = model(**stream_inputs(b, [0, 1], [6, 6]))[0]
    out.sum().backward()  # the first step's graph is not reached (it would raise if it were freed)
    layer = model.knn_attention
    assert layer.mem_gate.grad is not None and layer.mem_gate.grad.abs().sum() > 0
    assert layer.mem_log_scale.grad is not None


def test_bad_flags():
    d = make_dictionary(10)
    with pytest.raises(ValueError, match="--memorizing-memory-size"):
        KnnMemory(-1, 4)
    with pytest.raises(ValueError, match="--memorizing-topk"):
        KnnMemory(8, 0)
    args = argparse.Namespace(tokens_per_sample=16, memorizing_memory_size=8, memorizing_topk=2, memorizing_layer=7)
    memorizing_tiny(args)
    with pytest.raises(ValueError, match="--memorizing-layer"):
        MemorizingTransformerLanguageModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))


def test_train_and_eval_through_fairseq(tiny_lm, tmp_path):
    data = tiny_lm[0]
    run_cli(["fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
             "--arch", "memorizing_transformer_lm_tiny", "--memorizing-memory-size", "64", "--memorizing-topk", "4",
             "--criterion", "cross_entropy", "--stream-batching", "--batch-size", "4", "--tokens-per-sample", "16",
             "--optimizer", "adam", "--lr", "3e-3", "--max-update", "6", "--save-dir", str(tmp_path),
             "--no-epoch-checkpoints", "--cpu"])
    ev = ["fairseq_cli.eval_lm", str(data), "--path", str(tmp_path / "checkpoint_last.pt"), "--user-dir", USER_DIR,
          "--task", "trime_lm", "--tokens-per-sample", "16", "--context-window", "8", "--gen-subset", "valid", "--cpu"]
    ppl = {}
    for size in ("0", "64", "512"):
        for bsz in ("1", "6"):
            out = run_cli([*ev, "--batch-size", bsz, "--model-overrides", f"{{'memorizing_memory_size': {size}}}"])
            ppl[size, bsz] = float(re.search(r"Perplexity: ([0-9.]+)", out.stderr).group(1))
    for size in ("0", "64", "512"):
        assert ppl[size, "1"] == pytest.approx(ppl[size, "6"], rel=1e-4)
    assert ppl["64", "1"] != pytest.approx(ppl["0", "1"], rel=1e-4)
    # the same memory searched through faiss (exact flat index): the same perplexity
    out = run_cli([*ev, "--batch-size", "1", "--model-overrides",
                   "{'memorizing_memory_size': 64, 'memorizing_search': 'faiss', 'memorizing_faiss_factory': 'Flat'}"])
    assert "faiss Flat per (row, head)" in out.stderr
    assert float(re.search(r"Perplexity: ([0-9.]+)", out.stderr).group(1)) == pytest.approx(ppl["64", "1"], rel=1e-4)
    # a checkpoint saved before the rename (its model config holds the --knn-* names) loads and
    # scores the same, and takes memory overrides under the old names
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    model_cfg = state["cfg"]["model"]
    for old, new in DEPRECATED_NAMES.items():
        model_cfg[old] = model_cfg.pop(new)
    assert model_cfg["knn_memory_size"] == 64
    torch.save(state, tmp_path / "old.pt")
    old_ev = [*ev, "--batch-size", "1"]
    old_ev[old_ev.index("--path") + 1] = str(tmp_path / "old.pt")
    for overrides, size in (("{}", "64"), ("{'knn_memory_size': 512}", "512")):
        out = run_cli([*old_ev, "--model-overrides", overrides])
        assert "--knn-memory-size is deprecated" in out.stderr and "predates the --memorizing-* names" in out.stderr
        assert float(re.search(r"Perplexity: ([0-9.]+)", out.stderr).group(1)) == pytest.approx(ppl[size, "1"],
                                                                                                 rel=1e-4)


def test_old_flag_names_are_deprecated_aliases(caplog):
    from fairseq import options

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "data", "--user-dir", USER_DIR, "--task", "trime_lm", "--arch", "memorizing_transformer_lm_tiny",
        "--knn-memory-size", "64", "--knn-param-scale", "10", "--memorizing-topk", "4", "--knn-search", "torch"])
    assert (args.memorizing_memory_size, args.memorizing_param_scale, args.memorizing_topk,
            args.memorizing_search) == (64, 10.0, 4, "torch")
    assert args.knn_memory_size is None and args.knn_param_scale is None  # saved checkpoints carry the new names
    assert args.memorizing_gate_init == MEMORIZING_DEFAULTS["memorizing_gate_init"]
    assert "--knn-memory-size is deprecated" in caplog.text and "use --memorizing-memory-size" in caplog.text
    # a deprecated name given over a set new name (a --model-overrides of the old name) wins, with a warning
    ns = argparse.Namespace(memorizing_memory_size=64, knn_memory_size=512)
    resolve_memorizing_args(ns)
    assert ns.memorizing_memory_size == 512 and ns.knn_memory_size is None
    assert "--knn-memory-size 512 (deprecated name) replaces --memorizing-memory-size 64" in caplog.text
    assert {k: getattr(ns, k) for k in MEMORIZING_DEFAULTS} == {**MEMORIZING_DEFAULTS, "memorizing_memory_size": 512}


def filled_memory(search="torch", size=10, rows=2, heads=2, dim=5, segments=3, t=7, seed=0, **options):
    """A memory that has seen ``segments`` segments of ``t`` tokens per row (one document)."""
    g = torch.Generator().manual_seed(seed)
    mem = KnnMemory(size, 4, search=search, **options)
    history = []
    for s in range(segments):
        keys, values = torch.randn(rows, heads, t, dim, generator=g), torch.randn(rows, heads, t, dim, generator=g)
        pos = torch.arange(s * t, (s + 1) * t).repeat(rows, 1)
        mem.update(keys, values, keep=torch.ones(rows, t, dtype=torch.bool), positions=pos,
                   docs=torch.zeros(rows, t, dtype=torch.long))
        history.append((keys, values, pos))
    return mem, history


def brute_force(history, q, size, before, k):
    """Exact top-k over each row's newest ``size`` entries with position < before."""
    keys = torch.cat([h[0] for h in history], 2)[:, :, -size:]
    values = torch.cat([h[1] for h in history], 2)[:, :, -size:]
    pos = torch.cat([h[2] for h in history], 1)[:, -size:]
    out = []
    for r in range(q.size(0)):
        ok = pos[r] < before[r]
        sims = F.normalize(q[r], dim=-1) @ F.normalize(keys[r][:, ok], dim=-1).transpose(-1, -2)
        top = sims.topk(k, dim=-1)
        idx = top.indices.flatten(1)[..., None].expand(-1, -1, values.size(-1))
        out.append((top.values, values[r][:, ok].gather(1, idx).view(*top.indices.shape, -1)))
    return out


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_fifo_wraps_and_equals_brute_force(search):
    torch.manual_seed(0)
    mem, history = filled_memory(search, faiss_factory="Flat")  # 21 entries through a 10-slot FIFO
    assert mem.count.tolist() == [10, 10] and mem.inserted.tolist() == [21, 21]
    q = torch.randn(2, 2, 3, 5)
    before = torch.tensor([21, 18])  # row 1: the newest 3 entries are in its local window
    scores, vals, found = mem.topk(q, before=before, query_docs=torch.zeros(2, 3, dtype=torch.long))
    assert found.all()
    for r, (top, top_vals) in enumerate(brute_force(history, q, 10, before, 4)):
        torch.testing.assert_close(scores[r], top)
        torch.testing.assert_close(vals[r], top_vals)


def test_faiss_flat_equals_exact_torch_search():
    torch.manual_seed(0)
    mem, _ = filled_memory("faiss", size=64, rows=3, heads=2, dim=8, segments=5, t=24, faiss_factory="Flat")
    assert [idx.ntotal for row in mem._indexes for idx in row] == [64] * 6  # evicted ids were removed
    q = F.normalize(torch.randn(3, 2, 24, 8), dim=-1)
    docs = torch.zeros(3, 24, dtype=torch.long)
    docs[2, 10:] = 1  # row 2: later queries belong to another document, which has no memory
    before = torch.tensor([120, 110, 100])
    a_top, a_slots = mem.search_slots(q, before, docs, "faiss")
    e_top, e_slots = mem.search_slots(q, before, docs, "torch")
    torch.testing.assert_close(a_top, e_top)
    assert torch.equal(a_slots[torch.isfinite(e_top)], e_slots[torch.isfinite(e_top)])
    assert not torch.isfinite(a_top[2, :, 10:]).any() and torch.isfinite(a_top[2, :, :10]).all()
    assert search_recall(mem, q, before, docs) == 1.0


def test_faiss_ivf_recall_against_exact():
    torch.manual_seed(0)
    mem, _ = filled_memory("faiss", size=2048, rows=1, heads=2, dim=16, segments=5, t=512,
                           faiss_factory="IVF16,Flat", faiss_nprobe=4)
    assert mem._indexes[0][0].is_trained and mem._indexes[0][0].ntotal == 2048
    q = torch.randn(1, 2, 256, 16)
    recall = search_recall(mem, q, torch.tensor([10**6]), torch.zeros(1, 256, dtype=torch.long))
    assert 0.5 <= recall < 1.0  # 4 of 16 lists on random data: about 0.8
    mem.faiss_nprobe = 16
    for index in mem._indexes[0]:
        index.set_nprobe(16)
    assert search_recall(mem, q, torch.tensor([10**6]), torch.zeros(1, 256, dtype=torch.long)) == 1.0


def test_faiss_ivf_trains_once_memory_holds_enough_keys():
    torch.manual_seed(0)
    mem, _ = filled_memory("faiss", size=64, rows=1, segments=1, t=20, faiss_factory="IVF2,Flat", faiss_train_size=40)
    assert not mem._index_ready(0)  # exact torch search until then
    q = torch.randn(1, 2, 3, 5)
    scores, _, found = mem.topk(q, before=torch.tensor([100]), query_docs=torch.zeros(1, 3, dtype=torch.long))
    assert found.all()
    mem, history = filled_memory("faiss", size=64, rows=1, segments=3, t=20, faiss_factory="IVF2,Flat",
                                 faiss_train_size=40, faiss_nprobe=2)
    assert mem._index_ready(0) and mem._indexes[0][0].ntotal == 60
    scores, vals, found = mem.topk(q, before=torch.tensor([100]), query_docs=torch.zeros(1, 3, dtype=torch.long))
    top, top_vals = brute_force(history, q, 64, [100], 4)[0]
    torch.testing.assert_close(scores[0], top)  # all lists probed: exact


def test_faiss_index_without_remove_is_rebuilt():
    torch.manual_seed(0)
    mem, history = filled_memory("faiss", size=10, rows=1, segments=3, t=7, faiss_factory="HNSW8")
    assert not mem._removable and mem._indexes[0][0].ntotal == 10
    q = torch.randn(1, 2, 3, 5)
    scores, _, found = mem.topk(q, before=torch.tensor([21]), query_docs=torch.zeros(1, 3, dtype=torch.long))
    torch.testing.assert_close(scores[0], brute_force(history, q, 10, [21], 4)[0][0])  # tiny: HNSW is exact


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_memory_clears_at_document_boundary_and_rows_never_mix(search):
    torch.manual_seed(0)
    mem, _ = filled_memory(search, size=16, rows=2, segments=2, t=6, faiss_factory="Flat")
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(2, 2, 6, 5, generator=g), torch.randn(2, 2, 6, 5, generator=g)
    docs = torch.tensor([[0] * 6, [0, 0, 1, 1, 1, 1]])  # row 1: document 1 starts mid-segment
    mem.update(keys, values, keep=torch.ones(2, 6, dtype=torch.bool), positions=torch.arange(12, 18).repeat(2, 1),
               docs=docs)
    assert mem.count.tolist() == [16, 4] and mem.docs.tolist() == [0, 1]
    if search == "faiss":
        assert [idx.ntotal for idx in mem._indexes[1]] == [4, 4]
    # a query of row 1 (document 1) sees only document 1's four entries; row 1's old queries see nothing
    q = keys.clone()
    scores, vals, found = mem.topk(q, before=torch.tensor([18, 18]), query_docs=docs)
    assert found[0].all() and not found[1, :, :2].any() and found[1, :, 2:].all()
    torch.testing.assert_close(scores[1, :, 2:].max(-1).values, torch.ones(2, 4))  # each finds itself
    row1 = {tuple(v.tolist()) for v in values[1].reshape(-1, 5)[values[1].reshape(-1, 5).abs().sum(-1) > 0]}
    assert all(tuple(v.tolist()) not in row1 for v in vals[0].reshape(-1, 5))  # row 0 never returns row 1's
    # and row 0's results do not depend on what row 1 stored
    other, _ = filled_memory(search, size=16, rows=2, segments=2, t=6, faiss_factory="Flat")
    keys2, values2 = keys.clone(), values.clone()
    keys2[1], values2[1] = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    other.update(keys2, values2, keep=torch.ones(2, 6, dtype=torch.bool),
                 positions=torch.arange(12, 18).repeat(2, 1), docs=docs)
    scores2, vals2, _ = other.topk(q, before=torch.tensor([18, 18]), query_docs=docs)
    torch.testing.assert_close(scores2[0], scores[0])
    torch.testing.assert_close(vals2[0], vals[0])


def test_model_with_faiss_flat_equals_torch_search():
    d = make_dictionary(30)
    outs = {}
    for search in ("torch", "faiss"):
        model = make_memorizing(d, memory_size=8)
        model.knn_attention.memory = KnnMemory(8, 4, search=search, faiss_factory="Flat")
        segs = [random_tokens(d, 2, 6, seed=s) for s in (1, 2, 3)]
        outs[search] = [model(**stream_inputs(x, [0, 1], [6 * i, 6 * i]))[0] for i, x in enumerate(segs)]
    for a, b in zip(outs["torch"], outs["faiss"]):
        torch.testing.assert_close(a, b)


def test_faiss_flags():
    with pytest.raises(ValueError, match="--memorizing-search"):
        KnnMemory(8, 2, search="annoy")
    with pytest.raises(ValueError, match="--memorizing-faiss-nprobe"):
        KnnMemory(8, 2, search="faiss", faiss_nprobe=0)
    assert KnnMemory(100, 2, search="auto", faiss_min_size=64).search == "faiss"
    assert KnnMemory(64, 2, search="auto", faiss_min_size=64).search == "torch"
    for factory, match in (("NotAnIndex", "--memorizing-faiss-factory 'NotAnIndex' is not a valid"),
                           ("IVF64,Flat", "--memorizing-faiss-factory 'IVF64,Flat' needs >= 64 keys")):
        mem = KnnMemory(32, 2, search="faiss", faiss_factory=factory)
        with pytest.raises(ValueError, match=match):
            mem.update(torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5), torch.arange(4)[None],
                       torch.zeros(1, 4, dtype=torch.long), keep=torch.ones(1, 4, dtype=torch.bool))


def test_qk_norm_local_attention_equals_brute_force_and_memory_size_zero_keeps_it():
    """``--memorizing-qk-norm on``: the layer's local attention is softmax(scale_h · q̂·k̂ + causal) v
    with the memory's learned per-head scale, with or without memory inputs."""
    d = make_dictionary(30)
    torch.manual_seed(0)
    args = argparse.Namespace(tokens_per_sample=128, memorizing_memory_size=0, memorizing_topk=4, memorizing_layer=-1,
                              memorizing_qk_norm="on", memorizing_scale_init=7.0)
    memorizing_tiny(args)
    model = MemorizingTransformerLanguageModel.build_model(
        args, SimpleNamespace(source_dictionary=d, target_dictionary=d)).eval()
    layer = model.knn_attention
    assert layer.qk_norm
    with torch.no_grad():
        layer.mem_log_scale.copy_(torch.tensor([math.log(7.0), math.log(3.0)]))
    t, b = 6, 2
    x = torch.randn(t, b, layer.embed_dim)
    causal = torch.triu(torch.full((t, t), float("-inf")), 1)
    out, _ = layer(x, x, x, attn_mask=causal)
    h, dh = layer.num_heads, layer.head_dim
    q = layer.q_proj(x).view(t, b, h, dh)
    k = layer.k_proj(x).view(t, b, h, dh)
    v = layer.v_proj(x).view(t, b, h, dh)
    ref = torch.empty(t, b, h, dh)
    for bi in range(b):
        for hi in range(h):
            s = [7.0, 3.0][hi] * F.normalize(q[:, bi, hi], dim=-1) @ F.normalize(k[:, bi, hi], dim=-1).T
            ref[:, bi, hi] = torch.softmax(s + causal, -1) @ v[:, bi, hi]
    torch.testing.assert_close(out, layer.out_proj(ref.reshape(t, b, -1)), rtol=1e-5, atol=1e-5)
    # the ordinary (off) layer with the same weights differs: the setting is not a no-op
    layer.qk_norm = False
    assert (layer(x, x, x, attn_mask=causal)[0] - out).abs().max() > 1e-3
    layer.qk_norm = True
    # the model scores the same with stream inputs and memory size 0 as without them
    tokens = random_tokens(d, 2, 9, seed=1)
    torch.testing.assert_close(model(**stream_inputs(tokens, [0, 1], [0, 0]))[0], model(tokens)[0])
    with pytest.raises(ValueError, match="qk-norm on has no incremental decoding"):
        layer(x, x, x, incremental_state={})
