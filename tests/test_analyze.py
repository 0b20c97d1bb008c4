"""``trime-analyze``: the memory-by-distance table (and the command end to end)."""
import json
import math

import pytest
import torch

from helpers import run_cli
from trime_fairseq.cli.analyze import distance_labels, distance_table, mass_by_distance


def test_mass_by_distance_sums_each_stretch_of_memory():
    # 2 queries, 5 shared entries: two long-term (ranks 3 and 0), then three local (-1)
    rank = torch.tensor([3, 0, -1, -1, -1])
    weights = torch.tensor([[0.1, 0.2, 0.05, 0.0, 0.3],
                            [0.4, 0.0, 0.1, 0.1, 0.1]])
    labels = torch.tensor([[7, 8, 7, 9, 8]]).expand(2, 5)
    target = torch.tensor([8, 7])
    log_w = torch.log(weights)  # 0 -> -inf: an entry the combiner did not use
    keep = torch.tensor([True, True])
    got = mass_by_distance(log_w, labels, rank, target, keep, [0, 2])
    assert distance_labels([0, 2]) == ["local", "0-2", ">=2"]
    # local: all 0.05+0.3 + 0.1+0.1+0.1; on target: query 0 (8): 0.3, query 1 (7): 0.1
    assert got[0].tolist() == pytest.approx([0.65, 0.4])
    # rank 0 (newest): 0.2 (label 8, query 0's target) + 0.0
    assert got[1].tolist() == pytest.approx([0.2, 0.2])
    # rank 3: 0.1 (label 7, not query 0's target) + 0.4 (query 1's target)
    assert got[2].tolist() == pytest.approx([0.5, 0.4])
    # a query left out is not counted; no rank at all = local memory only
    only_first = mass_by_distance(log_w, labels, None, target, torch.tensor([True, False]), [0])
    assert only_first.flatten().tolist() == pytest.approx([0.65, 0.5, 0.0, 0.0])
    rows = distance_table(got, 2, [0, 2])
    assert rows[2] == {"memory": ">=2", "mass": pytest.approx(0.25), "on_target": pytest.approx(0.2),
                       "precision": pytest.approx(0.8)}
    assert distance_table(torch.zeros(2, 2), 2, [0])[1]["precision"] is None


def test_analyze_reports_memory_by_distance(tiny_lm, tmp_path):
    data, ckpt, _ = tiny_lm
    common = [str(data), "--path", str(ckpt), "--gen-subset", "valid", "--tokens-per-sample", "32",
              "--context-window", "16", "--max-tokens", "256", "--cpu", "--eval-combiner", "trime"]
    out = tmp_path / "long.json"
    run_cli(["trime_fairseq.cli.analyze", *common, "--eval-memory", "local+long", "--long-memory-size", "48",
             "--distance-buckets", "0,8", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["memory_by_distance"]
    assert [r["memory"] for r in rows] == ["local", "0-8", ">=8"]
    for r in rows:
        assert 0 < r["on_target"] <= r["mass"] < 1
        assert r["precision"] == pytest.approx(r["on_target"] / r["mass"])
    assert sum(r["mass"] for r in rows) < 1  # the model keeps some mass
    assert "memory (tokens back)" in out.with_suffix(".md").read_text()
    # local memory only: one row, and it takes more mass than beside a long-term memory
    local = tmp_path / "local.json"
    run_cli(["trime_fairseq.cli.analyze", *common, "--eval-memory", "local", "--out", str(local)])
    only = json.loads(local.read_text())["memory_by_distance"]
    assert [r["memory"] for r in only] == ["local"] and only[0]["mass"] > rows[0]["mass"]
    assert math.isfinite(json.loads(local.read_text())["ppl_by_frequency"][-1]["ppl"])
    bad = run_cli(["trime_fairseq.cli.analyze", *common, "--distance-buckets", "10,20"], check=False)
    assert bad.returncode == 2 and "--distance-buckets must start at 0" in bad.stderr
