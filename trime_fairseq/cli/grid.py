"""Tuning grids shared by ``trime-tune``, ``trime-tune-mt`` and the examples that read their output:
which axes are interpolation weights, and whether an optimum sits on the edge of its grid."""
import argparse
import json
import logging
import math
import sys
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

logger = logging.getLogger("trime_fairseq.tune")

#: interpolation weights: < 1 so that every token keeps a non-zero probability
LAMBDAS = ("lambda", "memory_lambda", "cache_lambda")

#: adaptive retrieval: the grid axis of --retrieval-skip-threshold (combiners with external memory)
SKIP_AXIS = "skip_threshold"

#: grid axes that are not settings to choose: a sweep's memory size, the number of neighbours
#: searched, the skip rule, the kind of P' (a label, not a range)
NOT_TUNED = ("memory_size", "k", SKIP_AXIS, "pprime")
#: how much better (nats per token) an edge optimum must be than the next value inward to be
#: reported: a plateau at the edge says the grid is wide enough
DEFAULT_EDGE_TOLERANCE = 1e-3


def grid_edges(rows: Sequence[dict], best: dict, nll: Callable[[dict], float],
               tolerance: float = DEFAULT_EDGE_TOLERANCE) -> Dict[str, float]:
    """The settings of ``best`` that sit on the smallest or largest of at least three values
    tried and are still improving there: the best ``nll(row)`` (nats per token) with the next
    value inward is worse by more than ``tolerance``, so the optimum may lie outside the
    grid. Rows are compared at ``best``'s values of :data:`NOT_TUNED` axes; an interpolation
    weight at 0 (Eq. 6 / the model alone) is a boundary, not an edge."""
    fixed = {k: v for k, v in best["params"].items() if k in NOT_TUNED}
    same = [r for r in rows if r["params"] and all(r["params"].get(k) == v for k, v in fixed.items())]
    edges = {}
    for key, value in best["params"].items():
        if key in NOT_TUNED:
            continue
        tried = sorted({r["params"][key] for r in same if key in r["params"]})
        if len(tried) < 3 or value not in (tried[0], tried[-1]) or (key in LAMBDAS and value == 0.0):
            continue
        inward = tried[1] if value == tried[0] else tried[-2]
        if min(nll(r) for r in same if r["params"].get(key) == inward) - nll(best) > tolerance:
            edges[key] = value
    return edges


def result_grid_edges(result: dict, tolerance: float = DEFAULT_EDGE_TOLERANCE) -> Dict[str, float]:
    """:func:`grid_edges` of a ``trime-tune`` / ``trime-tune-mt`` result (``rows`` and
    ``best``; none without them)."""
    if not result.get("rows") or not result.get("best"):
        return {}
    return grid_edges(result["rows"], result["best"], result_nll, tolerance)


def warn_grid_edges(edges: Dict[str, float], command: str) -> None:
    """One warning per setting whose optimum may lie outside its grid."""
    for key, value in edges.items():
        logger.warning("%s: the best %s=%g is at the edge of its --grid values and still improving there; "
                       "widen the grid", command, key, value)


def tuning_results(data, path: str = "") -> Iterator[Tuple[str, dict]]:
    """Every ``trime-tune`` / ``trime-tune-mt`` result (``rows`` of ``params`` and ``best``)
    nested anywhere in a JSON document, with its path."""
    if isinstance(data, dict):
        rows = data.get("rows")
        if "best" in data and isinstance(rows, list) and rows and isinstance(rows[0], dict) and "params" in rows[0]:
            yield path or "/", data
        for key, value in data.items():
            yield from tuning_results(value, f"{path}/{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from tuning_results(value, f"{path}[{i}]")


def result_nll(row: dict) -> float:
    """Nats per token of a tuning row: ``nll`` (``trime-tune-mt``) or ``log ppl`` (``trime-tune``)."""
    return float(row["nll"]) if "nll" in row else math.log(row["ppl"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m trime_fairseq.cli.grid FILE.json ...``: the optima on the edge of their grid
    (and still improving there) in every tuning result the files hold, one line each."""
    p = argparse.ArgumentParser(prog="python -m trime_fairseq.cli.grid", description=main.__doc__)
    p.add_argument("files", nargs="+", help="JSON files: trime-tune / trime-tune-mt outputs or results pages")
    p.add_argument("--tolerance", type=float, default=DEFAULT_EDGE_TOLERANCE,
                   help="nats per token an edge optimum must beat the next value inward by")
    a = p.parse_args(argv)
    found = 0
    for name in a.files:
        try:
            with open(name) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {name}: not a readable JSON file ({e})") from None
        for where, result in tuning_results(data):
            edges = result_grid_edges(result, a.tolerance)
            found += bool(edges)
            print(f"{name}{where}: best {json.dumps(result['best']['params'])}; "
                  + ("on the edge: " + ", ".join(f"{k}={v:g}" for k, v in edges.items()) if edges else "inside its grid"))
    print(f"{found} tuning result(s) with an optimum on the edge of its grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
