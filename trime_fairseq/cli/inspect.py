"""``trime-inspect``: what memory did for one text, as a self-contained HTML page (+ JSON).

For every scored token of one document of ``--gen-subset`` (``--doc N``) or of a text file
(``--text FILE``): the target's probability without memory and with it (the same scoring
code as ``fairseq-eval-lm --task trime_lm``, with the same memory flags), the share of the
final probability that each memory kind contributed (from :meth:`Combiner.contributions`),
the gain in bits, and the memory entries that carried most mass, each with its label and
the text around it: an earlier position of the document (local / long-term memory) or the
training-set position a datastore entry was built from (external memory; entry ``i`` of a
``trime-build-datastore`` datastore is source position ``i`` of its split's token stream).
For a Memorizing Transformer (``--arch memorizing_transformer_lm``): the positions its
kNN-augmented attention retrieved, their attention weight, and each head's gate.

    trime-inspect DATA --path ckpt.pt --gen-subset valid --tokens-per-sample 512 \\
        --context-window 256 --eval-combiner trime --eval-temperature 1 --doc 3 --out page.html

The page (``--out``) and ``page.json`` beside it are written atomically. Every other flag
goes to fairseq's eval-lm parser, as for ``fairseq-eval-lm`` and ``trime-analyze``.
"""
import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trime_fairseq.tasks.memory_flags import EvalMemory
from trime_fairseq.cli import setup_cli_logging

logger = logging.getLogger("trime_fairseq.inspect")

MODEL = "model"  # the share of P(target) that came from the LM's own softmax
OTHER_ENTRIES = 3  # entries shown per token besides those labelled with the target


# ---------------------------------------------------------------------------------------------
# recording what the memories returned (positions and ids are not part of ScoringInputs)


class _RecordingRetriever:
    """Delegates to a :class:`~trime_fairseq.memory.retriever.Retriever`, keeping the datastore
    ids of the last search (``scored_rows`` keeps only scores and values)."""

    def __init__(self, retriever) -> None:
        self.inner, self.last = retriever, None

    def search(self, queries, positions=None, tok_lprobs=None, features=None):
        self.last = self.inner.search(queries, positions, tok_lprobs, features)
        return self.last

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _recording_long_memory(size: int, context: int):
    from trime_fairseq.memory.long_term import LongTermMemory

    class RecordingLongTermMemory(LongTermMemory):
        """Keeps the last window handed out (with the stream positions of its entries)."""

        last = None

        def window(self, context_start: int, doc: int):
            self.last = super().window(context_start, doc)
            return self.last

    return RecordingLongTermMemory(size, context=context)


class _MemorizingRecorder:
    """Records the slots a Memorizing Transformer's kNN attention retrieved in one forward."""

    def __init__(self, model) -> None:
        self.layer = model.knn_attention
        self.memory = self.layer.memory
        self._search = self.memory.search_slots
        self.memory.search_slots = self._record  # instance attribute: this model only
        self.last: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _record(self, q, before, query_docs, method=None, k=None):
        top, slots = self._search(q, before, query_docs, method, k)
        pos = self.memory.positions.gather(1, slots.reshape(slots.size(0), -1)).view_as(slots)
        self.last = (top, pos)
        return top, slots

    def gates(self) -> List[float]:
        return torch.sigmoid(self.layer.mem_gate.detach().float()).tolist()

    def weights(self, top: torch.Tensor) -> torch.Tensor:
        """Attention weights over the retrieved entries (the layer's own softmax)."""
        found = torch.isfinite(top)
        scale = self.layer.mem_log_scale.detach().float().exp().view(1, -1, 1, 1)
        logits = (top.float().masked_fill(~found, 0.0) * scale).masked_fill(~found, float("-inf"))
        w = torch.softmax(logits.masked_fill(~found.any(-1, keepdim=True), 0.0), -1)
        return w.masked_fill(~found, 0.0)

    def close(self) -> None:
        del self.memory.search_slots  # back to the class method


# ---------------------------------------------------------------------------------------------
# scoring


@dataclass
class Entry:
    """One memory entry shown for a token."""

    kind: str
    position: int  # stream position of the entry (of the training split for ext/datastore)
    label: int  # its next token
    weight: float  # mass it added to P(label) (Memorizing: gate x attention weight)
    similarity: Optional[float]
    head: Optional[int] = None


