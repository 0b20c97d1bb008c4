"""Read TRIME's representations off a stock fairseq decoder with forward hooks (no fork).

* ``g(c)``: the input of the last decoder layer's feed-forward block, i.e. the input of
  its ``fc1`` (after ``final_layer_norm`` when ``normalize_before``), as in §3 and kNN-LM.
* ``f(c)``: the decoder output that the output projection reads (the continuous cache's
  "hidden state"). With an adaptive softmax fairseq returns it as ``net_output[0]``.

Hooks keep the autograd graph, so gradients flow through both.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from torch import Tensor, nn

from trime_fairseq.errors import TrimeUserError


# the model does not expose the layers TRIME needs: a user error (--arch)
RepresentationError = TrimeUserError


def last_ffn_input_module(model: nn.Module) -> nn.Module:
    """The module whose input is ``g``: ``model.decoder.layers[-1].fc1``."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not layers:
        raise RepresentationError(
            f"{type(model).__name__} has no decoder.layers: TRIME needs a fairseq "
            "transformer decoder (e.g. --arch transformer_lm) to read g, the input of "
            "the last feed-forward block"
        )
    fc1 = getattr(layers[-1], "fc1", None)
    if not isinstance(fc1, nn.Module):
        raise RepresentationError(
            f"the last decoder layer of {type(model).__name__} has no fc1: cannot read "
            "g, the input of the last feed-forward block"
        )
    return fc1


class RepresentationCapture(nn.Module):
    """Attached to a model as a parameter-free child; records ``g`` (and ``f``) on forward.

    Also receives fairseq's ``set_num_updates`` (models forward it to every child), which
    the criterion uses for its CE warm-up.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.g: Optional[Tensor] = None
        self.f: Optional[Tensor] = None
        self.num_updates = 0
        self.on_num_updates: List[Callable[[int], None]] = []
        self._handles = [
            last_ffn_input_module(model).register_forward_pre_hook(self._grab_g)
        ]
        proj = getattr(getattr(model, "decoder", None), "output_projection", None)
        if isinstance(proj, nn.Module):
            self._handles.append(proj.register_forward_pre_hook(self._grab_f))

    def _grab_g(self, module: nn.Module, inputs) -> None:
        self.g = inputs[0].transpose(0, 1)  # fairseq layers are time-major

    def _grab_f(self, module: nn.Module, inputs) -> None:
        self.f = inputs[0]

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates
        for fn in self.on_num_updates:
            fn(num_updates)

    def take(self) -> Tensor:
        """Return ``g`` ``[B, T, d]`` from the last forward and forget it."""
        if self.g is None:
            raise RuntimeError("no forward pass recorded g (was the model run?)")
        g, self.g = self.g, None
        return g

    def take_f(self, net_output) -> Tensor:
        """Return ``f`` ``[B, T, d]`` from the last forward."""
        f = self.f if self.f is not None else net_output[0]
        self.f = None
        return f


def to_model_device(sample, model: nn.Module):
    """``sample`` with its tensors on the device of ``model``'s parameters (as fairseq's
    own commands move batches to the GPU); unchanged on the CPU."""
    from fairseq import utils

    device = next(model.parameters()).device
    if device.type == "cpu":
        return sample
    return utils.apply_to_sample(lambda t: t.to(device, non_blocking=True), sample)


def get_capture(model: nn.Module) -> RepresentationCapture:
    """The model's capture, attached on first use (idempotent)."""
    cap = getattr(model, "trime_capture", None)
    if cap is None:
        cap = RepresentationCapture(model)
        model.add_module("trime_capture", cap)
    return cap
