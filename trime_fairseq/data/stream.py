"""A binarised LM split as one token stream with document ids, and two views of it.

fairseq's text convention separates documents by an empty line, which binarises to a
line holding only ``</s>``. :class:`TokenStream` concatenates the lines and gives every
token its document (a separator belongs to the document it closes).

* :class:`DocumentSegments` (training, §4.2): segments of at most ``L`` tokens that never
  cross a document boundary, in reading order, so that ``m`` consecutive ones can share a
  batch.
* :class:`StreamBlocks` (evaluation): blocks of the stream in order, each with up to
  ``context`` preceding tokens that are seen but not scored; every item is computed from
  its index alone, so results do not depend on batch size or order of loading.
"""
import logging
from typing import Dict, List, Sequence

import numpy as np
import torch
from fairseq.data import FairseqDataset, data_utils

from trime_fairseq.memory.in_batch import MemorySpec
from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)


class TokenStream:
    """All tokens of a split and where each document starts.

    Memory is O(documents), not O(tokens): ``tokens`` is a view of fairseq's memory-mapped
    ``.bin`` file when possible (native dtype; slices are converted on access), and a
    token's document is found by binary search over ``doc_starts``.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        self.tokens = tokens
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if len(tokens) and (len(self.doc_starts) == 0 or self.doc_starts[0] != 0):
            raise ValueError("doc_starts must begin with 0")

    @classmethod
    def from_doc_ids(cls, tokens: np.ndarray, docs: np.ndarray) -> "TokenStream":
        """From a per-token array of (non-decreasing) document ids."""
        if len(tokens) != len(docs):
            raise ValueError("tokens and docs must have the same length")
        change = np.flatnonzero(np.diff(docs)) + 1
        return cls(tokens, np.concatenate([[0], change]) if len(tokens) else np.zeros(0, np.int64))

    @classmethod
    def from_lines(cls, lines, eos: int) -> "TokenStream":
        """From a fairseq indexed dataset of lines (each ending in ``eos``)."""
        sizes = np.asarray(lines.sizes, dtype=np.int64)
        tokens = None
        buf = getattr(lines, "_bin_buffer", None)
        index = getattr(lines, "_index", None)
        if buf is not None and index is not None:  # mmap: the .bin file is the stream
            tokens = np.frombuffer(buf, dtype=index.dtype)
            if len(tokens) != int(sizes.sum()):
                tokens = None
        if tokens is None:
            tokens = np.concatenate([lines[i].numpy() for i in range(len(lines))]) if len(lines) else np.zeros(0, np.int64)
        ends = np.cumsum(sizes)
        separator = sizes == 1
        if separator.any():  # only an eos on the line: an empty line, i.e. a document break
            separator[separator] = tokens[ends[separator] - 1] == eos
        # a document starts after each separator line (if anything follows it)
        starts = np.concatenate([[0], ends[separator]]) if len(sizes) else np.zeros(0, np.int64)
        stream = cls(tokens, starts[starts < len(tokens)] if len(tokens) else starts[:0])
        stream._owner = lines  # fairseq unmaps the .bin when its dataset is freed: keep it alive
        return stream

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts)

    def ids(self, start: int, end: int) -> np.ndarray:
        """Token ids ``[start, end)`` as int64."""
        return np.asarray(self.tokens[start:end], dtype=np.int64)

    def docs_at(self, positions: np.ndarray) -> np.ndarray:
        """Document index of each stream position."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    @property
    def docs(self) -> np.ndarray:
        """Per-token document ids (materialised: O(tokens); for tests and small splits)."""
        return self.docs_at(np.arange(len(self)))


def _pad_2d(rows: List[torch.Tensor], pad: int) -> torch.Tensor:
    return data_utils.collate_tokens(rows, pad, left_pad=False)


def _collate_lm(samples: List[Dict], pad: int) -> Dict:
    """fairseq's LM batch layout for items with ``id``, ``source`` and ``target``."""
    src = _pad_2d([s["source"] for s in samples], pad)
    tgt = _pad_2d([s["target"] for s in samples], pad)
    return {
        "id": torch.LongTensor([s["id"] for s in samples]),
        "nsentences": len(samples),
        "ntokens": int(tgt.ne(pad).sum()),
        "net_input": {"src_tokens": src, "src_lengths": src.ne(pad).sum(1)},
        "target": tgt,
    }


