"""Translation with memory (cf. TRIME Table 5): base, kNN-MT, adaptive kNN-MT and TRIME-MT.

On the real de->en corpus of ``trime-prepare-mt`` (by default gettext catalogs of PyPI
projects, Debian package descriptions (DDTP) and Debian base-system ``.mo`` catalogs; the
``gramps`` catalogs are held out as a second domain):

1. base: ``transformer_mt_trime_small`` with label-smoothed cross entropy; its BLEU on the
   validation set (greedy, ``--eval-bleu``) is logged ``--curve-points`` times during
   training (BLEU against updates). TRIME-MT: the same model and budget with ``trime_loss``
   (memory = the other target sentences of the batch) in the reference TRIME-MT recipe:
   memory logits q·k/√d divided by ``--trime-temperature`` (10), only the
   ``--memory-top-k`` (8) largest memory logits per token, no label smoothing and a CE
   warm-up. The reference also keeps BM25 groups whole (``--bm25-grouping whole``); here
   they are re-split by length by default (whole groups pad away 58% of the tokens of an
   update on this corpus, see ``docs/results/translation_ablation.md``). TRIME-MT's
   ``--max-tokens`` is raised until its BM25 batches hold as many target tokens per update
   as the base model's (``--trime-max-tokens``).
2. datastores of every training target token: L2 for the base model (kNN-MT), inner
   product for TRIME-MT; for the domain-adaptation rows, over the held-out domain's
   training pairs instead (the models never saw that domain).
3. kNN-MT's λ and T and TRIME-MT's τ (a grid from 1/16 to 4 times its training
   temperature) with Appendix F's λ and τ' (Eq. 8 over the retrieved neighbours) are chosen
   by validation NLL with ``trime-tune-mt`` (one retrieval pass per model; an optimum at the
   edge of its grid is logged and named on the page); Meta-k (adaptive kNN-MT) is trained
   on the validation set with ``trime-train-metak``. With ``--bleu-lambdas``, kNN-MT's λ and TRIME-MT's
   Appendix F λ are also chosen by validation BLEU (one beam search per value), reported
   as extra systems; with ``--bleu-temperature-factors`` too, each system's memory
   temperature (kNN-MT's T, Appendix F's τ') is then chosen by validation BLEU at that λ
   (coordinate ascent, the same for both systems), reported as a third pair of systems;
   ``--bleu-tau-factors`` adds TRIME-MT's second temperature (Eq. 6's τ) to that step.
4. ``fairseq-generate`` (beam 5) on the test sets, detokenised, scored with sacrebleu; the
   test NLL of kNN-MT and TRIME-MT at their tuned settings (reported, not used to choose).

Results go to ``RUN/results.{json,md,png}`` and to ``--results`` (``docs/results/translation``
by default: ``.json`` rows keyed ``base``, ``knnmt``, ``adaptive_knnmt``, ``trime_mt``,
``trime_mt_nomem``, each with ``domain`` and ``bleu``).

    python examples/translation.py --run-dir runs/mt
"""
import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import harness as ex  # noqa: E402

logger = logging.getLogger("translation")

DEFAULT_SOURCES = "pypi,debian-ddtp,debian-mo"
#: ``docs/results/translation.json`` row keys
ROW_KEYS = {"base": "base", "kNN-MT": "knnmt", "adaptive kNN-MT": "adaptive_knnmt", "TRIME-MT": "trime_mt",
            "TRIME-MT (no memory)": "trime_mt_nomem", "kNN-MT (λ by valid BLEU)": "knnmt_bleu_lambda",
            "TRIME-MT (λ by valid BLEU)": "trime_mt_bleu_lambda",
            "kNN-MT (λ, temperature by valid BLEU)": "knnmt_bleu",
            "TRIME-MT (λ, temperature by valid BLEU)": "trime_mt_bleu"}
#: settings chosen by validation BLEU: (suffix of the system names, what was chosen), in search order
BLEU_TUNINGS = ((" (λ by valid BLEU)", "λ by validation BLEU"),
                (" (λ, temperature by valid BLEU)", "λ, then temperature by validation BLEU"))


def knn_generate_flags(p: dict, datastore: list) -> list:
    """``fairseq-generate`` flags of kNN-MT at the grid point ``p`` (``trime-tune-mt`` names)."""
    return ["--eval-combiner", "knn", "--knn-lambda", p["lambda"], "--knn-temperature", p["temperature"], *datastore]


def trime_generate_flags(p: dict, datastore: list) -> list:
    """``fairseq-generate`` flags of TRIME-MT at the grid point ``p`` (Appendix F where λ > 0)."""
    return ["--eval-combiner", "trime", "--eval-temperature", p["tau"], *datastore,
            *(["--memory-lambda", p["memory_lambda"], "--memory-temperature", p["memory_tau"]]
              if p.get("memory_lambda", 0) > 0 else [])]


