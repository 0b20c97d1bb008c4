"""Device readiness: every path on the CPU, and on CUDA when present.

What runs where, and what is guarded:

* The plugin never asks for a device. Tensors are created on the device of the tensors
  they meet (the model's output, the batch, the queries); the only CPU round trips are
  FAISS searches (queries go to the CPU, results come back on the queries' device),
  splitmix64 draws of ``--drop-local-prob`` and the datastore files. ``fairseq-train``,
  ``fairseq-eval-lm`` and ``fairseq-generate`` move the model and the batches to the GPU
  unless ``--cpu``; ``trime-tune``, ``trime-build-datastore``, ``trime-tune-mt``,
  ``trime-train-metak`` and ``trime-analyze`` do the same (``--cpu`` keeps them on the CPU,
  ``--fp16`` casts the model to half precision as in ``fairseq-eval-lm``). A Meta-k network
  (adaptive kNN-MT) is loaded on the CPU and follows the retrieved neighbours to their
  device; it is trained on the CPU.
* Mixed precision: fp16/bf16 models (``--fp16``) and autocast (``--amp``) are supported.
  Matrix products run in the precision autocast picks; everything that enters a
  softmax, a log-sum-exp or an exponential (logits, memory similarities, combiner inputs,
  Meta-k's weights) is upcast to float32 first, so losses and log-probabilities are
  float32. fairseq's ``--bf16`` implies ``--tpu`` (torch_xla) and cannot run on a CPU or
  GPU without it; use ``--amp`` or ``--fp16`` on a GPU.
* FAISS: indexes are built, trained and tuned on the CPU. A datastore's index is copied
  to the GPU(s) (``faiss.index_cpu_to_all_gpus``) only when faiss has GPU support
  (``faiss.StandardGpuResources``, i.e. faiss-gpu is installed) *and* ``faiss.get_num_gpus()``
  sees a GPU *and* the queries are CUDA tensors *and* ``--knn-k`` is at most 2048
  (faiss-gpu's limit); otherwise it is searched on the CPU. With faiss-cpu nothing
  GPU-only is ever called. The Memorizing Transformer's per-(row, head) faiss indexes stay
  on the CPU.
* Tests: every test below runs on the CPU; the ``cuda`` variants, the CUDA autocast ones,
  the faiss-gpu one and the GPU ``fairseq-train`` runs skip, with their reason, on machines
  without a CUDA GPU (or without faiss-gpu).
"""
import math

import numpy as np
import pytest
import torch

from helpers import REPO, make_dictionary, make_model, random_tokens, run_cli
from test_trime_loss import criterion_for, make_sample
from trime_fairseq.memory import index as index_mod
from trime_fairseq.memory.adaptive import MetaK
from trime_fairseq.memory.combiners import (
    AdaptiveKnnCombiner, CacheCombiner, KnnCombiner, ScoringInputs, TrimeCombiner)
from trime_fairseq.memory.datastore import Datastore, DatastoreMeta, DatastoreWriter
from trime_fairseq.memory.joint import scaled_similarity
from trime_fairseq.memory.long_term import LongTermMemory
from trime_fairseq.memory.retriever import Retriever
from trime_fairseq.memory.search_index import SearchIndex
from trime_fairseq.models.capture import get_capture, to_model_device

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=needs_cuda, id="cuda")]


def faiss_sees_gpu() -> bool:
    faiss = index_mod.faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


MODES = ["local", "long", "external"]


def memory_spec(mode):
    return {"local": None,
            "long": {"mode": "long", "segments_per_group": 2, "row_doc": torch.tensor([0, 0, 1, 2])},
            "external": {"mode": "external", "keep_local": torch.tensor([True, False, True, True])}}[mode]


def trime_sample(d, mode):
    tokens = random_tokens(d, 4, 13, seed=2)
    tokens[3, 10:] = d.pad()
    sample = make_sample(tokens, d.pad())
    sample["id"] = torch.arange(4)
    spec = memory_spec(mode)
    if spec is not None:
        sample["trime_memory"] = spec
    return sample


def no_dropout_model(d, dtype=torch.float64):
    # dropout off: training mode (needed for --drop-local-prob) is then deterministic
    return make_model(d, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).to(dtype)


def loss_and_grads(model, sample, **cfg):
    crit = criterion_for(make_dictionary(40), **cfg)
    model.zero_grad()
    torch.manual_seed(0)  # the --drop-local-prob key
    loss, _, log = crit(model, sample)
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), log["ce_loss"].detach().cpu(), grads


