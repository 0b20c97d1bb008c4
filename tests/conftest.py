"""Shared fixtures: a tiny corpus and a tiny TRIME model trained on it through fairseq-train."""
import pytest

from helpers import REPO, run_cli, write_tiny_corpus

USER_DIR = str(REPO / "trime_fairseq")


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """``(data_bin, checkpoint, train process)`` of a 12-update trime_loss run."""
    root = tmp_path_factory.mktemp("lm")
    data = write_tiny_corpus(root / "corpus")
    ckpt = root / "ckpt"
    proc = run_cli([
        "fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
        "--arch", "transformer_lm_trime_tiny", "--criterion", "trime_loss",
        "--ce-warmup-updates", "3", "--optimizer", "adam", "--lr", "3e-3",
        "--tokens-per-sample", "64", "--max-tokens", "512", "--max-update", "12",
        "--save-dir", str(ckpt), "--no-epoch-checkpoints", "--log-format", "json",
        "--log-interval", "1", "--cpu", "--seed", "1",
    ])
    return data, ckpt / "checkpoint_last.pt", proc
