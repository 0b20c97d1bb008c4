"""The harness of the examples and the benchmark suite: run fairseq's own commands, parse, tabulate, plot.

Every number an example reports comes from ``fairseq-train`` / ``fairseq-eval-lm`` /
``trime-tune`` output parsed here, so anyone can rerun the same commands by hand (each
step's full command line is logged and its output kept under ``logs/``).
"""
import json
import logging
import math
import os
import re
import shlex
import sys
import textwrap
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

from trime_fairseq import launch
from trime_fairseq.cli import LOG_FORMAT
from trime_fairseq.cli.grid import result_grid_edges, warn_grid_edges
from trime_fairseq.results import atomic_write, save_figure, write_results  # noqa: F401  (re-exported)

logger = logging.getLogger("trime_fairseq.experiment")

REPO_PKG = str(Path(__file__).resolve().parents[1] / "trime_fairseq")  # the plugin folder (--user-dir)
_SHOW = re.compile(r"train_inner|\| valid \||Perplexity|Evaluated|<- best|error|Error")


class CommandError(RuntimeError):
    """A step failed; the message holds the command and the end of its output."""


def _compact(line: str) -> str:
    """fairseq's JSON progress lines as ``train_inner | num_updates=20 loss=9.98 ...``."""
    line = line.rstrip()
    if "{" in line and ("| train" in line or "| valid" in line):
        head, _, body = line.partition("{")
        try:
            stats = json.loads("{" + body)
        except json.JSONDecodeError:
            return line[-200:]
        keys = ("epoch", "num_updates", "loss", "ce_loss", "ppl", "ce_ppl", "wps", "lr")
        tag = head.split("|")[-2].strip() if head.count("|") >= 2 else "progress"
        prefix = "valid_" if tag == "valid" else ""
        return tag + " | " + " ".join(
            f"{k}={stats[prefix + k]}" for k in keys if prefix + k in stats or k in stats and not prefix
        )
    return line[-200:]


#: torch threads of each command while :func:`run_parallel` runs several (None: torch's default)
_job_threads: Optional[int] = None


def run_parallel(jobs: Dict[str, Callable[[], dict]], workers: int) -> Dict[str, dict]:
    """Run independent steps (each a fairseq command) ``workers`` at a time. With more than one
    at once, each command gets ``cores // workers`` torch threads (unless ``OMP_NUM_THREADS``
    is set): with torch's default of one thread per core, two commands on two cores ran ~3x
    slower than one after the other."""
    global _job_threads
    workers = max(1, min(workers, len(jobs)))
    before = _job_threads
    if workers > 1:
        _job_threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {k: pool.submit(f) for k, f in jobs.items()}
            return {k: f.result() for k, f in futures.items()}
    finally:
        _job_threads = before


class CommandOutput(str):
    """A command's output, with the CPU seconds it took (``cpu_s``)."""

    cpu_s: float = math.nan