def coordinate_search(start: dict, axes: Sequence[Tuple[str, Sequence[float]]],
                      score: Callable[[dict], float]) -> Tuple[List[dict], List[dict]]:
    """Coordinate ascent of ``score`` from ``start``: each ``(key, values)`` axis in turn, the
    best value (the first one on ties) kept for the next axis. Returns the point after each
    axis and every scored point (``score`` added), in order."""
    point, steps, scored = dict(start), [], []
    for key, values in axes:
        trial = [({**point, key: v}, score({**point, key: v})) for v in values]
        scored += [{**p, "score": s} for p, s in trial]
        point = max(trial, key=lambda t: t[1])[0]
        steps.append(point)
    return steps, scored


def bleu_axes(params: dict, lam_key: str, temp_key: str, lambdas: Sequence[float], factors: Sequence[float],
              tau_factors: Sequence[float] = ()) -> List[Tuple[str, List[float]]]:
    """The validation-BLEU coordinate search: λ, then (``factors``) the memory temperature
    ``temp_key`` at that λ, then (``tau_factors``, TRIME-MT) Eq. 6's τ; each temperature
    among its NLL-tuned value in ``params`` times the factors. The systems reported are the
    point after λ and the point after the last axis."""
    axes = [(lam_key, list(lambdas))]
    if factors:
        axes.append((temp_key, [params[temp_key] * f for f in factors]))
        if tau_factors:
            axes.append(("tau", [params["tau"] * f for f in tau_factors]))
    return axes


def float_list(text: str) -> List[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]``."""
    return [float(v) for v in text.split(",") if v.strip()]


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The TRIME-MT recipe (reference IWSLT'14 settings); also used by translation_ablation.py."""
    p.add_argument("--trime-temperature", type=float, default=10.0,
                   help="TRIME-MT: --train-temperature (memory logits q.k/sqrt(d) divided by it)")
    p.add_argument("--memory-top-k", type=int, default=8, help="TRIME-MT: memory logits kept per token (0: all)")
    p.add_argument("--trime-label-smoothing", type=float, default=0.0,
                   help="TRIME-MT: label smoothing of the token term (the base model uses 0.1)")
    p.add_argument("--model-alone-weight", type=float, default=0.0,
                   help="TRIME-MT: add this times the model-alone cross entropy to Eq. 5 (trime_loss "
                        "--model-alone-weight; 0: the paper's loss)")
    p.add_argument("--bm25-from-epoch", type=int, default=1,
                   help="TRIME-MT: BM25 batches from this epoch on; earlier epochs use the base model's "
                        "length-sorted batches of --max-tokens (2: ordinary batches during the CE warm-up)")
    p.add_argument("--bm25-grouping", choices=["whole", "length"], default="length",
                   help="TRIME-MT: BM25 groups kept whole in chain order (the reference), or re-split by "
                        "length (default; docs/results/translation_ablation.md compares them)")


def trime_flags(a: argparse.Namespace, max_update: int) -> list:
    """fairseq-train flags of TRIME-MT under the recipe arguments ``a``."""
    return ["--criterion", "trime_loss", "--ce-warmup-updates", max(1, int(a.ce_warmup_frac * max_update)),
            "--train-temperature", a.trime_temperature, "--memory-top-k", a.memory_top_k,
            "--label-smoothing", a.trime_label_smoothing, "--model-alone-weight", a.model_alone_weight,
            "--bm25-batching", "--bm25-grouping", a.bm25_grouping,
            *(["--bm25-from-epoch", a.bm25_from_epoch] if a.bm25_from_epoch > 1 else [])]


def batches_per_epoch(data: Path, arch: str, max_tokens: int, seed: int, extra: Sequence = ()) -> int:
    """Training batches of one epoch that ``fairseq-train --task trime_translation`` would
    make with ``max_tokens`` and the flags ``extra`` (BM25 batches are computed and cached)."""
    from fairseq import options, tasks, utils

    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", str(ex.REPO_PKG), "--task", "trime_translation", "--arch", arch,
        "--max-tokens", str(max_tokens), "--seed", str(seed), "--cpu", *map(str, extra)])
    task = tasks.setup_task(args)
    task.load_dataset(args.train_subset)
    itr = task.get_batch_iterator(task.dataset(args.train_subset), max_tokens=max_tokens,
                                  max_positions=utils.resolve_max_positions(task.max_positions(), (1024, 1024)),
                                  required_batch_size_multiple=args.required_batch_size_multiple, seed=seed)
    return len(itr.frozen_batches)