# --- trime_loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_trime_loss_on_device_equals_cpu(device, mode):
    d = make_dictionary(40)
    drop = {"drop_local_prob": 0.5} if mode == "external" else {}
    ref_model = no_dropout_model(d).train()
    ref = loss_and_grads(ref_model, trime_sample(d, mode), **drop)
    model = no_dropout_model(d).to(device).train()
    sample = to_model_device(trime_sample(d, mode), model)
    assert sample["target"].device.type == device
    if mode == "external":  # as trime_translation does: the spec is added to the moved batch, on the CPU
        sample["trime_memory"] = memory_spec(mode)
    loss, ce, grads = loss_and_grads(model, sample, **drop)
    torch.testing.assert_close(loss, ref[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ce, ref[1], rtol=1e-9, atol=1e-9)
    assert loss.item() != pytest.approx(ce.item(), rel=1e-6)  # the memory is in use
    assert grads.keys() == ref[2].keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref[2][name], rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_trime_loss_with_adaptive_softmax_on_device(device):
    d = make_dictionary(40)
    ref = loss_and_grads(make_model(d, adaptive_cutoff="12,30").double(), trime_sample(d, "local"))
    model = make_model(d, adaptive_cutoff="12,30").double().to(device)
    loss, ce, grads = loss_and_grads(model, to_model_device(trime_sample(d, "local"), model))
    torch.testing.assert_close(loss, ref[0], rtol=1e-9, atol=1e-9)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[2][name], rtol=1e-7, atol=1e-9, msg=name)


def test_to_model_device_leaves_cpu_batches_alone():
    d = make_dictionary(40)
    sample = trime_sample(d, "long")
    assert to_model_device(sample, make_model(d)) is sample


@needs_cuda
def test_to_model_device_moves_nested_tensors():
    d = make_dictionary(40)
    moved = to_model_device(trime_sample(d, "long"), make_model(d).cuda())
    assert moved["net_input"]["src_tokens"].is_cuda and moved["trime_memory"]["row_doc"].is_cuda


# --- combiners ------------------------------------------------------------------------------

