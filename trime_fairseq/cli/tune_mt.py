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
import json
import logging
import os
import sys
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch

from trime_fairseq.memory.combiners import Combiner, ScoringInputs
from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.cli.grid import result_grid_edges, warn_grid_edges
from trime_fairseq.errors import TrimeUserError, cli_entry

logger = logging.getLogger("trime_fairseq.tune_mt")

#: per combiner: the grid axes it needs, and the optional ones with their defaults
GRID_KEYS = {"knn": (("lambda", "temperature"), {}),
             "trime": (("tau",), {"memory_lambda": 0.0, "memory_tau": 1.0})}


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

    p = {**GRID_KEYS[combiner][1], **params}
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


def score_grid(c: Dict[str, torch.Tensor], combiner: str, points: Sequence[Dict[str, float]]) -> List[dict]:
    """NLL per token (nats) of every grid point, and of the MT model alone first. τ' is not read
    without Appendix F (λ = 0): such points are scored once, at the first τ' of the grid."""
    rows = [{"params": {}, "nll": float(-(c["tok_target"] - c["tok_lse"]).mean())}]
    first_tau = next((p["memory_tau"] for p in points if "memory_tau" in p), None)
    for p in points:
        if p.get("memory_lambda") == 0 and p.get("memory_tau", first_tau) != first_tau:
            continue
        rows.append({"params": dict(p), "nll": float(-target_log_prob(c, grid_combiner(combiner, p)).mean())})
    return rows


def parse_grid(combiner: str, items: Sequence[str]) -> List[Dict[str, float]]:
    """The grid points of ``--grid`` (:func:`trime_fairseq.cli.tune.parse_grid` with this command's axes)."""
    from trime_fairseq.cli.tune import parse_grid as parse

    return parse(combiner, items, GRID_KEYS, skip_combiners=())


@cli_entry("trime-tune-mt")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="trime-tune-mt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--combiner", choices=sorted(GRID_KEYS), required=True,
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
    result["grid_edges"] = result_grid_edges(result)
    warn_grid_edges(result["grid_edges"], "trime-tune-mt")
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
