"""Tasks: batching and the flags users type (registered with fairseq on import)."""
from trime_fairseq.tasks import trime_lm, trime_translation  # noqa: F401