def run_logged(module: str, args: Sequence[str], log_path: Path, show: bool = True) -> CommandOutput:
    """Run ``python -m module args`` (:mod:`trime_fairseq.launch`), its output written to
    ``log_path`` as it runs; returns the output. Lines with progress (fairseq's
    ``train_inner``/``valid``, perplexities) are echoed.
    """
    cmd = [sys.executable, "-m", module, *map(str, args)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s", " ".join(shlex.quote(c) for c in cmd))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if _job_threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(_job_threads)  # run_parallel: share the cores, don't oversubscribe
    proc = launch.start(module, args, log_path, env=env)  # the log written as the command runs
    lines: List[str] = []
    with open(log_path, errors="replace") as log:
        partial = ""
        while True:
            finished = proc.poll() is not None
            for line in (partial + log.read()).splitlines(keepends=True):
                if not line.endswith("\n") and not finished:
                    partial = line
                    break
                partial = ""
                lines.append(line)
                if show and _SHOW.search(line) and "faiss.loader" not in line:
                    logger.info("  %s", _compact(line))
            if finished:
                break
            time.sleep(0.1)
    rc = proc.returncode
    out = CommandOutput("".join(lines))
    out.cpu_s = proc.cpu_s if proc.cpu_s is not None else math.nan
    if rc != 0:
        tail = "".join(lines[-25:])
        raise CommandError(f"{module} exited with {rc} (log: {log_path}):\n{tail}")
    return out


def train(data: Path, save_dir: Path, args: Sequence[str], log_path: Path) -> Dict[str, float]:
    """``fairseq-train``; returns training tokens/s (mean over logged intervals after the
    first) and wall time. Skips training if ``checkpoint_last.pt`` reached ``--max-update``."""
    done = save_dir / "train_done.json"
    if done.exists():
        logger.info("reusing %s (delete it to retrain)", save_dir)
        return json.loads(done.read_text())
    t0 = time.time()
    out = run_logged(
        "fairseq_cli.train",
        [data, "--user-dir", REPO_PKG, "--save-dir", save_dir, "--log-format", "json",
         "--no-epoch-checkpoints", *args],
        log_path,
    )
    inner = [json.loads(l.split("|")[-1]) for l in out.splitlines() if "| train_inner |" in l]
    if not inner:  # shorter than one log interval: the epoch summaries
        inner = [json.loads(l.split("|")[-1]) for l in out.splitlines() if "| train |" in l and "{" in l]
        inner = [{"wps": x.get("train_wps", 0), "num_updates": x.get("train_num_updates", 0)} for x in inner]
    wps = sorted(float(x["wps"]) for x in (inner[1:] or inner))
    result = {  # median: intervals that include a validation pass are slower
        "train_tokens_per_s": wps[len(wps) // 2] if wps else 0.0,
        "train_wall_s": time.time() - t0,
        "updates": int(inner[-1]["num_updates"]) if inner else 0,
    }
    atomic_write(done, json.dumps(result, indent=2))
    return result


_PPL = re.compile(r"Perplexity: ([0-9.]+)")
_TPS = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s \(([0-9.]+) tokens/s\)")


def eval_lm(data: Path, ckpt: Path, args: Sequence[str], log_path: Path) -> Dict[str, float]:
    """``fairseq-eval-lm --task trime_lm``; returns perplexity, tokens, tokens/s and the
    command's CPU seconds."""
    out = run_logged(
        "fairseq_cli.eval_lm",
        [data, "--path", ckpt, "--user-dir", REPO_PKG, "--task", "trime_lm", *args],
        log_path,
    )
    ppl = _PPL.findall(out)
    tps = _TPS.findall(out)
    if not ppl or not tps:
        raise CommandError(f"could not read the perplexity from {log_path}")
    return {"ppl": float(ppl[-1]), "tokens": int(tps[-1][0].replace(",", "")), "tokens_per_s": float(tps[-1][2]),
            "cpu_s": out.cpu_s}


def cached_eval(data: Path, ckpt: Path, args: Sequence, out: Path, log: Path) -> Dict:
    """:func:`eval_lm`'s result, kept in ``out`` with its arguments and the checkpoint's
    mtime (reused while both match), so a rerun of an example only scores what changed."""
    key = [str(x) for x in (ckpt, *args)]
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("argv") == key and old.get("checkpoint_mtime") == ckpt.stat().st_mtime:
            return old
    r = eval_lm(data, ckpt, list(args), log)
    r.update(argv=key, checkpoint_mtime=ckpt.stat().st_mtime)
    atomic_write(out, json.dumps(r))
    return r


def best_point(rows: List[dict], own_ext_tau: Optional[bool] = None, **fixed) -> Optional[dict]:
    """The best ``trime-tune`` grid point of ``rows`` (its JSON ``rows``; the first, the model
    alone, is skipped) with the ``fixed`` parameters (a missing one counts as 0); with
    ``own_ext_tau`` True/False only points with / without a separate τ_ext (``ext_tau`` > 0).
    ``None`` if no point matches."""
    rows = [r for r in rows[1:] if all(r["params"].get(k, 0) == v for k, v in fixed.items())
            and (own_ext_tau is None or bool(r["params"].get("ext_tau", 0)) == own_ext_tau)]
    return min(rows, key=lambda r: r["ppl"], default=None)


_GEN_SPEED = re.compile(r"Translated ([0-9,]+) sentences \(([0-9,]+) tokens\) in ([0-9.]+)s \(([0-9.]+) sentences/s")


def generate(data: Path, ckpt: Path, args: Sequence[str], log_path: Path) -> Dict:
    """``fairseq-generate --task trime_translation``; returns the detokenised hypotheses in
    sentence-id order (``D-`` lines; pass ``--post-process``) and sentences/s."""
    out = run_logged(
        "fairseq_cli.generate",
        [data, "--path", ckpt, "--user-dir", REPO_PKG, "--task", "trime_translation", *args],
        log_path, show=False,
    )
    hyps = {int(i): h for i, h in re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", out, flags=re.M)}
    speed = _GEN_SPEED.findall(out)
    if not speed:
        raise CommandError(f"could not read the generation speed from {log_path}")
    return {"hyps": [hyps.get(i, "") for i in range(len(hyps))], "sentences": int(speed[-1][0].replace(",", "")),
            "seconds": float(speed[-1][2]), "sentences_per_s": float(speed[-1][3])}


def cached_generate(data: Path, ckpt: Path, args: Sequence, log_path: Path) -> Dict:
    """:func:`generate`'s result, kept beside its log (``.json``) with its arguments and the
    checkpoint's mtime (reused while both match), so a rerun of an example only decodes
    what changed."""
    out = log_path.with_suffix(".json")
    key = [str(x) for x in (ckpt, *args)]
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("argv") == key and old.get("checkpoint_mtime") == ckpt.stat().st_mtime:
            return old
    r = generate(data, ckpt, [str(x) for x in args], log_path)
    r.update(argv=key, checkpoint_mtime=ckpt.stat().st_mtime)
    atomic_write(out, json.dumps(r))
    return r


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> Dict:
    """Corpus BLEU of detokenised text with sacrebleu's defaults, and its signature."""
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(list(hyps), [list(refs)])
    return {"bleu": round(score.score, 2), "signature": str(metric.get_signature())}


def paired_bootstrap(baseline: Sequence[str], system: Sequence[str], refs: Sequence[str],
                     samples: int = 1000) -> Dict:
    """sacrebleu's paired bootstrap resampling of ``system`` against ``baseline`` (corpus BLEU of
    each, the p-value of the difference, the half-width of the system's 95% interval)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    _, scores = PairedTest([("baseline", list(baseline)), ("system", list(system))], {"BLEU": BLEU()},
                           [list(refs)], test_type="bs", n_samples=samples)()
    base, other = scores["BLEU"]
    return {"baseline_bleu": round(base.score, 2), "system_bleu": round(other.score, 2),
            "p_value": round(float(other.p_value), 4), "ci": round(float(other.ci), 2), "samples": samples}


def run_tool(module: str, args: Sequence[str], out_json: Path, log_path: Path) -> dict:
    """Run a tool that writes ``out_json`` and return the JSON; reused while
    ``out_json.args.json`` records the same arguments (and the same mtimes of the files
    they name)."""
    argv = [str(x) for x in args]
    stamp = out_json.with_suffix(".args.json")
    inputs = [a for a in argv if a != str(out_json)]  # the output itself is no input
    key = {"argv": argv, "mtimes": {a: os.path.getmtime(a) for a in inputs if os.path.isfile(a)}}
    if out_json.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        logger.info("reusing %s (delete it to rerun)", out_json)
        return json.loads(out_json.read_text())
    run_logged(module, argv, log_path)
    atomic_write(stamp, json.dumps(key))
    return json.loads(out_json.read_text())


def tune(data: Path, ckpt: Path, combiner: str, grid: Sequence[str], args: Sequence[str], out_json: Path, log_path: Path) -> dict:
    """``trime-tune`` on the validation set; returns its JSON (rows and best). Reuses
    ``out_json`` when ``out_json.args.json`` records the same arguments and checkpoint."""
    argv = [str(x) for x in [data, "--path", ckpt, "--combiner", combiner, "--grid", *grid, "--out", out_json, *args]]
    stamp = out_json.with_suffix(".args.json")
    key = {"argv": argv, "checkpoint_mtime": os.path.getmtime(ckpt) if os.path.exists(ckpt) else None}
    if out_json.exists() and stamp.exists() and json.loads(stamp.read_text()) == key:
        logger.info("reusing %s (delete it to rerun)", out_json)
    else:
        run_logged("trime_fairseq.cli.tune", argv, log_path)
        atomic_write(stamp, json.dumps(key))
    result = json.loads(out_json.read_text())
    check_grid_edges(result, str(out_json))
    return result


def check_grid_edges(result: dict, label: str) -> Dict[str, float]:
    """The optima of a ``trime-tune`` / ``trime-tune-mt`` result on the edge of their grid and
    still improving there, logged under ``label`` (also for results cached before the tools
    checked their grids)."""
    edges = result_grid_edges(result)
    warn_grid_edges(edges, label)
    return edges


def add_common_args(p, run_dir: str, tokens_per_sample: int, max_update: int = 320, lr: float = 2e-3,
                    eval_tokens_per_sample: int = 512, context_window: int = 256) -> None:
    """The flags every example takes (run directory, model, budget, evaluation blocks)."""
    p.add_argument("--run-dir", default=run_dir, help="where data, checkpoints and results go")
    p.add_argument("--data", default=None, help="binarised corpus to use instead of building the default one")
    p.add_argument("--arch", default="transformer_lm_trime_small", help="architecture of every model")
    p.add_argument("--tokens-per-sample", type=int, default=tokens_per_sample, help="training segment length L")
    p.add_argument("--max-update", type=int, default=max_update, help="updates per model (the same for all)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (inverse_sqrt schedule)")
    p.add_argument("--ce-warmup-frac", type=float, default=0.05, help="share of updates trained with plain CE first")
    p.add_argument("--eval-tokens-per-sample", type=int, default=eval_tokens_per_sample,
                   help="evaluation block including the context window")
    p.add_argument("--context-window", type=int, default=context_window, help="evaluation context window")
    p.add_argument("--seed", type=int, default=1, help="training seed")


def start_run(a, warmup_updates: int = 0, prepare_args: Sequence = ()):
    """Common start of every example: logging, run/logs directories, the corpus (reused from
    ``a.reuse`` when given; built with ``trime-prepare-lm prepare_args`` otherwise), the
    shared fairseq-train flags and the CE warm-up updates.

    Returns ``(run, logs, data, train_flags, ce_warmup_updates)``.
    """
    setup_logging()
    run = Path(a.run_dir)
    logs = run / "logs"
    src = Path(a.reuse) if getattr(a, "reuse", None) else run
    data = ensure_corpus(src, a.data, logs, prepare_args)
    flags = train_flags(a.arch, a.tokens_per_sample, a.max_update, a.lr, a.seed,
                        warmup_updates or max(1, a.max_update // 8))
    return run, logs, data, flags, max(1, int(a.ce_warmup_frac * a.max_update))


def ensure_corpus(run: Path, data: Optional[str], logs: Path, prepare_args: Sequence = ()) -> Path:
    """``data`` (a fairseq-preprocess output) or the corpus built in ``run/corpus`` by
    ``trime-prepare-lm prepare_args`` (default: the default corpus)."""
    if data:
        path = Path(data)
    else:
        path = run / "corpus" / "bin"
        if not (path / "dict.txt").exists():
            run_logged("trime_fairseq.cli.prepare_lm", ["--out", run / "corpus", *prepare_args], logs / "prepare.log")
    if not (path / "dict.txt").exists():
        raise SystemExit(f"error: --data {path} has no dict.txt (not a fairseq-preprocess output)")
    return path


def train_flags(arch: str, tokens_per_sample: int, max_update: int, lr: float, seed: int,
                warmup_updates: int) -> List:
    """The fairseq-train flags all examples share (Adam, inverse-sqrt schedule, CPU)."""
    return [
        "--task", "trime_lm", "--arch", arch, "--tokens-per-sample", tokens_per_sample,
        "--max-update", max_update, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", lr,
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", warmup_updates, "--warmup-init-lr", "1e-7",
        "--clip-norm", "1.0", "--seed", seed, "--log-interval", "20",
        "--validate-interval-updates", max_update, "--cpu", "--num-workers", "0",
    ]


def eval_flags(tokens_per_sample: int, context_window: int) -> List:
    """The fairseq-eval-lm / trime-tune flags all examples share."""
    return ["--tokens-per-sample", tokens_per_sample, "--context-window", context_window,
            "--max-tokens", 4096, "--cpu", "--num-workers", "0"]


def memorizing_params(ckpt: Path) -> Dict[str, List[float]]:
    """Per-head gate σ(b) and memory scale learned by a Memorizing Transformer checkpoint
    (its ``--memorizing-param-scale``, ``--knn-param-scale`` in checkpoints saved before the rename)."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model_cfg = state["cfg"]["model"]  # a dict or a Namespace, depending on how it was saved
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k: getattr(model_cfg, k, None)
    s = float(get("memorizing_param_scale") or get("knn_param_scale") or 1.0)
    gate = next(v for k, v in state["model"].items() if k.endswith("mem_gate"))
    log_scale = next(v for k, v in state["model"].items() if k.endswith("mem_log_scale"))
    return {"gate": [round(float(x), 3) for x in torch.sigmoid(s * gate.float())],
            "scale": [round(float(x), 2) for x in (s * log_scale.float()).exp()]}


def publish(result: dict, markdown: str, run_json: Path, prefix: Optional[str] = None,
            log: logging.Logger = logger) -> List[Path]:
    """The examples' last step: ``result`` as JSON and ``markdown`` beside it in the run
    (``run_json``) and, unless ``prefix`` is empty or ``none``, as ``PREFIX.json/.md`` too;
    the markdown is logged. Returns the JSON paths written."""
    outs = [run_json] + ([Path(prefix + ".json")] if prefix and prefix != "none" else [])
    for out in outs:
        write_results(out, result, markdown)
    log.info("\n%s", markdown)
    return outs


def markdown_table(rows: List[Dict], columns: List[str], headers: Optional[List[str]] = None) -> str:
    headers = headers or columns

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def bar_plot(rows: List[Dict], path: Path, title: str, keys=("valid_ppl", "test_ppl"),
             ylabel: str = "perplexity (lower is better)") -> None:
    """Grouped bars of a metric (perplexity by default) per system (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["system"] for r in rows]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.6))
    for k, key in enumerate(keys):
        xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        vals = [r.get(key, float("nan")) for r in rows]
        bars = ax.bar(xs, vals, width, label=key.replace("_", " "))
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([textwrap.fill(n, 18) for n in names], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr, force=True)
