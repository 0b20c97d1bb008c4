"""TRIME-MT recipe ablation: each change of the reference recipe on and off (validation only).

Trains the base model (label-smoothed CE) and TRIME-MT under the recipe of
``examples/translation.py`` (memory logits / 10, top-8 memory logits, no label smoothing,
BM25 groups whole in chain order), then TRIME-MT with one change reverted at a time, and
TRIME-MT with all four reverted (the earlier setup). Every model gets the same updates and
seed. Reported on the **validation** set (never test): greedy BLEU (fairseq's
``--eval-bleu``), NLL of the model alone and, for TRIME-MT, the NLL of Eq. 5 with the other
sentences of each validation batch as memory.

    python examples/translation_ablation.py --corpus runs/mt/corpus --run-dir runs/mt_ablation

Writes ``RUN/ablation.{json,md}`` and ``--results`` (``docs/results/translation_ablation``).
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from translation import (  # noqa: E402
    add_recipe_args, common_train_flags, train_tokens_per_update, trime_flags, valid_curve)
from examples import harness as ex  # noqa: E402

logger = logging.getLogger("translation_ablation")

#: variant name -> (description, recipe arguments changed from the recipe)
VARIANTS = {
    "recipe": ("TRIME-MT, reference recipe", {}),
    "temperature_1": ("train temperature 1 (off)", {"trime_temperature": 1.0}),
    "top_k_all": ("all memory logits (top-k off)", {"memory_top_k": 0}),
    "label_smoothing": ("label smoothing 0.1 of the token term (on)", {"trime_label_smoothing": 0.1}),
    "bm25_length": ("BM25 groups re-split by length (off)", {"bm25_grouping": "length"}),
    "old": ("all four reverted (earlier setup)",
            {"trime_temperature": 1.0, "memory_top_k": 0, "bm25_grouping": "length"}),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="a trime-prepare-mt output directory (examples/translation.py builds one)")
    p.add_argument("--run-dir", default="runs/mt_ablation", help="where checkpoints, logs and results go")
    p.add_argument("--results", default="docs/results/translation_ablation",
                   help="also write RESULTS.json/.md ('none': only in --run-dir)")
    p.add_argument("--arch", default="transformer_mt_trime_small", help="architecture of every model")
    p.add_argument("--max-update", type=int, default=600, help="updates per model (the same for all)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (inverse_sqrt)")
    p.add_argument("--ce-warmup-frac", type=float, default=0.3, help="TRIME-MT: share of updates with plain CE first")
    p.add_argument("--seed", type=int, default=1, help="training seed")
    p.add_argument("--valid-pairs", type=int, default=0,
                   help="validate on the first N pairs of the validation set only (binarised into RUN/data "
                        "with the corpus dictionary; 0: all), for short runs")
    p.add_argument("--curve-points", type=int, default=4,
                   help="base and recipe: validate this many times during training (BLEU against updates)")
    p.add_argument("--variants", default=",".join(["base", *VARIANTS]),
                   help=f"comma-separated subset of base,{','.join(VARIANTS)}")
    add_recipe_args(p)
    p.set_defaults(bm25_grouping="whole")  # the ablation starts from the full reference recipe
    return p.parse_args(argv)


def valid_subset(corpus: Path, pairs: int, out: Path, logs: Path) -> Path:
    """``out``: the corpus's dictionaries and training split (links) with a validation
    split of the first ``pairs`` pairs of ``corpus/valid.{de,en}`` (sentencepiece text)."""
    if (out / "valid.de-en.en.idx").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        with open(corpus / f"valid.{lang}") as src:
            ex.atomic_write(out / f"valid_subset.{lang}", "".join(l for _, l in zip(range(pairs), src)))
        for ext in ("bin", "idx"):
            link = out / f"train.de-en.{lang}.{ext}"
            if not link.exists():
                link.symlink_to((corpus / "bin" / f"train.de-en.{lang}.{ext}").resolve())
    ex.run_logged("fairseq_cli.preprocess", [
        "--source-lang", "de", "--target-lang", "en", "--srcdict", corpus / "bin" / "dict.de.txt",
        "--tgtdict", corpus / "bin" / "dict.en.txt", "--validpref", out / "valid_subset", "--destdir", out,
        "--workers", 1], logs / "valid_subset.log")
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    ex.setup_logging()
    run, data = Path(a.run_dir), Path(a.corpus) / "bin"
    logs = run / "logs"
    if a.valid_pairs > 0:
        data = valid_subset(Path(a.corpus), a.valid_pairs, run / f"data_valid{a.valid_pairs}", logs)
    wanted = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v != "base" and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants: unknown variant {unknown[0]!r} (choose from base, {', '.join(VARIANTS)})")
    rows, curves = [], {}
    for name in wanted:
        every = max(1, a.max_update // max(1, a.curve_points)) if name in ("base", "recipe") else a.max_update
        common = common_train_flags(a, a.max_update, every)
        if name == "base":
            desc, flags = "base (label-smoothed CE 0.1)", [*common, "--criterion", "label_smoothed_cross_entropy",
                                                         "--label-smoothing", "0.1"]
        else:
            desc, change = VARIANTS[name]
            flags = [*common, *trime_flags(argparse.Namespace(**dict(vars(a), **change)), a.max_update),
                     "--bm25-cache-dir", run]
        trained = ex.train(data, run / "ckpt" / name, flags, logs / f"train_{name}.log")
        curves[name] = valid_curve(logs / f"train_{name}.log")
        last = curves[name][-1]
        rows.append({"system": name, "description": desc, **last,
                     "train_tokens_per_update": train_tokens_per_update(logs / f"train_{name}.log"),
                     "train_tokens_per_s": trained["train_tokens_per_s"]})
        logger.info("%s: %s", name, rows[-1])
    table = ex.markdown_table(rows, ["system", "description", "updates", "train_tokens_per_update", "valid_bleu",
                                     "valid_nll", "valid_trime_nll"],
                              ["variant", "change", "updates", "target tokens / update", "valid BLEU (greedy)",
                               "valid NLL, model alone", "valid NLL, Eq. 5 in-batch memory"])
    header = (f"# TRIME-MT recipe ablation (validation set)\n\n`{a.arch}`, {a.max_update} updates of {a.max_tokens} "
              f"tokens, seed {a.seed}, corpus `{a.corpus}`"
              + (f" (validation: its first {a.valid_pairs} pairs)" if a.valid_pairs > 0 else "") + ". NLL in nats/token. Recipe: train temperature "
              f"{a.trime_temperature}, top-{a.memory_top_k} memory logits, label smoothing {a.trime_label_smoothing}, "
              f"BM25 groups {a.bm25_grouping}; each other row changes what it names.\n\n")
    curve_rows = [dict(p, system=n) for n, c in curves.items() if len(c) > 1 for p in c]
    if curve_rows:
        table += "\n\nAgainst updates (validation set):\n\n" + ex.markdown_table(
            curve_rows, ["system", "updates", "valid_bleu", "valid_nll"],
            ["variant", "updates", "valid BLEU (greedy)", "valid NLL, model alone"])
    result = {"args": vars(a), "rows": rows, "valid_curves": curves}
    ex.publish(result, header + table, run / "ablation.json", a.results, logger)
    return result


if __name__ == "__main__":
    main()
