"""``trime-tune-mt``: choose kNN-MT's λ and T, or TRIME-MT's τ (and Appendix F's λ, τ'), on a validation set.

One teacher-forced pass of the MT model over ``--gen-subset`` and one FAISS search per
batch (``--knn-k`` neighbours of every target token); every grid point is then scored on
those cached neighbours (no second search), by the reference's negative log-likelihood
per token under the memory-augmented distribution. Prints and writes (``--out``) JSON
with all grid points and the best one::

    trime-tune-mt DATA_BIN --task trime_translation --path base.pt --datastore ds_l2 \\
        --knn-k 16 --combiner knn --grid lambda=0.2,0.4,0.6 temperature=1,10,100
    trime-tune-mt DATA_BIN --task trime_translation --path trime.pt --datastore ds_ip \\
        --knn-k 16 --combiner trime --grid tau=0.5,1,2 [memory_lambda=0,0.3 memory_tau=1,10]

TRIME-MT's optional axes are Appendix F's: ``memory_lambda`` (λ of Eq. 8, default 0) and
``memory_tau`` (τ' of Eq. 7 over the retrieved neighbours' raw similarities, the published
P'; only read where λ > 0).

Any other flag goes to fairseq's parser (``--max-tokens``, ``--source-lang``...).
"""
import argparse
import itertools
import json
import logging
import os
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch

from trime_fairseq.memory.combiners import Combiner, ScoringInputs
from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.errors import TrimeUserError, cli_entry

logger = logging.getLogger("trime_fairseq.tune_mt")

#: per combiner: the grid axes it needs, and the optional ones with their defaults
GRID_AXES = {"knn": ("lambda", "temperature"), "trime": ("tau",)}
OPTIONAL_AXES = {"knn": {}, "trime": {"memory_lambda": 0.0, "memory_tau": 1.0}}
LAMBDAS = ("lambda", "memory_lambda")


def load_mt(argv: Sequence[str], prog: str):
    """:func:`trime_fairseq.cli.tune.load` for the MT commands: ``(cfg, model, task)``,
    the task a ``trime_translation`` one."""
    from trime_fairseq.cli.tune import load
    from trime_fairseq.tasks.trime_translation import TrimeTranslationTask

    cfg, model, task = load(argv)
    if not isinstance(task, TrimeTranslationTask):
        raise TrimeUserError(f"{prog} needs --task trime_translation")
    return cfg, model, task


def collect(model, task, split: str, max_tokens: int, batch_size: Optional[int], combiners=None) -> Dict[str, torch.Tensor]:
    """Teacher-forced targets of ``split`` with their neighbours: ``scores``/``values``
    ``[N, K]``, ``target``, ``tok_target``, ``tok_lse`` ``[N]``, and ``dim`` (key size)."""
    retriever = task.build_retriever(model, combiners)
    retriever.check_model(model)
    task.load_dataset(split)
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("scores", "values", "target", "tok_target", "tok_lse")}
    dim = 0
    for keys, target, tok_target, tok_lse in task.iter_datastore_keys(model, split, max_tokens, batch_size,
                                                                      token_terms=True):
        found = retriever.search(keys.float())
        dim = keys.size(-1)
        for k, t in zip(parts, (found.scores, found.values, target, tok_target.float(), tok_lse.float())):
            parts[k].append(t)
    if not parts["target"]:
        raise TrimeUserError(f"--gen-subset {split}: no target tokens")
    out = {k: torch.cat(v).cpu() for k, v in parts.items()}  # Meta-k trains on the CPU
    out["dim"] = torch.tensor(dim)
    return out


