"""Bad input: every mistake is a one-line error, never a silent wrong number.

One table of cases. Each case names the command, builds its arguments (and the broken file
it needs) from one tiny corpus, checkpoint and datastore built once for the module, and
states what the one-line message must contain. Every case asserts: the command fails, the
error is a :class:`TrimeUserError` whose message is one line, and no file is left
half-written (no ``*.tmp*`` / ``*.partial`` appears, nothing is added to the data).

Most cases call the command in this process (fairseq's ``cli_main`` or a ``trime-*``
``main``); the cases marked ``subprocess`` run the real command in a new process, all at
once, and also check what the user sees there: exit status non-zero, no ``Traceback``, and
the last stderr line is the only ``PROG: error: ...`` line (fairseq's INFO logging may come
before it). One of them raises the error in a spawned data-parallel worker.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch

from conftest import USER_DIR
from helpers import REPO
from trime_fairseq import launch
from trime_fairseq.errors import TrimeUserError, UserErrorExit, user_error_message

pytestmark = pytest.mark.slow

EV = ["--tokens-per-sample", "64", "--context-window", "32", "--cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def world(tiny_lm, tmp_path_factory):
    """The tiny corpus and checkpoint, a Flat inner-product datastore over ``train`` and
    broken copies of it (one per kind of damage)."""
    from trime_fairseq.cli import build_datastore as bd

    data, ckpt, _ = tiny_lm
    root = tmp_path_factory.mktemp("bad")
    ds = root / "ds_train"
    bd.main([str(data), "--path", str(ckpt), "--gen-subset", "train", "--out", str(ds), "--key-dtype", "float32",
             "--recall-k", "8", "--recall-queries", "50", "--max-tokens", "512", *EV])
    w = SimpleNamespace(data=data, ckpt=ckpt, root=root, ds=ds)
    w.stores = make_broken_stores(w)
    w.data_dict = copy_data(data, root / "data_dict", lambda d: swap_dict_counts(d / "dict.txt"))
    w.data_empty = copy_data(data, root / "data_empty", write_empty_split)
    w.mt_data = fake_mt_data(root / "mt", data / "dict.txt")
    return w


def copy_data(src: Path, dst: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    change(dst)
    return dst


def swap_dict_counts(path: Path) -> None:
    """Same symbols in the same order (the model still loads), another file (another sha256)."""
    lines = path.read_text().splitlines()
    lines[0] = lines[0].split()[0] + " 999999"
    path.write_text("\n".join(lines) + "\n")


def write_empty_split(data: Path) -> None:
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(str(data / "empty.bin"), impl="mmap", vocab_size=100)
    builder.finalize(str(data / "empty.idx"))


def fake_mt_data(root: Path, dictionary: Path) -> Path:
    """Enough of a translation data directory for the task to start: two dictionaries."""
    root.mkdir()
    for lang in ("de", "en"):
        shutil.copy(dictionary, root / f"dict.{lang}.txt")
    return root


def make_broken_stores(w) -> Dict[str, Path]:
    import faiss

    from trime_fairseq.memory.index import IndexConfig
    from trime_fairseq.memory.search_index import SearchIndex

    stores = {}

    def broken(name: str, damage: Callable[[Path], None]) -> None:
        path = w.root / f"ds_{name}"
        shutil.copytree(w.ds, path)
        damage(path)
        stores[name] = path

    def truncate(path: Path, keep: float) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    def set_meta(path: Path, **changes) -> None:
        meta = json.loads((path / "meta.json").read_text())
        meta.update(changes)
        (path / "meta.json").write_text(json.dumps(meta))

    def nan_key(path: Path) -> None:
        keys = np.load(path / "keys.npy", mmap_mode="r+")
        keys[5, 3] = np.nan
        keys.flush()

    def l2_index(path: Path) -> None:
        keys = np.load(path / "keys.npy")
        cfg = IndexConfig(**json.loads((path / "index.json").read_text()))
        cfg.metric = "l2"
        SearchIndex(SearchIndex.build(keys, "Flat", "l2").index, cfg).save(str(path))

    def small_index(path: Path) -> None:
        index = faiss.IndexFlatIP(int(np.load(path / "keys.npy", mmap_mode="r").shape[1]))
        index.add(np.load(path / "keys.npy")[:10])
        faiss.write_index(index, str(path / "index.faiss"))

    broken("index_truncated", lambda p: truncate(p / "index.faiss", 0.5))
    broken("keys_truncated", lambda p: truncate(p / "keys.npy", 0.5))
    broken("meta_bad_json", lambda p: (p / "meta.json").write_text("{not json"))
    broken("no_index", lambda p: (p / "index.faiss").unlink())
    broken("nan_key", nan_key)
    broken("foreign_model", lambda p: set_meta(p, model_sha256="0" * 64))
    broken("meta_size", lambda p: set_meta(p, size=json.loads((p / "meta.json").read_text())["size"] + 7))
    broken("l2", l2_index)
    broken("index_small", small_index)
    partial = w.root / "ds_partial"
    shutil.copytree(w.ds, w.root / "ds_partial.partial")
    stores["partial"] = partial
    return stores


# --- how a command is run ---------------------------------------------------------------

def fairseq_inproc(command: str, argv: List[str]) -> None:
    """``fairseq-<command>`` in this process (``fairseq_cli.<command>.cli_main``)."""
    module = importlib.import_module(f"fairseq_cli.{command}")
    saved = sys.argv
    sys.argv = [module.__file__, *argv]
    try:
        module.cli_main()
    finally:
        sys.argv = saved


def trime_inproc(tool: str, argv: List[str]) -> None:
    importlib.import_module(f"trime_fairseq.cli.{tool}").main(argv)


def eval_lm(w, *extra) -> List[str]:
    return [str(w.data), "--path", str(w.ckpt), "--user-dir", USER_DIR, "--task", "trime_lm",
            "--gen-subset", "valid", *EV, *extra]


def train(w, tmp: Path, *extra, arch: str = "transformer_lm_trime_tiny") -> List[str]:
    return [str(w.data), "--user-dir", USER_DIR, "--task", "trime_lm", "--arch", arch, "--optimizer", "adam",
            "--lr", "1e-3", "--tokens-per-sample", "16", "--max-update", "1", "--save-dir", str(tmp / "ckpt"),
            "--cpu", "--num-workers", "0", "--disable-validation", "--no-save", *extra]


def generate(w, *extra) -> List[str]:
    return [str(w.mt_data), "--user-dir", USER_DIR, "--task", "trime_translation", "--source-lang", "de",
            "--target-lang", "en", "--path", str(w.ckpt), "--cpu", *extra]


def tune(w, *extra) -> List[str]:
    return [str(w.data), "--path", str(w.ckpt), "--gen-subset", "valid", *EV, *extra]


def build_ds(w, out: Path, *extra) -> List[str]:
    return [str(w.data), "--path", str(w.ckpt), "--gen-subset", "valid", "--out", str(out), *EV, *extra]


@dataclass
class Case:
    id: str
    command: str  # fairseq-train / fairseq-eval-lm / fairseq-generate / trime-<tool>
    argv: Callable  # (world, tmp) -> argv
    expect: str  # in the message
    subprocess: bool = False
    also: tuple = ()  # more strings the message must hold


D = lambda name: (lambda w, t: str(w.stores[name]))  # noqa: E731
REBUILD = ("trime-build-datastore",)

CASES = [
    # -- the two silent wrong results ---------------------------------------------------------
    Case("tune_cache_lambda_1", "trime-tune", lambda w, t: tune(w, "--combiner", "cache", "--grid", "lambda=0.5,1.0",
         "theta=0.1"), "--grid lambda: values must be in [0, 1)", subprocess=True),
    Case("eval_own_split", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda", "0.2",
         "--datastore", str(w.ds)) + ["--gen-subset", "train"], "was built from this split",
         subprocess=True, also=("--exclude-self-from-datastore",)),
    Case("trime_ext_on_l2", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "trime", "--eval-memory",
         "local+ext", "--datastore", D("l2")(w, t)), "L2", also=("--metric ip",)),
    # -- the two crashes ------------------------------------------------------------------------
    Case("index_truncated", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda",
         "0.2", "--datastore", D("index_truncated")(w, t)), "index.faiss is damaged or truncated",
         subprocess=True, also=REBUILD + ("--index-only",)),
    Case("context_window_eq_block", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--context-window", "64"),
         "--context-window must be smaller than --tokens-per-sample", subprocess=True),
    # -- clear messages that used to come after a traceback ------------------------------------
    Case("cache_without_lambda_theta", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "cache"),
         "needs both --cache-lambda and --cache-theta"),
    Case("datastore_missing", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda",
         "0.2", "--datastore", str(t / "nope")), "no such directory"),
    Case("datastore_foreign_model", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn",
         "--knn-lambda", "0.2", "--datastore", D("foreign_model")(w, t)), "built by another model"),
    Case("cache_lambda_out_of_range", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "cache",
         "--cache-lambda", "1.5", "--cache-theta", "0.1"), "--cache-lambda must be in [0, 1)"),
    Case("knn_lambda_1", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda", "1",
         "--datastore", str(w.ds)), "--knn-lambda must be in [0, 1)"),
    Case("long_memory_without_size", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "trime",
         "--eval-memory", "local+long"), "--long-memory-size > 0"),
    Case("trime_loss_without_fc1", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--max-tokens", "64", arch="lstm_lm"), "no fc1"),
    Case("bm25_batch_of_one", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--bm25-batching", "--batch-size", "1", "--bm25-cache-dir", str(t)), "at least 2 segments"),
    Case("drop_local_prob_2", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--drop-local-prob", "2", "--max-tokens", "64"), "--drop-local-prob must be in [0, 1]", subprocess=True),
    Case("consecutive_not_multiple_in_worker", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--consecutive-segments", "3", "--batch-size", "4", "--distributed-world-size", "2"),
         "multiple of --consecutive-segments 3", subprocess=True),
    Case("bm25_from_epoch_0", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--bm25-batching", "--bm25-from-epoch", "0", "--batch-size", "4"), "--bm25-from-epoch must be >= 1"),
    Case("bm25_with_consecutive", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--bm25-batching", "--consecutive-segments", "2", "--batch-size", "4"), "drop --consecutive-segments"),
    Case("stream_without_batch_size", "fairseq-train", lambda w, t: train(w, t, "--criterion", "cross_entropy",
         "--stream-batching", "--max-tokens", "8", "--memorizing-memory-size", "16",
         arch="memorizing_transformer_lm_tiny"), "--stream-batching needs --batch-size"),
    Case("consecutive_larger_than_batch", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--consecutive-segments", "8", "--batch-size", "4"), "larger than the batch"),
    Case("ce_warmup_negative", "fairseq-train", lambda w, t: train(w, t, "--criterion", "trime_loss",
         "--ce-warmup-updates", "-1", "--max-tokens", "64"), "--ce-warmup-updates must be >= 0"),
    # -- datastore files checked on open --------------------------------------------------------
    Case("keys_truncated", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda",
         "0.2", "--datastore", D("keys_truncated")(w, t)), "keys.npy is damaged or truncated", also=REBUILD),
    Case("meta_not_json", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda", "0.2",
         "--datastore", D("meta_bad_json")(w, t)), "meta.json is not readable JSON", also=REBUILD),
    Case("meta_size_mismatch", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda",
         "0.2", "--datastore", D("meta_size")(w, t)), "meta.json says", also=REBUILD),
    Case("index_missing", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda", "0.2",
         "--datastore", D("no_index")(w, t)), "index.faiss is missing", also=REBUILD),
    Case("index_of_other_keys", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda",
         "0.2", "--datastore", D("index_small")(w, t)), "does not match the datastore", also=REBUILD),
    Case("nan_in_keys", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda", "0.2",
         "--datastore", D("nan_key")(w, t)), "key 5", also=("not finite",) + REBUILD),
    Case("nan_in_keys_index_build", "trime-build_datastore", lambda w, t: build_ds(w, w.stores["nan_key"],
         "--index-only"), "key 5", also=("not finite",)),
    Case("datastore_unfinished", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda",
         "0.2", "--datastore", D("partial")(w, t)), "unfinished build", also=("resume",)),
    Case("dictionary_differs", "fairseq-eval-lm", lambda w, t: [str(w.data_dict)] + eval_lm(w, "--eval-combiner",
         "knn", "--knn-lambda", "0.2", "--datastore", str(w.ds))[1:], "another dictionary"),
    # -- data, checkpoints, other flags -----------------------------------------------------------
    Case("empty_split", "fairseq-eval-lm", lambda w, t: [str(w.data_empty)] + eval_lm(w)[1:] + ["--gen-subset",
         "empty"], "no token to score"),
    Case("lm_checkpoint_in_generate", "fairseq-generate", lambda w, t: generate(w), "not a translation model",
         subprocess=True),
    Case("mt_knn_without_lambda", "fairseq-generate", lambda w, t: generate(w, "--mt-combiner", "knn",
         "--datastore", str(w.ds)), "--mt-combiner knn needs --knn-lambda"),
    Case("metak_file_missing", "fairseq-generate", lambda w, t: generate(w, "--mt-combiner", "adaptive",
         "--datastore", str(w.ds), "--metak-path", str(t / "nope.pt")), "--metak-path"),
    Case("knn_k_zero", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn", "--knn-lambda", "0.2",
         "--datastore", str(w.ds), "--knn-k", "0"), "--knn-k must be >= 1"),
    Case("skip_threshold_without_feature", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn",
         "--knn-lambda", "0.2", "--datastore", str(w.ds), "--retrieval-skip-threshold", "0.5"),
         "--retrieval-skip-threshold 0.5 needs --retrieval-skip-feature"),
    Case("skip_threshold_negative", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "knn",
         "--knn-lambda", "0.2", "--datastore", str(w.ds), "--retrieval-skip-feature", "entropy",
         "--retrieval-skip-threshold", "-1"), "--retrieval-skip-threshold must be a number >= 0"),
    Case("tune_skip_without_feature", "trime-tune", lambda w, t: tune(w, "--combiner", "knn", "--grid",
         "lambda=0.2", "temperature=1", "skip_threshold=1", "--datastore", str(w.ds)),
         "--grid skip_threshold=... needs --retrieval-skip-feature"),
    Case("memory_lambda_without_tau", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "trime",
         "--memory-lambda", "0.3", "--memory-distribution", "all-scaled"), "--memory-temperature"),
    Case("published_pprime_without_ext", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "trime",
         "--memory-lambda", "0.3", "--memory-temperature", "10"), "ext-raw needs --eval-memory"),
    Case("eval_temperature_zero", "fairseq-eval-lm", lambda w, t: eval_lm(w, "--eval-combiner", "trime",
         "--eval-temperature", "0"), "--eval-temperature must be > 0"),
    Case("tune_k_without_external", "trime-tune", lambda w, t: tune(w, "--combiner", "trime", "--grid", "tau=1",
         "k=4"), "needs external memory"),
    Case("tune_grid_no_values", "trime-tune", lambda w, t: tune(w, "--combiner", "trime", "--grid", "tau="),
         "--grid tau: no values"),
    Case("tune_memory_lambda_1", "trime-tune", lambda w, t: tune(w, "--combiner", "trime", "--grid", "tau=1",
         "memory_lambda=1", "memory_tau=1"), "--grid memory_lambda: values must be in [0, 1)"),
    Case("tune_mt_lambda_1", "trime-tune_mt", lambda w, t: ["--combiner", "knn", "--grid", "lambda=1",
         "temperature=10"], "--grid lambda: values must be in [0, 1)"),
    Case("build_out_exists", "trime-build_datastore", lambda w, t: build_ds(w, w.ds), "already exists",
         also=("--overwrite",)),
    Case("shard_id_without_shards", "trime-build_datastore", lambda w, t: build_ds(w, t / "x", "--shard-id", "1"),
         "--shard-id needs --num-shards"),
    Case("prepare_lm_no_input", "trime-prepare_lm", lambda w, t: ["--source", "folder", "--out", str(t / "c")],
         "--input"),
]


def snapshot(w) -> set:
    return set(w.root.rglob("*")) | set(w.data.rglob("*"))


def check_nothing_half_written(w, tmp: Path, before: set) -> None:
    """No new temporary or unfinished file anywhere; nothing new in the data directory."""
    for root in (w.root, tmp):
        new = [p for p in root.rglob("*") if (".tmp" in p.name or ".partial" in p.name) and p not in before]
        assert not new, f"left behind: {new}"
    added = set(w.data.rglob("*")) - before
    assert not added, f"written into the data directory: {added}"


def run_inprocess(case: Case, argv: List[str]) -> str:
    """The case's command in this process; returns the user error's one-line message."""
    if case.command.startswith("fairseq-"):
        with pytest.raises(TrimeUserError) as err:
            fairseq_inproc(case.command.split("-", 1)[1].replace("-", "_"), argv)
        message = user_error_message(err.value)
    else:
        with pytest.raises(UserErrorExit) as err:
            trime_inproc(case.command.split("-", 1)[1], argv)
        assert err.value.code == 2
        message = str(err.value).split(": error: ", 1)[1]
    return message


@pytest.fixture(scope="module")
def subprocess_results(world, tmp_path_factory):
    """All subprocess cases, started at once as commands (:mod:`trime_fairseq.launch`: forks of
    a server that imported fairseq once; ``tests/test_launch.py`` checks that a fork reports as
    a new interpreter does)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = {}
    for case in CASES:
        if not case.subprocess:
            continue
        tmp = tmp_path_factory.mktemp(case.id)
        module = {"fairseq-train": "fairseq_cli.train", "fairseq-eval-lm": "fairseq_cli.eval_lm",
                  "fairseq-generate": "fairseq_cli.generate"}.get(case.command)
        module = module or "trime_fairseq.cli." + case.command.split("-", 1)[1].replace("-", "_")
        procs[case.id] = (launch.start(module, case.argv(world, tmp), tmp / "stdout", tmp / "stderr", REPO, env), tmp)
    codes = {k: p.wait(600) for k, (p, _) in procs.items()}
    return {k: (((tmp / "stdout").read_text(), (tmp / "stderr").read_text()), codes[k], tmp)
            for k, (_, tmp) in procs.items()}


