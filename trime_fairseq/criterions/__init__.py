"""Training losses (registered with fairseq on import)."""
from trime_fairseq.criterions import trime_loss  # noqa: F401