class _InOrder(FairseqDataset):
    """Items of known ``sizes``, always read in index order (never sorted by length)."""

    sizes: np.ndarray

    def num_tokens(self, index: int) -> int:
        return int(self.sizes[index])

    def size(self, index: int) -> int:
        return int(self.sizes[index])

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self))


class DocumentSegments(_InOrder):
    """Training segments: ``source = x[s:s+n]``, ``target = x[s+1:s+n+1]``, inside one document.

    Args:
        stream: the split.
        length: L, the segment length.
        group: m; collated batches carry ``sample["trime_memory"]`` for
            ``trime_loss`` (``long`` memory over groups of ``m`` consecutive rows, within a
            document unless ``across_documents``).
        external: collated batches ask for ``external`` memory (all other segments of
            the batch; the batches themselves come from BM25 batching).
        across_documents: the segments are the stream cut every ``length`` tokens, as the
            reference trains on WikiText-103 (a segment may span a document boundary, none
            is padded); a run's long memory is then every earlier token of the run, whatever
            its document, and a segment's document (``seg_docs``, for BM25's same-document
            exclusion) is that of its first token.
    """

    def __init__(self, stream: TokenStream, length: int, pad: int, group: int = 1, external: bool = False,
                 across_documents: bool = False) -> None:
        if length < 1:
            raise TrimeUserError(f"--tokens-per-sample must be >= 1, got {length}")
        self.stream, self.length, self.pad, self.group = stream, length, pad, group
        self.external = external  # batches of BM25-similar segments (TRIMELM_ext)
        self.stream_rows = False  # batches continue each row's stream (Memorizing Transformer)
        self.with_positions = False  # add mem_docs / mem_positions to net_input
        self.across_documents = across_documents  # stream segments; long runs' memory crosses documents
        starts: List[np.ndarray] = []
        lens: List[np.ndarray] = []
        if len(stream):
            doc_start = stream.doc_starts[:1] if across_documents else stream.doc_starts
            doc_end = np.concatenate([doc_start[1:], [len(stream)]])
            for a, b in zip(doc_start, doc_end):
                n_src = b - a - 1  # the last token of a document has no next token in it
                if n_src < 1:
                    continue
                s = np.arange(a, a + n_src, length)
                starts.append(s)
                lens.append(np.minimum(length, a + n_src - s))
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.sizes = np.concatenate(lens) if lens else np.zeros(0, np.int64)
        self.seg_docs = stream.docs_at(self.starts)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Dict:
        s, n = int(self.starts[index]), int(self.sizes[index])
        toks = torch.from_numpy(self.stream.ids(s, s + n + 1))
        return {"id": index, "source": toks[:-1], "target": toks[1:], "doc": int(self.seg_docs[index]), "start": s}

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        batch = _collate_lm(samples, self.pad)
        if self.with_positions:
            pos = _pad_2d([torch.arange(s["start"], s["start"] + len(s["source"])) for s in samples], -1)
            batch["net_input"]["mem_positions"] = pos
            batch["net_input"]["mem_docs"] = torch.LongTensor([s["doc"] for s in samples]).unsqueeze(1).expand_as(pos).contiguous()
        if self.external:
            batch["trime_memory"] = MemorySpec.external().to_sample()
        elif self.group > 1:
            # across documents, every row of a run counts as one document: its memory is
            # all earlier tokens of the run (the stream), not only those of its document
            row_doc = [0 if self.across_documents else s["doc"] for s in samples]
            batch["trime_memory"] = MemorySpec.long(self.group, torch.LongTensor(row_doc)).to_sample()
        return batch

    def groups(self) -> List[np.ndarray]:
        """Runs of ``m`` consecutive segments (a trailing incomplete run is dropped)."""
        m = self.group
        full = (len(self) // m) * m
        return [np.arange(i, i + m) for i in range(0, full, m)]

    def stream_batches(self, rows: int, seed: int, epoch: int, shuffle: bool) -> List[np.ndarray]:
        """Batches whose row ``r`` continues row ``r`` of the previous batch: the segments,
        in document order (documents shuffled per epoch), cut into ``rows`` equal runs;
        batch ``t`` holds the ``t``-th segment of every run (a trailing remainder is dropped)."""
        order = np.arange(len(self))
        if shuffle and len(self):
            with data_utils.numpy_seed(seed, epoch):
                doc_order = np.random.permutation(int(self.seg_docs.max()) + 1)
            rank = np.empty_like(doc_order)
            rank[doc_order] = np.arange(len(doc_order))
            order = order[np.argsort(rank[self.seg_docs], kind="stable")]
        steps = len(order) // rows
        runs = order[: steps * rows].reshape(rows, steps)
        return [runs[:, t] for t in range(steps)]

    def batches(self, groups_per_batch: int, seed: int, epoch: int, shuffle: bool) -> List[np.ndarray]:
        """Batches of whole groups; shuffling moves groups, never segments within one."""
        groups = self.groups()
        if shuffle:
            with data_utils.numpy_seed(seed, epoch):
                order = np.random.permutation(len(groups))
            groups = [groups[i] for i in order]
        return [
            np.concatenate(groups[i:i + groups_per_batch])
            for i in range(0, len(groups), groups_per_batch)
        ]


class StreamBlocks(_InOrder):
    """Evaluation blocks in reading order with a context window (see module docstring).

    Item ``i`` scores the targets of source positions ``[i·B, min((i+1)·B, N-1))`` and
    prepends up to ``context`` earlier tokens whose targets are padding.
    """

    def __init__(self, stream: TokenStream, block: int, context: int, pad: int) -> None:
        if block < 1:
            raise TrimeUserError(f"--tokens-per-sample minus --context-window must be >= 1, got {block}")
        if context < 0:
            raise TrimeUserError(f"--context-window must be >= 0, got {context}")
        self.stream, self.block, self.context, self.pad = stream, block, context, pad
        self.with_positions = False  # add mem_docs / mem_positions / mem_start to net_input
        n_src = max(len(stream) - 1, 0)
        self.starts = np.arange(0, n_src, block)
        self.sizes = np.minimum(block, n_src - self.starts) + np.minimum(self.starts, context)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Dict:
        s = int(self.starts[index])
        e = min(s + self.block, len(self.stream) - 1)
        c = min(s, self.context)
        toks = torch.from_numpy(self.stream.ids(s - c, e + 1))
        target = toks[1:].clone()
        target[:c] = self.pad
        return {
            "id": index,
            "source": toks[:-1],
            "target": target,
            "start": c,
            "docs": torch.from_numpy(self.stream.docs_at(np.arange(s - c, e))),
            "positions": torch.arange(s - c, e),
        }

    def collater(self, samples: List[Dict]) -> Dict:
        if not samples:
            return {}
        batch = _collate_lm(samples, self.pad)
        batch["start_indices"] = [s["start"] for s in samples]
        batch["doc_ids"] = _pad_2d([s["docs"] for s in samples], -1)
        batch["positions"] = _pad_2d([s["positions"] for s in samples], -1)
        if self.with_positions:
            batch["net_input"].update(mem_docs=batch["doc_ids"], mem_positions=batch["positions"],
                                      mem_start=batch["start_indices"])
        return batch


def shard_rows(batches: Sequence[np.ndarray], num_shards: int, shard_id: int, unit: int = 1) -> List[np.ndarray]:
    """Worker ``shard_id``'s part of every global batch (data-parallel training).

    Each batch is cut into ``num_shards`` contiguous parts of whole runs of ``unit`` rows
    (a run of consecutive segments is never split), as even as possible; every worker
    gets one part of every batch (possibly empty), so ``W`` workers × ``B`` rows read
    exactly the batches of 1 worker × ``W·B`` rows, row ``r`` of worker ``w`` being row
    ``w·B + r`` of the global batch.
    """
    if num_shards == 1:
        return list(batches)
    out = []
    for b in batches:
        b = np.asarray(b)
        if len(b) % unit:
            raise ValueError(f"a batch of {len(b)} rows is not made of runs of {unit}")
        runs = b.reshape(len(b) // unit, unit)
        out.append(np.array_split(runs, num_shards)[shard_id].reshape(-1))
    return out
