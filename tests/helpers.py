"""Small builders shared by the tests: tiny dictionaries, models and data."""
from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.models.transformer_lm import TransformerLanguageModel

import trime_fairseq  # noqa: F401  (registers everything)
from trime_fairseq import launch
from trime_fairseq.data.synthetic import write_lm_text, write_parallel_text
from trime_fairseq.models.architectures import trime_tiny

REPO = Path(__file__).resolve().parents[1]


def make_dictionary(n_words: int = 40) -> Dictionary:
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return d


def make_model(
    dictionary: Dictionary, adaptive_cutoff: Optional[str] = None, seed: int = 0, **overrides
) -> TransformerLanguageModel:
    """A 2-layer, d=32 ``transformer_lm`` (optionally with an adaptive softmax)."""
    torch.manual_seed(seed)
    args = argparse.Namespace(tokens_per_sample=128, **overrides)
    if adaptive_cutoff:
        args.adaptive_softmax_cutoff = adaptive_cutoff
        args.share_decoder_input_output_embed = False
    trime_tiny(args)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
    model = TransformerLanguageModel.build_model(args, task)
    return model.eval()


def random_tokens(dictionary: Dictionary, bsz: int, length: int, seed: int = 0, vocab: Optional[int] = None) -> torch.Tensor:
    """Tokens drawn from a small sub-vocabulary so labels repeat (memory has positives)."""
    g = torch.Generator().manual_seed(seed)
    hi = dictionary.nspecial + (vocab or 8)
    return torch.randint(dictionary.nspecial, hi, (bsz, length), generator=g)


def write_tiny_corpus(root: Path, n_docs: int = 24, seed: int = 0) -> Path:
    """Text files in fairseq's convention (one blank line between documents), binarised."""
    write_lm_text(root, {"train": n_docs, "valid": 16, "test": 16}, seed)
    run_cli(
        ["fairseq_cli.preprocess", "--only-source", "--trainpref", str(root / "train.txt"),
         "--validpref", str(root / "valid.txt"), "--testpref", str(root / "test.txt"),
         "--destdir", str(root / "bin"), "--workers", "1"]
    )
    return root / "bin"


def run_cli(argv: List[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` from the repo root (forked from the pre-imported
    server of :mod:`trime_fairseq.launch`); returns the completed process."""
    proc = launch.run(argv[0], argv[1:], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def write_tiny_parallel(root: Path, n_train: int = 120, seed: int = 0) -> Path:
    """A tiny de->en corpus (word-for-word synthetic pairs), binarised with a joined dictionary."""
    write_parallel_text(root, {"train": n_train, "valid": 24, "test": 12}, seed)
    run_cli(
        ["fairseq_cli.preprocess", "--source-lang", "de", "--target-lang", "en", "--joined-dictionary",
         "--trainpref", str(root / "train"), "--validpref", str(root / "valid"), "--testpref", str(root / "test"),
         "--destdir", str(root / "bin"), "--workers", "1"]
    )
    return root / "bin"


def adaptive_log_masses(asm, features: torch.Tensor) -> torch.Tensor:
    """Brute-force ``log exp(E_w · f)`` ``[..., V]`` of a fairseq ``AdaptiveSoftmax`` (eval
    mode), word by word: a head word's head logit; a tail word of cluster ``c`` the
    cluster's head logit plus its log-probability within the cluster."""
    x = features.reshape(-1, features.size(-1))
    head = asm.head(x)
    cutoff = asm.cutoff
    out = torch.empty(x.size(0), asm.vocab_size, dtype=head.dtype)
    for n in range(x.size(0)):
        for w in range(asm.vocab_size):
            if w < cutoff[0]:
                out[n, w] = head[n, w]
                continue
            c = next(i for i in range(len(cutoff) - 1) if cutoff[i] <= w < cutoff[i + 1])
            tail = torch.log_softmax(asm.tail[c](x[n:n + 1]), -1)[0]
            out[n, w] = head[n, cutoff[0] + c] + tail[w - cutoff[c]]
    return out.view(*features.shape[:-1], asm.vocab_size)