@dataclass
class TokenRecord:
    """One scored token: ``position`` is the stream position of the *target*."""

    position: int
    target: int
    lp_without: float
    lp_with: float
    shares: Dict[str, float]
    entries: List[Entry]
    top_with: List[Tuple[int, float]] = field(default_factory=list)
    top_without: List[Tuple[int, float]] = field(default_factory=list)


def kind_names(combiner) -> Tuple[str, str, str]:
    """Names of (long-term shared, local shared, external) entries for ``combiner``."""
    from trime_fairseq.memory.combiners import CacheCombiner, KnnCombiner

    if isinstance(combiner, CacheCombiner):
        return "cache-long", "cache", "ext"
    if isinstance(combiner, KnnCombiner):
        return "cache-long", "cache", "datastore"
    return "long", "local", "ext"


def used_kinds(combiner) -> Tuple[int, ...]:
    """Which of (long-term, local, external) entries ``combiner`` reads."""
    from trime_fairseq.memory.combiners import CacheCombiner, KnnCombiner

    if isinstance(combiner, CacheCombiner):
        return (0, 1)
    if isinstance(combiner, KnnCombiner):
        return (0, 1, 2) if combiner.cache is not None else (2,)
    return (0, 1, 2)


def score_positions(model, task, combiner, stream, lo: int, hi: int, context: int, long_size: int = 0,
                    retriever=None, batch_size: int = 1, top_entries: int = 8,
                    top_words: int = 3) -> Tuple[List[TokenRecord], dict]:
    """Score the targets of source positions ``[lo, hi)`` of ``stream`` as ``fairseq-eval-lm
    --task trime_lm`` does: blocks in order from the first block that holds ``lo``, memories
    empty there. Exact when ``[lo, hi)`` lies in one document (long-term and Memorizing
    memories hold only the current document's tokens).

    Returns the records and extras (``gates`` of a Memorizing Transformer).
    """
    from trime_fairseq.data.stream import StreamBlocks
    from trime_fairseq.memory.combiners import NoMemory
    from trime_fairseq.models.capture import to_model_device
    from trime_fairseq.models.memory_eval import MemoryEvalModel, scored_rows, scoring_inputs

    pad = task.source_dictionary.pad()
    if isinstance(model, MemoryEvalModel):
        model = model.inner
    block = task.args.tokens_per_sample
    blocks = StreamBlocks(stream, block, context, pad)
    memorizing = getattr(model, "needs_stream_positions", False)
    blocks.with_positions = memorizing
    recorder = None
    if memorizing:
        model.knn_attention.memory.reset()
        recorder = _MemorizingRecorder(model)
        batch_size = 1  # rows are run one after another anyway: one search per forward
    uses_memory = not isinstance(combiner, NoMemory)
    long_memory = _recording_long_memory(long_size, block + context) if uses_memory and long_size > 0 else None
    rec_retriever = _RecordingRetriever(retriever) if uses_memory and retriever is not None else None
    kinds = kind_names(combiner)
    wrapped = MemoryEvalModel(model, NoMemory(), pad).eval()
    records: List[TokenRecord] = []
    first, last = lo // block, (hi - 1) // block
    try:
        with torch.no_grad():
            for k in range(first, last + 1, batch_size):
                sample = to_model_device(blocks.collater([blocks[i] for i in range(k, min(k + batch_size, last + 1))]),
                                         model)
                base = None
                if memorizing:  # without memory: the same weights, no kNN attention
                    net_input = {n: sample["net_input"][n] for n in ("src_tokens", "src_lengths")}
                    base = scoring_inputs(model, wrapped(**net_input), sample, pad)
                    recorder.last = None
                x = scoring_inputs(model, wrapped(**sample["net_input"]), sample, pad)
                base = x if base is None else base
                rows = scored_rows(x, sample, pad, long_memory, rec_retriever, combiner.representations)
                starts = sample["start_indices"]
                offset = 0
                while True:
                    if long_memory is not None:
                        long_memory.last = None
                    try:
                        i, s, row = next(rows)
                    except StopIteration:
                        break
                    n_q = x.target.size(1) - s
                    ext_ids = None
                    if rec_retriever is not None:
                        ext_ids = rec_retriever.last.ids[offset:offset + n_q]
                    offset += n_q
                    qpos = sample["positions"][i, s:]  # source positions of the queries
                    keep = row.target[0].ne(pad) & (qpos >= lo) & (qpos < hi)
                    if not bool(keep.any()):
                        continue
                    window = long_memory.last if long_memory is not None else None
                    mem_pos = sample["positions"][i]
                    if window is not None:
                        mem_pos = torch.cat([window.positions.to(mem_pos.device), mem_pos])
                    base_row = base.rows(i, i + 1).queries(s, x.target.size(1))
                    n_long = 0 if window is None else len(window)
                    records += _row_records(combiner, row, base_row, qpos, keep, mem_pos, n_long, ext_ids, kinds,
                                            top_entries, top_words, recorder, int(starts[i]))
    finally:
        if recorder is not None:
            recorder.close()
    extras = {"gates": recorder.gates() if recorder is not None else None}
    return records, extras


