"""``trime-train-metak``: train adaptive kNN-MT's Meta-k network on a frozen MT model.

Runs the MT model teacher-forced over ``--gen-subset`` (a validation set), retrieves
``--knn-k`` neighbours per target token from ``--datastore`` *once*, then trains the small
Meta-k network (:mod:`trime_fairseq.memory.adaptive`) to maximise the likelihood of the
reference under the adaptive mixture. 10% of the tokens (by sentence order) are held out
to pick the best epoch; the log reports their NLL for the MT model alone and for the
mixture. The saved file (``--out``) is what ``--metak-path`` loads::

    trime-train-metak DATA_BIN --task trime_translation --path mt.pt --datastore ds \\
        --knn-k 8 --knn-temperature 10 --gen-subset valid --out metak.pt

Any other flag goes to fairseq's parser (``--max-tokens``, ``--source-lang``...).
"""
import argparse
import json
import logging
import math
import os
import sys
from typing import Optional, Sequence

import torch

from trime_fairseq.cli import setup_cli_logging
from trime_fairseq.errors import TrimeUserError, cli_entry

logger = logging.getLogger("trime_fairseq.train_metak")


def train(scores, values, target, lprob, k: int, temperature: float, epochs: int, lr: float,
          hidden: int, dropout: float, batch: int, seed: int):
    """Fit Meta-k; returns ``(net, report)`` with held-out NLLs (nats per token)."""
    from trime_fairseq.memory.adaptive import MetaK, metak_target_log_prob

    torch.manual_seed(seed)
    n = len(target)
    cut = max(1, int(n * 0.9)) if n > 1 else n
    net = MetaK(k, hidden=hidden, dropout=dropout)
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def nll(rows) -> float:
        net.eval()
        with torch.no_grad():
            lp = metak_target_log_prob(lprob[rows], net(scores[rows], values[rows]), scores[rows],
                                          values[rows], target[rows], net.ks, temperature)
        return float(-lp.mean())

    held = torch.arange(cut, n) if cut < n else torch.arange(n)
    best, best_state = math.inf, None
    for epoch in range(1, epochs + 1):
        net.train()
        for rows in torch.randperm(cut).split(batch):
            lp = metak_target_log_prob(lprob[rows], net(scores[rows], values[rows]), scores[rows],
                                          values[rows], target[rows], net.ks, temperature)
            loss = -lp.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        held_nll = nll(held)
        logger.info("epoch %d: held-out NLL %.4f", epoch, held_nll)
        if held_nll < best:
            best, best_state = held_nll, {k_: v.clone() for k_, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    report = {"tokens": n, "held_out_tokens": len(held), "held_out_nll_mt": float(-lprob[held].mean()),
              "held_out_nll_adaptive": best}
    return net.eval(), report


@cli_entry("trime-train-metak")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_cli_logging()
    p = argparse.ArgumentParser(prog="trime-train-metak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where to save the Meta-k network (.pt)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the collected tokens")
    p.add_argument("--metak-lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--metak-hidden", type=int, default=32, help="hidden units of Meta-k")
    p.add_argument("--metak-dropout", type=float, default=0.0, help="dropout inside Meta-k")
    p.add_argument("--metak-batch", type=int, default=256, help="tokens per Meta-k update")
    ours, rest = p.parse_known_args(argv)
    if ours.epochs < 1:
        raise TrimeUserError(f"--epochs must be >= 1, got {ours.epochs}")
    from trime_fairseq.cli.tune_mt import collect, load_mt

    cfg, model, task = load_mt(rest, "trime-train-metak")
    model.eval()
    c = collect(model, task, cfg.dataset.gen_subset, cfg.dataset.max_tokens or 4096, cfg.dataset.batch_size)
    scores, values, target, lprob = c["scores"], c["values"], c["target"], c["tok_target"] - c["tok_lse"]
    logger.info("collected %d tokens with %d neighbours each", len(target), scores.size(1))
    net, report = train(scores, values, target, lprob, scores.size(1), task.cfg.knn_temperature, ours.epochs,
                        ours.metak_lr, ours.metak_hidden, ours.metak_dropout, ours.metak_batch, cfg.common.seed)
    report.update(knn_k=scores.size(1), knn_temperature=task.cfg.knn_temperature, datastore=task.cfg.datastore)
    tmp = ours.out + ".tmp"
    torch.save({"config": net.config(), "state_dict": net.state_dict(), "report": report}, tmp)
    os.replace(tmp, ours.out)
    logger.info("Meta-k saved to %s: held-out NLL %.4f (MT alone %.4f)", ours.out,
                report["held_out_nll_adaptive"], report["held_out_nll_mt"])
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
