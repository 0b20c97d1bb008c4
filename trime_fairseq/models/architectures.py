"""Architectures of the TRIME paper (Table 11, Appendix D) on fairseq's stock ``transformer_lm``.

TRIME changes no architecture, so these are presets of the stock model; any
``transformer_lm*`` architecture works with ``trime_loss`` as well. Adaptive presets use
WikiText-103's cut-offs (20000,60000); for a smaller vocabulary pass your own
``--adaptive-softmax-cutoff``/``--adaptive-input-cutoff``.

| name | paper | layers | d | heads | FFN | softmax |
|---|---|---|---|---|---|---|
| transformer_lm_trime_tiny | (tests) | 2 | 32 | 2 | 64 | full, tied |
| transformer_lm_trime_small | (demo, 2 CPU cores) | 4 | 128 | 4 | 512 | full, tied |
| transformer_lm_trime_wt103_7m | App. D / Table 12 | 8 | 128 | 4 | 512 | adaptive |
| transformer_lm_trime_wt103_150m | Table 3 | 16 | 410 | 10 | 2100 | adaptive |
| transformer_lm_trime_wt103_247m | Table 2 | 16 | 1024 | 8 | 4096 | adaptive |
| transformer_lm_trime_enwik8_38m | Table 4 | 12 | 512 | 8 | 2048 | full |

Translation (``--arch`` of fairseq's ``transformer``; the paper's Table 5 uses fairseq's
``transformer_iwslt_de_en``: 6+6 layers, d=512, FFN 1024, 4 heads):

| name | use | enc+dec layers | d | heads | FFN |
|---|---|---|---|---|---|
| transformer_mt_trime_tiny | (tests) | 1+1 | 32 | 2 | 64 |
| transformer_mt_trime_small | (demo, minutes on 2 CPU cores) | 3+3 | 128 | 4 | 512 |
"""
from __future__ import annotations

from fairseq.models import register_model_architecture
from fairseq.models.transformer import base_architecture as base_mt_architecture
from fairseq.models.transformer_lm import base_lm_architecture, transformer_lm_baevski_wiki103
from fairseq.utils import safe_getattr


def _set(args, **defaults) -> None:
    for key, value in defaults.items():
        setattr(args, key, safe_getattr(args, key, value))


def _adaptive(args, cutoff: str = "20000,60000") -> None:
    _set(
        args,
        adaptive_input=True,
        tie_adaptive_weights=True,
        tie_adaptive_proj=True,
        adaptive_input_cutoff=cutoff,
        adaptive_softmax_cutoff=cutoff,
        adaptive_softmax_dropout=0.0,
    )


@register_model_architecture("transformer_lm", "transformer_lm_trime_tiny")
def trime_tiny(args) -> None:
    _set(args, decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
         decoder_attention_heads=2, share_decoder_input_output_embed=True, dropout=0.0)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "transformer_lm_trime_small")
def trime_small(args) -> None:
    _set(args, decoder_layers=4, decoder_embed_dim=128, decoder_ffn_embed_dim=512,
         decoder_attention_heads=4, share_decoder_input_output_embed=True, dropout=0.1)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "transformer_lm_trime_wt103_7m")
def trime_wt103_7m(args) -> None:
    _set(args, decoder_layers=8, decoder_embed_dim=128, decoder_ffn_embed_dim=512,
         decoder_attention_heads=4, dropout=0.1)
    _adaptive(args)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "transformer_lm_trime_wt103_150m")
def trime_wt103_150m(args) -> None:
    _set(args, decoder_layers=16, decoder_embed_dim=410, decoder_ffn_embed_dim=2100,
         decoder_attention_heads=10, dropout=0.1)
    _adaptive(args)
    base_lm_architecture(args)


@register_model_architecture("transformer_lm", "transformer_lm_trime_wt103_247m")
def trime_wt103_247m(args) -> None:
    # Baevski & Auli's WikiText-103 model, the paper's 247M configuration
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("transformer_lm", "transformer_lm_trime_enwik8_38m")
def trime_enwik8_38m(args) -> None:
    _set(args, decoder_layers=12, decoder_embed_dim=512, decoder_ffn_embed_dim=2048,
         decoder_attention_heads=8, dropout=0.1)
    base_lm_architecture(args)


def _mt(args, layers: int, dim: int, heads: int, ffn: int, dropout: float) -> None:
    _set(args, encoder_layers=layers, decoder_layers=layers, encoder_embed_dim=dim, decoder_embed_dim=dim,
         encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_embed_dim=ffn,
         decoder_ffn_embed_dim=ffn, share_all_embeddings=True, dropout=dropout)
    base_mt_architecture(args)


@register_model_architecture("transformer", "transformer_mt_trime_tiny")
def trime_mt_tiny(args) -> None:
    _mt(args, layers=1, dim=32, heads=2, ffn=64, dropout=0.0)


@register_model_architecture("transformer", "transformer_mt_trime_small")
def trime_mt_small(args) -> None:
    _mt(args, layers=3, dim=128, heads=4, ffn=512, dropout=0.1)
