"""Residual branches: norm placement, ReZero gates, branch scales and layer dropout."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """One residual branch ``x + scale * g * f(norm(x))`` with the norm placed as configured.

    placement: ``pre`` (norm before f), ``post`` (norm after the sum), ``sandwich`` (norm before
    and after f), ``rezero`` (no norm, learned gate g initialised to 0, 2003.04887).
    """

    def __init__(self, fn: nn.Module, *, placement: str, make_norm, scale: float = 1.0, layer_dropout: float = 0.0):
        super().__init__()
        self.fn = fn
        self.placement = placement
        self.scale = scale
        self.layer_dropout = layer_dropout
        self.pre_norm = make_norm() if placement in ("pre", "sandwich") else None
        self.branch_norm = make_norm() if placement == "sandwich" else None
        self.post_norm = make_norm() if placement == "post" else None
        self.gate = nn.Parameter(torch.zeros(())) if placement == "rezero" else None

    def forward(self, x, *args, **kwargs):
        """Returns (new x, whatever f returned beside its output, or None)."""
        out, extra = self.branch(x, *args, **kwargs)
        if out is None:
            return x, None  # layer dropout skips the whole layer, its post-norm included
        x = x + out
        if self.post_norm is not None:
            x = self.post_norm(x)
        return x, extra

    def branch(self, x, *args, **kwargs):
        """The branch alone, ``(scale * g * f(norm(x)), extra)``; ``(None, None)`` when layer dropout
        drops it. Reversible layers (reversible.py) add it to the other stream."""
        drop = self.training and self.layer_dropout > 0
        if drop and not torch.compiler.is_compiling() and torch.rand(()).item() < self.layer_dropout:
            return None, None  # drop the whole branch (a CPU draw: no device sync)
        h = self.pre_norm(x) if self.pre_norm is not None else x
        out = self.fn(h, *args, **kwargs)
        out, extra = out if isinstance(out, tuple) else (out, None)
        if self.branch_norm is not None:
            out = self.branch_norm(out)
        if self.gate is not None:
            out = out * self.gate
        if self.scale != 1.0:
            out = out * self.scale
        if drop and torch.compiler.is_compiling():
            # a compiled graph cannot branch on a random draw: compute the branch, keep it or not
            out = out * (torch.rand((), device=x.device) >= self.layer_dropout).to(out.dtype)
        return out, extra

    def extra_repr(self):
        s = f"placement={self.placement}"
        return s + (f", scale={self.scale}" if self.scale != 1.0 else "")
