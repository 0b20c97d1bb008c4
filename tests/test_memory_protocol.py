"""The memory protocol (update / top-k / reset): the same rules checked on both memories
against a brute-force reference (``trime_fairseq/memory/protocol.py``)."""
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from trime_fairseq.memory.knn_memory import KnnMemory
from trime_fairseq.memory.long_term import LongTermMemory
from trime_fairseq.memory.protocol import SegmentMemory, TopK

DIM = 6


class LongTerm:
    """One stream; values are next-token labels; similarity is the raw inner product."""

    def __init__(self, size: int) -> None:
        self.memory = LongTermMemory(size)

    def update(self, keys, ids, positions, docs, keep=None):
        self.memory.update({"g": keys}, ids, positions=positions, docs=docs, keep=keep)

    def topk(self, queries, before: int, docs, k: int) -> TopK:
        return self.memory.topk(queries, before, docs, k)

    @staticmethod
    def sim(queries, keys):
        return queries @ keys.t()


class Knn:
    """One batch row and one head; values are vectors that hold the entry's id;
    similarity is the inner product of L2-normalised queries and keys."""

    def __init__(self, size: int) -> None:
        self.memory = KnnMemory(size, topk=4, search="torch")

    def update(self, keys, ids, positions, docs, keep=None):
        values = ids.double()[:, None].expand(-1, DIM)
        self.memory.update(keys[None, None], values[None, None], positions[None], docs[None],
                           keep=None if keep is None else keep[None])

    def topk(self, queries, before: int, docs, k: int) -> TopK:
        scores, values, found = self.memory.topk(queries[None, None], torch.tensor([before]), docs[None], k)
        return TopK(scores[0, 0], values[0, 0, ..., 0].round().long(), found[0, 0])

    @staticmethod
    def sim(queries, keys):
        return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).t()


MEMORIES = [LongTerm, Knn]


def brute_force(kind, queries, keys, ids, readable, k: int):
    """Scores and ids of the k most similar readable entries per query (-inf / -1 beyond)."""
    sims = kind.sim(queries, keys).masked_fill(~readable, float("-inf"))
    top, idx = sims.topk(min(k, keys.size(0)), dim=-1)
    return top, torch.where(torch.isfinite(top), ids[idx], torch.full_like(idx, -1))


def check(kind, mem, queries, before: int, docs, k: int, keys, ids, positions, entry_docs, stored: Optional[torch.Tensor]):
    """``stored``: bool over the entries the memory should still hold (None: all)."""
    got = mem.topk(queries, before, docs, k)
    readable = (positions < before)[None, :] & (docs[:, None] == entry_docs[None, :])
    if stored is not None:
        readable &= stored[None, :]
    top, want_ids = brute_force(kind, queries, keys, ids, readable, k)
    n = min(top.size(-1), got.scores.size(-1))  # a memory may return fewer than k columns
    assert not bool(torch.isfinite(top[:, n:]).any())
    assert got.found[:, :n].tolist() == torch.isfinite(top[:, :n]).tolist()
    assert not bool(got.found[:, n:].any())
    top, want_ids = top[:, :n], want_ids[:, :n]
    found = got.found[:, :n]
    assert torch.allclose(got.scores[:, :n][found], top[found], atol=1e-9)
    assert got.values[:, :n][found].tolist() == want_ids[found].tolist()


@pytest.mark.parametrize("chunk", [1 << 22, 7], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("kind", MEMORIES, ids=lambda k: k.__name__)
def test_both_memories_follow_the_protocol(kind, chunk, monkeypatch):
    monkeypatch.setattr("trime_fairseq.memory.protocol.SIM_CHUNK", chunk)  # 7: about one query per chunk
    torch.manual_seed(0)
    mem = kind(size=5)
    assert isinstance(mem.memory, SegmentMemory)
    keys = torch.randn(15, DIM, dtype=torch.float64)
    ids = torch.arange(100, 115)
    positions = torch.arange(15)
    docs = torch.tensor([0] * 12 + [1] * 3)
    queries = torch.randn(3, DIM, dtype=torch.float64)
    fifo = positions >= 7  # a memory of 5 keeps positions 7..11 of document 0

    mem.update(keys[:8], ids[:8], positions[:8], docs[:8])
    mem.update(keys[8:12], ids[8:12], positions[8:12], docs[8:12])
    d0 = torch.zeros(3, dtype=torch.long)
    check(kind, mem, queries, 12, d0, 4, keys, ids, positions, docs, fifo)  # the newest 5 only
    check(kind, mem, queries, 10, d0, 4, keys, ids, positions, docs, fifo)  # nothing at or after `before`
    check(kind, mem, queries, 12, d0, 8, keys, ids, positions, docs, fifo)  # k above what is held
    assert not bool(mem.topk(queries, 12, torch.ones(3, dtype=torch.long), 4).found.any())  # other document

    # a newer document replaces the old one; `keep` selects what is stored
    keep = torch.tensor([True, False, True])
    mem.update(keys[12:], ids[12:], positions[12:], docs[12:], keep=keep)
    stored = torch.zeros(15, dtype=torch.bool)
    stored[[12, 14]] = True
    d1 = torch.ones(3, dtype=torch.long)
    check(kind, mem, queries, 15, d1, 4, keys, ids, positions, docs, stored)
    assert not bool(mem.topk(queries, 15, d0, 4).found.any())  # document 0 is gone

    mem.memory.reset()
    assert not bool(mem.topk(queries, 15, d1, 4).found.any())


def test_long_term_topk_without_k_reads_the_window_and_respects_documents_per_query():
    """``k=None`` returns every readable entry; a block's queries in a later document read nothing."""
    torch.manual_seed(1)
    mem = LongTermMemory(size=10)
    keys = torch.randn(6, DIM, dtype=torch.float64)
    mem.update({"g": keys}, torch.arange(6), positions=torch.arange(6), docs=torch.zeros(6, dtype=torch.long))
    queries = torch.randn(4, DIM, dtype=torch.float64)
    docs = torch.tensor([0, 0, 1, 1])  # the block crosses into document 1
    got = mem.topk(queries, 6, docs)
    assert got.scores.shape == (4, 6)
    assert got.found[:2].all() and not got.found[2:].any()
    want = (queries[:2] @ keys.t()).sort(-1, descending=True)
    assert torch.allclose(got.scores[:2], want.values)
    assert got.values[:2].tolist() == want.indices.tolist()
    with pytest.raises(ValueError, match="not 'f'"):
        mem.topk(queries, 6, docs, representation="f")
