"""Tiny synthetic corpora for tests and smoke-size benchmarks (structure, not language).

Both writers are seeded and deterministic, and write fairseq's text conventions: the LM
corpus has one blank line between documents; the parallel corpus is word-for-word
(``d<i>`` -> ``e<i>``) so an MT model can learn it in a few updates.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping

LM_WORDS = [f"w{i}" for i in range(30)] + "the a of to and in is".split()


def write_lm_text(root: Path, docs: Mapping[str, int], seed: int = 0) -> None:
    """``root/{split}.txt`` with ``docs[split]`` documents of 2-5 lines of 5-15 words."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n_docs in docs.items():
        with open(root / f"{split}.txt", "w") as f:
            for _ in range(n_docs):
                for _ in range(rnd.randint(2, 5)):
                    f.write(" ".join(rnd.choice(LM_WORDS) for _ in range(rnd.randint(5, 15))) + "\n")
                f.write("\n")


def write_parallel_text(root: Path, pairs: Mapping[str, int], seed: int = 0) -> None:
    """``root/{split}.de`` / ``.en`` with ``pairs[split]`` word-for-word sentence pairs."""
    rnd = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in pairs.items():
        with open(root / f"{split}.de", "w") as de, open(root / f"{split}.en", "w") as en:
            for _ in range(n):
                words = [rnd.randrange(20) for _ in range(rnd.randint(3, 9))]
                de.write(" ".join(f"d{w}" for w in words) + "\n")
                en.write(" ".join(f"e{w}" for w in words) + "\n")
