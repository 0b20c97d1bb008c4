"""Data-parallel training with memory: W workers x B segments == 1 worker x W*B.

Two gloo CPU processes each run the real criterion on their rows of a fixed global batch
(split by the task's own ``shard_rows``), sum their gradients (what fairseq's all-reduce
does) and normalise by the total sample size; the parent process computes the same
global batch in one process. Losses and gradients must agree for every memory mode.
"""
import argparse
import json
import os
import re
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import USER_DIR
from helpers import make_dictionary, make_model, run_cli, write_tiny_corpus
from trime_fairseq.criterions.trime_loss import TrimeLoss, TrimeLossConfig
from trime_fairseq.data.stream import DocumentSegments, TokenStream, shard_rows

WORLD = 2
# name: (memory spec kind, segments per run m, --drop-local-prob, gather across workers)
TRIME_CASES = {
    "local": ("local", 1, 0.0, "on"),
    "long": ("long", 2, 0.0, "on"),
    "external": ("external", 1, 0.0, "on"),
    "external_drop_all": ("external", 1, 1.0, "on"),
    "external_drop_half": ("external", 1, 0.5, "on"),
    "external_placeholder": ("external", 1, 0.0, "on"),  # worker 1 holds fairseq's dummy batch
    "external_not_gathered": ("external", 1, 0.0, "off"),  # must differ from 1 worker
}
MEMORIZING_STEPS = 3


def dictionary():
    return make_dictionary(30)


def global_batch(m: int):
    """Fixed segments: ``tokens [N, L+1]`` (rows padded differently), and their documents."""
    d = dictionary()
    g = torch.Generator().manual_seed(5)
    n = 10 if m > 1 else 5  # odd split for external: 3 + 2 rows; long: 3 + 2 runs of 2
    tokens = torch.randint(d.nspecial, d.nspecial + 8, (n, 12), generator=g)
    lengths = [12, 9, 12, 7, 12, 12, 5, 12, 10, 12][:n]
    for r, n_tok in enumerate(lengths):
        tokens[r, n_tok:] = d.pad()
    docs = torch.tensor([0, 0, 1, 2, 3, 3, 4, 4, 5, 6][:n])
    return tokens, docs


def make_sample(tokens: torch.Tensor, docs: torch.Tensor, rows: np.ndarray, kind: str, m: int,
                placeholder: bool = False) -> Dict:
    """A collated batch of ``rows`` (trailing all-padding columns trimmed, as collation does)."""
    pad = dictionary().pad()
    t = tokens[torch.as_tensor(rows, dtype=torch.long)]
    width = int(t.ne(pad).sum(1).max())
    t = t[:, :width]
    src, tgt = t[:, :-1].clone(), t[:, 1:].clone()
    sample = {"id": torch.as_tensor(rows, dtype=torch.long),
              "net_input": {"src_tokens": src, "src_lengths": src.ne(pad).sum(1)},
              "target": tgt, "ntokens": int(tgt.ne(pad).sum()), "nsentences": len(rows)}
    if kind == "long":
        sample["trime_memory"] = {"mode": "long", "segments_per_group": m,
                                  "row_doc": docs[torch.as_tensor(rows, dtype=torch.long)]}
    elif kind == "external":
        sample["trime_memory"] = {"mode": "external", **({"placeholder": True} if placeholder else {})}
    return sample


def criterion(p: float, across: str) -> TrimeLoss:
    d = dictionary()
    cfg = TrimeLossConfig(ce_warmup_updates=0, train_temperature=1.0, similarity_chunk_size=4,
                          checkpoint_similarity_above=1 << 26, drop_local_prob=p,
                          memory_across_workers=across, sentence_avg=False)
    return TrimeLoss(cfg, SimpleNamespace(target_dictionary=d, source_dictionary=d))


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.parameters()])


def trime_step(name: str, rows: np.ndarray, placeholder: bool = False):
    """``(loss, sample_size, summed grads)`` of the criterion on ``rows`` of the case's batch."""
    kind, m, p, across = TRIME_CASES[name]
    tokens, docs = global_batch(m)
    model = make_model(dictionary(), seed=0).double().train()
    sample = make_sample(tokens, docs, rows, kind, m, placeholder)
    torch.manual_seed(5)  # fairseq seeds every update alike on all workers (5: mixed drops)
    loss, sample_size, _ = criterion(p, across)(model, sample)
    if placeholder:
        loss = loss * 0  # fairseq's ignore_grad for its dummy batch
        sample_size = 0
    loss.backward()
    return loss.detach(), sample_size, flat_grads(model)


