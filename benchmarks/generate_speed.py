"""Generation throughput of kNN-MT against the base MT model, same model, beam and batch, same run.

Translates the first ``--max-sentences`` of ``--gen-subset`` with fairseq's
``SequenceGenerator`` (what ``fairseq-generate`` runs), once plain and once with the
``--datastore`` (kNN-MT, λ=0.5), alternating passes so machine noise hits both, and
reports sentences/s, the ratio (target >= 0.5), the ratio per output token
(kNN-MT may change how long the outputs are) and where kNN-MT's time goes (model /
search / combine).

    python benchmarks/generate_speed.py DATA_BIN --path base.pt --datastore ds_l2 \\
        --knn-k 16 --beam 5 --batch-size 64 --max-sentences 500
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from typing import Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trime_fairseq.cli.tune import load  # noqa: E402

logger = logging.getLogger("benchmarks.generate_speed")


def one_pass(task, model, batches, gen) -> Tuple[float, float]:
    """Sentences/s and output tokens/s of beam search (``gen``: a GenerationConfig) over ``batches``."""
    generator = task.build_generator([model], gen)
    n = tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for sample in batches:
            hypos = task.inference_step(generator, [model], sample)
            n += sample["nsentences"]
            tokens += sum(len(h[0]["tokens"]) for h in hypos)
    seconds = time.perf_counter() - t0
    return n / seconds, tokens / seconds


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(message)s", force=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beam", type=int, default=5, help="beam size")
    p.add_argument("--max-sentences", type=int, default=500, help="sentences translated per pass")
    p.add_argument("--passes", type=int, default=2, help="alternating passes per variant")
    p.add_argument("--max-len-a", type=float, default=1.2, help="outputs of at most a x source + b tokens")
    p.add_argument("--max-len-b", type=int, default=10, help="outputs of at most a x source + b tokens")
    p.add_argument("--out", default=None, help="write the result as JSON")
    ours, rest = p.parse_known_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg, base, task = load([*rest, "--task", "trime_translation"])
    _, knn, _ = load([*rest, "--task", "trime_translation", "--eval-combiner", "knn", "--knn-lambda", "0.5"])
    split = cfg.dataset.gen_subset
    task.load_dataset(split)
    ds = task.dataset(split)
    bsz = cfg.dataset.batch_size or 64
    ids = list(range(min(len(ds), ours.max_sentences)))
    batches = [ds.collater([ds[i] for i in ids[k:k + bsz]]) for k in range(0, len(ids), bsz)]
    from fairseq.dataclass.configs import GenerationConfig

    gen = GenerationConfig(beam=ours.beam, max_len_a=ours.max_len_a, max_len_b=ours.max_len_b)
    speeds = {"base": [], "knn": []}
    token_speeds = {"base": [], "knn": []}
    for model in (base, knn):  # warm-up (first-call allocations), not timed
        one_pass(task, model.eval(), batches[:1], gen)
    knn.timings.update(search=0.0, combine=0.0)
    knn.retriever.reset_counters()
    for _ in range(ours.passes):
        for name, model in (("base", base.eval()), ("knn", knn.eval())):
            sent_s, tok_s = one_pass(task, model, batches, gen)
            speeds[name].append(sent_s)
            token_speeds[name].append(tok_s)
            logger.info("%s: %.1f sentences/s, %.1f output tokens/s", name, sent_s, tok_s)
    base_s, knn_s = statistics.median(speeds["base"]), statistics.median(speeds["knn"])
    total = len(ids) * ours.passes / knn_s
    split_s = {"search": knn.timings["search"], "combine": knn.timings["combine"]}
    split_s["model"] = max(total - split_s["search"] - split_s["combine"], 0.0)
    result = {
        "sentences": len(ids), "beam": ours.beam, "batch_size": bsz, "knn_k": knn.retriever.k,
        "datastore_size": len(knn.retriever.datastore), "index": knn.retriever.config.factory,
        "base_sentences_per_s": base_s, "knn_sentences_per_s": knn_s, "ratio": knn_s / base_s, "target": 0.5,
        # the datastore can change output lengths; per output token the comparison is per decoding step
        "token_ratio": statistics.median(token_speeds["knn"]) / statistics.median(token_speeds["base"]),
        "knn_time_split": {k: v / total for k, v in split_s.items()},
        "skipped": knn.retriever.counters()["skipped_share"],  # adaptive retrieval (0: every step searched)
    }
    print(json.dumps(result, indent=2))
    if ours.out:
        with open(ours.out + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(ours.out + ".tmp", ours.out)
    return result


if __name__ == "__main__":
    main()