def grid_combiner(combiner: str, params: Dict[str, float]) -> Combiner:
    """The decoder's combiner for one grid point, from the same registry as
    ``fairseq-generate --eval-combiner`` (:func:`~trime_fairseq.tasks.memory_flags.build_combiner`)."""
    from trime_fairseq.tasks.memory_flags import build_combiner

    p = {**OPTIONAL_AXES[combiner], **params}
    lam = p.get("memory_lambda", 0.0)
    cfg = SimpleNamespace(eval_combiner=combiner, knn_lambda=p.get("lambda"),
                          knn_temperature=p.get("temperature", 1.0), eval_temperature=p.get("tau", 1.0),
                          memory_lambda=lam, memory_temperature=p.get("memory_tau") if lam > 0 else None)
    return build_combiner(cfg, flag="--combiner")


def target_log_prob(c: Dict[str, torch.Tensor], combiner: Combiner) -> torch.Tensor:
    """``log P(reference token)`` under ``combiner`` on the cached neighbours ``[N]``."""
    x = ScoringInputs.targets_only(c["tok_target"], c["tok_lse"], int(c["dim"]), c["scores"], c["values"],
                                   c["target"])
    return combiner.target_log_prob(x)[0]


def score_grid(c: Dict[str, torch.Tensor], combiner: str, grid: Dict[str, List[float]]) -> List[dict]:
    """NLL per token (nats) of every grid point, and of the MT model alone first."""
    rows = [{"params": {}, "nll": float(-(c["tok_target"] - c["tok_lse"]).mean())}]
    names = list(grid)
    for combo in itertools.product(*(grid[k] for k in names)):
        p = dict(zip(names, combo))
        if p.get("memory_lambda") == 0 and "memory_tau" in p and p["memory_tau"] != grid["memory_tau"][0]:
            continue  # tau' is not read without Appendix F: one point for all of its values
        rows.append({"params": p, "nll": float(-target_log_prob(c, grid_combiner(combiner, p)).mean())})
    return rows


def parse_grid(combiner: str, items: Sequence[str]) -> Dict[str, List[float]]:
    grid: Dict[str, List[float]] = {}
    for item in items:
        name, _, values = item.partition("=")
        axes = (*GRID_AXES[combiner], *OPTIONAL_AXES[combiner])
        if name not in axes or not values:
            raise TrimeUserError(f"--grid for {combiner} takes {', '.join(axes)}=v1,v2,...; got {item!r}")
        try:
            grid[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise TrimeUserError(f"--grid {name}: values must be numbers, got {values!r}") from None
        if name in LAMBDAS and any(not 0.0 <= v < 1.0 for v in grid[name]):
            raise TrimeUserError(f"--grid {name}: values must be in [0, 1) (at 1 the MT model gets no "
                                 f"weight and unseen tokens log-prob -inf), got {values}")
    missing = [k for k in GRID_AXES[combiner] if k not in grid]
    if missing:
        raise TrimeUserError(f"--grid for {combiner} needs {', '.join(missing)}=...")
    return grid


@cli_entry("trime-tune-mt")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="trime-tune-mt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--combiner", choices=sorted(GRID_AXES), required=True,
                   help="knn (grid over lambda, temperature) or trime (grid over tau, optionally "
                        "memory_lambda and memory_tau of Appendix F)")
    p.add_argument("--grid", nargs="+", required=True, help="name=v1,v2,... per parameter")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    ours, rest = p.parse_known_args(argv)
    grid = parse_grid(ours.combiner, ours.grid)
    cfg, model, task = load_mt(rest, "trime-tune-mt")
    from trime_fairseq.memory.combiners import TrimeCombiner

    c = collect(model.eval(), task, cfg.dataset.gen_subset, cfg.dataset.max_tokens or 4096, cfg.dataset.batch_size,
                [TrimeCombiner()] if ours.combiner == "trime" else None)
    rows = score_grid(c, ours.combiner, grid)
    best = min(rows[1:], key=lambda r: r["nll"])
    result = {"combiner": ours.combiner, "tokens": int(c["target"].numel()), "k": int(c["scores"].size(1)),
              "rows": rows, "best": best}
    for r in rows:
        logger.info("%-40s NLL %.4f", json.dumps(r["params"]) if r["params"] else "MT alone", r["nll"])
    if ours.out:
        tmp = ours.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, ours.out)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