def scoring_inputs(seed=0, B=2, T=6, V=13, dim=8, K=4, M=3) -> ScoringInputs:
    """Random inputs with local keys (causal), long-term keys and retrieved entries."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    qg, qf = torch.randn(B, T, dim, generator=g) * 2, torch.randn(B, T, dim, generator=g)
    labels = torch.randint(0, 5, (B, T), generator=g)
    x = ScoringInputs(
        tok_scores=logits, tok_lse=torch.logsumexp(logits, -1), target=torch.randint(0, 5, (B, T), generator=g),
        query_g=qg, query_f=qf, keys_g=qg, keys_f=qf, key_labels=labels,
        mask=torch.ones(T, T, dtype=torch.bool).tril(-1).expand(B, T, T).clone(),
    )
    ext = torch.randn(B, T, K, generator=g).sort(-1, descending=True).values * 3
    ext[0, 1, 2:] = -math.inf  # fewer neighbours found
    ext[1, 0] = -math.inf  # none found
    x = x.with_external(ext, torch.randint(0, 5, (B, T, K), generator=g))
    long_g, long_f = torch.randn(B, M, dim, generator=g), torch.randn(B, M, dim, generator=g)
    return x.with_long_memory(long_g, long_f, torch.randint(0, 5, (B, M), generator=g),
                              torch.rand(B, T, M, generator=g) > 0.3)


def combiners():
    torch.manual_seed(0)
    metak = MetaK(4, hidden=8)
    return {
        "trime": TrimeCombiner(0.8, lam=0.3, memory_temperature=1.5),
        "knn": KnnCombiner(0.4, 2.0, cache=CacheCombiner(0.2, 0.5, "g")),
        "cache": CacheCombiner(0.3, 0.7, "f"),
        "adaptive": AdaptiveKnnCombiner(metak, 3.0),
    }


def moved(x: ScoringInputs, device=None, dtype=None) -> ScoringInputs:
    """``x`` with every tensor on ``device`` and every float tensor cast to ``dtype``."""
    out = {}
    for k in x.__dataclass_fields__:
        v = getattr(x, k)
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if (dtype and v.is_floating_point()) else v.dtype)
        out[k] = v
    return ScoringInputs(**out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["trime", "knn", "cache", "adaptive"])
def test_combiners_on_device_equal_cpu(device, name):
    x = scoring_inputs()
    ref_lp = combiners()[name].log_probs(x)
    ref_t = combiners()[name].target_log_prob(x)
    assert torch.isfinite(ref_t).all() and (ref_lp > -math.inf).any()
    comb = combiners()[name]  # the adaptive one's Meta-k is on the CPU, the inputs maybe not
    xd = moved(x, device)
    lp, t = comb.log_probs(xd), comb.target_log_prob(xd)
    assert lp.device.type == device and t.device.type == device
    torch.testing.assert_close(lp.cpu(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.cpu(), ref_t, rtol=1e-5, atol=1e-5)
    # the target-only path agrees with the full distribution
    torch.testing.assert_close(t, lp.gather(-1, xd.target.unsqueeze(-1)).squeeze(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["trime", "knn", "cache", "adaptive"])
def test_combiners_upcast_half_inputs(name, dtype):
    x = scoring_inputs()
    ref = combiners()[name].log_probs(x)
    half = moved(x, dtype=dtype)  # what a --fp16 model hands over
    # the inputs hold float32 copies of the (rounded) half-precision tensors
    assert half.tok_scores.dtype == half.query_g.dtype == half.ext_scores.dtype == torch.float32
    assert not torch.equal(half.query_g, x.query_g)
    lp = combiners()[name].log_probs(half)
    t = combiners()[name].target_log_prob(half)
    assert lp.dtype == torch.float32 and t.dtype == torch.float32
    assert torch.isfinite(t).all()
    assert torch.equal(torch.isfinite(lp), torch.isfinite(ref))
    torch.testing.assert_close(lp, ref, rtol=0, atol=0.15)  # inputs rounded to 8 (bf16) / 11 (fp16) bits


@pytest.mark.parametrize("name", ["trime", "knn", "cache", "adaptive"])
def test_combiners_under_cpu_autocast(name):
    x = scoring_inputs()
    ref = combiners()[name].log_probs(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(x.query_g, x.query_g.transpose(-1, -2)).dtype == torch.bfloat16  # autocast is on
        lp = combiners()[name].log_probs(x)
        t = combiners()[name].target_log_prob(x)
    assert lp.dtype == torch.float32 and t.dtype == torch.float32 and torch.isfinite(t).all()
    torch.testing.assert_close(lp, ref, rtol=0, atol=0.15)


def test_similarity_is_float32_under_autocast():
    q = torch.randn(3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = scaled_similarity(q, q, 0.5)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, scaled_similarity(q, q, 0.5), rtol=2e-2, atol=5e-2)
    assert scaled_similarity(q.double(), q.double()).dtype == torch.float64  # never downcast


# --- long-term memory, eval-lm wrapper --------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_long_term_memory_on_device(device):
    def run(dev):
        mem = LongTermMemory(size=5, context=3)
        g = torch.Generator().manual_seed(0)
        out = []
        for start in range(0, 20, 4):  # blocks of 4 tokens; document 1 starts at 10
            pos = torch.arange(start, start + 4)
            docs = (pos >= 10).long()
            keys = {"g": torch.randn(4, 6, generator=g).to(dev)}
            w = mem.window(start, int(docs[0]))
            out.append(None if w is None else (w.keys["g"], w.labels, w.docs))
            mem.update(keys, (pos % 7).to(dev), positions=pos.to(dev), docs=docs.to(dev))
        return out

    ref, got = run("cpu"), run(device)
    assert [r is None for r in ref] == [r is None for r in got] and sum(r is not None for r in got) >= 2
    for r, o in zip(ref, got):
        if r is not None:
            assert all(t.device.type == device for t in o)
            for a, b in zip(r, o):
                torch.testing.assert_close(b.cpu(), a)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_wrapper_with_long_memory_on_device(device):
    """fairseq-eval-lm's path (MemoryEvalModel, local + long-term memory, Eq. 6) on ``device``."""
    from trime_fairseq.data.stream import StreamBlocks, TokenStream
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    d = make_dictionary(40)
    tokens = random_tokens(d, 1, 60, seed=4)[0].numpy()
    stream = TokenStream.from_doc_ids(tokens, (np.arange(60) >= 35).astype(np.int64))
    blocks = StreamBlocks(stream, 8, 4, d.pad())

    def run(dev):
        model = MemoryEvalModel(make_model(d).double().to(dev), TrimeCombiner(0.9), d.pad(), long_memory_size=10)
        out = []
        with torch.no_grad():
            for s in range(0, len(blocks), 2):
                sample = to_model_device(blocks.collater([blocks[i] for i in range(s, min(s + 2, len(blocks)))]),
                                         model.inner)
                lp = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True, sample=sample)
                assert lp.device.type == dev and lp.dtype == torch.float64
                out.append(lp.cpu())
        assert model.long_memory is not None and model.long_memory.labels.device.type == dev
        return out

    for a, b in zip(run("cpu"), run(device)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


# --- retrieval and faiss-gpu ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_datastore(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_ds") / "ds"
    n, dim = 300, 8
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n, dim)).astype(np.float32)
    meta = DatastoreMeta(size=n, dim=dim, key_dtype="float32", value_dtype="int32", key_type="ffn_input",
                         model_sha256="-", dictionary_sha256="-", vocab_size=20, source={})
    writer = DatastoreWriter(str(out), meta)
    writer.write(keys, rng.integers(0, 20, n).astype(np.int32))
    writer.finish()
    SearchIndex.build(keys, "Flat", "ip").save(str(out))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_retriever_returns_on_the_query_device(tiny_datastore, device, dtype):
    ds = Datastore(str(tiny_datastore))
    q = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    ref = Retriever(ds, k=6, use_gpu=False).search(q)
    found = Retriever(ds, k=6).search(q.to(device, dtype))
    for t in (found.scores, found.values, found.ids):
        assert t.device.type == device
    assert found.scores.dtype == torch.float32 and found.values.dtype == torch.int64
    if dtype == torch.float32:  # (half queries are rounded: neighbours may differ)
        torch.testing.assert_close(found.scores.cpu(), ref.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(found.ids.cpu(), ref.ids) and torch.equal(found.values.cpu(), ref.values)


class _Recorder:
    def __init__(self):
        self.calls = 0

    def __call__(self, index, *args, **kwargs):
        self.calls += 1
        return index


def test_faiss_gpu_path_is_guarded(tiny_datastore, monkeypatch):
    """index.py copies an index to the GPU only when faiss has GPU support *and* sees a GPU;
    the retriever only for CUDA queries. Here (faiss-cpu, or no GPU) nothing GPU-only runs."""
    faiss = index_mod.faiss_module()
    move = _Recorder()
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", move, raising=False)
    # the guard reads both conditions
    assert index_mod.gpu_available() == faiss_sees_gpu()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    assert not index_mod.gpu_available()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    assert not index_mod.gpu_available()
    # without GPU support, loading with use_gpu=True keeps the CPU index
    index = SearchIndex.load(str(tiny_datastore), use_gpu=True).index
    assert move.calls == 0 and isinstance(index, faiss.Index) and "Gpu" not in type(index).__name__
    q = torch.randn(3, 8)
    Retriever(Datastore(str(tiny_datastore)), k=4).search(q)
    assert move.calls == 0
    # with GPU support claimed: SearchIndex.load(use_gpu=True) moves, use_gpu=False does not ...
    monkeypatch.setattr(index_mod, "gpu_available", lambda: True)
    SearchIndex.load(str(tiny_datastore), use_gpu=False)
    assert move.calls == 0
    SearchIndex.load(str(tiny_datastore), use_gpu=True)
    assert move.calls == 1
    # ... and the retriever keeps the index on the CPU for CPU queries
    r = Retriever(Datastore(str(tiny_datastore)), k=4)
    r.search(q)
    assert move.calls == 1 and not r.on_gpu


def test_an_index_faiss_gpu_cannot_hold_stays_on_the_cpu(tiny_datastore, monkeypatch, caplog):
    """Fast-scan PQ (the default large index) has no faiss-gpu version: keep searching on the CPU."""
    faiss = index_mod.faiss_module()

    def refuse(index):
        raise RuntimeError("Error in index_cpu_to_gpu: not implemented for this type of index\nmore")

    monkeypatch.setattr(index_mod, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse, raising=False)
    cpu = faiss.IndexFlatIP(8)
    with caplog.at_level("WARNING"):
        assert index_mod.index_to_gpu(cpu) is cpu
    assert "searching it on the CPU" in caplog.text and "more" not in caplog.text
    r = Retriever(Datastore(str(tiny_datastore)), k=4)
    r._to_gpu()
    assert not r.on_gpu  # and so it is not reported as searched on the GPU


def test_this_machine_takes_no_faiss_gpu_path():
    if HAS_CUDA and faiss_sees_gpu():
        pytest.skip("this machine has faiss-gpu and a GPU: see test_faiss_gpu_index")
    assert not index_mod.gpu_available()


@pytest.mark.skipif(not (HAS_CUDA and faiss_sees_gpu()),
                    reason="needs faiss-gpu (faiss.StandardGpuResources) and a visible CUDA GPU")
def test_faiss_gpu_index(tiny_datastore):
    ds = Datastore(str(tiny_datastore))
    q = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    cpu_index = SearchIndex.load(str(tiny_datastore), use_gpu=False).index
    gpu_index = SearchIndex.load(str(tiny_datastore), use_gpu=True).index
    assert "Gpu" in type(gpu_index).__name__ or gpu_index is not cpu_index
    d0, i0 = cpu_index.search(q.numpy(), 5)
    d1, i1 = gpu_index.search(q.numpy(), 5)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_allclose(d0, d1, rtol=1e-4, atol=1e-4)
    ref = Retriever(ds, k=5, use_gpu=False).search(q)
    r = Retriever(ds, k=5)
    found = r.search(q.cuda())
    assert r.on_gpu and found.scores.is_cuda
    assert torch.equal(found.ids.cpu(), ref.ids)
    big = Retriever(ds, k=ds.meta.size)  # K above faiss-gpu's limit would stay on the CPU
    big.k = index_mod.GPU_MAX_K + 1
    big._to_gpu()
    assert not big.on_gpu


# --- mixed precision: trime_loss ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_trime_loss_under_cpu_bf16_autocast(mode):
    d = make_dictionary(40)
    model = no_dropout_model(d, torch.float32)
    ref = loss_and_grads(model, trime_sample(d, mode))
    crit = criterion_for(d)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**trime_sample(d, mode)["net_input"])
        get_capture(model).take()
        assert out[0].dtype == torch.bfloat16  # autocast really lowers the logits
        loss, _, log = crit(model, trime_sample(d, mode))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref[0].item(), rel=2e-2)
    assert log["ce_loss"].item() == pytest.approx(ref[1].item(), rel=2e-2)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_trime_loss_with_half_precision_model(dtype):
    """fairseq --fp16 casts the model itself: logits and g arrive in half precision."""
    d = make_dictionary(40)
    ref = loss_and_grads(no_dropout_model(d, torch.float32), trime_sample(d, "external"))
    model = no_dropout_model(d, torch.float32).to(dtype)
    loss, ce, grads = loss_and_grads(model, trime_sample(d, "external"))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref[0].item(), rel=5e-2)
    assert ce.item() == pytest.approx(ref[1].item(), rel=5e-2)
    assert all(torch.isfinite(g.float()).all() for g in grads.values())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_trime_loss_under_cuda_autocast(mode, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    d = make_dictionary(40)
    model = no_dropout_model(d, torch.float32).cuda()
    ref = loss_and_grads(model, to_model_device(trime_sample(d, mode), model))
    crit = criterion_for(d)
    model.zero_grad()
    with torch.autocast("cuda", dtype=dtype):
        loss, _, _ = crit(model, to_model_device(trime_sample(d, mode), model))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref[0].item(), rel=2e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- fairseq-train on a GPU ---------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("precision", ["--fp16", "--amp"])
def test_fairseq_train_on_gpu_with_mixed_precision(tmp_path, precision):
    """2 updates of trime_loss (local memory after 1 CE update) on the GPU."""
    import json

    from helpers import write_tiny_corpus

    data = write_tiny_corpus(tmp_path / "corpus")
    proc = run_cli([
        "fairseq_cli.train", str(data), "--user-dir", str(REPO / "trime_fairseq"), "--task", "trime_lm",
        "--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--ce-warmup-updates", "1",
        "--optimizer", "adam", "--lr", "3e-3", "--tokens-per-sample", "64", "--max-tokens", "512",
        "--max-update", "2", "--save-dir", str(tmp_path / "ckpt"), "--no-save", "--log-format", "json",
        "--log-interval", "1", "--seed", "1", precision,
    ])
    logs = [json.loads(line.split("|")[-1]) for line in (proc.stdout + proc.stderr).splitlines()
            if "train_inner" in line and "{" in line]
    assert len(logs) == 2 and all(math.isfinite(float(l["loss"])) for l in logs)


# --- the memory commands on a GPU ---------------------------------------------------------------

def _on(device):
    return ["--cpu"] if device == "cpu" else []


@needs_cuda
def test_lm_memory_commands_on_gpu_equal_cpu(tiny_lm, tmp_path):
    """trime-build-datastore, fairseq-eval-lm (local+long+ext) and trime-tune without --cpu
    give the numbers of their --cpu runs."""
    import re

    data, ckpt, _ = tiny_lm
    user = ["--user-dir", str(REPO / "trime_fairseq")]
    common = ["--tokens-per-sample", "64", "--context-window", "32"]
    stores = {}
    for device in ("cuda", "cpu"):
        stores[device] = tmp_path / f"ds_{device}"
        run_cli(["trime_fairseq.cli.build_datastore", str(data), *user, "--path", str(ckpt), "--gen-subset", "train",
                 "--out", str(stores[device]), "--key-dtype", "float32", "--recall-k", "8", "--recall-queries", "50",
                 *common, *_on(device)])
    np.testing.assert_allclose(np.asarray(Datastore(str(stores["cuda"])).keys),
                               np.asarray(Datastore(str(stores["cpu"])).keys), rtol=1e-4, atol=1e-4)
    ppl, tuned = {}, {}
    for device in ("cuda", "cpu"):
        proc = run_cli(["fairseq_cli.eval_lm", str(data), "--path", str(ckpt), *user, "--task", "trime_lm", *common,
                        "--gen-subset", "valid", "--eval-combiner", "trime", "--eval-memory", "local+long+ext",
                        "--long-memory-size", "64", "--datastore", str(stores["cpu"]), "--knn-k", "16",
                        *_on(device)])
        ppl[device] = float(re.search(r"Perplexity: ([0-9.]+)", proc.stderr + proc.stdout).group(1))
        proc = run_cli(["trime_fairseq.cli.tune", str(data), "--path", str(ckpt), *user, "--combiner", "knn",
                        "--grid", "lambda=0.2", "temperature=1", "--datastore", str(stores["cpu"]), "--knn-k", "16",
                        "--memory-sizes", "0,64", "--eval-memory", "local+long+ext", *common, "--gen-subset", "valid",
                        *_on(device)])
        tuned[device] = [float(v) for v in re.findall(r"ppl ([0-9.]+)", proc.stderr)]
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-3)
    assert len(tuned["cuda"]) == len(tuned["cpu"]) >= 3
    assert tuned["cuda"] == pytest.approx(tuned["cpu"], rel=1e-3)