def _row_records(combiner, row, base_row, qpos, keep, mem_pos, n_long, ext_ids, kinds, top_entries, top_words,
                 recorder, row_start) -> List[TokenRecord]:
    """Records of one row's kept queries (see :func:`score_positions`)."""
    used = used_kinds(combiner)
    target = row.target[0]
    lp_full = combiner.log_probs(row)[0]
    lp_with = lp_full.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    top_w = lp_full.topk(top_words, -1)
    base_full = base_row.tok_log_probs()[0]  # the vanilla LM's distribution, as NoMemory scores it
    base_lp = base_full.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    top_wo = base_full.topk(top_words, -1)
    contrib = combiner.contributions(row)
    names: List[str] = []
    shares = kind_of = None
    if contrib is not None:
        k_all = contrib.log_weight.size(-1)
        kind_of = torch.full((k_all,), 2, dtype=torch.long)
        kind_of[:n_long] = 0
        kind_of[n_long:contrib.num_shared] = 1
        names = list(kinds)
        w = contrib.log_weight[0].exp()
        positive = w * contrib.labels[0].eq(target.unsqueeze(-1))
        per_kind = positive.new_zeros(positive.size(0), 3).index_add_(1, kind_of.to(positive.device), positive)
        shares = per_kind / lp_with.exp().unsqueeze(-1).clamp_min(1e-30)
        # the entries that carried P(target) most, then the strongest ones for other words
        hit = contrib.labels[0].eq(target.unsqueeze(-1))
        lw = contrib.log_weight[0]
        n_hit, n_other = min(top_entries, k_all), min(OTHER_ENTRIES, k_all) if top_entries else 0
        for_target = lw.masked_fill(~hit, float("-inf")).topk(n_hit, -1)
        for_others = lw.masked_fill(hit, float("-inf")).topk(n_other, -1)
        top_lw = torch.cat([for_target.values, for_others.values], -1).tolist()
        top_j = torch.cat([for_target.indices, for_others.indices], -1).tolist()
    mt = None
    if recorder is not None and recorder.last is not None:
        top, pos = recorder.last  # [1, H, T_row, k] over the row's positions
        weights = recorder.weights(top)[0] * torch.tensor(recorder.gates(), device=top.device).view(-1, 1, 1)
        mt = (weights, pos[0], top[0].float())
    out: List[TokenRecord] = []
    for t in keep.nonzero(as_tuple=True)[0].tolist():
        entries: List[Entry] = []
        sh: Dict[str, float] = {}
        if contrib is not None:
            for k_idx, name in enumerate(names):
                v = float(shares[t, k_idx])
                present = (n_long, contrib.num_shared - n_long, k_all - contrib.num_shared)[k_idx] > 0
                if k_idx in used and present:
                    sh[name] = v
            sh[MODEL] = max(0.0, 1.0 - sum(sh.values()))
            for lw, j in zip(top_lw[t], top_j[t]):
                if not math.isfinite(lw):
                    continue
                kind = names[int(kind_of[j])]
                if j < contrib.num_shared:
                    position = int(mem_pos[j])
                else:
                    position = int(ext_ids[t, j - contrib.num_shared])
                sim = float(contrib.similarity[0, t, j])
                entries.append(Entry(kind, position, int(contrib.labels[0, t, j]), math.exp(lw),
                                     sim if math.isfinite(sim) else None))
        if mt is not None:
            weights, pos, sims = mt
            col = row_start + t  # the memorizing forward covers the whole row
            flat_w = weights[:, col].reshape(-1)
            n_top = min(top_entries, flat_w.numel())
            vals, idx = flat_w.topk(n_top)
            k = weights.size(-1)
            for v, f in zip(vals.tolist(), idx.tolist()):
                if v <= 0:
                    continue
                h, e = divmod(f, k)
                p = int(pos[h, col, e])
                entries.append(Entry("knn-memory", p, -1, v, float(sims[h, col, e]), head=h))
        out.append(TokenRecord(
            position=int(qpos[t]) + 1, target=int(target[t]), lp_without=float(base_lp[t]),
            lp_with=float(lp_with[t]), shares=sh, entries=entries,
            top_with=list(zip(top_w.indices[t].tolist(), top_w.values[t].exp().tolist())),
            top_without=list(zip(top_wo.indices[t].tolist(), top_wo.values[t].exp().tolist())),
        ))
    return out


