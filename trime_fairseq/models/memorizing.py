"""``--arch memorizing_transformer_lm``: the Memorizing Transformer (Wu et al., 2022).

One decoder layer's self-attention is kNN-augmented (:class:`KnnAugmentedAttention`): it
keeps the (key, value) pairs it computed on earlier segments of the same document in a
:class:`~trime_fairseq.memory.knn_memory.KnnMemory` (per batch row and head, FIFO,
no gradient), retrieves each query's top-k keys by inner product of L2-normalised
queries and keys, attends over them with its own softmax (a learned per-head scale), and
mixes that with ordinary local attention through a learned per-head gate:
``out = σ(b)·memory + (1-σ(b))·local``. The gate's start (``--memorizing-gate-init``), the
scale's start (``--memorizing-scale-init``) and how fast Adam moves both
(``--memorizing-param-scale``) are flags. With ``--memorizing-qk-norm on`` the local
attention of that layer also scores normalised queries and keys with the same learned
per-head scale (the paper normalises keys and queries), so local and memory attention are
on one scale: otherwise local attention can sharpen by growing q/k norms, which the
memory's cosine scores never see, and the memory softmax stays near uniform.

The memory needs to know, for every token, its document and stream position; the
``trime_lm`` task adds them to ``net_input`` (``mem_docs``, ``mem_positions``) for this
model. Training batches come from ``--stream-batching`` (row r of every batch continues
row r of the previous one); at test time rows are consecutive blocks of one stream and
are run one after another (``mem_start`` marks each row's context window), so results do
not depend on the batch size. Without these inputs, or with ``--memorizing-memory-size 0``,
the model is exactly a ``transformer_lm`` with the same weights. Change the memory size at
test time with ``--model-overrides "{'memorizing_memory_size': 32768}"``; large memories are
searched through faiss (``--memorizing-search``, ``--memorizing-faiss-*``; see
:mod:`trime_fairseq.memory.knn_memory`).

The flags are ``--memorizing-*`` (the ``--knn-*`` flags are kNN-LM's retrieval). Their names
before the rename (``--knn-layer``, ``--knn-memory-size``, ``--knn-memory-topk``,
``--knn-gate-init``... see :data:`DEPRECATED_NAMES`) still work for one release, with a
logged warning, and checkpoints saved under them load unchanged. fairseq ignores
``--model-overrides`` keys a checkpoint does not hold, so such a checkpoint takes overrides
under the old names (a warning says so).
"""
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from fairseq.modules import MultiheadAttention
from omegaconf import OmegaConf, open_dict
from torch import Tensor, nn

from trime_fairseq.memory.knn_memory import MEMORIZING_DEFAULTS, SEARCH_CHOICES, KnnMemory
from trime_fairseq.errors import TrimeUserError

logger = logging.getLogger(__name__)
_D = MEMORIZING_DEFAULTS