@needs_cuda
def test_mt_memory_commands_on_gpu_equal_cpu(tiny_mt, tmp_path):
    """fairseq-generate with kNN-MT / TRIME-MT / adaptive kNN-MT, and trime-train-metak,
    without --cpu decode like their --cpu runs."""
    import re

    data, ckpt, stores = tiny_mt
    user = ["--user-dir", str(REPO / "trime_fairseq"), "--task", "trime_translation"]
    metak = tmp_path / "metak.pt"
    run_cli(["trime_fairseq.cli.train_metak", str(data), *user, "--path", str(ckpt), "--datastore",
             str(stores["l2"]), "--knn-k", "8", "--gen-subset", "valid", "--out", str(metak), "--epochs", "2"])

    def generate(device, *extra):
        proc = run_cli(["fairseq_cli.generate", str(data), *user, "--path", str(ckpt), "--gen-subset", "test",
                        "--beam", "4", "--batch-size", "4", *extra, *_on(device)])
        hyps = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", proc.stdout, flags=re.M))
        assert len(hyps) == 12, proc.stdout[-2000:]
        return hyps

    for flags in (["--mt-combiner", "knn", "--datastore", str(stores["l2"]), "--knn-k", "8", "--knn-lambda", "0.6"],
                  ["--mt-combiner", "trime", "--datastore", str(stores["ip"]), "--knn-k", "8"],
                  ["--mt-combiner", "adaptive", "--datastore", str(stores["l2"]), "--knn-k", "8",
                   "--metak-path", str(metak)]):
        assert generate("cuda", *flags) == generate("cpu", *flags), flags
