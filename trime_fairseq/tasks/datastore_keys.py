"""The datastore keys of a split, read the same way by the LM and the MT task.

A split is a sequence of *units* read in a fixed order (LM: ``fairseq-eval-lm``'s blocks;
MT: target sentences in index order), ``batch_units`` per forward pass. Unit ``u`` holds
the keys ``[unit_ends[u-1], unit_ends[u])``: one per scored token, the decoder's ``g``
(input of the last feed-forward block) with the token as value. ``trime-build-datastore``
(single or sharded builds, resumed builds), ``trime-tune-mt`` and ``trime-train-metak``
read keys only through :meth:`DatastoreKeys.iter_datastore_keys`.
"""
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch

#: tokens per forward pass when reading keys and no --max-tokens was given
DEFAULT_KEY_MAX_TOKENS = 8192


class KeyBatch(NamedTuple):
    """One forward pass: keys ``[n, d]``, values ``[n]`` and, on request, the token terms
    ``(s_value, log Σ_w exp s_w)`` ``[n]`` each."""

    keys: torch.Tensor
    values: torch.Tensor
    tok_target: Optional[torch.Tensor] = None
    tok_lse: Optional[torch.Tensor] = None


@dataclass
class KeyLayout:
    """How a split is read into keys: ``unit_ends`` (cumulative key count at the end of
    each unit), ``batch_units`` units per forward pass, ``collate`` (unit indices -> a
    sample), ``source`` (what ``meta.json`` records about the reading)."""

    unit: str
    unit_ends: np.ndarray
    batch_units: int
    collate: Callable[[Sequence[int]], dict]
    pad: int
    reorder: bool = False  # the collater sorts rows (MT: by source length); restore unit order
    source: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.unit_ends[-1]) if len(self.unit_ends) else 0

    def unit_starting_at(self, key: int) -> int:
        """The unit whose first key is ``key`` (``key`` must be a unit boundary)."""
        u = int(np.searchsorted(self.unit_ends, key, side="right"))
        if key and self.unit_ends[u - 1] != key:
            raise RuntimeError(f"datastore progress is not on a {self.unit} boundary; delete the .partial directory")
        return u

    def unit_ending_at(self, key: int) -> int:
        """One past the last unit of the keys ``[.., key)`` (``key``: a unit boundary, or past the end)."""
        if key >= self.size:
            return len(self.unit_ends)
        if key <= 0:
            return 0
        u = int(np.searchsorted(self.unit_ends, key, side="left"))
        if self.unit_ends[u] != key:
            raise RuntimeError(f"key {key} is not on a {self.unit} boundary")
        return u + 1


class DatastoreKeys:
    """Mixin of the tasks: :meth:`datastore_layout` (per task) and the shared reading."""

    def datastore_layout(self, split: str, max_tokens: int, batch_size: Optional[int],
                         context_window: int = 0) -> KeyLayout:
        raise NotImplementedError

    def datastore_dictionary_path(self) -> str:
        """The dictionary of the datastore's values (its fingerprint goes into ``meta.json``)."""
        raise NotImplementedError

    def datastore_size(self, split: str) -> int:
        raise NotImplementedError

    def iter_datastore_keys(self, model, split: str, max_tokens: int, batch_size: Optional[int],
                            context_window: int = 0, start_key: int = 0, end_key: Optional[int] = None,
                            max_keys: Optional[int] = None, token_terms: bool = False) -> Iterator[KeyBatch]:
        """The keys ``[start_key, end_key)`` of ``split`` in order, one :class:`KeyBatch`
        per forward pass. ``start_key`` (a unit boundary: a resumed build, a shard) skips
        what is done; ``end_key`` (a unit boundary) stops there; ``max_keys`` stops after
        the batch reaching that many keys; ``token_terms`` adds the model's token terms."""
        from trime_fairseq.models.capture import get_capture, to_model_device

        layout = self.datastore_layout(split, max_tokens, batch_size, context_window)
        first = layout.unit_starting_at(start_key)
        end = len(layout.unit_ends) if end_key is None else layout.unit_ending_at(end_key)
        capture = get_capture(model)
        done = start_key
        with torch.no_grad():
            for s in range(first, end, layout.batch_units):
                sample = to_model_device(layout.collate(range(s, min(s + layout.batch_units, end))), model)
                net_output = model(**sample["net_input"])
                g, target = capture.take(), sample["target"]
                order = torch.argsort(sample["id"]) if layout.reorder else None
                if order is not None:
                    g, target = g[order], target[order]
                keep = target.ne(layout.pad)
                terms = ()
                if token_terms:
                    from trime_fairseq.models.output_layer import target_token_terms

                    terms = target_token_terms(model, net_output, sample["target"])
                    terms = tuple((t[order] if order is not None else t)[keep] for t in terms)
                yield KeyBatch(g[keep], target[keep], *terms)
                done += int(keep.sum())
                if max_keys is not None and done >= max_keys:
                    return
