"""One error type for user errors, and how every command reports it.

Everywhere the plugin checks its input (a flag, a file, a datastore, a checkpoint) it raises
:class:`TrimeUserError` with a one-line message: the flag or file, what is wrong and what to
do. Those errors are reported as one line, ``PROG: error: MESSAGE``, and a non-zero exit
status, never as a traceback:

* ``trime-*`` commands: :func:`cli_entry` wraps their ``main`` (exit status 2, as argparse).
* ``fairseq-train`` / ``fairseq-eval-lm`` / ``fairseq-generate`` (the plugin is imported by
  ``--user-dir`` before their ``main`` runs): :func:`install_excepthook` replaces
  ``sys.excepthook`` so that an uncaught user error prints its line (exit status 1, as any
  uncaught exception). An error raised in a worker process started by
  ``torch.multiprocessing.spawn`` (``--distributed-world-size``) reaches the parent as a
  ``ProcessRaisedException`` holding the worker's traceback text; the hook recognises a
  user error at its end and prints only its message.

Every other exception (a bug) keeps Python's full traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

# how a user error's last traceback line starts (worker processes report text only)
_MARKER = "trime_fairseq.errors.TrimeUserError: "


class TrimeUserError(ValueError):
    """Bad input given by the user: the message is one line naming the flag or file, what is
    wrong and what to do. A ``ValueError`` so that callers catching that still work."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line message if ``exc`` is a user error (also one raised in a spawned worker
    process), else ``None``."""
    if isinstance(exc, TrimeUserError):
        return str(exc)
    text = str(exc)
    if type(exc).__name__ == "ProcessRaisedException" and _MARKER in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        if last.startswith(_MARKER):
            return last[len(_MARKER):].strip()
    return None


_FAIRSEQ_SCRIPTS = {"train.py": "fairseq-train", "eval_lm.py": "fairseq-eval-lm", "generate.py": "fairseq-generate",
                    "validate.py": "fairseq-validate", "interactive.py": "fairseq-interactive",
                    "score.py": "fairseq-score"}


def program_name() -> str:
    """The command's name as the user typed it (``python -m fairseq_cli.train`` ->
    ``fairseq-train``)."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if base in _FAIRSEQ_SCRIPTS and "fairseq_cli" in sys.argv[0]:
        return _FAIRSEQ_SCRIPTS[base]
    return base


def report(message: str, prog: Optional[str] = None) -> None:
    """Print ``PROG: error: MESSAGE`` as one line on stderr (after flushing stdout)."""
    try:
        sys.stdout.flush()
    except Exception:  # pragma: no cover - a closed stdout
        pass
    sys.stderr.write(f"{prog or program_name()}: error: {message}\n")
    sys.stderr.flush()


def _hook(previous: Callable) -> Callable:
    def excepthook(exc_type, exc, tb):
        message = user_error_message(exc) if exc is not None else None
        if message is None:
            return previous(exc_type, exc, tb)
        report(message)

    excepthook._trime = True  # type: ignore[attr-defined]
    return excepthook


def install_excepthook() -> None:
    """Report uncaught user errors as one line (see the module docstring); idempotent."""
    if not getattr(sys.excepthook, "_trime", False):
        sys.excepthook = _hook(sys.excepthook)


class UserErrorExit(SystemExit):
    """How :func:`cli_entry` ends a command after reporting a user error: exit status 2;
    ``str()`` is the line that was printed (``PROG: error: MESSAGE``)."""

    def __init__(self, line: str) -> None:
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def cli_entry(prog: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a ``trime-*`` ``main``: a user error prints ``PROG: error: ...`` and exits 2."""

    def wrap(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> T:
            try:
                return main(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only user errors are handled
                message = user_error_message(exc)
                if message is None:
                    raise
                report(message, prog)
                raise UserErrorExit(f"{prog}: error: {message}") from None

        return run

    return wrap
