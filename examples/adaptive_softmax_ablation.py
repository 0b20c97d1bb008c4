"""Adaptive softmax token mass in Eq. 5/6: exact (head mass Z_head · p_AS) against normalised.

Trains two TRIMELMs (``trime_loss``, local memory) with an adaptive-softmax preset, one per
``--adaptive-token-mass`` (same data order, updates and seed), then scores each on the
validation set (never test) with ``fairseq-eval-lm``: without memory, and with Eq. 6 over
the local memory under both token masses.

    python examples/adaptive_softmax_ablation.py --data runs/main/corpus/bin --run-dir runs/asm_ablation

``--valid-lines N`` scores only the first N lines of the corpus's ``valid.txt`` (binarised
with the corpus dictionary into ``RUN/data``; training data unchanged), for short runs.

Writes ``RUN/results.{json,md}`` and ``--results`` (``docs/results/adaptive_softmax_ablation``).
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("adaptive_softmax_ablation")
MASSES = ("head", "normalised")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/asm_ablation", tokens_per_sample=256, max_update=200,
                       eval_tokens_per_sample=256, context_window=128)
    p.set_defaults(arch="transformer_lm_trime_wt103_7m")
    p.add_argument("--cutoff", default="2000,5000",
                   help="--adaptive-softmax-cutoff and --adaptive-input-cutoff (suited to an 8k vocabulary)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per update")
    p.add_argument("--warmup-updates", type=int, default=40, help="learning-rate warm-up updates")
    p.add_argument("--eval-temperature", type=float, default=1.0, help="tau of Eq. 6 at evaluation")
    p.add_argument("--valid-lines", type=int, default=0,
                   help="score only the first N lines of DATA/../valid.txt (0: the whole validation set)")
    p.add_argument("--results", default="docs/results/adaptive_softmax_ablation",
                   help="also write RESULTS.json/.md ('none': only in --run-dir)")
    return p.parse_args(argv)


def valid_subset(data: Path, lines: int, out: Path, logs: Path) -> Path:
    """``out``: ``data``'s dictionary and training split (links) with a validation split of
    the first ``lines`` lines of ``data/../valid.txt``."""
    if (out / "valid.idx").exists():
        return out
    text = data.parent / "valid.txt"
    if not text.exists():
        raise SystemExit(f"error: --valid-lines needs {text} (the corpus text beside --data)")
    out.mkdir(parents=True, exist_ok=True)
    head = out / "valid_subset.txt"
    with open(text) as src:
        ex.atomic_write(head, "".join(line for _, line in zip(range(lines), src)))
    for name in ("train.bin", "train.idx"):
        if not (out / name).exists():
            (out / name).symlink_to((data / name).resolve())
    ex.run_logged("fairseq_cli.preprocess", ["--only-source", "--srcdict", data / "dict.txt", "--validpref", head,
                                             "--destdir", out, "--workers", 1], logs / "valid_subset.log")
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, warm = ex.start_run(a, a.warmup_updates)
    if a.valid_lines > 0:
        data = valid_subset(data, a.valid_lines, run / f"data_valid{a.valid_lines}", logs)
    common = [*common, "--max-tokens", a.max_tokens, "--adaptive-softmax-cutoff", a.cutoff,
              "--adaptive-input-cutoff", a.cutoff]
    ev = [*ex.eval_flags(a.eval_tokens_per_sample, a.context_window), "--gen-subset", "valid"]
    rows = []
    for train_mass in MASSES:
        trained = ex.train(data, run / "ckpt" / train_mass,
                           [*common, "--criterion", "trime_loss", "--ce-warmup-updates", warm,
                            "--adaptive-token-mass", train_mass], logs / f"train_{train_mass}.log")
        ckpt = run / "ckpt" / train_mass / "checkpoint_last.pt"
        row = {"system": f"trained with {train_mass}", "train_mass": train_mass,
               "train_tokens_per_s": trained["train_tokens_per_s"]}
        row["valid_ppl_nomem"] = ex.eval_lm(data, ckpt, ev, logs / f"eval_{train_mass}_none.log")["ppl"]
        for eval_mass in MASSES:
            flags = ["--eval-combiner", "trime", "--eval-temperature", a.eval_temperature,
                     "--adaptive-token-mass", eval_mass]
            row[f"valid_ppl_{eval_mass}"] = ex.eval_lm(data, ckpt, [*ev, *flags],
                                                       logs / f"eval_{train_mass}_{eval_mass}.log")["ppl"]
        row["valid_ppl"] = row[f"valid_ppl_{train_mass}"]  # scored as trained
        rows.append(row)
        logger.info("%s", row)
    table = ex.markdown_table(rows, ["system", "valid_ppl_nomem", "valid_ppl_head", "valid_ppl_normalised"],
                              ["training token mass", "valid ppl, no memory", "valid ppl, Eq. 6 head (exact)",
                               "valid ppl, Eq. 6 normalised"])
    header = (f"# Adaptive softmax token mass (validation set)\n\n`{a.arch}` with cut-offs {a.cutoff}, local "
              f"memory, {a.max_update} updates of {a.max_tokens} tokens (L={a.tokens_per_sample}, CE warm-up "
              f"{warm}), seed {a.seed}; eval blocks {a.eval_tokens_per_sample} with context {a.context_window}, "
              f"tau {a.eval_temperature}. Corpus `{data}`"
              + (f" (validation: its first {a.valid_lines} lines)" if a.valid_lines > 0 else "") + ".\n\n")
    result = {"args": vars(a), "rows": rows}
    ex.publish(result, header + table, run / "results.json", a.results, logger)
    return result


if __name__ == "__main__":
    main()
