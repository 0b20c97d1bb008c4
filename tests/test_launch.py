"""trime_fairseq.launch: a command forked from the pre-imported server behaves as ``python -m``."""
import os
import subprocess
import sys
import textwrap

import pytest

from trime_fairseq import launch

pytestmark = pytest.mark.slow  # every test starts processes

MODULE = textwrap.dedent('''
    import logging, os, sys
    import torch
    import fairseq  # as every command: fairseq's import sets up the root logger (stderr)
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "name", __name__, "file", os.path.basename(sys.argv[0]))
    print("threads", torch.get_num_threads(), "var", os.environ.get("PROBE_VAR"))
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    logging.getLogger("probe").info("logged")
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "raise":
        raise KeyError("a bug")
    if sys.argv[1] == "exit":
        sys.exit(3)
    if sys.argv[1] == "message":
        sys.exit("bad flag")
''')


@pytest.fixture()
def probe(tmp_path):
    (tmp_path / "probe_cmd.py").write_text(MODULE)
    return tmp_path


def both(module, args, cwd, env):
    """The command through the launcher and as a new interpreter."""
    forked = launch.run(module, args, cwd=cwd, env=env)
    fresh = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    return forked, fresh


@pytest.mark.parametrize("how", ["ok", "raise", "exit", "message"])
def test_a_fork_reports_as_a_new_interpreter(probe, how):
    env = dict(os.environ, PROBE_VAR="x", OMP_NUM_THREADS="1")  # a variable read when the command runs
    assert launch.differing(env) == [] and launch._forkable(env)
    forked, fresh = both("probe_cmd", [how], probe, env)
    assert forked.returncode == fresh.returncode == {"ok": 0, "raise": 1, "exit": 3, "message": 1}[how]
    assert forked.stdout == fresh.stdout
    assert f"cwd {probe} name __main__ file probe_cmd.py" in forked.stdout and "threads 1 var x" in forked.stdout
    lines = forked.stderr.splitlines()
    assert "to stderr" in lines and "INFO:probe:logged" in lines  # through the handler importing fairseq set up
    assert "INFO:probe:logged" in fresh.stderr.splitlines()
    assert lines[-1] == fresh.stderr.splitlines()[-1]
    if how == "raise":
        assert "Traceback" in forked.stderr and lines[-1] == "KeyError: 'a bug'"


def test_thread_count_and_a_variable_read_at_import(probe, monkeypatch):
    """OMP_NUM_THREADS is applied in the fork; another variable that differs from the
    server's (one the libraries may read at import) gets a new interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    assert launch.differing(env) == []
    out = launch.run("probe_cmd", ["ok"], cwd=probe, env=env).stdout
    assert "threads 2" in out
    env["TRIME_FUTURE_SWITCH"] = "1"
    assert launch.differing(env) == ["TRIME_FUTURE_SWITCH"] and not launch._forkable(env)
    assert "threads 2" in launch.run("probe_cmd", ["ok"], cwd=probe, env=env).stdout
    monkeypatch.setenv(launch.ENV_SWITCH, "0")
    assert not launch._forkable(dict(os.environ))


def test_a_plugin_user_error_is_one_line_from_a_fork_and_from_a_new_interpreter(tiny_lm):
    from helpers import REPO

    data, ckpt, _ = tiny_lm
    args = [str(data), "--path", str(ckpt), "--user-dir", str(REPO / "trime_fairseq"), "--task", "trime_lm",
            "--cpu", "--eval-combiner", "cache"]
    forked, fresh = both("fairseq_cli.eval_lm", args, REPO, dict(os.environ))
    assert forked.returncode == fresh.returncode == 1
    for proc in (forked, fresh):
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = forked.stderr.strip().splitlines()[-1]
    assert last == fresh.stderr.strip().splitlines()[-1] and last.startswith("fairseq-eval-lm: error: ")
    assert "needs both --cache-lambda and --cache-theta" in last


@pytest.mark.parametrize("fork", [True, False])
def test_cpu_seconds_of_the_command(probe, fork):
    """The CPU a command spent (a fork's own count, or wait4() of a new interpreter)."""
    (probe / "busy_cmd.py").write_text("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n")
    env = dict(os.environ) if fork else dict(os.environ, TRIME_FUTURE_SWITCH="1")
    cmd = launch.start("busy_cmd", [], probe / "out", cwd=probe, env=env)
    assert cmd.wait() == 0 and cmd.poll() == 0
    assert 0.5 <= cmd.cpu_s < (1.5 if fork else 15)


def test_logging_configured_before_or_by_importing_fairseq(probe):
    """A command that configures logging before importing fairseq (fairseq-train) keeps its
    configuration; one that imports fairseq first (fairseq-eval-lm, the probe above) gets
    fairseq's. (What fairseq logs while it is imported is not repeated in a fork.)"""
    (probe / "first_cmd.py").write_text(
        "import logging, sys\nlogging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(levelname)s %(message)s')\n"
        "import fairseq\nlogging.getLogger('probe').info('logged')\n")
    forked, fresh = both("first_cmd", [], probe, dict(os.environ))
    assert forked.stdout == "INFO logged\n"
    assert fresh.stdout.splitlines()[-1] == "INFO logged"  # (after what fairseq logs at import)