def make_memorizing():
    from trime_fairseq.models.memorizing import MemorizingTransformerLanguageModel, memorizing_tiny

    torch.manual_seed(0)
    args = argparse.Namespace(tokens_per_sample=128, memorizing_memory_size=24, memorizing_topk=4, memorizing_layer=-1)
    memorizing_tiny(args)
    d = dictionary()
    model = MemorizingTransformerLanguageModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))
    return model.double().train()


def memorizing_batches(rows: int) -> List[np.ndarray]:
    """Stream batches (row r continues row r) of a 5-document stream, in document order."""
    segments = memorizing_segments()
    return segments.stream_batches(rows, seed=1, epoch=1, shuffle=False)[:MEMORIZING_STEPS]


def memorizing_segments() -> DocumentSegments:
    d = dictionary()
    g = torch.Generator().manual_seed(9)
    lengths = [40, 25, 33, 18, 41]
    tokens = torch.randint(d.nspecial, d.nspecial + 8, (sum(lengths),), generator=g).numpy()
    docs = np.repeat(np.arange(len(lengths)), lengths)
    ds = DocumentSegments(TokenStream.from_doc_ids(tokens, docs), 6, d.pad())
    ds.with_positions = True
    return ds


def memorizing_run(batches: List[np.ndarray], reduce=None):
    """Per step ``(loss, sample_size, normalised grads)``; SGD on the (all-reduced) grads."""
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    d = dictionary()
    model = make_memorizing()
    crit = CrossEntropyCriterion(SimpleNamespace(target_dictionary=d), sentence_avg=False)
    ds = memorizing_segments()
    out = []
    for batch in batches:
        model.zero_grad()
        loss, sample_size, _ = crit(model, ds.collater([ds[int(i)] for i in batch]))
        loss.backward()
        grads = flat_grads(model)
        stats = torch.tensor([loss.item(), float(sample_size)], dtype=torch.float64)
        if reduce is not None:
            reduce(grads)
            reduce(stats)
        grads = grads / stats[1]
        out.append((stats[0], stats[1], grads))
        with torch.no_grad():  # the same update everywhere
            offset = 0
            for p in model.parameters():
                p -= 0.5 * grads[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name, (kind, m, _, _) in TRIME_CASES.items():
        tokens, _ = global_batch(m)
        rows = shard_rows([np.arange(len(tokens))], WORLD, rank, m)[0]
        placeholder = name == "external_placeholder" and rank == 1
        if placeholder:
            rows = shard_rows([np.arange(len(tokens))], WORLD, 0, m)[0]  # fairseq reuses a seen batch
        loss, sample_size, grads = trime_step(name, rows, placeholder)
        stats = torch.tensor([loss.item(), float(sample_size)], dtype=torch.float64)
        dist.all_reduce(grads)  # fairseq sums worker gradients, then divides by the total sample size
        dist.all_reduce(stats)
        results[name] = (stats[0], stats[1], grads / stats[1])
    batches = [shard_rows([b], WORLD, rank)[0] for b in memorizing_batches(2 * WORLD)]
    results["memorizing"] = memorizing_run(batches, reduce=dist.all_reduce)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Dict:
    out = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name in TRIME_CASES:  # after the all-reduce every worker holds the same numbers
        torch.testing.assert_close(ranks[0][name][2], ranks[1][name][2], rtol=0, atol=0)
    return ranks[0]


def assert_same(got, ref_loss: float, ref_size: float, ref_grads: torch.Tensor) -> None:
    loss, size, grads = got
    assert float(size) == ref_size
    assert float(loss) == pytest.approx(ref_loss, rel=1e-7)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", ["local", "long", "external", "external_drop_all", "external_drop_half"])
def test_two_workers_equal_one_worker_with_the_global_batch(two_workers, name):
    kind, m, _, _ = TRIME_CASES[name]
    tokens, _ = global_batch(m)
    loss, size, grads = trime_step(name, np.arange(len(tokens)))  # no process group: one worker
    assert grads.abs().sum() > 0
    assert_same(two_workers[name], float(loss), float(size), grads / size)


def test_placeholder_batch_stays_out_of_memory(two_workers):
    """A worker running fairseq's dummy batch adds nothing to the others' memory."""
    tokens, _ = global_batch(1)
    own = shard_rows([np.arange(len(tokens))], WORLD, 0)[0]
    loss, size, grads = trime_step("external_placeholder", own)
    assert_same(two_workers["external_placeholder"], float(loss), float(size), grads / size)


def test_external_memory_without_gather_differs(two_workers):
    """The equivalence needs the gather: with --memory-across-workers off it fails."""
    tokens, _ = global_batch(1)
    loss, size, grads = trime_step("external", np.arange(len(tokens)))
    got_loss, _, got_grads = two_workers["external_not_gathered"]
    assert float(got_loss) != pytest.approx(float(loss), rel=1e-4)
    assert not torch.allclose(got_grads, grads / size, rtol=1e-4)


def test_memorizing_two_workers_equal_one_worker(two_workers):
    """Each worker owns its stream rows (memory per row): same losses and grads over steps."""
    ref = memorizing_run(memorizing_batches(2 * WORLD))
    got = two_workers["memorizing"]
    assert len(got) == len(ref) == MEMORIZING_STEPS
    model = make_memorizing()
    gate = [i for i, (n, _) in enumerate(model.named_parameters()) if n.endswith("mem_gate")][0]
    offset = sum(p.numel() for p in list(model.parameters())[:gate])
    assert float(ref[-1][2][offset:offset + 2].abs().sum()) > 0  # the memory was read
    for g, r in zip(got, ref):
        assert_same(g, float(r[0]), float(r[1]), r[2])


def test_shard_rows_keeps_runs_whole_and_order():
    batches = [np.arange(10), np.arange(10, 16), np.arange(16, 18)]
    parts = [shard_rows(batches, 2, w, unit=2) for w in range(2)]
    assert [p.tolist() for p in parts[0]] == [[0, 1, 2, 3, 4, 5], [10, 11, 12, 13], [16, 17]]
    assert [p.tolist() for p in parts[1]] == [[6, 7, 8, 9], [14, 15], []]
    for b, a0, a1 in zip(batches, *parts):  # worker order = the global batch
        assert np.concatenate([a0, a1]).tolist() == b.tolist()
    with pytest.raises(ValueError, match="runs of 2"):
        shard_rows([np.arange(3)], 2, 0, unit=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def train_log(data, save_dir, workers: int, batch: int, *extra) -> List[Dict]:
    proc = run_cli([
        "fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
        "--optimizer", "adam", "--lr", "3e-3", "--tokens-per-sample", "16", "--batch-size", str(batch),
        "--max-update", "3", "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--no-save",
        "--log-format", "json", "--log-interval", "1", "--cpu", "--seed", "1",
        "--distributed-world-size", str(workers), *extra,
    ])
    text = proc.stdout + proc.stderr
    logs = [json.loads(line.split("|")[-1]) for line in text.splitlines()
            if re.search(r"\| (train_inner|valid) \|", line) and "{" in line]
    assert logs, text[-3000:]
    return logs


@pytest.mark.parametrize("mode", ["long", "external", "memorizing"])
def test_fairseq_train_two_workers_equals_one(corpus, tmp_path, mode):
    """Real ``fairseq-train --distributed-world-size 2`` (gloo, CPU) logs the same losses as
    one worker with the doubled batch."""
    data = corpus
    extra = {
        "long": ["--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--consecutive-segments", "2"],
        "external": ["--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss", "--bm25-batching",
                     "--drop-local-prob", "0.5", "--bm25-cache-dir", str(tmp_path)],
        "memorizing": ["--arch", "memorizing_transformer_lm_tiny", "--memorizing-memory-size", "64",
                       "--memorizing-topk", "4", "--stream-batching", "--criterion", "cross_entropy"],
    }[mode]
    two = train_log(data, tmp_path / "two", 2, 4, *extra)
    one = train_log(data, tmp_path / "one", 1, 8, *extra)
    assert len(two) == len(one) == 4  # 3 updates + validation
    for a, b in zip(two, one):
        for key in ("bsz", "valid_bsz"):
            assert a.get(key) == b.get(key)
        for key in ("loss", "valid_loss"):
            if key in a:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-3), (mode, a, b)