def prog_of(command: str) -> str:
    return command.replace("_", "-")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_error(case, world, tmp_path, request):
    before = snapshot(world)
    if case.subprocess:
        (out, err), code, tmp = request.getfixturevalue("subprocess_results")[case.id]
        assert code != 0, err[-2000:]
        assert "Traceback" not in out + err, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        prog = prog_of(case.command)
        assert lines and lines[-1].startswith(f"{prog}: error: "), err[-3000:]
        assert sum(": error: " in line for line in lines) == 1, err[-3000:]
        message = lines[-1].split(": error: ", 1)[1]
        check_nothing_half_written(world, tmp, before)
    else:
        message = run_inprocess(case, case.argv(world, tmp_path))
        check_nothing_half_written(world, tmp_path, before)
    assert "\n" not in message
    for part in (case.expect, *case.also):
        assert part in message, message


def test_cases_cover_the_issue():
    assert len(CASES) >= 25
    assert {c.command for c in CASES if c.subprocess} >= {"fairseq-train", "fairseq-eval-lm", "fairseq-generate",
                                                           "trime-tune"}


def test_real_bugs_keep_their_traceback(capsys):
    """The hook reports user errors only; anything else goes to the previous hook."""
    try:
        raise KeyError("a bug")
    except KeyError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'a bug'" in err
    try:
        raise TrimeUserError("--flag x: wrong;\n do this")
    except TrimeUserError as e:
        sys.excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("error: --flag x: wrong; do this\n") and "Traceback" not in err


