"""Architectures and the hooks/wrappers that read TRIME's representations."""
from trime_fairseq.models import architectures, memorizing  # noqa: F401