class KnnAugmentedAttention(MultiheadAttention):
    """Self-attention plus attention over retrieved memory, mixed by a per-head gate."""

    def __init__(self, embed_dim: int, num_heads: int, memory_size: int, topk: int,
                 memory_options: Optional[Dict[str, Any]] = None, gate_init: float = _D["memorizing_gate_init"],
                 scale_init: float = _D["memorizing_scale_init"], param_scale: float = _D["memorizing_param_scale"],
                 qk_norm: bool = _D["memorizing_qk_norm"] == "on", **kwargs) -> None:
        super().__init__(embed_dim, num_heads, self_attention=True, **kwargs)
        if not 0.0 < gate_init < 1.0:
            raise ValueError(f"--memorizing-gate-init must be in (0, 1), got {gate_init}")
        if scale_init < 0 or param_scale <= 0:
            raise ValueError(f"--memorizing-scale-init must be >= 0 and --memorizing-param-scale > 0, got "
                             f"{scale_init}, {param_scale}")
        # gate b = s·mem_gate and scale = exp(s·mem_log_scale): Adam moves each parameter by
        # about lr per step whatever its gradient, so s multiplies their learning rate
        self.param_scale = param_scale
        scale = scale_init or math.sqrt(self.head_dim)
        self.mem_gate = nn.Parameter(torch.full((num_heads,), math.log(gate_init / (1 - gate_init)) / param_scale))
        self.mem_log_scale = nn.Parameter(torch.full((num_heads,), math.log(scale) / param_scale))
        self.memory = KnnMemory(memory_size, topk, **(memory_options or {}))
        self.qk_norm = qk_norm
        self.stream: Optional[Dict[str, Tensor]] = None  # set by the model for each forward

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        use_memory = self.stream is not None and self.memory.size > 0
        if incremental_state is not None and self.qk_norm:
            raise TrimeUserError("--memorizing-qk-norm on has no incremental decoding; score with fairseq-eval-lm")
        if incremental_state is not None or not (use_memory or self.qk_norm):
            return super().forward(query, key, value, key_padding_mask, incremental_state, need_weights,
                                   static_kv, attn_mask, before_softmax, need_head_weights)
        t, b, c = query.shape
        h, dh = self.num_heads, self.head_dim

        def heads(x: Tensor) -> Tensor:
            return x.view(t, b, h, dh).permute(1, 2, 0, 3)  # [B, H, T, dh]

        k, v = heads(self.k_proj(key)), heads(self.v_proj(value))
        if self.qk_norm:  # scale · q̂·k̂ for local attention too (the memory normalises its own)
            q = F.normalize(heads(self.q_proj(query)), dim=-1) * self.memory_scale()[None, :, None, None]
            local = self.local_attention(q, F.normalize(k, dim=-1), v, attn_mask, key_padding_mask)
        else:
            q = heads(self.q_proj(query) * self.scaling)
            local = self.local_attention(q, k, v, attn_mask, key_padding_mask)
        mem = self.memory_attention(q) if use_memory else None
        if mem is not None:
            out = self.mix(local, *mem)
        elif use_memory and torch.is_grad_enabled():  # empty memory: give the memory parameters
            # a zero gradient anyway, so DistributedDataParallel sees every parameter used
            out = local + 0.0 * (self.mem_gate.sum() + self.mem_log_scale.sum())
        else:
            out = local
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(t, b, c))
        if use_memory:
            s = self.stream
            self.memory.update(k, v, keep=s["keep"], positions=s["positions"], docs=s["docs"])
        return out, None

    def local_attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                        key_padding_mask: Optional[Tensor]) -> Tensor:
        """Ordinary attention over the segment (fused kernel); ``q`` is already scaled."""
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            pad = pad.masked_fill(key_padding_mask.bool(), float("-inf"))[:, None, None, :]
            mask = pad if mask is None else mask + pad
        drop = self.dropout_module.p if self.training or self.dropout_module.apply_during_inference else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)

    def memory_attention(self, q: Tensor):
        """``(memory result [B, H, T, dh], has memory [B, H, T, 1])`` or ``None`` if empty."""
        s = self.stream
        scores, values, found = self.memory.topk(q, before=s["before"], query_docs=s["docs"])
        if scores.size(-1) == 0 or not bool(found.any()):
            return None
        scale = self.memory_scale()[None, :, None, None]
        # zero the missing scores before scaling: -inf * scale has a NaN gradient in scale
        logits = (scores.masked_fill(~found, 0.0) * scale).masked_fill(~found, float("-inf"))
        has = found.any(-1, keepdim=True)
        weights = F.softmax(logits.masked_fill(~has, 0.0), dim=-1).masked_fill(~found, 0.0)
        return torch.matmul(weights.unsqueeze(-2), values).squeeze(-2), has

    def mix(self, local: Tensor, memory: Tensor, has: Tensor) -> Tensor:
        """``σ(b)·memory + (1-σ(b))·local`` where a query found memory, else ``local``."""
        gate = self.gate()[None, :, None, None]
        return torch.where(has, gate * memory + (1 - gate) * local, local)

    def gate(self) -> Tensor:
        """σ(b) per head, the weight of the memory result."""
        return torch.sigmoid(self.param_scale * self.mem_gate)

    def memory_scale(self) -> Tensor:
        """Per-head factor of the normalised q·k scores before the memory softmax."""
        return (self.param_scale * self.mem_log_scale).exp()


def _default(name: str, help: str):
    """A ``--memorizing-*`` field: unset (None) on the command line, so that its deprecated
    ``--knn-*`` name can stand in for it; the default comes from :data:`MEMORIZING_DEFAULTS`."""
    return field(default=None, metadata={"help": f"{help} (default: {_D[name]})"})


def _deprecated(new: str):
    return field(default=None, metadata={"help": f"deprecated name of --{new.replace('_', '-')} (kept for one "
                                                 "release)"})


#: the Memorizing flags' names before they were told apart from kNN-LM's ``--knn-*`` flags
DEPRECATED_NAMES = {
    "knn_layer": "memorizing_layer", "knn_memory_size": "memorizing_memory_size",
    "knn_memory_topk": "memorizing_topk", "knn_gate_init": "memorizing_gate_init",
    "knn_scale_init": "memorizing_scale_init", "knn_param_scale": "memorizing_param_scale",
    "knn_search": "memorizing_search", "knn_faiss_min_size": "memorizing_faiss_min_size",
    "knn_faiss_factory": "memorizing_faiss_factory", "knn_faiss_nprobe": "memorizing_faiss_nprobe",
    "knn_faiss_train_size": "memorizing_faiss_train_size",
}


