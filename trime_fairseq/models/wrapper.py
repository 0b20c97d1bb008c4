"""The base of the models that score with memory at test time (``fairseq-eval-lm``,
``fairseq-generate``): a thin wrapper around a loaded fairseq model.

Parameters and checkpoints stay the inner model's (loading, ``state_dict``, positions and
the encoder/decoder are delegated), so any checkpoint of the wrapped architecture loads and
fairseq's scorers and generators drive the wrapper as they would the model. Subclasses
override ``get_normalized_probs`` to mix in memory with a
:class:`~trime_fairseq.memory.combiners.Combiner`.
"""
from fairseq.models import BaseFairseqModel

from trime_fairseq.memory.combiners import Combiner
from trime_fairseq.models.capture import get_capture


class MemoryModelWrapper(BaseFairseqModel):
    """Delegates everything but memory scoring to ``inner``; ``capture`` reads its ``g``/``f``."""

    def __init__(self, model: BaseFairseqModel, combiner: Combiner) -> None:
        super().__init__()
        self.inner = model
        self.combiner = combiner
        self.capture = get_capture(model)

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
