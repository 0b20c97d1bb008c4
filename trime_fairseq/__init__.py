"""trime-fairseq: TRIME and other memory-augmented language models as a fairseq plugin.

Load with ``--user-dir trime_fairseq`` (or ``import trime_fairseq``); importing registers the
criterion ``trime_loss``, the task ``trime_lm`` and the ``transformer_lm_trime_*``
architectures, applies the stack shims of :mod:`trime_fairseq.compat` and reports user
errors (:class:`trime_fairseq.errors.TrimeUserError`) as one line.
"""
from trime_fairseq import compat as _compat
from trime_fairseq import errors as _errors

_compat.apply()
_errors.install_excepthook()  # user errors inside fairseq's commands: one line, no traceback

from trime_fairseq import criterions, models, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