def matched_max_tokens(data: Path, a: argparse.Namespace, run: Path) -> int:
    """TRIME-MT's ``--max-tokens`` that gives it as many target tokens per update as the base
    model (as few batches per epoch; BM25 groups pad more than fairseq's length-sorted
    batches), by bisection in steps of 128 tokens; cached in ``run``."""
    cache = run / "matched_max_tokens.json"
    key = {"max_tokens": a.max_tokens, "bm25_grouping": a.bm25_grouping, "seed": a.seed}
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    if saved.get("key") == key:
        return int(saved["trime_max_tokens"])
    bm25 = ["--bm25-batching", "--bm25-grouping", a.bm25_grouping, "--bm25-cache-dir", run]
    target = batches_per_epoch(data, a.arch, a.max_tokens, a.seed)
    lo, hi = a.max_tokens, 4 * a.max_tokens  # batches(lo) > target >= batches(hi), in practice
    while hi - lo > 128:
        mid = (lo + hi) // 2 // 128 * 128
        if batches_per_epoch(data, a.arch, mid, a.seed, bm25) > target:
            lo = mid
        else:
            hi = mid
    found = batches_per_epoch(data, a.arch, hi, a.seed, bm25)
    logger.info("TRIME-MT --max-tokens %d: %d batches per epoch (base model: %d at --max-tokens %d)",
                hi, found, target, a.max_tokens)
    ex.atomic_write(cache, json.dumps({"key": key, "trime_max_tokens": hi, "batches": found, "base_batches": target}))
    return hi


def common_train_flags(a: argparse.Namespace, max_update: int, validate_every: int) -> list:
    """fairseq-train flags both MT models share; validation every ``validate_every`` updates
    reports greedy BLEU on the validation set (``valid_bleu``)."""
    return [
        "--task", "trime_translation", "--arch", a.arch, "--max-tokens", a.max_tokens, "--max-update", max_update,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", a.lr, "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", max(1, max_update // 10), "--warmup-init-lr", "1e-7", "--clip-norm", "1.0",
        "--seed", a.seed, "--log-interval", "50", "--validate-interval-updates", validate_every,
        "--validate-interval", 1000000, "--save-interval-updates", validate_every, "--keep-interval-updates", 1,
        "--cpu", "--num-workers", "0", "--share-all-embeddings",
        "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}',
        "--eval-bleu-remove-bpe", "sentencepiece", "--best-checkpoint-metric", "loss",
    ]


def train_tokens_per_update(log_path: Path) -> float:
    """Mean target tokens per update (fairseq's ``wpb``) of a fairseq-train JSON log: the
    last epoch summary, else the mean of the progress lines; NaN if none."""
    summaries, inner = [], []
    for line in log_path.read_text().splitlines():
        if "{" not in line:
            continue
        if "| train |" in line:
            summaries.append(float(json.loads(line[line.index("{"):]).get("train_wpb", "nan")))
        elif "| train_inner |" in line:
            inner.append(float(json.loads(line[line.index("{"):]).get("wpb", "nan")))
    if summaries:
        return summaries[-1]
    return sum(inner) / len(inner) if inner else float("nan")


def valid_curve(log_path: Path) -> list:
    """``[{"updates", "valid_bleu", "valid_nll", ...}]`` from a fairseq-train JSON log:
    every validation pass (BLEU greedy on the validation set; NLL in nats/token of the
    model alone: ``ce_loss`` for trime_loss, ``nll_loss`` for label-smoothed CE)."""
    import math

    points = []
    for line in log_path.read_text().splitlines():
        if "| valid |" not in line or "{" not in line:
            continue
        stats = json.loads(line[line.index("{"):])
        nll = stats.get("valid_ce_loss", stats.get("valid_nll_loss"))
        point = {"updates": int(stats["valid_num_updates"]), "valid_bleu": float(stats.get("valid_bleu", "nan")),
                 "valid_nll": float(nll) * math.log(2) if nll is not None else float("nan")}
        if "valid_ce_loss" in stats:  # trime_loss: also the TRIME loss with in-batch memory
            point["valid_trime_nll"] = float(stats.get("valid_nll_loss", stats["valid_loss"])) * math.log(2)
        points.append(point)
    return points


RECIPE_ARGS = ("trime_temperature", "memory_top_k", "trime_label_smoothing", "model_alone_weight", "bm25_grouping",
               "bm25_from_epoch")


def recipe_rows(run: Path, run_json: Path, current: dict) -> list:
    """One row per TRIME-MT recipe whose results are in ``run`` (``results*.json``), the
    current one (``current``, to be written to ``run_json``) first: its flags, the model
    alone's validation NLL and test BLEU alone / with memory per domain."""
    found = [current] + [json.loads(p.read_text()) for p in sorted(run.glob("results*.json")) if p != run_json]
    out = []
    for r in found:
        args, bleu = r.get("args", {}), {}
        for row in r.get("rows", []):
            if row["key"] in ("trime_mt", "trime_mt_nomem"):
                bleu[row["domain"] + ("_nomem" if row["key"] == "trime_mt_nomem" else "")] = row["bleu"]
        curve = (r.get("valid_curves") or {}).get("trime") or [{}]
        out.append({"trime_name": args.get("trime_name", "trime"), "valid_nll": curve[-1].get("valid_nll"),
                    "recipe": ", ".join(f"{k.replace('_', '-')} {args[k]}" for k in RECIPE_ARGS if k in args),
                    **bleu})
    return out


