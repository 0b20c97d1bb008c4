"""Can a model copy? Random token sequences shown twice, in context and through memory.

A model can only profit from memory of earlier text (the Memorizing Transformer's kNN
layer, a cache) if it can match the current context against a stored one and read off what
came next. This probe measures that skill directly, on ``--trials`` sequences of ``--length``
tokens drawn uniformly from the dictionary (no corpus statistics to lean on):

* ``in_context``: the sequence twice in one block (``</s> S S``). Mean NLL (nats) of the
  second copy (its first token excluded: nothing predicts it) against the same positions of
  the first copy. A model that copies in context (induction heads) has a far lower second
  copy NLL; one that does not has about the same.
* ``with_local_memory`` (TRIME's memory, other models): the same sequences scored with
  Eq. 6 over local memory (τ = ``--tau``), which copies by construction: an earlier token
  whose representation g matches the query's lends its next token, whether or not the model
  itself learned to copy.
* ``through_memory`` (Memorizing Transformer only): block A = ``S``, then block B = ``S``
  again as the next block of the same document, so A is in the kNN memory but not in B's
  local attention. Mean NLL of B with that memory against B with the memory emptied.

    python examples/copy_probe.py runs/fig3b/corpus/bin --checkpoints vanilla=runs/fig3b/ckpt/vanilla/checkpoint_last.pt \\
        memorizing=runs/fig3b/ckpt/memorizing/checkpoint_last.pt --out docs/results/copy_probe
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("copy_probe")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="binarised corpus (its dictionary is the models')")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH", help="models probed")
    p.add_argument("--length", type=int, default=48, help="tokens of each random sequence (2·length+1 must fit "
                                                          "the model's positions)")
    p.add_argument("--trials", type=int, default=64, help="random sequences")
    p.add_argument("--memory-size", type=int, default=2048, help="kNN memory of the Memorizing Transformer")
    p.add_argument("--seed", type=int, default=1, help="seed of the random sequences")
    p.add_argument("--tau", type=float, default=1.0, help="Eq. 6 temperature of the local-memory scoring")
    p.add_argument("--out", default=None, help="write PREFIX.json/.md")
    return p.parse_args(argv)


def random_sequences(vocab: int, first: int, length: int, trials: int, seed: int) -> torch.Tensor:
    """``[trials, length]`` tokens uniform over ``[first, vocab)`` (no special symbols)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(first, vocab, (trials, length), generator=g)


def token_nll(model, tokens: torch.Tensor, sample: Optional[dict] = None, **net_input) -> torch.Tensor:
    """NLL (nats) of ``tokens[:, 1:]`` given their prefixes: ``[B, T-1]`` (``sample``: what a
    memory wrapper's ``get_normalized_probs`` reads)."""
    out = model(tokens[:, :-1], **net_input)
    lprobs = model.get_normalized_probs(out, log_probs=True, sample=sample)
    return -lprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1).double()


def doubled(seqs: torch.Tensor, eos: int) -> torch.Tensor:
    """``</s> S S`` per row."""
    return torch.cat([torch.full((seqs.size(0), 1), eos), seqs, seqs], dim=1)


def copy_nlls(nll: torch.Tensor, n: int, prefix: str = "") -> Dict[str, float]:
    """Mean NLL of the first and second copy from the ``[B, 2n]`` target NLLs of
    :func:`doubled` (target j is x[j+1]: first copy = targets 0..n-1, second = n..2n-1), the
    first position of each left out."""
    first, second = nll[:, 1:n].mean().item(), nll[:, n + 1:2 * n].mean().item()
    return {f"{prefix}first_copy_nll": round(first, 4), f"{prefix}second_copy_nll": round(second, 4),
            f"{prefix}in_context_gain_nats": round(first - second, 4)}


def in_context(model, seqs: torch.Tensor, eos: int) -> Dict[str, float]:
    """Mean NLL of the first and the second copy of ``S`` in ``</s> S S``, positions 1.. of each."""
    return copy_nlls(token_nll(model, doubled(seqs, eos)), seqs.size(1))


