"""Preparation: corpora (real, or synthetic at smoke size), checkpoints and datastores, reused when present."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from benchmarks.suite.sizes import ONE_SAVE
from examples import harness as ex
from trime_fairseq.data.synthetic import write_lm_text, write_parallel_text

if TYPE_CHECKING:
    from benchmarks.suite.runner import Suite


def lm_corpus(suite: Suite, smoke: bool, log: Path) -> dict:
    """The default real corpus (``prepare_lm``), or a synthetic one for smoke runs."""
    root = suite.work / "lm_corpus"
    if not (root / "bin" / "dict.txt").exists():
        if smoke:
            write_lm_text(root, {"train": 150, "valid": 40, "test": 16})
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
            write_parallel_text(root, {"train": 200, "valid": 24, "test": 24})
            ex.run_logged("fairseq_cli.preprocess", [
                "--source-lang", "de", "--target-lang", "en", "--joined-dictionary", "--trainpref", root / "train",
                "--validpref", root / "valid", "--testpref", root / "test", "--destdir", root / "bin",
                "--workers", "1"], log, show=False)
        else:
            ex.run_logged("trime_fairseq.cli.prepare_mt", ["--out", root], log)
    return {"data": str(root / "bin")}


def lm_name(suite: Suite) -> str:
    """The LM checkpoint's (and its datastore's) folder name: a new size retrains, never reuses."""
    return f"lm_{suite.size.lm_updates}u"


def lm_checkpoint(suite: Suite, data: Path, log: Path) -> dict:
    """A ``cross_entropy`` run. Speed alone needs only the real shapes, but the external-memory
    figures keep the perplexity of the full search within a budget, and the neighbours of an
    untrained model are all at about the same distance (the mass is not in the top few)."""
    s = suite.size
    save = suite.work / "ckpt" / lm_name(suite)
    flags = ex.train_flags(s.lm_arch, s.tokens_per_sample, s.lm_updates, 2e-3, 1, max(1, s.lm_updates // 4))
    out = ex.train(data, save, [*flags, "--criterion", "cross_entropy", "--max-tokens", s.max_tokens,
                                "--disable-validation", *ONE_SAVE], log)
    return {"path": str(save / "checkpoint_last.pt"), "arch": s.lm_arch, **out}


def mt_checkpoint(suite: Suite, data: Path, log: Path) -> dict:
    """The kNN-MT base: label-smoothed CE, as long as the size says (``full``: a trained model)."""
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


