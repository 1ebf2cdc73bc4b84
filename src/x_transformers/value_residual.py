"""Value residual learning (ResFormer, 2410.17897): every attention after the first mixes the
first attention's values into its own, ``v <- v_1 + lam * (v - v_1)``.

The stack switches it on with ``add_value_residual=True``; ``learned_value_residual_mix`` (default
True, as upstream) makes ``lam`` a learned function of the block's input, ``sigmoid(w . x + b)``
per token and key/value head (2412.15113's per-token mix), else ``lam = 1/2``. Self-attention mixes
with the first self-attention's values, cross-attention with the first cross-attention's (always at
1/2: its values are per context token, and a mix read from the queries has no context position).

One :class:`ValueResidual` is made per forward and passed to every attention block: the first
block of each kind to run stores its values (after the value norm, ``attn_value_rmsnorm``, which is
what a cross-attention's cache holds; upstream mixes before its norm), the later ones read them. With a key/value cache the values mixed are the new tokens' (each position's
mix depends only on that position), so the cached values are the mixed ones and decoding equals
the full forward. Transformer-XL memories (recurrence.py) are earlier columns of the sequence: their
values mix with the first attention's memory values the same way (kind ``"self_memory"``), so segments
with unbounded memory compute the whole sequence.

Legend: b batch, g kv heads, n tokens, e value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueResidualMix(nn.Module):
    """lam = sigmoid(W x + c): (b, n, dim) -> (b, g, n, 1), one mix per token and key/value head."""

    def __init__(self, dim: int, kv_heads: int):
        super().__init__()
        self.proj = nn.Linear(dim, kv_heads)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.proj(x)).transpose(1, 2)[..., None]  # (b, n, g) -> (b, g, n, 1)


class ValueResidual:
    """The first self- and cross-attention values of one forward (the stack makes one per forward)."""

    def __init__(self):
        self.first: dict[str, Tensor] = {}

    def seen(self, kind: str) -> bool:
        return kind in self.first

    def store(self, kind: str, v: Tensor):
        self.first[kind] = v

    def mix(self, kind: str, v: Tensor, x: Tensor, mixer: ValueResidualMix | None) -> Tensor:
        """The first ``kind`` attention to call this stores v (b, g, n, e) and gets it back; a later one
        gets ``v_1 + lam * (v - v_1)``, lam from ``mixer(x)`` or 1/2."""
        first = self.first.get(kind)
        if first is None:
            self.first[kind] = v
            return v
        lam = mixer(x).to(v.dtype) if mixer is not None else 0.5
        return first + lam * (v - first)
