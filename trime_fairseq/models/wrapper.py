"""The base of the models that score with memory at test time (``fairseq-eval-lm``,
``fairseq-generate``): a thin wrapper around a loaded fairseq model.

Parameters and checkpoints stay the inner model's (loading, ``state_dict``, positions and
the encoder/decoder are delegated), so any checkpoint of the wrapped architecture loads and
fairseq's scorers and generators drive the wrapper as they would the model. Subclasses
override ``get_normalized_probs`` to mix in memory with a
:class:`~trime_fairseq.memory.combiners.Combiner`.
"""
from typing import Dict

from fairseq.models import BaseFairseqModel

from trime_fairseq.memory.combiners import Combiner
from trime_fairseq.models.capture import get_capture


class MemoryModelWrapper(BaseFairseqModel):
    """Delegates everything but memory scoring to ``inner``; ``capture`` reads its ``g``/``f``.

    ``timings`` accumulates seconds in the model forward, the datastore search and the
    combining (what a subclass measures of them); :meth:`summary` adds the retriever's
    counters (queries, share of searches skipped by adaptive retrieval)."""

    retriever = None

    def __init__(self, model: BaseFairseqModel, combiner: Combiner) -> None:
        super().__init__()
        self.inner = model
        self.combiner = combiner
        self.capture = get_capture(model)
        self.timings: Dict[str, float] = {"model": 0.0, "search": 0.0, "combine": 0.0}

    def summary(self) -> dict:
        """Time split (seconds and shares) and the retriever's counters."""
        total = sum(self.timings.values())
        out = {"time_s": dict(self.timings),
               "time_share": {k: (v / total if total > 0 else 0.0) for k, v in self.timings.items()}}
        if self.retriever is not None:
            out.update(self.retriever.counters())
        return out

    def describe_summary(self) -> str:
        """One line: time split and, with a datastore, the share of searches skipped."""
        s = self.summary()
        parts = [k for k in ("model", "search", "combine") if k != "model" or s["time_s"]["model"] > 0]
        split = ", ".join(f"{k} {s['time_s'][k]:.1f}s ({s['time_share'][k]:.0%})" for k in parts)
        line = f"time split: {split}"
        if "queries" in s:
            skip = self.retriever.skip.describe() if self.retriever.skip is not None else "every query searched"
            line += (f"; datastore searches skipped: {s['skipped']:,} of {s['queries']:,} "
                     f"({s['skipped_share']:.1%}; {skip})")
        return line

    @property
    def encoder(self):
        return self.inner.encoder

    @property
    def decoder(self):
        return self.inner.decoder

    def get_targets(self, sample, net_output):
        return self.inner.get_targets(sample, net_output)

    def max_positions(self):
        return self.inner.max_positions()

    def max_decoder_positions(self):
        return self.inner.max_decoder_positions()

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.inner.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def state_dict(self, *args, **kwargs):
        return self.inner.state_dict(*args, **kwargs)
