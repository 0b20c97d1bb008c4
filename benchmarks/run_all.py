"""The benchmark suite: one command, every figure a ratio against a baseline
measured in the same run, on the same model and data.

Prepares what it needs under ``--work`` (reused when present): an LM corpus, a
``cross_entropy`` LM checkpoint, an L2 datastore with index over its training split, an MT
corpus, checkpoint and L2 datastore. Then runs every benchmark of ``benchmarks/`` as a
subprocess (``train_speed``, ``eval_speed``, ``external_speed``, ``generate_speed``), and
writes a markdown report (figure, value, target, pass/miss; time split of the
memory-augmented scorers; setup; machine; command), a PNG of the figures against their
targets and a JSON with the same content. A benchmark that fails is reported as failed
(with its log) and makes the exit code 1; the other figures are still measured.

    python benchmarks/run_all.py --size smoke --work /tmp/bench      # ~3 min, structure only
    python benchmarks/run_all.py --size full                         # the report in docs/results
"""
import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.suite.report import write_report  # noqa: E402
from benchmarks.suite.runner import Suite, run_suite  # noqa: E402,F401  (Suite: used by tests)
from benchmarks.suite.sizes import BENCHMARKS, SIZES  # noqa: E402
from examples import harness as ex  # noqa: E402

logger = logging.getLogger("benchmarks.run_all")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="smoke: tiny models and data (minutes)")
    p.add_argument("--work", default="runs/bench", help="artefacts and logs (reused when present)")
    p.add_argument("--report", default="docs/results/benchmarks.md", help="markdown report (.png, .json beside)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated benchmarks to rerun ({','.join(BENCHMARKS)}); the others' last "
                        "results in the work directory are reported, marked as reused")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the benchmarks train, evaluate, search and generate (cuda: the first GPU; preparation stays on the CPU)")
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA GPU (set up with TRIME_DEVICE=cuda bash scripts/setup.sh)")
    only = None
    if a.only:
        only = set(a.only.split(","))
        unknown = sorted(only - set(BENCHMARKS))
        if unknown:
            p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    ex.setup_logging()
    load_start = os.getloadavg()
    command = "python benchmarks/run_all.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    work = Path(a.work).resolve() / a.size
    t0 = time.time()
    suite = run_suite(a.size, work, only, a.device)
    report = write_report(suite, a.size, Path(a.report), command, load_start)
    logger.info("%s (%.0f s)", report["summary"], time.time() - t0)
    print(Path(a.report).resolve())
    return 1 if any(st["status"] == "failed" for st in suite.steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
