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
import datetime
import json
import logging
import os
import platform
import random
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trime_fairseq.cli import experiment as ex  # noqa: E402

logger = logging.getLogger("benchmarks.run_all")


@dataclass(frozen=True)
class Size:
    """Models, data and benchmark flags of one suite size."""

    lm_arch: str
    lm_updates: int
    tokens_per_sample: int  # training segment length, also the evaluation block (context included)
    context: int
    max_tokens: int
    mt_arch: str
    mt_updates: int
    mt_max_tokens: int
    lm_recall_k: int
    mt_recall_k: int
    train: List[str]
    memorizing: List[str]
    eval: List[str]
    external: List[str]
    generate: List[str]
    gen_passes: int


SIZES: Dict[str, Size] = {
    "smoke": Size(
        lm_arch="transformer_lm_trime_tiny", lm_updates=4, tokens_per_sample=64, context=32, max_tokens=512,
        mt_arch="transformer_mt_trime_tiny", mt_updates=20, mt_max_tokens=512, lm_recall_k=16, mt_recall_k=8,
        train=["--blocks", "1", "--steps", "2", "--warmup-steps", "1", "--long-m", "2"],
        memorizing=["--blocks", "1", "--steps", "2", "--warmup-steps", "1", "--memorizing", "256"],
        eval=["--long-memory-size", "512", "--max-blocks", "16", "--passes", "1"],
        external=["--bm25-segments", "2000", "--blocks", "16", "--knn-k", "16"],
        generate=["--knn-k", "8", "--beam", "2", "--batch-size", "12", "--max-sentences", "12", "--passes", "1"],
        gen_passes=1,
    ),
    "full": Size(
        lm_arch="transformer_lm_trime_small", lm_updates=40, tokens_per_sample=512, context=128, max_tokens=8192,
        mt_arch="transformer_mt_trime_small", mt_updates=60, mt_max_tokens=4096, lm_recall_k=1024, mt_recall_k=16,
        # repetitions sized so the benchmarks take ~25 min on 2 busy cores (preparation: ~30 min, once)
        train=["--blocks", "2", "--steps", "3", "--long-m", "4"],
        memorizing=["--blocks", "2", "--steps", "3", "--memorizing", "8192"],
        eval=["--long-memory-size", "12000", "--max-blocks", "100", "--passes", "2"],
        external=["--bm25-segments", "100000", "--blocks", "60", "--knn-k", "1024"],
        generate=["--knn-k", "16", "--beam", "5", "--batch-size", "64", "--max-sentences", "200", "--passes", "2"],
        gen_passes=2,
    ),
}


BENCHMARKS = ("train", "memorizing", "eval_full_memory", "eval_documents", "external", "ext_eval", "generate")
PREPARATION = ("lm_corpus", "lm_checkpoint", "lm_datastore", "mt_corpus", "mt_checkpoint", "mt_datastore")
ONE_SAVE = ["--save-interval", 10**6]  # epochs: save once, when training stops


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


# ----------------------------------------------------------------------------- preparation


def _tiny_lm_text(root: Path, seed: int = 0) -> None:
    """A synthetic document-level corpus (blank line between documents), as tests use."""
    rnd = random.Random(seed)
    words = [f"w{i}" for i in range(30)] + "the a of to and in is".split()
    for split, n_docs in (("train", 150), ("valid", 40), ("test", 16)):
        with open(root / f"{split}.txt", "w") as f:
            for _ in range(n_docs):
                for _ in range(rnd.randint(2, 5)):
                    f.write(" ".join(rnd.choice(words) for _ in range(rnd.randint(5, 15))) + "\n")
                f.write("\n")


def _tiny_mt_text(root: Path, seed: int = 0) -> None:
    """A synthetic word-for-word de->en corpus."""
    rnd = random.Random(seed)
    for split, n in (("train", 200), ("valid", 24), ("test", 24)):
        with open(root / f"{split}.de", "w") as de, open(root / f"{split}.en", "w") as en:
            for _ in range(n):
                ws = [rnd.randrange(20) for _ in range(rnd.randint(3, 9))]
                de.write(" ".join(f"d{w}" for w in ws) + "\n")
                en.write(" ".join(f"e{w}" for w in ws) + "\n")