# ---------------------------------------------------------------------------------------------
# the page's data


class Detokenizer:
    """Dictionary symbols as display text: sentencepiece (``▁``), subword-nmt (``@@``) or words."""

    def __init__(self, dictionary) -> None:
        self.d = dictionary
        syms = [dictionary[i] for i in range(dictionary.nspecial, min(len(dictionary), dictionary.nspecial + 2000))]
        self.spm = sum("\u2581" in s for s in syms) > len(syms) // 10

    def piece(self, idx: int, first: bool = False) -> str:
        if idx == self.d.eos():
            return "\n"
        s = self.d[idx]
        if self.spm:
            s = s.replace("\u2581", " ")
            return s.lstrip() if first else s
        if s.endswith("@@"):
            return s[:-2] if first else " " + s[:-2]  # joined to the next piece by the renderer
        return s if first else " " + s

    def text(self, ids: Sequence[int], first: bool = True) -> str:
        out = "".join(self.piece(int(t), first and i == 0) for i, t in enumerate(ids))
        return out.replace("@@ ", "")


def snippet(stream, detok: Detokenizer, position: int, before: int = 12, after: int = 4) -> List[str]:
    """``[text before, label, text after]`` around entry ``position`` (whose label is the
    token at ``position + 1``) of ``stream``."""
    n = len(stream)
    a = max(0, position - before + 1)
    left = detok.text(stream.ids(a, position + 1)) if position >= 0 else ""
    lab = detok.piece(int(stream.ids(position + 1, position + 2)[0])) if 0 <= position + 1 < n else ""
    right = detok.text(stream.ids(position + 2, min(n, position + 2 + after)), False) if position + 2 < n else ""
    if lab.startswith(" "):  # the space before the label is not part of it
        left, lab = left + " ", lab[1:]
    return [s.replace("\n", " \u00b6 ") for s in (left, lab, right)]


def build_page_data(records: List[TokenRecord], stream, first: int, end: int, detok: Detokenizer, freq: np.ndarray,
                    bounds: Sequence[int], meta: dict, ext_stream=None, extras: Optional[dict] = None,
                    top_n: int = 20) -> dict:
    """The JSON the page shows: tokens ``[first, end)`` of ``stream``, each with its record."""
    by_pos = {r.position: r for r in records}
    tokens = []
    for q in range(first, end):
        tid = int(stream.ids(q, q + 1)[0])
        tok = {"i": q - first, "pos": q, "id": tid, "text": detok.piece(tid, q == first), "scored": q in by_pos}
        r = by_pos.get(q)
        if r is not None:
            tok.update(
                lp_without=r.lp_without, lp_with=r.lp_with, gain_bits=(r.lp_with - r.lp_without) / math.log(2),
                shares=r.shares, freq=int(freq[tid]) if tid < len(freq) else 0,
                top_with=[[detok.piece(w, True), p] for w, p in r.top_with],
                top_without=[[detok.piece(w, True), p] for w, p in r.top_without],
                entries=[_entry_json(e, stream, ext_stream, detok, first, end, q) for e in r.entries],
            )
        tokens.append(tok)
    scored = [t for t in tokens if t["scored"]]
    summary = summarize(scored, bounds, top_n)
    if extras and extras.get("gates") is not None:
        summary["gates"] = extras["gates"]
    return {"meta": meta, "summary": summary, "tokens": tokens}


