"""A test-time long-term memory (Eq. 3): the representations of a document's earlier tokens.

Used by ``fairseq-eval-lm`` (``--eval-memory local,long``) for TRIMELM_long and the
continuous cache extended to long-term memory. Entries are appended in reading order,
with their stream position and document; :meth:`window` returns those a block may use:
the same document, strictly before the block's context window (the window itself is
local memory, so no token is counted twice), at most ``size`` of them (the most recent).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor


class MemoryOrderError(RuntimeError):
    """Blocks did not arrive in reading order."""


@dataclass
class MemoryWindow:
    """The entries a block may read: keys ``[K, d]`` per representation, labels, documents
    and age rank (0 = most recent)."""

    keys: Dict[str, Tensor]
    labels: Tensor
    docs: Tensor
    rank: Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class LongTermMemory:
    """FIFO of the last ``size`` (+ context) tokens' representations; reset at documents."""

    size: int
    context: int = 0
    keys: Dict[str, Tensor] = field(default_factory=dict)
    labels: Optional[Tensor] = None
    docs: Optional[Tensor] = None
    positions: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"--long-memory-size must be >= 0, got {self.size}")

    def reset(self) -> None:
        self.keys, self.labels, self.docs, self.positions = {}, None, None, None

    @property
    def next_position(self) -> Optional[int]:
        if self.positions is None or self.positions.numel() == 0:
            return None
        return int(self.positions[-1]) + 1

    def window(self, context_start: int, doc: int) -> Optional[MemoryWindow]:
        """Entries of document ``doc`` before stream position ``context_start``, newest last."""
        if self.labels is None:
            return None
        keep = (self.positions < context_start) & (self.docs == doc)
        idx = keep.nonzero(as_tuple=True)[0][-self.size:] if self.size > 0 else keep.new_zeros(0, dtype=torch.long)
        if idx.numel() == 0:
            return None
        rank = torch.arange(idx.numel() - 1, -1, -1, device=idx.device)
        return MemoryWindow({k: v[idx] for k, v in self.keys.items()}, self.labels[idx], self.docs[idx], rank)

    def append(self, keys: Dict[str, Tensor], labels: Tensor, docs: Tensor, positions: Tensor) -> None:
        """Add scored tokens (``[n, d]`` keys, ``[n]`` labels/documents/positions) in order."""
        if positions.numel() == 0:
            return
        nxt = self.next_position
        if nxt is not None and int(positions[0]) != nxt:
            if int(positions[0]) == 0:
                self.reset()  # a new pass over the data
            else:
                raise MemoryOrderError(
                    f"long-term memory expected stream position {nxt}, got {int(positions[0])}: "
                    "blocks must be scored in reading order (use --task trime_lm's own data loader)"
                )
        if self.labels is None:
            self.keys = {k: v.detach() for k, v in keys.items()}
            self.labels, self.docs, self.positions = labels, docs, positions
        else:
            self.keys = {k: torch.cat([self.keys[k], v.detach()]) for k, v in keys.items()}
            self.labels = torch.cat([self.labels, labels])
            self.docs = torch.cat([self.docs, docs])
            self.positions = torch.cat([self.positions, positions])
        # keep only the current document's entries, at most size + context of them
        last_doc = self.docs[-1]
        keep_from = int((self.docs != last_doc).nonzero(as_tuple=True)[0][-1]) + 1 if bool((self.docs != last_doc).any()) else 0
        keep_from = max(keep_from, int(self.labels.numel()) - (self.size + self.context))
        if keep_from > 0:
            self.keys = {k: v[keep_from:] for k, v in self.keys.items()}
            self.labels, self.docs, self.positions = (
                self.labels[keep_from:], self.docs[keep_from:], self.positions[keep_from:]
            )