@dataclass
class MemorizingTransformerConfig(TransformerLanguageModelConfig):
    memorizing_layer: Optional[int] = _default(
        "memorizing_layer", "index of the kNN-augmented decoder layer (-1: about 3/4 of the depth)")
    memorizing_memory_size: Optional[int] = _default(
        "memorizing_memory_size", "tokens of (key, value) memory per batch row (FIFO, reset per document); "
                                  "0 disables the memory (a plain transformer_lm)")
    memorizing_topk: Optional[int] = _default("memorizing_topk", "memory entries retrieved per query and head")
    memorizing_gate_init: Optional[float] = _default(
        "memorizing_gate_init", "initial gate σ(b) of every head (the weight of the memory result)")
    memorizing_scale_init: Optional[float] = _default(
        "memorizing_scale_init", "initial factor of the normalised q·k (in [-1, 1]) before the memory softmax; "
                                 "0: sqrt(head dim)")
    memorizing_param_scale: Optional[float] = _default(
        "memorizing_param_scale", "the gate and the log-scale are stored divided by this factor, so that Adam "
                                  "(steps of about --lr per parameter) moves them this many times faster")
    memorizing_qk_norm: Optional[ChoiceEnum(["on", "off"])] = _default(
        "memorizing_qk_norm", "on: the kNN-augmented layer's local attention also scores L2-normalised queries "
                              "and keys times the learned per-head scale, as its memory attention does (one scale "
                              "for both; set --memorizing-scale-init to about 10-20); off: ordinary q.k/sqrt(d)")
    memorizing_search: Optional[ChoiceEnum(SEARCH_CHOICES)] = _default(
        "memorizing_search", "memory search: exact torch matmul + top-k, a faiss index per (row, head), or auto "
                             "(faiss above --memorizing-faiss-min-size entries)")
    memorizing_faiss_min_size: Optional[int] = _default(
        "memorizing_faiss_min_size", "--memorizing-search auto uses faiss for memories larger than this")
    memorizing_faiss_factory: Optional[str] = _default(
        "memorizing_faiss_factory", "faiss index_factory string of each (row, head) index, inner product (Flat: "
                                    "exact); auto: IVF with about 4*sqrt(memory size) lists and flat codes (Flat "
                                    "where the memory cannot hold 39 keys per list)")
    memorizing_faiss_nprobe: Optional[int] = _default(
        "memorizing_faiss_nprobe", "lists probed per query by IVF indexes")
    memorizing_faiss_train_size: Optional[int] = _default(
        "memorizing_faiss_train_size", "keys a row must hold before its trainable (IVF) indexes are trained on "
                                       "them (exact torch search until then); 0: min(memory size, 39 per IVF list)")
    knn_layer: Optional[int] = _deprecated("memorizing_layer")
    knn_memory_size: Optional[int] = _deprecated("memorizing_memory_size")
    knn_memory_topk: Optional[int] = _deprecated("memorizing_topk")
    knn_gate_init: Optional[float] = _deprecated("memorizing_gate_init")
    knn_scale_init: Optional[float] = _deprecated("memorizing_scale_init")
    knn_param_scale: Optional[float] = _deprecated("memorizing_param_scale")
    knn_search: Optional[ChoiceEnum(SEARCH_CHOICES)] = _deprecated("memorizing_search")
    knn_faiss_min_size: Optional[int] = _deprecated("memorizing_faiss_min_size")
    knn_faiss_factory: Optional[str] = _deprecated("memorizing_faiss_factory")
    knn_faiss_nprobe: Optional[int] = _deprecated("memorizing_faiss_nprobe")
    knn_faiss_train_size: Optional[int] = _deprecated("memorizing_faiss_train_size")


def resolve_memorizing_args(args) -> None:
    """Settle the Memorizing flags of ``args`` (a Namespace, or a checkpoint's model config):
    a deprecated ``--knn-*`` name that is set is moved to its ``--memorizing-*`` name (with a
    warning; it wins over a value already there, as a ``--model-overrides`` of the old name on
    a newer checkpoint must), and unset flags take :data:`MEMORIZING_DEFAULTS`. Idempotent."""
    def get(name):
        try:
            return getattr(args, name, None)
        except Exception:  # an omegaconf struct without the key
            return None

    old_checkpoint = []
    for old, new in DEPRECATED_NAMES.items():
        value = get(old)
        if value is None:
            continue
        flag_old, flag_new = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
        current = get(new)
        if current is None:
            logger.warning("%s is deprecated (the --knn-* flags are kNN-LM's retrieval); use %s", flag_old, flag_new)
            if not hasattr(args, new):
                old_checkpoint.append(old)
        elif current != value:
            logger.warning("%s %s (deprecated name) replaces %s %s", flag_old, value, flag_new, current)
        setattr(args, new, value)
        setattr(args, old, None)
    if old_checkpoint:
        logger.warning("this checkpoint predates the --memorizing-* names: fairseq ignores --model-overrides keys it "
                       "does not hold, so override %s under their old names", ", ".join(old_checkpoint))
    for name, default in MEMORIZING_DEFAULTS.items():
        if get(name) is None:
            setattr(args, name, default)


