"""Position-wise feed-forward blocks, GLU variants (2002.05202) and chunking (Reformer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def relu_squared(x):
    return F.relu(x) ** 2


# Activation registry. With ff_glu=True the same name picks the gate: gelu -> GEGLU,
# swish -> SwiGLU, relu -> ReGLU, identity -> bilinear.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2 / T5 v1.1 "gelu_new"
    "swish": F.silu,
    "relu": F.relu,
    "relu_squared": relu_squared,
    "identity": lambda x: x,
}


class FeedForward(nn.Module):
    """Linear -> activation (or GLU) -> dropout -> Linear.

    The hidden size is ``mult * dim`` (or ``inner_dim``). With ``glu=True`` the first projection
    makes two halves of that size, so a GLU block has 1.5x the parameters of a plain one at the
    same mult; the GLU paper keeps parameters equal by using 2/3 of the hidden size, which is
    ``ff_mult=8/3`` here.
    """

    def __init__(self, dim: int, cfg, dim_out: int | None = None):
        super().__init__()
        inner = cfg.inner_dim or int(dim * cfg.mult)
        bias = not cfg.no_bias
        self.glu = cfg.glu
        self.act_name = cfg.activation
        self.act = ACTIVATIONS[cfg.activation]
        self.chunks = cfg.chunks
        self.proj_in = nn.Linear(dim, inner * (2 if cfg.glu else 1), bias=bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.proj_out = nn.Linear(inner, dim_out or dim, bias=bias)

    def _forward(self, x):
        h = self.proj_in(x)
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            h = h * self.act(gate)
        else:
            h = self.act(h)
        return self.proj_out(self.dropout(h))

    def forward(self, x):
        if self.chunks == 1 or x.shape[-2] < 2:
            return self._forward(x)
        # Reformer: position-wise, so computing it in chunks along the sequence gives the same
        # output with a peak hidden activation 1/chunks the size.
        return torch.cat([self._forward(c) for c in x.chunk(self.chunks, dim=-2)], dim=-2)

    def extra_repr(self):
        kind = f"glu({self.act_name})" if self.glu else self.act_name
        return f"{kind}, chunks={self.chunks}"