def lm_corpus(suite: Suite, smoke: bool, log: Path) -> dict:
    """The default real corpus (``prepare_lm``), or a synthetic one for smoke runs."""
    root = suite.work / "lm_corpus"
    if not (root / "bin" / "dict.txt").exists():
        if smoke:
            root.mkdir(parents=True, exist_ok=True)
            _tiny_lm_text(root)
            ex.run_logged("fairseq_cli.preprocess", [
                "--only-source", "--trainpref", root / "train.txt", "--validpref", root / "valid.txt",
                "--testpref", root / "test.txt", "--destdir", root / "bin", "--workers", "1"], log, show=False)
        else:
            ex.run_logged("trime_fairseq.cli.prepare_lm", ["--out", root], log)
    return {"data": str(root / "bin"), "train_tokens": _lm_train_tokens(root)}


def _lm_train_tokens(root: Path) -> int:
    manifest = root / "corpus.json"
    if manifest.exists():
        return int(json.loads(manifest.read_text())["splits"]["train"]["tokens"])
    from fairseq.data import data_utils

    ds = data_utils.load_indexed_dataset(str(root / "bin" / "train"), None)
    return int(ds.sizes.sum())


def mt_corpus(suite: Suite, smoke: bool, log: Path) -> dict:
    """The default de->en corpus (``prepare_mt``), or a synthetic one for smoke runs."""
    root = suite.work / "mt_corpus"
    if not (root / "bin" / "dict.en.txt").exists():
        if smoke:
            root.mkdir(parents=True, exist_ok=True)
            _tiny_mt_text(root)
            ex.run_logged("fairseq_cli.preprocess", [
                "--source-lang", "de", "--target-lang", "en", "--joined-dictionary", "--trainpref", root / "train",
                "--validpref", root / "valid", "--testpref", root / "test", "--destdir", root / "bin",
                "--workers", "1"], log, show=False)
        else:
            ex.run_logged("trime_fairseq.cli.prepare_mt", ["--out", root], log)
    return {"data": str(root / "bin")}