@register_model("memorizing_transformer_lm", dataclass=MemorizingTransformerConfig)
class MemorizingTransformerLanguageModel(TransformerLanguageModel):
    """A transformer LM with one kNN-augmented attention layer (see module docstring)."""

    needs_stream_positions = True

    @classmethod
    def build_model(cls, args, task):
        with open_dict(args) if OmegaConf.is_config(args) else nullcontext():
            resolve_memorizing_args(args)
        model = super().build_model(args, task)
        layers = model.decoder.layers
        idx = args.memorizing_layer if args.memorizing_layer >= 0 else (3 * len(layers)) // 4
        if not 0 <= idx < len(layers):
            raise TrimeUserError(f"--memorizing-layer {args.memorizing_layer} is not a layer index "
                                 f"(0..{len(layers) - 1})")
        old = layers[idx].self_attn
        new = KnnAugmentedAttention(
            old.embed_dim, old.num_heads, args.memorizing_memory_size, args.memorizing_topk,
            memory_options=dict(
                search=args.memorizing_search, faiss_factory=args.memorizing_faiss_factory,
                faiss_min_size=args.memorizing_faiss_min_size, faiss_nprobe=args.memorizing_faiss_nprobe,
                faiss_train_size=args.memorizing_faiss_train_size,
            ),
            gate_init=args.memorizing_gate_init, scale_init=args.memorizing_scale_init,
            param_scale=args.memorizing_param_scale, qk_norm=str(args.memorizing_qk_norm) == "on",
            dropout=old.dropout_module.p, bias=old.k_proj.bias is not None,
        )
        new.load_state_dict(old.state_dict(), strict=False)
        layers[idx].self_attn = new
        model.knn_layer_index = idx
        return model

    @property
    def knn_attention(self) -> KnnAugmentedAttention:
        return self.decoder.layers[self.knn_layer_index].self_attn

    def train(self, mode: bool = True):
        if mode != self.training and hasattr(self, "knn_layer_index"):
            self.knn_attention.memory.reset()  # training and evaluation streams differ
        return super().train(mode)

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None, mem_docs: Optional[Tensor] = None,
                mem_positions: Optional[Tensor] = None, mem_start: Optional[List[int]] = None, **kwargs):
        layer = self.knn_attention
        if mem_docs is None:
            layer.stream = None
            return super().forward(src_tokens, src_lengths=src_lengths, **kwargs)
        if mem_start is None:  # parallel streams (training): one forward
            return self._forward_rows(src_tokens, src_lengths, mem_docs, mem_positions, None, **kwargs)
        outs = [  # rows are consecutive blocks of one stream: one after another
            self._forward_rows(src_tokens[i:i + 1], None if src_lengths is None else src_lengths[i:i + 1],
                               mem_docs[i:i + 1], mem_positions[i:i + 1], [mem_start[i]], **kwargs)
            for i in range(src_tokens.size(0))
        ]
        extra = outs[0][1]
        for key in ("inner_states",):
            if key in extra and extra[key] is not None:
                extra[key] = [torch.cat([o[1][key][j] for o in outs], dim=1) for j in range(len(extra[key]))]
        return torch.cat([o[0] for o in outs], dim=0), extra

    def _forward_rows(self, src_tokens, src_lengths, docs, positions, start, **kwargs):
        keep = positions >= 0
        if start is not None:  # the context window was stored with the previous block
            cols = torch.arange(src_tokens.size(1), device=src_tokens.device)
            keep = keep & (cols.unsqueeze(0) >= torch.tensor(start, device=cols.device).unsqueeze(1))
        first = positions.masked_fill(positions < 0, torch.iinfo(positions.dtype).max).amin(dim=1)
        self.knn_attention.stream = {"docs": docs, "positions": positions, "keep": keep, "before": first}
        try:
            return super().forward(src_tokens, src_lengths=src_lengths, **kwargs)
        finally:
            self.knn_attention.stream = None


@register_model_architecture("memorizing_transformer_lm", "memorizing_transformer_lm_tiny")
def memorizing_tiny(args) -> None:
    from trime_fairseq.models.architectures import trime_tiny

    resolve_memorizing_args(args)
    trime_tiny(args)


@register_model_architecture("memorizing_transformer_lm", "memorizing_transformer_lm_small")
def memorizing_small(args) -> None:
    from trime_fairseq.models.architectures import trime_small

    resolve_memorizing_args(args)
    trime_small(args)