def _entry_json(e: Entry, stream, ext_stream, detok: Detokenizer, first: int, end: int, query: int) -> dict:
    src = ext_stream if e.kind in ("ext", "datastore") else stream
    out = {"kind": e.kind, "pos": e.position, "weight": e.weight, "sim": e.similarity}
    if e.head is not None:
        out["head"] = e.head
    if e.label >= 0:
        out["label"] = detok.piece(e.label, True)
        out["label_id"] = e.label
    else:  # a Memorizing Transformer entry: the token stored at that position (its key/value)
        tid = int(stream.ids(e.position, e.position + 1)[0])
        out["label"] = detok.piece(tid, True)
        out["label_id"] = tid
    shown = e.position if e.head is not None else e.position + 1  # the highlighted token
    if src is not None:
        out["context"] = snippet(src, detok, shown - 1)
    if src is stream and first <= shown < end:
        out["link"] = shown - first  # its token index in the page
    return out


def leading_kind(shares: Dict[str, float]) -> Optional[str]:
    """The memory kind with the largest share of ``P(target)`` (``None`` if memory added none)."""
    mem = {n: v for n, v in shares.items() if n != MODEL and v > 0}
    return max(mem, key=mem.get) if mem else None


def summarize(scored: List[dict], bounds: Sequence[int], top_n: int = 20) -> dict:
    """Perplexities, gain by memory kind and by target-frequency bucket, most helped tokens."""
    from trime_fairseq.cli.analyze import bucket_of, frequency_buckets

    scored = [t for t in scored if math.isfinite(t["lp_without"]) and math.isfinite(t["lp_with"])]
    if not scored:
        return {"tokens": 0}
    lp0 = np.array([t["lp_without"] for t in scored])
    lp1 = np.array([t["lp_with"] for t in scored])
    gain = (lp1 - lp0) / math.log(2)
    out = {"tokens": len(scored), "ppl_without": float(math.exp(-lp0.mean())), "ppl_with": float(math.exp(-lp1.mean())),
           "bits_gained": float(gain.sum()), "bits_per_token": float(gain.mean()),
           "helped": int((gain > 0).sum()), "hurt": int((gain < 0).sum())}
    kinds = sorted({k for t in scored for k in t["shares"] if k != MODEL})
    by_kind = []
    for k in kinds:
        share = np.array([t["shares"].get(k, 0.0) for t in scored])
        dominant = np.array([leading_kind(t["shares"]) == k for t in scored])
        by_kind.append({"kind": k, "mean_share": float(share.mean()), "tokens_led": int(dominant.sum()),
                        "bits_gained_led": float(gain[dominant].sum()) if dominant.any() else 0.0})
    if any(t.get("entries") and t["entries"][0].get("head") is not None for t in scored):
        by_kind.append({"kind": "knn-memory", "mean_share": None, "tokens_led": len(scored),
                        "bits_gained_led": float(gain.sum())})
    out["by_kind"] = by_kind
    freq = np.array([t["freq"] for t in scored])
    b = bucket_of(freq, list(bounds))
    rows = []
    for i, name in enumerate(frequency_buckets(freq, list(bounds))):
        sel = b == i
        if not sel.any():
            rows.append({"bucket": name, "tokens": 0})
            continue
        rows.append({"bucket": name, "tokens": int(sel.sum()), "ppl_without": float(math.exp(-lp0[sel].mean())),
                     "ppl_with": float(math.exp(-lp1[sel].mean())), "bits_per_token": float(gain[sel].mean())})
    out["by_frequency"] = rows
    order = np.argsort(-gain, kind="stable")[:top_n]
    out["most_helped"] = [{"i": scored[j]["i"], "text": scored[j]["text"].strip() or "\u00b6",
                           "gain_bits": float(gain[j]), "p_without": float(math.exp(lp0[j])),
                           "p_with": float(math.exp(lp1[j]))} for j in order if gain[j] > 0]
    return out


# ---------------------------------------------------------------------------------------------
# command line


