"""Memory at test time inside ``fairseq-eval-lm``.

``fairseq-eval-lm`` scores with fairseq's ``SequenceScorer``, which calls
``model(**net_input)`` and ``model.get_normalized_probs(net_output, sample=sample)``. The
``trime_lm`` task wraps the loaded model in :class:`MemoryEvalModel`, whose
``get_normalized_probs`` returns the memory-augmented distribution of its combiner.

* Local memory: for a query at position ``t`` of a row, every earlier position ``j < t``
  of the row, *including the ``--context-window`` tokens*, labelled with its next token
  (for context tokens, the next input token: their targets are padding).
* Long-term memory (Eq. 3): the ``g``/``f`` of up to ``M`` earlier scored tokens of the same
  document (of the stream with ``across_documents``) that lie before the row's context
  window (so no token is in memory twice),
  kept in a :class:`~trime_fairseq.memory.long_term.LongTermMemory` across batches. Rows
  are scored one after another, in reading order.
* External memory (Eq. 4): the K nearest datastore entries of each scored query, found
  by one FAISS search per batch (:class:`~trime_fairseq.memory.retriever.Retriever`);
  with ``--retrieval-skip-feature``, the queries where the model is confident are not
  searched and are scored without external memory (adaptive retrieval).

The wrapper times the model forward, the search and the combining (:attr:`timings`); the
task logs them with the share of skipped searches at the end of ``fairseq-eval-lm``.

Positions that are not scored (the context window) get the model's own distribution.
"""
import time
from typing import Iterator, Optional, Sequence, Tuple

import torch
from fairseq.models import BaseFairseqModel
from torch import Tensor

from trime_fairseq.memory.combiners import Combiner, ScoringInputs
from trime_fairseq.memory.long_term import LongTermMemory
from trime_fairseq.memory.retriever import Retriever
from trime_fairseq.models.wrapper import MemoryModelWrapper
from trime_fairseq.models.output_layer import DEFAULT_ADAPTIVE_TOKEN_MASS, at_least_float32, full_token_scores
from trime_fairseq.errors import TrimeUserError


def memory_labels(src_tokens: Tensor, target: Tensor, pad: int) -> Tensor:
    """The next token of every input position: the target where there is one, else the
    next input token (context-window positions), else padding."""
    nxt = torch.full_like(src_tokens, pad)
    nxt[:, :-1] = src_tokens[:, 1:]
    return torch.where(target.ne(pad), target, nxt)


def local_mask(labels: Tensor, pad: int) -> Tensor:
    """``[B, T, T]``: query ``t`` sees keys ``j < t`` that have a label."""
    t = labels.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=labels.device).tril(-1)
    return causal.unsqueeze(0) & labels.ne(pad).unsqueeze(1)


def scoring_inputs(model, net_output, sample, pad: int,
                   adaptive_mass: str = DEFAULT_ADAPTIVE_TOKEN_MASS) -> ScoringInputs:
    """Assemble :class:`ScoringInputs` with local memory from a forward of a wrapped model
    (``adaptive_mass``: the adaptive-softmax token term, see
    :mod:`trime_fairseq.models.output_layer`)."""
    extra = net_output[1]
    target = sample["target"]
    if net_output[0].shape[:2] != target.shape:
        raise TrimeUserError(
            "--softmax-batch splits the batch, which memory scoring cannot follow; "
            "leave --softmax-batch at its default or lower --max-tokens instead"
        )
    tok_scores, tok_lse, tok_lprobs = full_token_scores(model, net_output, sample, adaptive_mass)
    labels = memory_labels(sample["net_input"]["src_tokens"], target, pad)
    g, f = at_least_float32(extra["trime_g"]), at_least_float32(extra["trime_f"])
    return ScoringInputs(
        tok_scores=tok_scores, tok_lse=tok_lse, target=target, query_g=g, query_f=f,
        keys_g=g, keys_f=f, key_labels=labels, mask=local_mask(labels, pad), tok_lprobs=tok_lprobs,
    )


