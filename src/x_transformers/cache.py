"""Key/value caches for incremental decoding.

A cache is an object that owns its buffers: per attention layer the keys (stored after rotary)
and values, plus, for the whole stack, the key padding mask and the positions of every token
seen so far. ``AttentionLayers.forward(..., cache=cache)`` reads and extends it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKV:
    """Keys and values of one attention layer: (b, g, m, d) each."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Self-attention: add the new keys/values, return all of them."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=-2), torch.cat((self.v, v), dim=-2)
        return self.k, self.v

    @property
    def filled(self) -> bool:
        """Cross-attention: keys/values of the context are computed once, then reused."""
        return self.k is not None

    def store(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def reorder(self, index: Tensor):
        if self.k is not None:
            self.k, self.v = self.k[index], self.v[index]


class KVCache:
    """A dynamic cache: grows by concatenation; one LayerKV per attention block."""

    def __init__(self):
        self.layers: dict[int, LayerKV] = {}
        self.key_mask: Tensor | None = None  # (b, m) bool, True = a real (unpadded) token
        self.positions: Tensor | None = None  # (b, m) long

    def layer(self, index: int) -> LayerKV:
        if index not in self.layers:
            self.layers[index] = LayerKV()
        return self.layers[index]

    @property
    def seq_len(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def empty(self) -> bool:
        return self.seq_len == 0

    def next_positions(self) -> Tensor | None:
        """(b, 1): one past the last kept position of each row (the count of kept tokens)."""
        if self.key_mask is None:
            return None
        return self.key_mask.sum(dim=-1, keepdim=True)

    def extend(self, key_mask: Tensor, positions: Tensor):
        """Record the mask and positions of the tokens just processed."""
        if self.key_mask is None:
            self.key_mask, self.positions = key_mask, positions
        else:
            self.key_mask = torch.cat((self.key_mask, key_mask), dim=-1)
            self.positions = torch.cat((self.positions, positions.expand(key_mask.shape[0], -1)), dim=-1)

    def reorder(self, index: Tensor):
        """Select/reorder batch rows (beam search)."""
        for layer in self.layers.values():
            layer.reorder(index)
        if self.key_mask is not None:
            self.key_mask, self.positions = self.key_mask[index], self.positions[index]
