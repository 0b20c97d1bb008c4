"""Suite sizes: models, data and benchmark flags (``smoke`` for structure, ``full`` for the report)."""
from dataclasses import dataclass
from typing import Dict, List


@dataclass(frozen=True)
class Size:
    """Models, data and benchmark flags of one suite size."""

    lm_arch: str
    lm_updates: int
    tokens_per_sample: int  # training segment length, also the evaluation block (context included)
    context: int
    max_tokens: int
    mt_arch: str
    mt_updates: int
    mt_max_tokens: int
    lm_recall_k: int
    mt_recall_k: int
    train: List[str]
    memorizing: List[str]
    eval: List[str]
    external: List[str]
    generate: List[str]
    gen_passes: int


SIZES: Dict[str, Size] = {
    "smoke": Size(
        lm_arch="transformer_lm_trime_tiny", lm_updates=4, tokens_per_sample=64, context=32, max_tokens=512,
        mt_arch="transformer_mt_trime_tiny", mt_updates=20, mt_max_tokens=512, lm_recall_k=16, mt_recall_k=8,
        train=["--blocks", "1", "--steps", "2", "--warmup-steps", "1", "--long-m", "2", "--op-counts"],
        memorizing=["--blocks", "1", "--steps", "2", "--warmup-steps", "1", "--memorizing", "256"],
        eval=["--long-memory-size", "512", "--max-blocks", "16", "--passes", "1"],
        external=["--bm25-segments", "2000", "--blocks", "16", "--knn-k", "16", "--cheaper-k", "8,4"],
        generate=["--knn-k", "8", "--beam", "2", "--batch-size", "12", "--max-sentences", "12", "--passes", "1"],
        gen_passes=1,
    ),
    "full": Size(
        # the LM as the main job trains it (320 updates of 8192 tokens): after 40 updates its
        # datastore keys had collapsed (median L2 distance of the 1st and the 1024th neighbour:
        # 0.0 and 0.2), so kNN-LM spread its mass evenly over all K neighbours
        lm_arch="transformer_lm_trime_small", lm_updates=320, tokens_per_sample=512, context=128, max_tokens=8192,
        # the MT model is trained as in examples/translation.py (400 updates of 4096 tokens), so
        # kNN-MT generation is timed on real output lengths, not an untrained model's
        mt_arch="transformer_mt_trime_small", mt_updates=400, mt_max_tokens=4096, lm_recall_k=1024, mt_recall_k=16,
        # repetitions sized so the benchmarks take ~25 min on 2 busy cores (preparation: ~45 min, once)
        train=["--blocks", "4", "--steps", "3", "--long-m", "4", "--op-counts"],
        memorizing=["--blocks", "2", "--steps", "3", "--memorizing", "8192"],
        eval=["--long-memory-size", "12000", "--max-blocks", "100", "--passes", "2"],
        external=["--bm25-segments", "100000", "--blocks", "60", "--knn-k", "1024"],
        generate=["--knn-k", "16", "--beam", "5", "--batch-size", "64", "--max-sentences", "200", "--passes", "2"],
        gen_passes=2,
    ),
}


BENCHMARKS = ("train", "memorizing", "eval_full_memory", "eval_documents", "external", "ext_eval", "generate")
PREPARATION = ("lm_corpus", "lm_checkpoint", "lm_datastore", "mt_corpus", "mt_checkpoint", "mt_datastore")
ONE_SAVE = ["--save-interval", 10**6]  # epochs: save once, when training stops