def memory_gain_rows(run: Path, domains: Sequence[str], recipes: Sequence[str]) -> list:
    """Validation NLL (nats/token, ``trime-tune-mt``) per domain of the model alone and with
    memory at the tuned setting: kNN-MT (base model) and each TRIME-MT recipe in ``run``,
    the latter with Eq. 6 alone (best λ = 0 point) and with Appendix F (best point)."""
    out = []
    for domain in domains:
        for name in ("knn", *recipes):
            path = run / f"tune_{name}_{domain}.json"
            if not path.exists():
                continue
            tune = json.loads(path.read_text())
            row = {"system": "knnmt" if name == "knn" else name, "domain": domain,
                   "model_alone": tune["rows"][0]["nll"], "with_memory": tune["best"]["nll"],
                   "params": tune["best"]["params"]}
            eq6 = [r["nll"] for r in tune["rows"][1:] if r["params"].get("memory_lambda", 0) == 0]
            if name != "knn" and eq6:
                row["with_memory_eq6"] = min(eq6)
            row["gain"] = row["model_alone"] - row["with_memory"]
            out.append(row)
    return out


def eq6_by_temperature(tune: dict) -> List[dict]:
    """Eq. 6 alone (Appendix F's λ = 0) against its temperature τ, from a TRIME-MT
    ``trime-tune-mt`` result: ``[{"tau", "valid_nll"}]``, τ ascending (the best point per τ)."""
    best: Dict[float, float] = {}
    for r in tune["rows"][1:]:
        p = r["params"]
        if "tau" in p and p.get("memory_lambda", 0) == 0:
            best[p["tau"]] = min(r["nll"], best.get(p["tau"], float("inf")))
    return [{"tau": t, "valid_nll": best[t]} for t in sorted(best)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/mt", help="where data, checkpoints and results go")
    p.add_argument("--corpus", default=None, help="a trime-prepare-mt output directory (default: build one)")
    p.add_argument("--sources", default=DEFAULT_SOURCES,
                   help="trime-prepare-mt --sources when the corpus is built here")
    p.add_argument("--results", default="docs/results/translation",
                   help="also write the results as RESULTS.json/.md/.png ('none': only in --run-dir)")
    p.add_argument("--arch", default="transformer_mt_trime_small", help="architecture of both models")
    p.add_argument("--max-update", type=int, default=1500, help="updates per model (the same for both)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (inverse_sqrt)")
    p.add_argument("--curve-points", type=int, default=6,
                   help="base model: validation BLEU (greedy) this many times during training")
    p.add_argument("--trime-max-tokens", type=int, default=0,
                   help="TRIME-MT's --max-tokens (0: the value that gives it the base model's target tokens per "
                        "update, found from the batches; BM25 groups pad more than length-sorted batches)")
    p.add_argument("--ce-warmup-frac", type=float, default=0.3, help="TRIME-MT: share of updates with plain CE first")
    add_recipe_args(p)
    p.add_argument("--knn-lambdas", default="0.1,0.2,0.3,0.5,0.7,0.8,0.9",
                   help="kNN-MT: λ values tuned on validation NLL (with --knn-temperatures)")
    p.add_argument("--knn-temperatures", default="1,3,10,30,100",
                   help="kNN-MT: temperature values T tuned on validation NLL (neighbour distances / T)")
    p.add_argument("--tau-factors", default="0.0625,0.125,0.25,0.5,1,2,4",
                   help="TRIME-MT: Eq. 6's tau values tuned on validation NLL, as multiples of --trime-temperature "
                        "(the datastore may want a much sharper temperature than in-batch training memory)")
    p.add_argument("--memory-lambdas", default="0,0.2,0.4,0.6,0.8",
                   help="TRIME-MT: Appendix F's lambda values (Eq. 8) tuned with tau (0: Eq. 6 alone)")
    p.add_argument("--memory-taus", default="1,3,10,30",
                   help="TRIME-MT: Appendix F's tau' values (Eq. 7: neighbours' raw similarity / tau')")
    p.add_argument("--trime-name", default="trime",
                   help="name of TRIME-MT's checkpoint, datastores, tuning and results files in --run-dir (another "
                        "name compares a second TRIME-MT recipe against the same base-model artefacts)")
    p.add_argument("--bleu-lambdas", default="",
                   help="also choose kNN-MT's λ and TRIME-MT's Appendix F λ by validation BLEU (beam search "
                        "on the validation set at each of these values, the other settings as tuned by NLL) and "
                        "report those systems too ('': NLL tuning only)")
    p.add_argument("--bleu-temperature-factors", default="",
                   help="with --bleu-lambdas: then choose each system's memory temperature (kNN-MT: T, TRIME-MT: "
                        "Appendix F's tau') by validation BLEU at its BLEU-chosen λ, among its NLL-tuned "
                        "temperature times each of these factors ('': λ only)")
    p.add_argument("--bleu-tau-factors", default="",
                   help="with --bleu-temperature-factors: TRIME-MT's temperature step then also chooses Eq. 6's "
                        "tau by validation BLEU (after tau'), among its NLL-tuned tau times each of these factors "
                        "(TRIME-MT has two memory temperatures, kNN-MT one; '': tau' only)")
    p.add_argument("--knn-k", type=int, default=16, help="neighbours retrieved per decoding step")
    p.add_argument("--beam", type=int, default=5, help="beam size")
    p.add_argument("--gen-batch-size", type=int, default=64, help="sentences per generation batch")
    p.add_argument("--seed", type=int, default=1, help="training seed")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    ex.setup_logging()
    run = Path(a.run_dir)
    logs = run / "logs"
    corpus = Path(a.corpus) if a.corpus else run / "corpus"
    if not (corpus / "corpus.json").exists():
        ex.run_logged("trime_fairseq.cli.prepare_mt", ["--out", corpus, "--sources", a.sources], logs / "prepare.log")
    data = corpus / "bin"
    manifest = json.loads((corpus / "corpus.json").read_text())
    domain_splits = (data / "indomain_test.de-en.de.idx").exists()

    every = max(1, a.max_update // max(1, a.curve_points))
    specs = {
        "base": [*common_train_flags(a, a.max_update, every), "--criterion", "label_smoothed_cross_entropy",
                 "--label-smoothing", "0.1"],
        "trime": [*common_train_flags(a, a.max_update, a.max_update), *trime_flags(a, a.max_update),
                  "--bm25-cache-dir", run],
    }
    trime_max_tokens = a.trime_max_tokens or matched_max_tokens(data, a, run)
    if a.bm25_from_epoch > 1:  # ordinary epochs at the base model's --max-tokens, BM25 ones matched
        specs["trime"] += ["--bm25-max-tokens", trime_max_tokens]
    else:
        specs["trime"] += ["--max-tokens", trime_max_tokens]  # the later flag wins
    files = {"base": "base", "trime": a.trime_name}  # names of each model's files in the run dir
    ckpt, trained, curves = {}, {}, {}
    for name, args in specs.items():
        trained[name] = ex.train(data, run / "ckpt" / files[name], args, logs / f"train_{files[name]}.log")
        ckpt[name] = run / "ckpt" / files[name] / "checkpoint_last.pt"
        curves[name] = valid_curve(logs / f"train_{files[name]}.log")

    run_flags = ["--task", "trime_translation", "--cpu", "--max-tokens", 8192, "--num-workers", "0"]
    domains = {"general": ("train", "valid", "test")}
    if domain_splits:
        domains["in-domain"] = ("indomain_train", "indomain_valid", "indomain_test")
    rows, tuned, index_info, test_nll, bleu_lambda, significance, edges = [], {}, {}, {}, [], [], []
    eq6_curves: Dict[str, dict] = {}
    for domain, (tr, va, te) in domains.items():
        stores = {"base": ("l2", run / "ds" / f"base_{tr}"), "trime": ("ip", run / "ds" / f"{a.trime_name}_{tr}")}
        for name, (metric, out) in stores.items():
            if not (out / "index.json").exists():
                ex.run_logged("trime_fairseq.cli.build_datastore",
                              [data, "--path", ckpt[name], "--gen-subset", tr, "--out", out, "--metric", metric,
                               "--recall-k", a.knn_k, "--recall-subset", va, "--overwrite", *run_flags],
                              logs / f"datastore_{files[name]}_{tr}.log")
            index_info[f"{name}/{tr}"] = json.loads((out / "index.json").read_text())
        ds = {n: ["--datastore", out, "--knn-k", a.knn_k] for n, (_, out) in stores.items()}
        valid = [*run_flags, "--gen-subset", va]
        knn = ex.run_tool("trime_fairseq.cli.tune_mt",
                          [data, "--path", ckpt["base"], "--combiner", "knn", "--grid", f"lambda={a.knn_lambdas}",
                           f"temperature={a.knn_temperatures}", "--out", run / f"tune_knn_{domain}.json",
                           *ds["base"], *valid],
                          run / f"tune_knn_{domain}.json", logs / f"tune_knn_{domain}.log")
        taus = ",".join(f"{a.trime_temperature * f:g}" for f in float_list(a.tau_factors))
        trime = ex.run_tool("trime_fairseq.cli.tune_mt",
                            [data, "--path", ckpt["trime"], "--combiner", "trime", "--grid", f"tau={taus}",
                             f"memory_lambda={a.memory_lambdas}", f"memory_tau={a.memory_taus}",
                             "--out", run / f"tune_{a.trime_name}_{domain}.json", *ds["trime"], *valid],
                            run / f"tune_{a.trime_name}_{domain}.json", logs / f"tune_{a.trime_name}_{domain}.log")
        metak = run / f"metak_{domain}.pt"
        if not metak.exists():
            ex.run_logged("trime_fairseq.cli.train_metak",
                          [data, "--path", ckpt["base"], "--out", metak, *ds["base"], *valid],
                          logs / f"metak_{domain}.log")
        tuned[domain] = {"knn": knn["best"], "trime": trime["best"]}
        eq6_curves[domain] = {"model_alone": trime["rows"][0]["nll"], "by_tau": eq6_by_temperature(trime)}
        for system, tune in (("kNN-MT", knn), ("TRIME-MT", trime)):
            for key, value in ex.check_grid_edges(tune, f"{domain}, {system}").items():
                edges.append({"domain": domain, "system": system, "param": key, "value": value})
        kp, tp = knn["best"]["params"], trime["best"]["params"]
        # the tuned points on the test set: NLL is reported, never used to choose
        test_nll[domain] = {
            name: ex.run_tool("trime_fairseq.cli.tune_mt",
                              [data, "--path", ckpt[model], "--combiner", comb, "--grid",
                               *(f"{k}={v:g}" for k, v in params.items()), "--out", run / f"testnll_{tag}_{domain}.json",
                               *ds[model], *run_flags, "--gen-subset", te],
                              run / f"testnll_{tag}_{domain}.json", logs / f"testnll_{tag}_{domain}.log")
            for name, model, comb, params, tag in (("knnmt", "base", "knn", kp, "knn"),
                                                    ("trime_mt", "trime", "trime", tp, a.trime_name))}
        systems = [
            ("base", "base", []),
            ("kNN-MT", "base", knn_generate_flags(kp, ds["base"])),
            ("adaptive kNN-MT", "base", ["--eval-combiner", "adaptive", "--metak-path", metak, *ds["base"]]),
            *([("TRIME-MT (no memory)", "trime", [])] if domain == "general" else []),
            ("TRIME-MT", "trime", trime_generate_flags(tp, ds["trime"])),
        ]

        decoded = {}  # (model, split, flags) -> result: one decode per setting, whatever the system's name

        def decode(system: str, model: str, flags: list, split: str) -> dict:
            """BLEU and speed of ``system`` on ``split`` (decodes cached beside their logs)."""
            key = (model, split, tuple(map(str, flags)))
            if key not in decoded:
                decoded[key] = decode_once(system, model, flags, split)
            return decoded[key]

        def decode_once(system: str, model: str, flags: list, split: str) -> dict:
            tag = "".join(c if c.isascii() and c.isalnum() else "_" for c in f"{domain}_{system}".lower())
            if model == "trime" and a.trime_name != "trime":
                tag += f"_{a.trime_name}"
            if split != te:
                tag += f"_{split}"
            gen = ex.cached_generate(data, ckpt[model], [*flags, "--gen-subset", split, "--beam", a.beam,
                                                         "--batch-size", a.gen_batch_size, "--max-len-a", 1.2,
                                                         "--max-len-b", 10, "--post-process", "sentencepiece",
                                                         "--cpu", "--num-workers", "0"], logs / f"generate_{tag}.log")
            refs = (corpus / "raw" / f"{split}.en").read_text().splitlines()
            return {**ex.bleu(gen["hyps"][: len(refs)], refs), "sentences_per_s": gen["sentences_per_s"],
                    "hyps": gen["hyps"][: len(refs)], "refs": refs}

        if a.bleu_lambdas:  # λ, then the memory temperature, by validation BLEU; the rest as tuned by NLL
            lambdas, factors = float_list(a.bleu_lambdas), float_list(a.bleu_temperature_factors)
            tau_factors = float_list(a.bleu_tau_factors)
            for system, model, lam_key, temp_key, make, params in (
                    ("kNN-MT", "base", "lambda", "temperature", knn_generate_flags, kp),
                    ("TRIME-MT", "trime", "memory_lambda", "memory_tau", trime_generate_flags, tp)):

                def valid_bleu(point: dict) -> float:
                    changed = [k for k in (lam_key, temp_key, "tau") if k == lam_key or point.get(k) != params.get(k)]
                    name = " ".join([system, *(f"{k} {point[k]:g}" for k in changed)])
                    return decode(name, model, make(point, ds[model]), va)["bleu"]

                axes = bleu_axes(params, lam_key, temp_key, lambdas, factors, tau_factors if model == "trime" else ())
                steps, scored = coordinate_search(params, axes, valid_bleu)
                bleu_lambda += [{"domain": domain, "system": system, "lambda": p[lam_key], "temperature": p[temp_key],
                                 "eq6_tau": p.get("tau"), "valid_bleu": p["score"]} for p in scored]
                reported = [steps[0], steps[-1]] if len(steps) > 1 else steps  # after λ; after the last axis
                for (suffix, _), point in zip(BLEU_TUNINGS, reported):
                    systems.append((f"{system}{suffix}", model, make(point, ds[model])))
        hyps = {}
        for system, model, flags in systems:
            score = decode(system, model, flags, te)
            hyps[system], test_refs = score["hyps"], score["refs"]
            rows.append({"key": ROW_KEYS[system], "domain": domain, "system": system, "bleu": score["bleu"],
                         "sentences_per_s": score["sentences_per_s"], "flags": " ".join(map(str, flags)),
                         "signature": score["signature"]})
            logger.info("%s / %s: BLEU %.2f (%.1f sentences/s)", domain, system, score["bleu"], score["sentences_per_s"])
        for suffix, tuning in (("", "validation NLL"), *BLEU_TUNINGS):
            if f"kNN-MT{suffix}" in hyps and f"TRIME-MT{suffix}" in hyps:
                significance.append({"domain": domain, "tuning": tuning,
                                     **ex.paired_bootstrap(hyps[f"kNN-MT{suffix}"], hyps[f"TRIME-MT{suffix}"],
                                                           test_refs)})

    wpb = {name: train_tokens_per_update(logs / f"train_{files[name]}.log") for name in specs}
    base_speed = {r["domain"]: r["sentences_per_s"] for r in rows if r["system"] == "base"}
    for r in rows:
        r["speed_vs_base"] = r["sentences_per_s"] / base_speed[r["domain"]]
    table = ex.markdown_table(rows, ["domain", "system", "bleu", "sentences_per_s", "speed_vs_base"],
                              ["test set", "system", "BLEU", "sentences/s", "÷ base"])
    sizes = ", ".join(f"{k} {v['pairs']:,} pairs" for k, v in manifest.get("splits", {}).items())
    header = (f"# Translation with memory (cf. TRIME Table 5)\n\nde→en (`trime-prepare-mt --sources {a.sources}`; "
              f"{sizes}). Models: `{a.arch}`, {a.max_update} updates each, of at most {a.max_tokens} tokens "
              f"(TRIME-MT: {trime_max_tokens}, so that both see the same target tokens per update: "
              f"{wpb['base']:,.0f} and {wpb['trime']:,.0f}); TRIME-MT: "
              f"train temperature {a.trime_temperature}, top-{a.memory_top_k} memory, label smoothing "
              f"{a.trime_label_smoothing}, model-alone CE weight {a.model_alone_weight}, BM25 groups {a.bm25_grouping}. Beam "
              f"{a.beam} (outputs of at most 1.2 x source + 10 tokens), batch {a.gen_batch_size}, K={a.knn_k}. sacrebleu: `{rows[0]['signature']}`.\n\n"
              "Memory parameters chosen by validation NLL (`trime-tune-mt`): "
              + "; ".join(f"{d}: kNN-MT {v['knn']['params']}, TRIME-MT {v['trime']['params']}" for d, v in tuned.items())
              + f". Grids: kNN-MT λ {a.knn_lambdas}, T {a.knn_temperatures}; TRIME-MT τ {taus} (the training "
              f"temperature times {a.tau_factors}), Appendix F's λ {a.memory_lambdas}, τ' {a.memory_taus}. "
              + ("Optima at the edge of their grid, still improving there (by > 0.001 nats): " + "; ".join(
                  f"{e['domain']} {e['system']} {e['param']}={e['value']:g}" for e in edges)
                 if edges else "No optimum is at the edge of its grid while still improving there (by > 0.001 "
                 "nats; λ = 0 or 1 excepted).")
              + "\n\n")
    curve = ex.markdown_table(curves["base"], ["updates", "valid_bleu", "valid_nll"],
                              ["updates", "valid BLEU (greedy)", "valid NLL (nats/token)"])
    header_curve = "\n\nBase model against updates (validation set):\n\n" + curve
    result = {"args": vars(a), "trime_max_tokens": trime_max_tokens, "target_tokens_per_update": wpb, "rows": rows,
              "tuned": tuned, "index": index_info, "train": trained, "valid_curves": curves,
              "test_nll": test_nll, "bleu_lambda": bleu_lambda, "significance": significance, "grid_edges": edges,
              "eq6_alone_by_tau": {"training_temperature": a.trime_temperature, **eq6_curves}}
    run_json = run / ("results.json" if a.trime_name == "trime" else f"results_{a.trime_name}.json")
    result["recipes"] = recipe_rows(run, run_json, result)
    recipes = ex.markdown_table(result["recipes"], ["trime_name", "recipe", "valid_nll", "general_nomem",
                                                    "general", "in-domain"],
                                ["--trime-name", "TRIME-MT recipe", "valid NLL, model alone", "general, model alone",
                                 "general", "in-domain"])
    header_recipes = ("\n\nTRIME-MT recipes trained in this run directory (test BLEU; the same base model, "
                      "datastore sizes and tuning; this page's is the first):\n\n" + recipes)
    result["valid_nll_memory_gain"] = memory_gain_rows(run, list(domains), [r["trime_name"] for r in result["recipes"]])
    shown = [{k: f"{v:.3f}" if isinstance(v, float) else v for k, v in r.items()} for r in result["valid_nll_memory_gain"]]
    gains = ex.markdown_table(shown,
                              ["domain", "system", "model_alone", "with_memory_eq6", "with_memory", "gain", "params"],
                              ["domain", "model (kNN-MT: base)", "model alone", "TRIME Eq. 6 alone", "with memory",
                               "gain", "tuned setting"])
    header_recipes += ("\n\nValidation NLL (nats/token, `trime-tune-mt`) alone and with memory at the setting "
                       "tuned on it:\n\n" + gains)
    eq6_taus = sorted({p["tau"] for c in eq6_curves.values() for p in c["by_tau"]})
    eq6_rows = [{"domain": d, **{f"{p['tau']:g}": f"{p['valid_nll']:.3f}" for p in c["by_tau"]},
                 "model_alone": f"{c['model_alone']:.3f}"} for d, c in eq6_curves.items()]
    header_recipes += (f"\n\nTRIME-MT's Eq. 6 alone (its joint softmax over the datastore's neighbours, no Appendix F) "
                       f"against its temperature τ, validation NLL (nats/token); trained with temperature "
                       f"{a.trime_temperature:g}:\n\n"
                       + ex.markdown_table(eq6_rows, ["domain", *(f"{t:g}" for t in eq6_taus), "model_alone"],
                                           ["domain", *(f"τ {t:g}" for t in eq6_taus), "model alone"]))
    nll_rows = [{"domain": d, "system": n, "model_alone": f"{v['rows'][0]['nll']:.3f}",
                 "with_memory": f"{v['rows'][1]['nll']:.3f}", "params": v["rows"][1]["params"]}
                for d, per in test_nll.items() for n, v in per.items()]
    header_recipes += ("\n\nTest NLL (nats/token, `trime-tune-mt --gen-subset TEST` at the validation-tuned "
                       "settings; reported, not used to choose):\n\n"
                       + ex.markdown_table(nll_rows, ["domain", "system", "model_alone", "with_memory", "params"],
                                           ["domain", "system", "model alone", "with memory", "setting"]))
    header_recipes += ("\n\nTRIME-MT against kNN-MT on the test sets, paired bootstrap resampling (sacrebleu, "
                       "1,000 resamples; p: the share of resamples whose centred difference is at least the "
                       "observed one, so a small p means the difference is unlikely to be chance):\n\n"
                       + ex.markdown_table(significance, ["domain", "tuning", "baseline_bleu", "system_bleu", "p_value",
                                                          "ci"],
                                           ["test set", "settings chosen by", "kNN-MT", "TRIME-MT", "p", "± 95% CI"]))
    if bleu_lambda:
        header_recipes += ("\n\nValidation BLEU (beam search) at each setting tried, in order: first each system's "
                           "interpolation weight λ (kNN-MT: λ; TRIME-MT: Appendix F's λ) at its NLL-tuned "
                           "temperature (kNN-MT: T; TRIME-MT: Appendix F's τ'), then, with "
                           "--bleu-temperature-factors, the temperature at the best λ (with --bleu-tau-factors, "
                           "TRIME-MT then also Eq. 6's τ); the other settings as tuned "
                           "by NLL. The best λ gives the '(λ by valid BLEU)' rows above, the best temperature at that λ "
                           "the '(λ, temperature by valid BLEU)' rows:\n\n"
                           + ex.markdown_table([{**r, "temperature": f"{r['temperature']:g}",
                                                 "eq6_tau": "" if r.get("eq6_tau") is None else f"{r['eq6_tau']:g}"}
                                                for r in bleu_lambda],
                                               ["domain", "system", "lambda", "temperature", "eq6_tau", "valid_bleu"],
                                               ["domain", "system", "λ", "temperature", "TRIME-MT Eq. 6 τ",
                                                "valid BLEU"]))
    for out in ex.publish(result, header + table + header_curve + header_recipes, run_json, a.results, logger):
        ex.bar_plot([dict(r, system=f"{r['system']} ({r['domain']})") for r in rows], out.with_suffix(".png"),
                    "Translation with memory", keys=("bleu",), ylabel="BLEU (higher is better)")
    return result


if __name__ == "__main__":
    main()
