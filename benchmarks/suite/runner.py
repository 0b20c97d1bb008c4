"""Running the suite: steps with status, time and log; each benchmark a subprocess."""
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Set

from benchmarks.suite import prepare
from benchmarks.suite.sizes import SIZES, Size
from examples import harness as ex

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger("benchmarks.run_all")


class Failed(RuntimeError):
    """A step failed; the message says why in one line."""


@dataclass
class Suite:
    """Runs steps, remembering each one's status, time, log and JSON output."""

    size: Size
    work: Path
    steps: Dict[str, dict] = field(default_factory=dict)
    results: Dict[str, dict] = field(default_factory=dict)
    only: Optional[Set[str]] = None  # benchmarks to rerun; the others reuse their last result

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def step(self, name: str, fn: Callable[[Path], Optional[dict]], needs: Sequence[str] = ()) -> Optional[dict]:
        """Run ``fn(log_path)`` unless a step it needs failed; record the outcome."""
        log = self.logs / f"{name}.log"
        missing = [n for n in needs if self.steps.get(n, {}).get("status") != "ok"]
        if missing:
            self.steps[name] = {"status": "failed", "seconds": 0.0, "log": str(self.logs / f"{missing[0]}.log"),
                                "error": f"not run: needs {', '.join(missing)}"}
            logger.error("%s: not run (needs %s)", name, ", ".join(missing))
            return None
        t0 = time.time()
        try:
            out = fn(log)
        except (ex.CommandError, Failed, OSError, ValueError, KeyError) as e:
            why = _reason(e)
            self.steps[name] = {"status": "failed", "seconds": time.time() - t0, "log": str(log), "error": why}
            logger.error("%s failed: %s (log: %s)", name, why, log)
            return None
        self.steps[name] = {"status": "ok", "seconds": time.time() - t0, "log": str(log) if log.exists() else ""}
        if out is not None:
            self.results[name] = out
        return out

    def bench(self, name: str, script: str, args: Sequence, needs: Sequence[str]) -> None:
        """``python -m benchmarks.<script> args --out JSON`` (always rerun: a fresh measurement)."""
        out = self.work / "results" / f"{name}.json"
        if self.only is not None and name not in self.only:
            if out.exists():
                self.results[name] = json.loads(out.read_text())
                self.steps[name] = {"status": "ok", "seconds": 0.0, "log": str(self.logs / f"{name}.log"),
                                    "reused": time.strftime("%Y-%m-%d %H:%M", time.localtime(out.stat().st_mtime))}
            else:
                self.steps[name] = {"status": "failed", "seconds": 0.0, "log": "",
                                    "error": f"not run (--only) and no earlier result in {out}"}
            return

        def run(log: Path) -> dict:
            out.unlink(missing_ok=True)
            paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if str(REPO) not in paths:  # ``-m benchmarks.X`` from any working directory
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), *paths] if p)
            ex.run_logged(f"benchmarks.{script}", [*args, "--out", out], log, show=False)
            if not out.exists():
                raise Failed(f"{script} wrote no {out}")
            return json.loads(out.read_text())

        self.step(name, run, needs)


def _reason(e: Exception) -> str:
    """One line: a failed command's last output line that names an error, else the message."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if isinstance(e, ex.CommandError) and len(lines) > 1:
        errors = [l for l in lines[1:] if "Error" in l or "error:" in l]
        last = (errors or lines[1:])[-1]
        return f"{lines[0].split(' (log:')[0]}: {last}"[:300]
    return (lines[0] if lines else type(e).__name__)[:300]



def run_suite(size_name: str, work: Path, only: Optional[Set[str]] = None, device: str = "cpu") -> Suite:
    """Prepare the artefacts, then run every benchmark (or those in ``only``). ``device``:
    where the benchmarks train, evaluate, search and generate (preparation stays on the CPU)."""
    on = ["--cpu"] if device == "cpu" else []
    s = SIZES[size_name]
    suite = Suite(s, work, only=only)
    smoke = size_name == "smoke"

    lm = suite.step("lm_corpus", lambda log: prepare.lm_corpus(suite, smoke, log)) or {}
    lm_data = Path(lm.get("data", "-"))
    ck = suite.step("lm_checkpoint", lambda log: prepare.lm_checkpoint(suite, lm_data, log), ["lm_corpus"]) or {}
    ev = ["--tokens-per-sample", s.tokens_per_sample, "--context-window", s.context, "--max-tokens", s.max_tokens]
    ds = suite.step("lm_datastore", lambda log: prepare.datastore(
        suite.work / "ds" / f"{prepare.lm_name(suite)}_l2", lm_data, Path(ck["path"]),
        [*ev, "--recall-k", s.lm_recall_k, *(["--recall-queries", 50] if smoke else [])], log),
        ["lm_checkpoint"]) or {}
    mt = suite.step("mt_corpus", lambda log: prepare.mt_corpus(suite, smoke, log)) or {}
    mt_data = Path(mt.get("data", "-"))
    mck = suite.step("mt_checkpoint", lambda log: prepare.mt_checkpoint(suite, mt_data, log), ["mt_corpus"]) or {}
    mds = suite.step("mt_datastore", lambda log: prepare.datastore(
        suite.work / "ds" / "mt_l2", mt_data, Path(mck["path"]),
        ["--task", "trime_translation", "--max-tokens", 8192, "--recall-k", s.mt_recall_k,
         *(["--recall-queries", 50] if smoke else [])], log), ["mt_checkpoint"]) or {}

    model = ["--arch", s.lm_arch, "--tokens-per-sample", s.tokens_per_sample, "--max-tokens", s.max_tokens,
             "--device", device]
    suite.bench("train", "train_speed", [lm_data, *model, *s.train, "--ext"], ["lm_corpus"])
    suite.bench("memorizing", "train_speed", [lm_data, *model, *s.memorizing, "--only", "memorizing,memorizing_no_memory"],
                ["lm_corpus"])
    scoring = [lm_data, "--path", ck.get("path", "-"), *ev, "--gen-subset", "valid", *on]
    suite.bench("eval_full_memory", "eval_speed", [*scoring, *s.eval, "--one-document"], ["lm_checkpoint"])
    suite.bench("eval_documents", "eval_speed", [*scoring, *s.eval], ["lm_checkpoint"])
    external = [lm_data, "--path", ck.get("path", "-"), *ev, *on, *s.external]
    suite.bench("external", "external_speed", [*external, "--only", "bm25,datastore"], ["lm_checkpoint"])
    suite.bench("ext_eval", "external_speed", [*external, "--only", "ext_eval", "--datastore", ds.get("path", "-"),
                                               "--retrieval-skip-feature", "entropy"], ["lm_datastore"])
    suite.bench("generate", "generate_speed", [mt_data, "--path", mck.get("path", "-"), "--datastore",
                                               mds.get("path", "-"), "--gen-subset", "test", *on, *s.generate],
                ["mt_datastore"])
    return suite


