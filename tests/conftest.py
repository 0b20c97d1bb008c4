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


@pytest.fixture(scope="session")
def tiny_mt(tmp_path_factory):
    """``(data_bin, checkpoint, {metric: datastore})``: a TRIME-MT model trained for 8 updates
    on a tiny de->en corpus, with L2 and inner-product datastores over its training targets."""
    from helpers import write_tiny_parallel

    root = tmp_path_factory.mktemp("mt")
    data = write_tiny_parallel(root / "corpus")
    ckpt = root / "ckpt"
    run_cli([
        "fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
        "--arch", "transformer_mt_trime_tiny", "--criterion", "trime_loss", "--ce-warmup-updates", "2",
        "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "400", "--max-update", "8",
        "--save-dir", str(ckpt), "--no-epoch-checkpoints", "--log-format", "json", "--cpu", "--seed", "1",
    ])
    stores = {}
    for metric in ("l2", "ip"):
        stores[metric] = root / f"ds_{metric}"
        run_cli([
            "trime_fairseq.cli.build_datastore", str(data), "--user-dir", USER_DIR, "--task", "trime_translation",
            "--path", str(ckpt / "checkpoint_last.pt"), "--gen-subset", "train", "--out", str(stores[metric]),
            "--metric", metric, "--recall-k", "8", "--recall-queries", "50", "--cpu",
        ])
    return data, ckpt / "checkpoint_last.pt", stores


# Tests that train a tiny model or run a command end to end are marked ``slow`` (the fast
# subset is ``-m "not slow"``): explicitly with ``@pytest.mark.slow``, or here when they
# need a trained fixture or start processes in their own body.
_SLOW_FIXTURES = {"tiny_lm", "tiny_mt"}
_SLOW_CALLS = ("run_cli(", "subprocess.run(", "subprocess.Popen(", ".spawn(", "ex.main(", "_main(")


# The longest tests (examples end to end, minutes each) start first, so that with several
# workers (scripts/test.sh runs pytest-xdist) none of them is left to run alone at the end.
LONGEST_FIRST = ("test_examples.py",)


def pytest_collection_modifyitems(config, items):
    import inspect

    items.sort(key=lambda item: 0 if item.nodeid.split("::")[0].endswith(LONGEST_FIRST) else 1)
    for item in items:
        if item.get_closest_marker("slow"):
            continue
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            continue
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError, AttributeError):
            continue
        if any(call in source for call in _SLOW_CALLS):
            item.add_marker(pytest.mark.slow)
