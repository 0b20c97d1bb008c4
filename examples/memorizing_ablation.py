"""Why does the Memorizing Transformer not use its memory? Short runs, one change at a time.

Every variant is the same ``memorizing_transformer_lm`` (``--arch`` with the kNN layer),
trained with ``--stream-batching`` and a ``--train-memory``-token memory for the same short
budget, then evaluated on valid with memories of ``--memory-sizes`` tokens (0 = no kNN
memory) by ``fairseq-eval-lm``. Variants (``--variants name=flags;...``) change the gate's
start, the learning speed of the gate and scale (``--memorizing-param-scale``: Adam moves a
parameter by about lr per step, so with lr 2e-3 and a few hundred updates the gate logit b
cannot leave [-0.5, 0.5] unless its step is scaled) and the scale of the normalised q·k.
The learned gates σ(b) and scales per head are read from each checkpoint.

    python examples/memorizing_ablation.py --run-dir runs/mem_ablation --data runs/fig3/corpus/bin \\
        --max-update 120 --out docs/results/memorizing_ablation
"""
import argparse
import math
import logging
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("memorizing_ablation")

VARIANTS = ("baseline=;fast gate+scale=--memorizing-param-scale 10;"
            "fast gate+scale, sharp=--memorizing-param-scale 10 --memorizing-scale-init 16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_common_args(p, "runs/mem_ablation", tokens_per_sample=128, max_update=120,
                       eval_tokens_per_sample=128, context_window=64)
    p.add_argument("--batch-size", type=int, default=64, help="rows (parallel streams) per update")
    p.add_argument("--train-memory", type=int, default=2048, help="memory while training (tokens per row)")
    p.add_argument("--memory-sizes", default="0,2000,8000", help="memory sizes evaluated on valid")
    p.add_argument("--variants", default=VARIANTS, help="name=extra fairseq-train flags, separated by ';'")
    p.add_argument("--eval-data", default=None,
                   help="binarised data evaluated (same dictionary; e.g. examples/long_memory.py's RUN/eval_docs/bin); "
                        "default: the training corpus")
    p.add_argument("--parallel", type=int, default=3, help="runs at once")
    p.add_argument("--out", default=None, help="also write PREFIX.json/.md (default: RUN/results.*)")
    return p.parse_args(argv)


def adam_reach(lr: float, max_update: int, warmup: int, init_lr: float = 1e-7) -> float:
    """Σ_t lr_t of fairseq's inverse_sqrt schedule: how far Adam (steps of about lr_t each,
    whatever the gradient's size) can move one parameter in ``max_update`` updates."""
    total = 0.0
    for t in range(1, max_update + 1):
        total += init_lr + (lr - init_lr) * t / warmup if t < warmup else lr * (warmup / t) ** 0.5
    return total


def main(argv=None) -> dict:
    a = parse_args(argv)
    run, logs, data, common, _ = ex.start_run(a)
    variants = dict(v.split("=", 1) for v in a.variants.split(";") if v)
    arch = a.arch.replace("transformer_lm_trime", "memorizing_transformer_lm")
    tag = {name: name.replace(" ", "_").replace(",", "").replace("+", "_") for name in variants}
    base = [*common, "--batch-size", a.batch_size, "--arch", arch, "--criterion", "cross_entropy",
            "--stream-batching", "--memorizing-memory-size", a.train_memory]
    trained = ex.run_parallel({n: (lambda n=n, f=f: ex.train(data, run / "ckpt" / tag[n], [*base, *shlex.split(f)],
                                                            logs / f"train_{tag[n]}.log")) for n, f in variants.items()},
                              a.parallel)
    ev = ex.eval_flags(a.eval_tokens_per_sample, a.context_window)
    eval_data = Path(a.eval_data) if a.eval_data else data
    sizes = [int(s) for s in a.memory_sizes.split(",")]
    jobs = {(n, s): (lambda n=n, s=s: ex.cached_eval(
        eval_data, run / "ckpt" / tag[n] / "checkpoint_last.pt",
        [*ev, "--gen-subset", "valid", "--model-overrides", f"{{'memorizing_memory_size': {s}}}"],
        run / "evals" / f"{tag[n]}_{s}.json", logs / f"eval_{tag[n]}_{s}.log")) for n in variants for s in sizes}
    done = ex.run_parallel(jobs, a.parallel)
    reach = adam_reach(a.lr, a.max_update, max(1, a.max_update // 8))
    rows = []
    for n, f in variants.items():
        ppl = [done[n, s]["ppl"] for s in sizes]
        s = float(shlex.split(f)[shlex.split(f).index("--memorizing-param-scale") + 1]) if "--memorizing-param-scale" in f else 1.0
        rows.append({"system": n, "train_flags": f, "memory_tokens": sizes, "valid_ppl": ppl,
                     "gain_pct": [round(100 * (ppl[0] - p) / ppl[0], 2) for p in ppl],
                     "gate_logit_reach": round(s * reach, 3),
                     **ex.memorizing_params(run / "ckpt" / tag[n] / "checkpoint_last.pt"),
                     "train_tokens_per_s": trained[n]["train_tokens_per_s"]})
    cols = ["| variant | train flags | " + " | ".join(f"valid ppl M={s}" for s in sizes)
            + f" | gain at M={sizes[-1]} | gates σ(b) | scales |", "|---|---|" + "---:|" * (len(sizes) + 1) + "---|---|"]
    for r in rows:
        cols.append(f"| {r['system']} | `{r['train_flags'] or '(defaults)'}` | "
                    + " | ".join(f"{p:.2f}" for p in r["valid_ppl"])
                    + f" | {r['gain_pct'][-1]:.2f}% | {', '.join(map(str, r['gate']))} | {', '.join(map(str, r['scale']))} |")
    md = (f"# Memorizing Transformer: what makes it use its memory\n\nCorpus `{data}` (evaluated: `{eval_data}`); `{arch}`, L={a.tokens_per_sample}, "
          f"{a.batch_size} rows, {a.max_update} updates, lr {a.lr}, trained with a {a.train_memory}-token memory; "
          f"valid ppl from fairseq-eval-lm (blocks of {a.eval_tokens_per_sample}, {a.context_window}-token context).\n\n"
          + "\n".join(cols) + "\n\n"
          f"Adam moves a parameter by about lr per update: over this schedule Σ lr_t = {reach:.3f}, so the gate "
          f"logit b can move at most ≈ s·{reach:.3f} from its start (s = --memorizing-param-scale), i.e. σ(b) stays in "
          + ", ".join(f"[{1 / (1 + math.exp(r['gate_logit_reach'])):.2f}, {1 / (1 + math.exp(-r['gate_logit_reach'])):.2f}] "
                      f"({r['system']})" for r in rows) + ".\n")
    result = {"rows": rows, "args": vars(a), "corpus_path": str(data), "eval_data": str(eval_data)}
    ex.publish(result, md, run / "results.json", a.out, logger)
    return result


if __name__ == "__main__":
    main()
