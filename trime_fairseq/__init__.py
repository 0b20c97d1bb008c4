"""trime-fairseq: TRIME and other memory-augmented language models as a fairseq plugin.

Load with ``--user-dir trime_fairseq`` (or ``import trime_fairseq``); importing registers the
criterion ``trime_loss``, the task ``trime_lm`` and the ``transformer_lm_trime_*``
architectures, and applies the stack shims of :mod:`trime_fairseq.compat`.
"""
from trime_fairseq import compat as _compat

_compat.apply()

from trime_fairseq import criterions, models, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