def lm_checkpoint(suite: Suite, data: Path, log: Path) -> dict:
    """A short ``cross_entropy`` run: speed figures need the real shapes, not a good model."""
    s = suite.size
    save = suite.work / "ckpt" / "lm"
    flags = ex.train_flags(s.lm_arch, s.tokens_per_sample, s.lm_updates, 2e-3, 1, max(1, s.lm_updates // 4))
    out = ex.train(data, save, [*flags, "--criterion", "cross_entropy", "--max-tokens", s.max_tokens,
                                "--disable-validation", *ONE_SAVE], log)
    return {"path": str(save / "checkpoint_last.pt"), "arch": s.lm_arch, **out}


def mt_checkpoint(suite: Suite, data: Path, log: Path) -> dict:
    """A short label-smoothed CE run of the MT model (the kNN-MT base)."""
    s = suite.size
    save = suite.work / "ckpt" / "mt"
    out = ex.train(data, save, [
        "--task", "trime_translation", "--arch", s.mt_arch, "--share-all-embeddings", "--max-tokens", s.mt_max_tokens,
        "--max-update", s.mt_updates, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", 1e-3,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", max(1, s.mt_updates // 4), "--warmup-init-lr", "1e-7",
        "--clip-norm", "1.0", "--seed", 1, "--log-interval", 20, "--disable-validation", *ONE_SAVE, "--cpu",
        "--num-workers", 0, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", 0.1], log)
    return {"path": str(save / "checkpoint_last.pt"), "arch": s.mt_arch, **out}


def datastore(out: Path, data: Path, ckpt: Path, args: Sequence, log: Path) -> dict:
    """An L2 datastore with index over the training split (``build_datastore``)."""
    if not (out / "index.json").exists():
        ex.run_logged("trime_fairseq.cli.build_datastore", [
            data, "--path", ckpt, "--gen-subset", "train", "--out", out, "--metric", "l2", "--overwrite",
            "--cpu", "--num-workers", 0, *args], log)
    return {"path": str(out), "keys": json.loads((out / "meta.json").read_text())["size"],
            **{k: v for k, v in json.loads((out / "index.json").read_text()).items()
               if k in ("factory", "nprobe", "recall", "recall_k", "build_seconds")}}


def run_suite(size_name: str, work: Path, only: Optional[Set[str]] = None) -> Suite:
    """Prepare the artefacts, then run every benchmark (or those in ``only``)."""
    s = SIZES[size_name]
    suite = Suite(s, work, only=only)
    smoke = size_name == "smoke"

    lm = suite.step("lm_corpus", lambda log: lm_corpus(suite, smoke, log)) or {}
    lm_data = Path(lm.get("data", "-"))
    ck = suite.step("lm_checkpoint", lambda log: lm_checkpoint(suite, lm_data, log), ["lm_corpus"]) or {}
    ev = ["--tokens-per-sample", s.tokens_per_sample, "--context-window", s.context, "--max-tokens", s.max_tokens]
    ds = suite.step("lm_datastore", lambda log: datastore(
        suite.work / "ds" / "lm_l2", lm_data, Path(ck["path"]),
        [*ev, "--recall-k", s.lm_recall_k, *(["--recall-queries", 50] if smoke else [])], log),
        ["lm_checkpoint"]) or {}
    mt = suite.step("mt_corpus", lambda log: mt_corpus(suite, smoke, log)) or {}
    mt_data = Path(mt.get("data", "-"))
    mck = suite.step("mt_checkpoint", lambda log: mt_checkpoint(suite, mt_data, log), ["mt_corpus"]) or {}
    mds = suite.step("mt_datastore", lambda log: datastore(
        suite.work / "ds" / "mt_l2", mt_data, Path(mck["path"]),
        ["--task", "trime_translation", "--max-tokens", 8192, "--recall-k", s.mt_recall_k,
         *(["--recall-queries", 50] if smoke else [])], log), ["mt_checkpoint"]) or {}

    model = ["--arch", s.lm_arch, "--tokens-per-sample", s.tokens_per_sample, "--max-tokens", s.max_tokens]
    suite.bench("train", "train_speed", [lm_data, *model, *s.train, "--ext"], ["lm_corpus"])
    suite.bench("memorizing", "train_speed", [lm_data, *model, *s.memorizing, "--only", "memorizing,memorizing_no_memory"],
                ["lm_corpus"])
    scoring = [lm_data, "--path", ck.get("path", "-"), *ev, "--gen-subset", "valid", "--cpu"]
    suite.bench("eval_full_memory", "eval_speed", [*scoring, *s.eval, "--one-document"], ["lm_checkpoint"])
    suite.bench("eval_documents", "eval_speed", [*scoring, *s.eval], ["lm_checkpoint"])
    external = [lm_data, "--path", ck.get("path", "-"), *ev, "--cpu", *s.external]
    suite.bench("external", "external_speed", [*external, "--only", "bm25,datastore"], ["lm_checkpoint"])
    suite.bench("ext_eval", "external_speed", [*external, "--only", "ext_eval", "--datastore", ds.get("path", "-")],
                ["lm_datastore"])
    suite.bench("generate", "generate_speed", [mt_data, "--path", mck.get("path", "-"), "--datastore",
                                               mds.get("path", "-"), "--gen-subset", "test", "--cpu", *s.generate],
                ["mt_datastore"])
    return suite


# ----------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One row of the report: how to read its value from a benchmark's JSON, and its target."""

    key: str
    label: str
    step: str
    value: Callable[[dict], float]
    target: float
    op: str  # ">=" or "<="
    unit: str = "ratio"
    notes: Callable[[dict], str] = lambda r: ""


def _train_notes(variant: str) -> Callable[[dict], str]:
    """Absolute tokens/s and peak RSS behind a training ratio."""
    return lambda r: (f"{r['tokens_per_s'][variant]:,.0f} vs {r['tokens_per_s']['cross_entropy']:,.0f} tokens/s; "
                      f"peak RSS {r['peak_rss_mb_per_variant'][variant]:,.0f} vs "
                      f"{r['peak_rss_mb_per_variant']['cross_entropy']:,.0f} MB")


def _eval_value(r: dict) -> float:
    return next(v for k, v in r["ratio_vs_local"].items() if k != "local")


def _eval_notes(r: dict) -> str:
    name = next(k for k in r["tokens_per_s"] if k != "local")
    occ = r["mean_long_memory_occupancy"][name]
    return (f"{r['tokens_per_s'][name]:,.0f} vs {r['tokens_per_s']['local']:,.0f} tokens/s; {name}, "
            f"mean {occ:,.0f} entries in long memory")


def _ds_sizes(r: dict) -> List[int]:
    return r["datastore"]["sizes"]


FIGURES: List[Figure] = [
    *[Figure(f"train_speed_{kind}", f"TRIME train tokens/s ÷ CE, {desc}", "train",
             lambda r, v=variant: r["ratio_vs_cross_entropy"][v], 0.95, ">=", notes=_train_notes(variant))
      for kind, variant, desc in (("local", "trime_loss", "local memory"),
                                  ("long", "trime_loss_long", "long memory (consecutive segments)"),
                                  ("external", "trime_loss_ext", "external memory (BM25 batches)"))],
    *[Figure(f"train_peak_memory_{kind}", f"peak training memory ÷ CE, {desc}", "train",
             lambda r, v=variant: r["peak_rss_ratio_vs_cross_entropy"][v], 1.1, "<=",
             notes=lambda r, v=variant: f"{r['peak_rss_mb_per_variant'][v]:,.0f} vs "
                                        f"{r['peak_rss_mb_per_variant']['cross_entropy']:,.0f} MB peak RSS")
      for kind, variant, desc in (("local", "trime_loss", "local memory"),
                                  ("long", "trime_loss_long", "long memory"),
                                  ("external", "trime_loss_ext", "external memory"))],
    Figure("eval_long_memory_full", "eval tokens/s, long memory full (one document) ÷ local only", "eval_full_memory",
           _eval_value, 0.9, ">=", notes=_eval_notes),
    Figure("eval_long_memory_documents", "eval tokens/s, long memory over real documents ÷ local only",
           "eval_documents", _eval_value, 0.9, ">=", notes=_eval_notes),
    Figure("ext_eval", "kNN-LM eval tokens/s ÷ vanilla (external memory)", "ext_eval",
           lambda r: r["ext_eval"]["ratio"], 0.5, ">=",
           notes=lambda r: (f"{r['ext_eval']['knn_tokens_per_s']:,.0f} vs {r['ext_eval']['vanilla_tokens_per_s']:,.0f} "
                            f"tokens/s; K={r['ext_eval']['k']}, {r['ext_eval']['keys']:,} keys, "
                            f"{r['ext_eval']['index']} nprobe {r['ext_eval']['nprobe']}, "
                            f"recall@K {r['ext_eval']['recall'] or 0:.3f}")),
    Figure("datastore_build", "datastore build keys/s ÷ plain forward tokens/s", "external",
           lambda r: r["datastore"]["ratio_build_vs_forward"], 0.9, ">=",
           notes=lambda r: (f"{r['datastore'][f'build_keys_per_s_{_ds_sizes(r)[-1]}']:,.0f} vs "
                            f"{r['datastore']['forward_tokens_per_s']:,.0f} per s")),
    Figure("datastore_peak_memory", "datastore build peak RSS, 4N ÷ N keys (flat in N)", "external",
           lambda r: r["datastore"]["peak_rss_ratio_large_vs_small"], 1.1, "<=",
           notes=lambda r: "N = {:,} → {:,} keys: {:,.0f} → {:,.0f} MB".format(
               *_ds_sizes(r), *(r["datastore"][f"peak_rss_mb_{n}"] for n in _ds_sizes(r)))),
    Figure("bm25_seconds", "BM25 batching time", "external", lambda r: r["bm25"]["seconds"], 60.0, "<=", unit="s",
           notes=lambda r: f"{r['bm25']['segments']:,} segments of {r['bm25']['segment_length']} tokens"),
    Figure("knn_mt_generation", "kNN-MT generation sentences/s ÷ base", "generate", lambda r: r["ratio"], 0.5, ">=",
           notes=lambda r: (f"{r['knn_sentences_per_s']:.1f} vs {r['base_sentences_per_s']:.1f} sentences/s; "
                            f"beam {r['beam']}, K={r['knn_k']}, {r['datastore_size']:,} keys ({r['index']})")),
    Figure("memorizing_train", "Memorizing Transformer train tokens/s ÷ plain (no kNN memory)", "memorizing",
           lambda r: r["memorizing_ratio_vs_no_memory"], 0.5, ">=",
           notes=lambda r: (f"{r['tokens_per_s']['memorizing']:,.0f} vs {r['tokens_per_s']['memorizing_no_memory']:,.0f} "
                            f"tokens/s; " + " ".join(r["variants"]["memorizing"][-2:]))),
]


def evaluate(suite: Suite) -> List[dict]:
    """One row per figure: value, target and pass / miss / failed."""
    rows = []
    for f in FIGURES:
        row = {"key": f.key, "figure": f.label, "target": f.target, "op": f.op, "unit": f.unit, "step": f.step}
        res = suite.results.get(f.step)
        if res is None:
            st = suite.steps.get(f.step, {})
            row.update(value=None, status="failed", notes=f"{st.get('error', 'not run')} (log: {st.get('log', '')})")
        else:
            try:
                value = float(f.value(res))
                notes = f.notes(res)
            except (KeyError, TypeError, IndexError, ValueError, StopIteration) as e:
                row.update(value=None, status="failed", notes=f"no value in the output ({type(e).__name__}: {e})")
                suite.steps[f.step].update(status="failed", error=f"missing figure {f.key}")
            else:
                ok = value >= f.target if f.op == ">=" else value <= f.target
                if f.key == "ext_eval" and (res["ext_eval"].get("recall") or 0) < 0.9:
                    ok, notes = False, notes + " (recall below 0.9)"
                row.update(value=value, status="pass" if ok else "miss", notes=notes)
        rows.append(row)
    return rows


def time_splits(suite: Suite) -> List[dict]:
    """Where the memory-augmented scorers spend their time (model / search / combine)."""
    rows = []
    ext = suite.results.get("ext_eval", {}).get("ext_eval")
    if ext:
        split = ext["time_split_s"]
        total = sum(split.values())
        rows.append({"scorer": f"kNN-LM eval (K={ext['k']}, {ext['keys']:,} keys)", "total_s": total,
                     **{k: split[k] / total for k in ("model", "search", "combine")}})
    gen = suite.results.get("generate")
    if gen:
        split = gen["knn_time_split"]
        rows.append({"scorer": f"kNN-MT generation (beam {gen['beam']}, K={gen['knn_k']}, {gen['datastore_size']:,} keys)",
                     "total_s": gen["sentences"] * suite.size.gen_passes / gen["knn_sentences_per_s"],
                     **{k: split[k] for k in ("model", "search", "combine")}})
    return rows


# ----------------------------------------------------------------------------- report


def machine_info(load_start: Sequence[float]) -> dict:
    import faiss
    import fairseq
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
        "fairseq": fairseq.__version__, "commit": commit,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(row: dict) -> str:
    v = row["value"]
    if v is None:
        return "—"
    return f"{v:.1f} s" if row["unit"] == "s" else f"{v:.3f}"


def render(report: dict) -> str:
    """The markdown report."""
    m = report["machine"]
    mark = {"pass": "pass", "miss": "**miss**", "failed": "**FAILED**"}
    figs = [{"figure": r["figure"], "value": _fmt(r), "target": f"{r['op'].replace('>=', '≥').replace('<=', '≤')} "
             f"{r['target']:g}{' s' if r['unit'] == 's' else ''}", "result": mark[r["status"]], "notes": r["notes"]}
            for r in report["figures"]]
    splits = [{"scorer": r["scorer"], "model": f"{r['model']:.0%}", "search": f"{r['search']:.0%}",
               "combine": f"{r['combine']:.0%}", "total_s": f"{r['total_s']:.1f}"} for r in report["time_split"]]
    steps = [{"step": k, "status": v["status"], "seconds": f"{v['seconds']:.0f}",
              "log": f"`{v['log']}`" if v["log"] else "", "error": v.get("error", "") or (f"reused from the run of {v['reused']}" if v.get("reused") else "")}
             for k, v in report["steps"].items()]
    setup = report["setup"]
    lines = [
        f"# Benchmark report ({report['size']} size)",
        "",
        f"`{report['command']}` — {m['date']}, {m['cpus']} CPUs. Every ratio is against a baseline "
        "measured in the same run, on the same model and data (variants alternate so machine noise "
        f"hits both). Load average at start {m['load_average_start']}, at end {m['load_average_end']}: "
        "the absolute speeds depend on what else ran; the ratios less so.",
        "",
        f"{report['summary']}",
        "",
        "## Figures",
        "",
        ex.markdown_table(figs, ["figure", "value", "target", "result", "notes"]),
        "",
        f"![figures against their targets]({report['plot']})",
        "",
        "## Time split of the memory-augmented scorers",
        "",
        ex.markdown_table(splits, ["scorer", "model", "search", "combine", "total_s"],
                          ["scorer", "model", "search", "combine", "total (s)"]) if splits else "(no scorer ran)",
        "",
        "## Setup",
        "",
        *[f"* {k}: {v}" for k, v in setup.items()],
        "",
        "## Steps",
        "",
        ex.markdown_table(steps, ["step", "status", "seconds", "log", "error"]),
        "",
        "## Machine",
        "",
        *[f"* {k}: {v}" for k, v in m.items()],
        "",
    ]
    return "\n".join(lines)


def plot(rows: List[dict], path: Path) -> None:
    """Horizontal bars of every figure with its target marked (green pass, red miss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [[r for r in rows if r["unit"] == "ratio"], [r for r in rows if r["unit"] == "s"]]
    fig, axes = plt.subplots(2, 1, figsize=(9, 0.45 * len(rows) + 2.2),
                             gridspec_kw={"height_ratios": [max(1, len(p)) for p in panels]})
    for ax, group, xlabel in zip(axes, panels, ("ratio against the same-run baseline", "seconds")):
        ys = list(range(len(group)))[::-1]
        vals = [r["value"] if r["value"] is not None else 0.0 for r in group]
        colours = ["tab:green" if r["status"] == "pass" else "tab:red" if r["status"] == "miss" else "grey"
                   for r in group]
        ax.barh(ys, vals, color=colours, height=0.6)
        for y, r, v in zip(ys, group, vals):
            ax.plot([r["target"], r["target"]], [y - 0.4, y + 0.4], color="black", lw=2)
            ax.annotate("failed" if r["value"] is None else f"{v:.2f}", (v, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels([textwrap.fill(r["figure"], 42) for r in group], fontsize=7)
        ax.set_xlabel(xlabel + " (black tick: target)", fontsize=8)
    axes[0].set_title("Benchmarks: green pass, red miss, grey failed", fontsize=9)
    ex.save_figure(fig, path, dpi=110)


def setup_notes(suite: Suite, size_name: str) -> dict:
    r = suite.results
    notes = {}
    if "lm_corpus" in r:
        notes["LM corpus"] = f"`{r['lm_corpus']['data']}`, {r['lm_corpus']['train_tokens']:,} training tokens"
    if "lm_checkpoint" in r:
        c = r["lm_checkpoint"]
        notes["LM checkpoint"] = (f"{c['arch']}, cross_entropy, {c['updates']} updates, L={suite.size.tokens_per_sample} "
                                  f"(evaluation: {suite.size.tokens_per_sample}-token blocks, "
                                  f"{suite.size.context} of them context)")
    if "lm_datastore" in r:
        d = r["lm_datastore"]
        notes["LM datastore"] = (f"{d['keys']:,} keys (L2, whole training split), {d['factory']}, nprobe {d['nprobe']}, "
                                 f"recall@{d['recall_k']} {d['recall'] or 0:.3f}")
        if size_name == "full" and d["keys"] < 1_000_000:
            notes["LM datastore"] += " — fewer than the 1M keys asked: the corpus has no more training tokens"
    if "mt_checkpoint" in r:
        notes["MT checkpoint"] = f"{r['mt_checkpoint']['arch']}, label-smoothed CE, {r['mt_checkpoint']['updates']} updates"
    if "mt_datastore" in r:
        d = r["mt_datastore"]
        notes["MT datastore"] = (f"{d['keys']:,} keys (L2, training targets), {d['factory']}, "
                                 f"recall@{d['recall_k']} {d['recall'] or 0:.3f}")
    bm = r.get("external", {}).get("bm25")
    if bm and size_name == "full" and bm["segments"] < 100_000:
        notes["BM25"] = f"{bm['segments']:,} segments: the corpus has fewer than the 100k asked"
    notes["work directory"] = f"`{suite.work}` (logs in `{suite.logs}`)"
    return notes


def write_report(suite: Suite, size_name: str, report_path: Path, command: str, load_start: Sequence[float]) -> dict:
    """Markdown + PNG + JSON beside each other, each written atomically."""
    figures = evaluate(suite)
    counts = {k: sum(r["status"] == k for r in figures) for k in ("pass", "miss", "failed")}
    prep = sum(v["seconds"] for k, v in suite.steps.items() if k in PREPARATION) / 60
    bench = sum(v["seconds"] for k, v in suite.steps.items() if k not in PREPARATION) / 60
    reused = ", ".join(f"{k} ({v['reused']})" for k, v in suite.steps.items() if v.get("reused"))
    reused = f" Not rerun (--only), their last results are shown: {reused}." if reused else ""
    report = {
        "size": size_name,
        "command": command,
        "summary": (f"{counts['pass']} of {len(figures)} figures meet their target, {counts['miss']} miss, "
                    f"{counts['failed']} failed to run. Preparation took {prep:.0f} min (artefacts already in "
                    f"the work directory are reused), the benchmarks {bench:.0f} min.{reused}"),
        "figures": figures,
        "time_split": time_splits(suite),
        "setup": setup_notes(suite, size_name),
        "steps": suite.steps,
        "machine": machine_info(load_start),
        "plot": report_path.with_suffix(".png").name,
        "raw": {k: v for k, v in suite.results.items()},
    }
    plot(figures, report_path.with_suffix(".png"))
    ex.atomic_write(report_path.with_suffix(".json"), json.dumps(report, indent=2, default=str))
    ex.atomic_write(report_path, render(report))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="full", help="smoke: tiny models and data (minutes)")
    p.add_argument("--work", default="runs/bench", help="artefacts and logs (reused when present)")
    p.add_argument("--report", default="docs/results/benchmarks.md", help="markdown report (.png, .json beside)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated benchmarks to rerun ({','.join(BENCHMARKS)}); the others' last "
                        "results in the work directory are reported, marked as reused")
    a = p.parse_args(argv)
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
    suite = run_suite(a.size, work, only)
    report = write_report(suite, a.size, Path(a.report), command, load_start)
    logger.info("%s (%.0f s)", report["summary"], time.time() - t0)
    print(Path(a.report).resolve())
    return 1 if any(st["status"] == "failed" for st in suite.steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