def read_text(path: str, dictionary, spm_model: Optional[str]) -> np.ndarray:
    """``--text FILE`` as token ids: encoded with ``spm_model`` when given, else split on
    whitespace (already tokenised text); each line ends with ``</s>`` as in binarised data."""
    if not os.path.isfile(path):
        raise ValueError(f"--text {path}: no such file")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    sp = None
    if spm_model:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    ids: List[int] = []
    for line in lines:
        if not line.strip():
            continue
        pieces = sp.encode(line, out_type=str) if sp is not None else line.split()
        ids += [dictionary.index(p) for p in pieces] + [dictionary.eos()]
    if len(ids) < 2:
        raise ValueError(f"--text {path}: fewer than 2 tokens to score")
    return np.asarray(ids, dtype=np.int64)


def default_spm(data: str) -> Optional[str]:
    """The corpus's sentencepiece model (``trime_fairseq.cli.prepare_lm`` writes ``spm.model``
    beside ``bin/``), if there is one."""
    p = Path(data.split(":")[0]).resolve().parent / "spm.model"
    return str(p) if p.exists() else None


def parse(argv: Optional[Sequence[str]]):
    from trime_fairseq.cli.analyze import DEFAULT_BUCKETS

    p = argparse.ArgumentParser(prog="trime-inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--doc", type=int, help="index of the document of --gen-subset to inspect (0-based)")
    which.add_argument("--text", help="a text file to inspect instead (one document)")
    p.add_argument("--out", required=True, help="HTML page to write (the JSON goes beside it, .json)")
    p.add_argument("--spm", default=None,
                   help="sentencepiece model that encodes --text (default: DATA/../spm.model if present; "
                        "without one --text must be tokenised already, pieces separated by spaces)")
    p.add_argument("--top-entries", type=int, default=8,
                   help=f"memory entries shown per token that are labelled with its target (plus the {OTHER_ENTRIES} "
                        "strongest ones for other words)")
    p.add_argument("--top-tokens", type=int, default=20, help="most-helped tokens listed in the summary")
    p.add_argument("--buckets", default=DEFAULT_BUCKETS,
                   help="descending lower bounds of the target-frequency buckets (as trime-analyze)")
    p.add_argument("--title", default=None, help="page title (default: checkpoint and document)")
    ours, rest = p.parse_known_args(argv)
    return ours, rest, p