# --- faults: killed commands, concurrent writers -----------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_killed_prepare_lm_and_mt_restart_cleanly(tmp_path):
    """What a SIGKILL leaves (the work directory of the dead process) is removed by the
    next run, which builds the corpus; a live run's work directory is left alone."""
    from test_corpus import write_folder
    from test_mt_corpus import write_catalogs
    from trime_fairseq.cli import prepare_lm, prepare_mt

    out = tmp_path / "lm"
    stale = tmp_path / f".lm.tmp-{dead_pid()}-abc123"
    (stale / "bin").mkdir(parents=True)
    (stale / "train.txt").write_text("half a fi")
    live = tmp_path / f".lm.tmp-{os.getpid()}-live00"
    live.mkdir()
    prepare_lm.main(["--source", "folder", "--input", str(write_folder(tmp_path / "in")), "--out", str(out),
                     "--tokenizer", "none", "--no-binarize"])
    assert (out / "corpus.json").exists() and not stale.exists() and live.exists()
    live.rmdir()

    out = tmp_path / "mt"
    stale = tmp_path / f".mt.tmp-{dead_pid()}-abc123"
    stale.mkdir()
    (stale / "train.de").write_text("halb")
    prepare_mt.main(["--folder", str(write_catalogs(tmp_path / "catalogs")), "--out", str(out), "--tokenizer",
                     "none", "--no-binarize", "--valid-size", "2", "--test-size", "2"])
    assert (out / "corpus.json").exists() and not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_killed_tune_leaves_no_output_and_reruns(world, tmp_path, monkeypatch):
    from trime_fairseq.cli import tune as tune_cli

    out = tmp_path / "grid.json"
    argv = [*tune(world, "--combiner", "trime", "--grid", "tau=1"), "--user-dir", USER_DIR, "--out", str(out)]
    original = json.dump

    def dying_dump(obj, f, **kw):
        f.write('{"subset": "val')  # killed while writing
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tune_cli.json, "dump", dying_dump)
    with pytest.raises(KeyboardInterrupt):
        tune_cli.main(argv)
    assert not out.exists()  # only the temporary file was being written
    monkeypatch.setattr(tune_cli.json, "dump", original)
    tune_cli.main(argv)
    assert json.loads(out.read_text())["best"]["params"] == {"tau": 1.0, "memory_size": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["grid.json"]


def test_killed_datastore_build_is_refused_then_resumes(world, tmp_path, monkeypatch):
    from trime_fairseq.cli import build_datastore as bd
    from trime_fairseq.memory.datastore import Datastore, DatastoreWriter

    out = tmp_path / "ds"
    argv = build_ds(world, out, "--key-dtype", "float32", "--max-tokens", "128", "--no-index")
    original, calls = DatastoreWriter.write, {"n": 0}

    def dying_write(self, keys, values):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, keys, values)

    monkeypatch.setattr(DatastoreWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        bd.main(argv)
    with pytest.raises(TrimeUserError, match="unfinished build .* resume"):
        Datastore(str(out))
    monkeypatch.setattr(DatastoreWriter, "write", original)
    bd.main(argv)
    assert len(Datastore(str(out))) > 0 and not (tmp_path / "ds.partial").exists()


def _bm25_worker(args):
    from trime_fairseq.tasks.memory_flags import cached_bm25_batches

    cfg, segments, root, barrier = args
    barrier.wait()
    return [b.tolist() for b in cached_bm25_batches(cfg, segments, 4, 1, root, "race")]


def test_two_processes_writing_the_same_bm25_cache(tmp_path):
    """Both get the same batches; the cache is complete and is read back; a damaged cache
    or one computed for other segments is recomputed."""
    from trime_fairseq.tasks.memory_flags import cached_bm25_batches

    rng = np.random.default_rng(0)
    segments = [rng.integers(4, 60, size=rng.integers(5, 20)) for _ in range(64)]
    cfg = SimpleNamespace(bm25_cache_dir=None, bm25_neighbours=8, bm25_query_terms=8)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        a, b = pool.map(_bm25_worker, [(cfg, segments, str(tmp_path), barrier)] * 2)
    assert a == b
    cached = list(tmp_path.glob("bm25_race_*.npz"))
    assert len(cached) == 1 and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    again = [x.tolist() for x in cached_bm25_batches(cfg, segments, 4, 1, str(tmp_path), "race")]
    assert again == a
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # a damaged cache
    assert [x.tolist() for x in cached_bm25_batches(cfg, segments, 4, 1, str(tmp_path), "race")] == a
    other = [s[::-1].copy() for s in segments]  # same count, other tokens: not the cached batches
    fresh = [x.tolist() for x in cached_bm25_batches(cfg, other, 4, 1, str(tmp_path), "race")]
    assert sorted(sum(fresh, [])) == list(range(64))
    assert [x.tolist() for x in cached_bm25_batches(cfg, other, 4, 1, str(tmp_path), "race")] == fresh


# --- the two silent wrong results, now right ----------------------------------------------------

def test_grid_point_counts_tokens_as_fairseq_eval_lm(world, monkeypatch):
    """A combiner that gives some tokens probability 0 (a continuous cache at lambda = 1,
    built past the flag check): trime-tune's score_grid leaves those tokens out of the sum
    *and* the count, exactly as fairseq-eval-lm's scoring loop does."""
    from fairseq import utils
    from fairseq_cli.eval_lm import eval_lm as fairseq_eval_lm

    from trime_fairseq.cli.tune import load, score_grid
    from trime_fairseq.memory.combiners import CacheCombiner, NoMemory
    from trime_fairseq.models.memory_eval import MemoryEvalModel

    # fairseq's "skipping tokens with inf scores" log call has a format bug (a logging error)
    monkeypatch.setattr(logging.getLogger("fairseq_cli.eval_lm"), "disabled", True)
    cfg, model, task = load(eval_lm(world))
    model.eval()
    all_cache = CacheCombiner(0.5, 0.2)
    all_cache.lam = 1.0
    combiners = [NoMemory(), all_cache, CacheCombiner(0.3, 0.2)]
    sums, counts = score_grid((model, task), cfg, combiners)
    assert counts[1][0] < counts[0][0] == counts[2][0]  # some tokens are not in the cache
    for comb, (s,), (n,) in zip(combiners, sums, counts):
        itr = task.eval_lm_dataloader(dataset=task.dataset("valid"), max_tokens=36000, num_workers=0,
                                      max_positions=utils.resolve_max_positions(model.max_positions()),
                                      context_window=cfg.eval_lm.context_window)
        got = fairseq_eval_lm([MemoryEvalModel(model, comb, task.dictionary.pad()).eval()], task.source_dictionary,
                              itr, target_dictionary=task.target_dictionary)
        assert math.exp(-s / n) == pytest.approx(float(got["perplexity"]), rel=1e-5)


def test_exclude_self_from_datastore_equals_brute_force(world):
    """On the datastore's own split, --exclude-self-from-datastore gives each query the K
    nearest entries of all *other* positions (exact search over the stored keys); without
    it almost every query's nearest entry is itself."""
    from trime_fairseq.cli.tune import iter_scored_rows, load
    from trime_fairseq.memory.datastore import Datastore

    k = 8
    cfg, model, task = load(eval_lm(world, "--eval-combiner", "knn", "--knn-lambda", "0.2", "--datastore",
                                    str(world.ds), "--exclude-self-from-datastore", "--knn-k", str(k)) +
                            ["--gen-subset", "train"])
    model.eval()
    ds = Datastore(str(world.ds))
    keys = torch.from_numpy(np.asarray(ds.keys, dtype=np.float32))
    values = torch.from_numpy(np.asarray(ds.values, dtype=np.int64))
    position, self_first, ties = 0, 0, 0
    for row in iter_scored_rows(model, task, cfg, external=True, k=k, representations=("g",)):
        scored = row.target[0].ne(task.dictionary.pad())  # the last block of a batch is padded
        q = row.query_g[0][scored]
        sims = q @ keys.T  # [T, N]
        pos = torch.arange(position, position + q.size(0))
        self_first += int((sims.argmax(-1) == pos).sum())
        sims[torch.arange(q.size(0)), pos] = -float("inf")
        top, ids = sims.topk(k, dim=-1)
        torch.testing.assert_close(row.ext_scores[0][scored], top, rtol=1e-4, atol=1e-4)
        # entries of equal score (identical keys) may come in either order: their labels are not compared
        close = (top[:, 1:] - top[:, :-1]).abs() <= 1e-4 * top[:, :-1].abs().clamp_min(1.0)
        tied = torch.zeros_like(top, dtype=torch.bool)
        tied[:, 1:] |= close
        tied[:, :-1] |= close
        assert torch.equal(row.ext_labels[0][scored][~tied], values[ids][~tied])
        ties += int(tied.sum())
        position += q.size(0)
    assert position == len(ds)  # every entry was a query once
    assert ties < 0.1 * k * len(ds)  # the labels of almost every retrieved entry were compared
    assert self_first > 0.5 * len(ds)  # the leak the flag removes
