"""Tuning grids (``trime_fairseq.cli.grid``): an optimum on the edge of its grid is named."""
import json
import math

import pytest

from trime_fairseq.cli.grid import NOT_TUNED, grid_edges


def tune(best, grid, nll=lambda p: 2.0, best_nll=1.0):
    """rows of ``grid`` scored by ``nll(params)``, and the best point at ``best_nll``"""
    rows = [{"params": dict(p), "nll": best_nll if p == best else nll(p)} for p in grid]
    return rows, {"params": dict(best), "nll": best_nll}


GRID = [{"tau": t, "memory_lambda": m} for t in (2.5, 5, 10) for m in (0.0, 0.4, 0.8)]


@pytest.mark.parametrize("best, edges", [
    ({"tau": 5, "memory_lambda": 0.4}, {}),  # interior
    ({"tau": 2.5, "memory_lambda": 0.4}, {"tau": 2.5}),  # smallest value
    ({"tau": 10, "memory_lambda": 0.8}, {"tau": 10, "memory_lambda": 0.8}),  # largest values
    ({"tau": 5, "memory_lambda": 0.0}, {}),  # a weight of 0 is a boundary, not an edge
])
def test_edges_are_the_smallest_or_largest_values_tried(best, edges):
    rows, b = tune(best, GRID)
    assert grid_edges(rows, b, lambda r: r["nll"]) == edges


def test_a_plateau_at_the_edge_is_not_named():
    flat = {"tau": 5, "memory_lambda": 0.4}
    rows, best = tune({"tau": 10, "memory_lambda": 0.4}, GRID, nll=lambda p: 1.00005 if p == flat else 2.0)
    assert grid_edges(rows, best, lambda r: r["nll"]) == {}
    assert grid_edges(rows, best, lambda r: r["nll"], tolerance=1e-5) == {"tau": 10}


def test_two_values_are_not_a_range_and_sweep_axes_are_not_settings():
    rows, best = tune({"lambda": 0.7, "temperature": 10}, [{"lambda": v, "temperature": t}
                                                           for v in (0.5, 0.7) for t in (1, 10)])
    assert grid_edges(rows, best, lambda r: r["nll"]) == {}
    # trime-tune: rows per memory size; the best point's size is compared only with its own
    assert "memory_size" in NOT_TUNED
    grid = [{"tau": t, "memory_size": m} for t in (0.5, 1, 2) for m in (0, 1000)]
    ppl = {(0.5, 0): 50.0, (1, 0): 40.0, (2, 0): 45.0, (0.5, 1000): 30.0, (1, 1000): 31.0, (2, 1000): 33.0}
    rows = [{"params": p, "ppl": ppl[(p["tau"], p["memory_size"])]} for p in grid]
    best = min(rows, key=lambda r: r["ppl"])
    assert best["params"] == {"tau": 0.5, "memory_size": 1000}
    assert grid_edges(rows, best, lambda r: math.log(r["ppl"])) == {"tau": 0.5}
    best0 = min((r for r in rows if r["params"]["memory_size"] == 0), key=lambda r: r["ppl"])
    assert grid_edges(rows, best0, lambda r: math.log(r["ppl"])) == {}


def test_the_scan_finds_tuning_results_nested_in_results_pages(tmp_path, capsys):
    """``python -m trime_fairseq.cli.grid`` reads trime-tune (ppl) and trime-tune-mt (nll)
    results wherever a JSON nests them and names the optima on an edge."""
    from trime_fairseq.cli.grid import main

    lm_rows = [{"params": {}, "ppl": 90.0}] + [{"params": {"tau": t, "memory_size": 0}, "ppl": p}
                                              for t, p in ((0.5, 60.0), (1.0, 50.0), (2.0, 40.0))]
    mt_rows, mt_best = tune({"lambda": 0.5, "temperature": 10}, [{"lambda": v, "temperature": t}
                                                                 for v in (0.3, 0.5, 0.7) for t in (1, 10, 100)])
    page = {"results": {"a": {"rows": lm_rows, "best": lm_rows[-1]}},
            "runs": [{"rows": [{"params": {}, "nll": 3.0}, *mt_rows], "best": mt_best}]}
    path = tmp_path / "page.json"
    path.write_text(json.dumps(page))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("/results/a: best {\"tau\": 2.0, \"memory_size\": 0}; on the edge: tau=2")
    assert out[1].endswith("/runs[0]: best {\"lambda\": 0.5, \"temperature\": 10}; inside its grid")
    assert out[-1] == "1 tuning result(s) with an optimum on the edge of its grid"