def with_local_memory(model, seqs: torch.Tensor, eos: int, pad: int, tau: float) -> Dict[str, float]:
    """:func:`in_context` with the model's distribution replaced by Eq. 6 over local memory."""
    from trime_fairseq.memory.combiners import TrimeCombiner
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    wrapper = MemoryEvalModel(model, TrimeCombiner(tau), pad)
    x = doubled(seqs, eos)
    sample = {"net_input": {"src_tokens": x[:, :-1]}, "target": x[:, 1:]}
    return copy_nlls(token_nll(wrapper, x, sample=sample), seqs.size(1), prefix="memory_")


def through_memory(model, seqs: torch.Tensor, eos: int) -> Optional[Dict[str, float]]:
    """Memorizing Transformer: NLL of block B = ``</s> S`` with block A = ``</s> S`` (the same
    document, earlier stream positions) in its kNN memory, and with the memory emptied."""
    if not hasattr(model, "knn_attention") or model.knn_attention.memory.size == 0:
        return None
    memory = model.knn_attention.memory
    x = torch.cat([torch.full((seqs.size(0), 1), eos), seqs], dim=1)
    t = x.size(1) - 1

    def block(offset: int) -> dict:
        pos = torch.arange(offset, offset + t).expand(x.size(0), t)
        return {"mem_docs": torch.zeros_like(pos), "mem_positions": pos.contiguous(), "mem_start": [0] * x.size(0)}

    memory.reset()
    token_nll(model, x, **block(0))
    with_memory = token_nll(model, x, **block(t))[:, 1:].mean().item()
    memory.reset()
    without = token_nll(model, x, **block(t))[:, 1:].mean().item()
    memory.reset()
    return {"memory_nll": round(with_memory, 4), "no_memory_nll": round(without, 4),
            "memory_gain_nats": round(without - with_memory, 4)}


def probe(a) -> List[dict]:
    from trime_fairseq.cli.tune import load

    rows = []
    for item in a.checkpoints:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"error: --checkpoints takes NAME=PATH, got {item!r}")
        overrides = f"{{'memorizing_memory_size': {a.memory_size}}}"
        _, model, task = load([a.data, "--path", path, "--cpu", "--model-overrides", overrides])
        model.eval()
        d = task.source_dictionary
        seqs = random_sequences(len(d), d.nspecial, a.length, a.trials, a.seed)
        with torch.no_grad():
            row = {"system": name, "checkpoint": path, **in_context(model, seqs, d.eos())}
            mem = through_memory(model, seqs, d.eos())
            if mem is not None:
                row.update(mem, memory_size=a.memory_size)
            else:
                row.update(with_local_memory(model, seqs, d.eos(), d.pad(), a.tau), tau=a.tau)
        logger.info("%s: %s", name, row)
        rows.append(row)
    return rows


def markdown(rows: List[dict], a) -> str:
    table = ex.markdown_table(
        rows, ["system", "first_copy_nll", "second_copy_nll", "in_context_gain_nats", "memory_second_copy_nll",
               "memory_in_context_gain_nats", "no_memory_nll", "memory_nll", "memory_gain_nats"],
        ["model", "1st copy", "2nd copy (in context)", "gain", "2nd copy, Eq. 6 local memory", "gain",
         "B without kNN memory", "B with A in kNN memory", "gain"])
    return (f"# Copy probe: random sequences shown twice\n\n{a.trials} sequences of {a.length} tokens drawn uniformly "
            f"from the dictionary; NLL in nats per token (uniform guessing: ln V). Eq. 6 at τ={a.tau}; the "
            f"Memorizing Transformer's kNN memory: {a.memory_size} tokens.\n\n" + table + "\n")


def main(argv=None) -> List[dict]:
    ex.setup_logging()
    a = parse_args(argv)
    rows = probe(a)
    if a.out:
        prefix = Path(a.out)
        ex.write_results(prefix.with_suffix(".json"), {"rows": rows, "args": vars(a)}, markdown(rows, a))
    return rows


if __name__ == "__main__":
    main()