def scored_rows(
    x: ScoringInputs, sample, pad: int, long_memory: Optional[LongTermMemory] = None,
    retriever: Optional[Retriever] = None, representations: Sequence[str] = ("g", "f"),
) -> Iterator[Tuple[int, int, ScoringInputs]]:
    """Yield ``(row, first scored position, inputs of the scored queries)`` in order.

    With ``long_memory``, each row's queries also see the long-term entries of their
    document, and the row's scored tokens are appended to it after it was yielded. With
    ``retriever``, each query also gets its nearest external entries. Only the
    ``representations`` listed are kept in the long-term memory.
    """
    starts = sample.get("start_indices") or [0] * x.target.size(0)
    external = None
    if retriever is not None:
        t = x.target.size(1)
        queries = torch.cat([x.query_g[i, int(starts[i]):] for i in range(x.target.size(0))])
        positions = None
        if retriever.exclude_self:  # the split the datastore was built from: leave each query's own entry out
            if "positions" not in sample:
                raise TrimeUserError("--exclude-self-from-datastore needs token positions: evaluate with "
                                     "--task trime_lm (its own data loader)")
            positions = torch.cat([sample["positions"][i, int(starts[i]):] for i in range(x.target.size(0))])
        features = None
        if retriever.skip is not None and not retriever.skip.never_skips:
            # adaptive retrieval: the skip rule reads the model's distribution, row by row
            tok = x.tok_log_probs()
            features = torch.cat([retriever.skip.values(tok[i, int(starts[i]):]) for i in range(x.target.size(0))])
        found = retriever.search(queries, positions, features=features)
        external = iter(zip(found.scores.split([t - int(s) for s in starts]),
                            found.values.split([t - int(s) for s in starts])))
    if long_memory is not None and ("doc_ids" not in sample or "positions" not in sample):
        raise TrimeUserError(
            "long-term memory needs document ids: evaluate with --task trime_lm (its own data loader)"
        )
    for i in range(x.target.size(0)):
        s = int(starts[i])
        row = x.rows(i, i + 1).queries(s, x.target.size(1))
        if external is not None:
            ext_scores, ext_values = next(external)
            row = row.with_external(ext_scores.unsqueeze(0), ext_values.unsqueeze(0))
        if long_memory is None:
            yield i, s, row
            continue
        docs, pos = sample["doc_ids"][i], sample["positions"][i]
        scored = x.target[i, s:].ne(pad).nonzero(as_tuple=True)[0] + s
        if scored.numel() == 0:
            yield i, s, row
            continue
        window = long_memory.window(int(pos[0]), int(docs[s]))
        if window is not None:
            if long_memory.across_documents:
                allowed = torch.ones(docs.numel() - s, len(window), dtype=torch.bool, device=docs.device)
            else:
                allowed = docs[s:].unsqueeze(1) == window.docs.unsqueeze(0)
            keys = {k: (window.keys[k].unsqueeze(0) if k in window.keys else None) for k in ("g", "f")}
            row = row.with_long_memory(keys["g"], keys["f"], window.labels.unsqueeze(0), allowed.unsqueeze(0))
        yield i, s, row
        reps = {"g": x.query_g, "f": x.query_f}
        long_memory.update(
            {k: reps[k][i, scored] for k in representations},
            x.target[i, scored], positions=pos[scored], docs=docs[scored],
        )


class MemoryEvalModel(MemoryModelWrapper):
    """Wraps a trained fairseq LM; scores with a memory :class:`Combiner`.

    Parameters and checkpoints are the inner model's: loading, ``state_dict`` and
    ``max_positions`` are delegated, so any checkpoint of a ``transformer_lm`` loads.
    """

    def __init__(self, model: BaseFairseqModel, combiner: Combiner, pad: int, long_memory_size: int = 0,
                 retriever: Optional[Retriever] = None, across_documents: bool = False,
                 adaptive_mass: str = DEFAULT_ADAPTIVE_TOKEN_MASS) -> None:
        super().__init__(model, combiner)
        self.across_documents = across_documents
        self.adaptive_mass = adaptive_mass
        self.retriever = retriever
        self.pad = pad
        self.long_memory_size = long_memory_size
        self.long_memory: Optional[LongTermMemory] = None

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(src_tokens, src_lengths=src_lengths, **kwargs)
        extra = out[1] if len(out) > 1 and isinstance(out[1], dict) else {}
        extra["trime_g"] = self.capture.take()
        extra["trime_f"] = self.capture.take_f(out)
        self.timings["model"] += time.perf_counter() - t0
        return (out[0], extra) + tuple(out[2:])

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        t0 = time.perf_counter()
        searched = self.retriever.search_seconds if self.retriever is not None else 0.0
        out = self._normalized_probs(net_output, log_probs, sample)
        search = (self.retriever.search_seconds if self.retriever is not None else 0.0) - searched
        self.timings["search"] += search
        self.timings["combine"] += time.perf_counter() - t0 - search
        return out

    def _normalized_probs(self, net_output, log_probs: bool, sample=None):
        if sample is None or sample.get("target") is None:
            raise TrimeUserError("memory scoring needs the sample's targets (fairseq-eval-lm)")
        if self.retriever is not None:
            self.retriever.check_model(self.inner)
        x = scoring_inputs(self.inner, net_output, sample, self.pad, self.adaptive_mass)
        if self.long_memory_size > 0 and self.long_memory is None:
            context = int(max(sample.get("start_indices") or [0]))
            self.long_memory = LongTermMemory(self.long_memory_size, context=max(context, x.target.size(1)),
                                              across_documents=self.across_documents)
        # a fresh tensor of this call; a row is overwritten only after it was scored
        lprobs = x.tok_log_probs()
        for i, s, row in scored_rows(x, sample, self.pad, self.long_memory, self.retriever,
                                     self.combiner.representations):
            lprobs[i, s:] = self.combiner.log_probs(row)[0]
        return lprobs if log_probs else lprobs.exp()