def inspect(ours, rest) -> dict:
    """Load, score, and return the page data (see :func:`main`)."""
    from trime_fairseq.cli.tune import load
    from trime_fairseq.data.stream import TokenStream
    from trime_fairseq.memory.combiners import NoMemory
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    bounds = sorted((int(b) for b in ours.buckets.split(",") if b), reverse=True)
    cfg, model, task = load(rest)
    model.eval()
    inner = model.inner if isinstance(model, MemoryEvalModel) else model
    combiner = task.combiner
    memory = EvalMemory.from_args(task.args)
    uses_memory = not isinstance(combiner, NoMemory)
    long_size = memory.long_size if uses_memory else 0
    retriever = None
    if uses_memory and memory.ext:
        retriever = getattr(model, "retriever", None) or task.build_retriever(inner)
        retriever.check_model(inner)
    subset = cfg.dataset.gen_subset
    data = task.args.data
    subset_stream = task.stream(subset)
    freq = np.bincount(subset_stream.ids(1, len(subset_stream)), minlength=len(task.dictionary))
    if ours.text is not None:
        ids = read_text(ours.text, task.dictionary, ours.spm or default_spm(data))
        stream = TokenStream(ids, np.zeros(1, dtype=np.int64))
        first, end = 0, len(ids)
        where = f"text {ours.text}"
    else:
        stream = subset_stream
        if not 0 <= ours.doc < stream.num_docs:
            raise ValueError(f"--doc {ours.doc}: --gen-subset {subset} has {stream.num_docs} documents "
                             f"(0..{stream.num_docs - 1})")
        first = int(stream.doc_starts[ours.doc])
        end = int(stream.doc_starts[ours.doc + 1]) if ours.doc + 1 < stream.num_docs else len(stream)
        where = f"{subset} document {ours.doc}"
    # queries and targets inside the document: every memory then starts empty at the first block
    # holding it, as in fairseq-eval-lm (they hold only the current document), so the scores
    # are eval-lm's exactly; the document's first token is shown, unscored
    lo, hi = first, end - 1
    if hi <= lo:
        raise ValueError(f"{where}: no token to score")
    context = cfg.eval_lm.context_window
    from fairseq import utils

    max_pos = utils.resolve_max_positions(inner.max_positions())
    if max_pos is not None and task.args.tokens_per_sample + context > max_pos:
        raise ValueError(f"--tokens-per-sample {task.args.tokens_per_sample + context} is longer than the model's "
                         f"{max_pos} positions (fairseq-eval-lm would skip such blocks): lower it")
    from trime_fairseq.tasks.trime_lm import blocks_per_batch

    bsz = blocks_per_batch(task.args.tokens_per_sample, context, cfg.dataset.max_tokens or 4096, cfg.dataset.batch_size)
    records, extras = score_positions(inner, task, combiner, stream, lo, hi, context, long_size, retriever, bsz,
                                      ours.top_entries)
    ext_stream, ext_note = None, None
    if retriever is not None:
        ext_stream, ext_note = datastore_stream(retriever.datastore, task)
    detok = Detokenizer(task.dictionary)
    heading = detok.text(stream.ids(first, min(first + 48, end))).split("\n")[0].strip()
    if heading:
        where += f" ({heading[:60]})"
    memorizing = getattr(inner, "needs_stream_positions", False)
    meta = {
        "title": ours.title or f"{Path(cfg.common_eval.path).parent.name}/{Path(cfg.common_eval.path).name} — {where}",
        "checkpoint": str(cfg.common_eval.path), "data": str(data), "where": where,
        "combiner": combiner.describe(), "memory": memory.describe() if uses_memory else "none",
        "long_memory_size": long_size, "datastore": str(retriever.datastore.path) if retriever else None,
        "datastore_layout": ext_note, "knn_k": retriever.k if retriever else None,
        "memorizing": memorizing, "tokens_per_sample": task.args.tokens_per_sample + context,
        "context_window": context, "first_position": first,
        "kinds": list(kind_names(combiner)) if uses_memory else [],
    }
    if memorizing:
        meta["memorizing_memory_size"] = inner.knn_attention.memory.size
        meta["memorizing_topk"] = inner.knn_attention.memory.k
    return build_page_data(records, stream, first, end, detok, freq, bounds, meta, ext_stream, extras, ours.top_tokens)


def datastore_stream(datastore, task):
    """The token stream a datastore's entries come from (entry ``i`` = source position ``i``),
    or ``None`` and why not."""
    src = datastore.meta.source or {}
    split = src.get("split")
    if split is None or "tokens_per_sample" not in src:
        return None, "the datastore does not record an LM split; entries shown without their text"
    try:
        s = task.stream(split)
    except FileNotFoundError:
        return None, f"split {split!r} of the datastore is not in DATA; entries shown without their text"
    if len(s) - 1 != len(datastore):
        return None, f"split {split!r} has {len(s)} tokens, the datastore {len(datastore)} keys; layout unknown"
    return s, f"entry i = source position i of {split}"


def _finite(v):
    """``v`` with every non-finite float replaced by ``None`` (valid JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_outputs(data: dict, out: str) -> Tuple[Path, Path]:
    """The HTML page and ``.json`` beside it, atomically."""
    from trime_fairseq.results import atomic_write
    from trime_fairseq.cli.inspect_page import render_page

    html = Path(out)
    js = html.with_suffix(".json")
    data = _finite(data)
    atomic_write(js, json.dumps(data, ensure_ascii=False, allow_nan=False))
    atomic_write(html, render_page(data))
    return html, js


def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_cli_logging()
    ours, rest, parser = parse(argv)
    if ours.top_entries < 0 or ours.top_tokens < 0:
        parser.error("--top-entries and --top-tokens must be >= 0")
    try:
        [int(b) for b in ours.buckets.split(",") if b]
    except ValueError:
        parser.error("--buckets takes comma-separated integers")
    from trime_fairseq.memory.datastore import DatastoreError

    try:
        data = inspect(ours, rest)
    except (DatastoreError, ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    html, js = write_outputs(data, ours.out)
    s = data["summary"]
    if s.get("tokens"):
        logger.info("%s: %d tokens, ppl %.2f without memory, %.2f with (%+.1f bits); page %s, data %s",
                    data["meta"]["where"], s["tokens"], s["ppl_without"], s["ppl_with"], s["bits_gained"], html, js)
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
