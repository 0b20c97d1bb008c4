"""Start commands (``python -m MODULE ARGS``) without paying for their imports each time.

Every fairseq command starts by importing torch, fairseq (all its tasks, models and
criterions) and the plugin: about 5 seconds on one core, more than a tiny training run or a
validation-subset evaluation takes. The examples, the benchmark suite and the tests run
hundreds of such commands, so :func:`start` hands them to a fork server (``multiprocessing``'s
``forkserver``) that imports those packages once; each command is then a fresh fork of it,
with its own ``sys.argv``, working directory, environment variables and output files, run as
``python -m`` runs it (``runpy``, ``__name__ == "__main__"``).

A command whose environment differs from the server's in a variable that the interpreter or
the preloaded libraries may read at start-up (:data:`_READ_AT_IMPORT`, e.g. ``TRIME_*``,
``TORCH*``) starts as a plain subprocess instead, as does every command when
``TRIME_FORK_SERVER=0`` or where ``forkserver`` is not available. The server never runs torch
code (no OpenMP pool, no CUDA context), so a fork of it is as clean as a new interpreter.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

logger = logging.getLogger(__name__)

#: switch: ``0`` / ``off`` starts every command as a plain subprocess
ENV_SWITCH = "TRIME_FORK_SERVER"
#: what the server imports once (heavy and side-effect free; not the commands' own modules,
#: which ``runpy`` must execute afresh as ``__main__``)
PRELOAD = ["torch", "numpy", "faiss", "fairseq", "fairseq.options", "fairseq.trainer", "fairseq.checkpoint_utils",
           "fairseq.sequence_generator", "fairseq.data", "trime_fairseq", "trime_fairseq.cli.tune"]
#: variables a fork applies itself (the thread counts through torch and faiss)
_APPLIED_IN_CHILD = {"PYTHONUNBUFFERED", "PYTHONPATH", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"}
#: prefixes of variables that the interpreter or the preloaded libraries may read at start-up:
#: where one differs from the server's, the command gets a new interpreter (any other variable,
#: e.g. CUDA's or TORCHINDUCTOR_* that torch sets itself while running, is read when used, and
#: is set in the fork)
_READ_AT_IMPORT = ("PYTHON", "TRIME_", "TORCH_", "PYTORCH_", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "FAISS",
                   "LD_", "MALLOC")

_server_env: Optional[dict] = None


_prep_lock = threading.Lock()

try:  # POSIX only
    from multiprocessing import popen_forkserver, spawn

    _FORKSERVER = multiprocessing.get_context("forkserver")
except (ImportError, ValueError):  # pragma: no cover - Windows
    _FORKSERVER = None
else:
    class _Popen(popen_forkserver.Popen):
        """The forkserver's launcher, less the step that re-imports the caller's ``__main__``
        in each child (an example's or pytest's module: slow, and not what ``python -m`` does)."""

        def _launch(self, process_obj):
            with _prep_lock:
                original = spawn.get_preparation_data

                def without_main(name):
                    data = original(name)
                    data.pop("init_main_from_name", None)
                    data.pop("init_main_from_path", None)
                    return data

                spawn.get_preparation_data = without_main
                try:
                    return super()._launch(process_obj)
                finally:
                    spawn.get_preparation_data = original

    class _Process(_FORKSERVER.Process):
        """A process forked by the server (see :class:`_Popen`)."""

        @staticmethod
        def _Popen(process_obj):
            return _Popen(process_obj)


def enabled() -> bool:
    """Whether commands may be forked (POSIX, and not switched off by ``TRIME_FORK_SERVER``)."""
    return (os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")
            and _FORKSERVER is not None)


def _server_environment() -> dict:
    """The server's environment: this process's after importing :data:`PRELOAD` as the server
    does (libraries set variables of their own at import, e.g. scikit-learn's ``KMP_*``);
    noted once, before the server starts."""
    global _server_env
    if _server_env is None:
        import importlib

        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:  # as the server: a library that is missing is not preloaded
                pass
        _FORKSERVER.set_forkserver_preload(PRELOAD)
        _server_env = dict(os.environ)
    return _server_env


def differing(env: Mapping[str, str]) -> List[str]:
    """The variables of ``env`` that the server's interpreter may have read at start-up with
    another value (a command with any of them needs a new interpreter)."""
    base = _server_environment()
    keys = {k for k in set(base) | set(env) if k.startswith(_READ_AT_IMPORT)} - _APPLIED_IN_CHILD
    out = sorted(k for k in keys if base.get(k) != env.get(k))
    # a thread count the server's libraries read at import can be raised or lowered in the
    # child, but "unset" (the libraries' own default) cannot be restored
    if "OMP_NUM_THREADS" in base and "OMP_NUM_THREADS" not in env:
        out.append("OMP_NUM_THREADS")
    return out


def _forkable(env: Mapping[str, str]) -> bool:
    """Whether a fork of the server is the same as a new interpreter with ``env``."""
    if not enabled():
        return False
    keys = differing(env)
    if keys:
        logger.debug("a new interpreter for a command: %s differ from the fork server's", ", ".join(keys))
    return not keys


def _logging_when_fairseq_is_imported() -> None:
    """Logging as in a new interpreter: unconfigured until the command first imports fairseq
    (or the plugin), whose import configures it (fairseq's own ``logging.basicConfig`` calls,
    which do nothing if the command configured logging first, as ``fairseq-train`` does)."""
    import builtins

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    for handler in saved[0]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    plain_import = builtins.__import__

    def first_import(name, *args, **kwargs):
        if name.split(".")[0] in ("fairseq", "trime_fairseq"):
            builtins.__import__ = plain_import
            if not root.handlers:
                for handler in saved[0]:
                    root.addHandler(handler)
                root.setLevel(saved[1])
        return plain_import(name, *args, **kwargs)

    builtins.__import__ = first_import


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of the processes it waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(module: str, args: Sequence[str], cwd: str, env: dict, stdout: str, stderr: str, cpu: str) -> None:
    """In the fork: become ``python -m module args`` in ``cwd`` with ``env``, output to files."""
    import atexit
    import importlib.util
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(f, fd)
        os.close(f)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
        if "faiss" in sys.modules:
            sys.modules["faiss"].omp_set_num_threads(int(threads))
    # the interpreter's search path as ``python -m`` builds it: the working directory, then $PYTHONPATH
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [os.getcwd(), *extra]
    _logging_when_fairseq_is_imported()
    code = 0
    try:
        # sys.argv[0] the file run, as ``python -m`` leaves it (also after runpy restores it,
        # when an uncaught exception is reported below)
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations is not None:
            spec = importlib.util.find_spec(module + ".__main__")
        sys.argv = [spec.origin if spec is not None and spec.origin else module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            sys.stderr.write(f"{e.code}\n")
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(cpu, "w") as f:  # what a parent reads from wait4() for a child of its own
        f.write(str(_cpu_seconds()))
    os._exit(code)


class Command:
    """A started command: ``poll()``, ``wait()`` and ``returncode`` as ``subprocess.Popen``'s;
    once it has ended, ``cpu_s``: the CPU seconds (user + system) of the command and of the
    processes it waited for."""

    def __init__(self, module: str, args: Sequence[Union[str, Path]], stdout: Union[str, Path],
                 stderr: Optional[Union[str, Path]] = None, cwd: Optional[Union[str, Path]] = None,
                 env: Optional[Mapping[str, str]] = None) -> None:
        env = dict(os.environ if env is None else env)
        args = [str(a) for a in args]
        cwd = str(cwd or os.getcwd())
        stderr = str(stderr or stdout)
        self.returncode: Optional[int] = None
        self.cpu_s: Optional[float] = None
        for path in {str(stdout), stderr}:
            open(path, "w").close()
        self._proc = self._popen = None
        if _forkable(env):
            fd, self._cpu_file = tempfile.mkstemp(prefix="trime-cpu-")
            os.close(fd)
            self._proc = _Process(target=_child, args=(module, args, cwd, env, str(stdout), stderr, self._cpu_file))
            self._proc.start()
        else:
            with open(stdout, "a") as out, (open(stderr, "a") if stderr != str(stdout) else out) as err:
                self._popen = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                                               stdout=out, stderr=err)

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else self._popen.pid

    def _ended(self, code: int, cpu_s: Optional[float]) -> None:
        self.returncode, self.cpu_s = code, cpu_s

    def poll(self) -> Optional[int]:
        if self.returncode is not None:
            return self.returncode
        if self._proc is not None:
            if not self._proc.is_alive():
                try:
                    with open(self._cpu_file) as f:
                        cpu = float(f.read() or "nan")
                finally:
                    os.unlink(self._cpu_file)
                self._ended(self._proc.exitcode, cpu)
        else:  # reaped here rather than by Popen, for its resource usage
            pid, status, usage = os.wait4(self._popen.pid, os.WNOHANG)
            if pid:
                self._popen.returncode = os.waitstatus_to_exitcode(status)
                self._ended(self._popen.returncode, usage.ru_utime + usage.ru_stime)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.pid, timeout or 0)
            if self._proc is not None:
                self._proc.join(0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic())))
            else:
                time.sleep(0.05)
        return self.returncode


def start(module: str, args: Sequence[Union[str, Path]], stdout: Union[str, Path],
          stderr: Optional[Union[str, Path]] = None, cwd: Optional[Union[str, Path]] = None,
          env: Optional[Mapping[str, str]] = None) -> Command:
    """Start ``python -m module args`` (from the fork server when possible), its standard
    output written to the file ``stdout`` and its standard error to ``stderr`` (default: the
    same file)."""
    return Command(module, args, stdout, stderr, cwd, env)


def run(module: str, args: Sequence[Union[str, Path]], cwd: Optional[Union[str, Path]] = None,
        env: Optional[Mapping[str, str]] = None, scratch: Optional[Union[str, Path]] = None
        ) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` to the end; returns its exit status and both outputs as
    ``subprocess.run(..., capture_output=True, text=True)`` does."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        rc = start(module, args, out, err, cwd, env).wait()
        return subprocess.CompletedProcess([sys.executable, "-m", module, *map(str, args)], rc,
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))
