"""trime-fairseq: TRIME and other memory-augmented language models as a fairseq plugin.

Load with ``--user-dir trime_fairseq`` (or ``import trime_fairseq``); when fairseq is
installed, importing registers the criterion ``trime_loss``, the tasks ``trime_lm`` and
``trime_translation`` and the ``transformer_*_trime_*`` architectures, applies the stack
shims of :mod:`trime_fairseq.compat` (``TRIME_FAIRSEQ_SHIMS=0`` switches them off) and
reports user errors (:class:`trime_fairseq.errors.TrimeUserError`) as one line. Without
fairseq, the fairseq-free parts (:mod:`trime_fairseq.memory`) still import.
"""
__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # the fairseq-free parts (memory/) stay usable
    HAS_FAIRSEQ = False
else:
    HAS_FAIRSEQ = True

if HAS_FAIRSEQ:
    from trime_fairseq import compat as _compat
    from trime_fairseq import errors as _errors

    _compat.apply()
    _errors.install_excepthook()  # user errors inside fairseq's commands: one line, no traceback

    from trime_fairseq import criterions, models, tasks  # noqa: E402,F401  (registration)
