"""The Memorizing Transformer variant (issue 6)."""
import argparse
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import USER_DIR
from helpers import make_dictionary, make_model, random_tokens, run_cli
from trime_fairseq.memory.knn_memory import KnnMemory
from trime_fairseq.models.memorizing import MemorizingTransformerLanguageModel, memorizing_tiny


def make_memorizing(d, memory_size=64, topk=4, seed=0):
    torch.manual_seed(seed)
    args = argparse.Namespace(tokens_per_sample=128, knn_memory_size=memory_size, knn_memory_topk=topk, knn_layer=-1)
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
    with pytest.raises(ValueError, match="--knn-memory-size"):
        KnnMemory(-1, 4)
    with pytest.raises(ValueError, match="--knn-memory-topk"):
        KnnMemory(8, 0)
    args = argparse.Namespace(tokens_per_sample=16, knn_memory_size=8, knn_memory_topk=2, knn_layer=7)
    memorizing_tiny(args)
    with pytest.raises(ValueError, match="--knn-layer"):
        MemorizingTransformerLanguageModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))


def test_train_and_eval_through_fairseq(tiny_lm, tmp_path):
    data = tiny_lm[0]
    run_cli(["fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
             "--arch", "memorizing_transformer_lm_tiny", "--knn-memory-size", "64", "--knn-memory-topk", "4",
             "--criterion", "cross_entropy", "--stream-batching", "--batch-size", "4", "--tokens-per-sample", "16",
             "--optimizer", "adam", "--lr", "3e-3", "--max-update", "6", "--save-dir", str(tmp_path),
             "--no-epoch-checkpoints", "--cpu"])
    ev = ["fairseq_cli.eval_lm", str(data), "--path", str(tmp_path / "checkpoint_last.pt"), "--user-dir", USER_DIR,
          "--task", "trime_lm", "--tokens-per-sample", "16", "--context-window", "8", "--gen-subset", "valid", "--cpu"]
    ppl = {}
    for size in ("0", "64", "512"):
        for bsz in ("1", "6"):
            out = run_cli([*ev, "--batch-size", bsz, "--model-overrides", f"{{'knn_memory_size': {size}}}"])
            ppl[size, bsz] = float(re.search(r"Perplexity: ([0-9.]+)", out.stderr).group(1))
    for size in ("0", "64", "512"):
        assert ppl[size, "1"] == pytest.approx(ppl[size, "6"], rel=1e-4)
    assert ppl["64", "1"] != pytest.approx(ppl["0", "1"], rel=1e-4)
