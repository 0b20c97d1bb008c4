"""What the Memorizing Transformer's kNN layer retrieves, and how it weighs it.

One pass over the first ``--max-blocks`` evaluation blocks of a split (as
``fairseq-eval-lm --task trime_lm`` reads them), recording at the kNN-augmented layer, per
head, over queries that found memory:

* ``top1_cos`` / ``topk_cos``: mean normalised q·k of the best and of the k-th retrieved key;
* ``max_weight`` and ``entropy_ratio`` (entropy / log k) of the memory softmax at the learned
  scale: near 1/k and 1.0 mean a near-uniform average of the k values;
* ``relevant_any``: share of queries with at least one retrieved entry whose next token is
  the query's next token (the entry a copy would need), ``relevant_mass``: the softmax weight
  on such entries, and ``relevant_mass_uniform``: the same under a uniform softmax;
* the gate σ(b) and scale.

    python examples/memorizing_diagnostics.py runs/fig3/corpus/bin --path runs/fig3/ckpt/memorizing/checkpoint_last.pt \\
        --memory-size 8000 --max-blocks 300 --out runs/diag.json
"""
import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

logger = logging.getLogger("memorizing_diagnostics")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="binarised corpus")
    p.add_argument("--path", required=True, help="Memorizing Transformer checkpoint")
    p.add_argument("--memory-size", type=int, default=8000, help="kNN memory (tokens) at test time")
    p.add_argument("--subset", default="valid", help="split read")
    p.add_argument("--tokens-per-sample", type=int, default=128, help="evaluation block incl. context window")
    p.add_argument("--context-window", type=int, default=64, help="evaluation context window")
    p.add_argument("--max-blocks", type=int, default=300, help="blocks read (from the start of the split)")
    p.add_argument("--out", default=None, help="JSON output")
    return p.parse_args(argv)


def diagnose(a) -> dict:
    from trime_fairseq.cli.tune import load

    cfg, model, task = load([a.data, "--path", a.path, "--gen-subset", a.subset, "--cpu",
                             "--tokens-per-sample", str(a.tokens_per_sample), "--context-window",
                             str(a.context_window), "--model-overrides", f"{{'memorizing_memory_size': {a.memory_size}}}",
                             "--max-tokens", str(a.tokens_per_sample * 32)])
    model.eval()
    layer = model.knn_attention
    stream = task.stream(a.subset)
    heads, k = layer.num_heads, layer.memory.k
    sums = {name: torch.zeros(heads, dtype=torch.float64) for name in (
        "top1_cos", "topk_cos", "max_weight", "entropy_ratio", "relevant_any", "relevant_mass", "relevant_mass_uniform")}
    count = torch.zeros(heads, dtype=torch.float64)
    original = layer.memory_attention

    def recording(q):
        out = original(q)
        s = layer.stream
        if out is None:
            return out
        qn = F.normalize(q.detach(), dim=-1)
        top, slots = layer.memory.search_slots(qn, s["before"], s["docs"])
        found = torch.isfinite(top)
        if found.size(-1) < k:
            return out
        full = found.all(-1)  # [B, H, T]
        pos = torch.stack([layer.memory.positions[r][slots[r]] for r in range(slots.size(0))])  # [B,H,T,k]
        nxt = torch.from_numpy(stream.ids(0, len(stream)))  # the stream's tokens
        entry_next = nxt[(pos + 1).clamp(max=len(stream) - 1)]
        query_pos = s["positions"]  # [B, T]
        query_next = nxt[(query_pos + 1).clamp(min=0, max=len(stream) - 1)]
        relevant = entry_next == query_next[:, None, :, None]
        w = torch.softmax(top.masked_fill(~found, 0) * layer.memory_scale().detach()[None, :, None, None], -1)
        ent = -(w * w.clamp_min(1e-12).log()).sum(-1) / math.log(k)
        for name, val in (("top1_cos", top[..., 0]), ("topk_cos", top[..., -1]), ("max_weight", w.max(-1).values),
                          ("entropy_ratio", ent), ("relevant_any", relevant.any(-1).double()),
                          ("relevant_mass", (w * relevant).sum(-1)),
                          ("relevant_mass_uniform", relevant.double().mean(-1))):
            sums[name] += torch.where(full, val.double(), torch.zeros((), dtype=torch.float64)).sum((0, 2))
        count.add_(full.double().sum((0, 2)))
        return out

    layer.memory_attention = recording
    task.load_dataset(a.subset)
    itr = task.eval_lm_dataloader(task.dataset(a.subset), max_tokens=a.tokens_per_sample * 32,
                                  context_window=a.context_window)
    blocks = 0
    with torch.no_grad():
        for sample in itr:
            if "net_input" not in sample:
                continue
            model(**sample["net_input"])
            blocks += sample["target"].size(0)
            if blocks >= a.max_blocks:
                break
    stats = {name: [round(float(x), 4) for x in (v / count.clamp_min(1))] for name, v in sums.items()}
    return {"checkpoint": a.path, "memory_size": a.memory_size, "subset": a.subset, "blocks": blocks, "k": k,
            "queries_with_full_memory": [int(c) for c in count], "uniform_weight": round(1 / k, 4),
            "gate": [round(float(x), 3) for x in layer.gate()], "scale": [round(float(x), 2) for x in layer.memory_scale()],
            **stats}


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    a = parse_args(argv)
    result = diagnose(a)
    text = json.dumps(result, indent=2)
    if a.out:
        tmp = Path(a.out).with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(a.out)
    print(text)
    return result


if __name__ == "__main__":
    main()
