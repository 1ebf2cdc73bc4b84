"""Residual branches: norm placement, ReZero gates, LayerScale, branch and skip scales, the GRU
gate and layer dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adaptive import apply_norm


def shift_amounts(k: int, causal: bool) -> tuple[int, ...] | None:
    """Token shift amounts of a block: 0..k causal, -k..k otherwise; None for k = 0."""
    if not k:
        return None
    return tuple(range(0 if causal else -k, k + 1))


def shift_tokens(x, shifts: tuple[int, ...], mask=None):
    """x (b, n, d): its first len(shifts) channel groups of d // len(shifts) moved along the sequence,
    group i by shifts[i] positions (positive: token t reads token t - s), zero-filled; the
    remaining channels stay. With a mask (b, n) (False: padding) the shift runs along each row's kept
    tokens, as positions count them: token t reads the s-th kept token before it, so left padding, or
    padding between prepended memory tokens and the first token, changes nothing; padding contributes
    zeros."""
    if mask is None:
        return _shift(x, shifts)
    x = x.masked_fill(~mask[..., None], 0.0)
    order = torch.argsort((~mask).to(torch.int32), dim=1, stable=True)  # (b, n): each row's kept tokens first
    out = _shift(x.gather(1, order[..., None].expand_as(x)), shifts)
    back = torch.argsort(order, dim=1)  # the inverse permutation
    return out.gather(1, back[..., None].expand_as(out))


def _shift(x, shifts):
    size = x.shape[-1] // len(shifts)
    n = x.shape[1]
    parts = list(x.split(size, dim=-1))
    for i, s in enumerate(shifts):
        s = max(-n, min(n, s))
        if s > 0:
            parts[i] = F.pad(parts[i][:, :n - s], (0, 0, s, 0))
        elif s < 0:
            parts[i] = F.pad(parts[i][:, -s:], (0, 0, 0, -s))
    return torch.cat(parts, dim=-1)


class Residual(nn.Module):
    """One residual branch ``skip(x) + scale * g * gamma * f(norm(x + inject))`` with the norm
    placed as configured.

    placement: ``pre`` (norm before f), ``post`` (norm after the sum), ``sandwich`` (norm before
    and after f), ``rezero`` (no norm, learned gate g initialised to 0, 2003.04887).
    ``post_norm``: a norm after the sum as well (``pre_and_post_norm``; ``post`` has it anyway).
    ``layerscale``: CaiT's LayerScale (2103.17239), a per-channel gain gamma on the branch,
    initialised to this value (None: off).
    ``skip_scale``: a learned per-channel gain on the skip path, initialised to 1
    (``scale_residual``); ``skip_constant``: a constant one (``scale_residual_constant``).
    ``gru``: the sum is replaced by a GRU cell reading the branch as input and the skip path as
    hidden state (``gate_residual``, GTrXL 1910.06764).
    ``inject``: a tensor added to the branch's input only (``reinject_input``), given per call.
    ``update``: a module (out, skip, seq_mask) -> new x in place of the sum (``orthog_residual``,
    ``mv_split_residual``: residual_updates.py).
    ``adaptive_scale``: an :class:`~x_transformers.adaptive.AdaptiveLayerScale` gating the branch by
    the condition; ``condition`` (b, 1|n, c), given per call, also reaches adaptive norms.
    """

    def __init__(self, fn: nn.Module, *, placement: str, make_norm, scale: float = 1.0, layer_dropout: float = 0.0,
                 post_norm: bool = False, dim: int | None = None, layerscale: float | None = None,
                 skip_scale: bool = False, skip_constant: float = 1.0, gru: bool = False,
                 shifts: tuple[int, ...] | None = None, adaptive_scale: nn.Module | None = None,
                 update: nn.Module | None = None, integrate: nn.Module | None = None):
        super().__init__()
        self.fn = fn
        self.placement = placement
        self.scale = scale
        self.layer_dropout = layer_dropout
        self.pre_norm = make_norm() if placement in ("pre", "sandwich") else None
        self.branch_norm = make_norm() if placement == "sandwich" else None
        self.post_norm = make_norm() if placement == "post" or post_norm else None
        self.gate = nn.Parameter(torch.zeros(())) if placement == "rezero" else None
        self.layerscale = nn.Parameter(torch.full((dim,), float(layerscale))) if layerscale is not None else None
        self.skip_scale = nn.Parameter(torch.ones(dim)) if skip_scale else None
        self.skip_constant = skip_constant
        self.gru = nn.GRUCell(dim, dim) if gru else None
        self.shifts = shifts  # token shift of the branch input (shift_tokens, as RWKV's token shift)
        self.adaptive_scale = adaptive_scale
        self.update = update  # how the branch enters the stream when not by a sum (residual_updates.py)
        self.integrate = integrate  # LIMe (hyper.py): the branch reads a mix of every earlier block's input

    def forward(self, x, *args, seq_mask=None, **kwargs):
        """Returns (new x, whatever f returned beside its output, or None). ``seq_mask`` (b, n): the
        kept tokens, for an update that takes means over the sequence."""
        out, extra = self.branch(x, *args, **kwargs)
        condition = kwargs.get("condition")
        if out is None:
            return x, None  # layer dropout skips the whole layer, its post-norm included
        skip = x
        if self.skip_scale is not None:
            skip = skip * self.skip_scale
        if self.skip_constant != 1.0:
            skip = skip * self.skip_constant
        if self.update is not None:
            x = self.update(out, skip, seq_mask)
        elif self.gru is not None:  # position-wise: every token's channels are one GRU step
            x = self.gru(out.reshape(-1, out.shape[-1]), skip.reshape(-1, skip.shape[-1])).view_as(out)
        else:
            x = skip + out
        if self.post_norm is not None:
            x = apply_norm(self.post_norm, x, condition)
        return x, extra

    def branch(self, x, *args, inject=None, shift_mask=None, condition=None, mem=None, layer_inputs=None, **kwargs):
        """The branch alone, ``(scale * g * gamma * f(norm(x + inject)), extra)``; ``(None, None)``
        when layer dropout drops it. Reversible layers (reversible.py) add it to the other stream.
        ``layer_inputs``: the inputs of this run's earlier blocks, which this one's joins (LIMe)."""
        drop = self.training and self.layer_dropout > 0
        if layer_inputs is not None:  # recorded even when the branch is dropped: later blocks count it
            layer_inputs.append(x)
        if drop and not torch.compiler.is_compiling() and torch.rand(()).item() < self.layer_dropout:
            return None, None  # drop the whole branch (a CPU draw: no device sync)
        if layer_inputs is not None:
            if self.integrate is not None:  # (the first block has none: its one input is its mix)
                x = self.integrate(x, layer_inputs)  # (b, n, d), or (3, b, n, d): q, k, v inputs
        h = x if inject is None else x + inject
        norm = self.pre_norm  # (read once: a submodule's lookup is nn.Module's slow attribute path)
        h = apply_norm(norm, h, condition) if norm is not None else h
        if norm is not None and kwargs.get("kv") is not None:
            # a funnel's pooled queries read the unpooled sequence's keys/values (funnel.py): both
            # sides enter the attention through this branch's norm, as x does without pooling
            kwargs["kv"] = apply_norm(norm, kwargs["kv"], condition)
        if self.shifts is not None:
            h = shift_tokens(h, self.shifts, shift_mask)
        if mem is not None:  # Transformer-XL memory: normed as the block's input (not re-injected, as upstream)
            kwargs["mem"] = apply_norm(norm, mem, condition) if norm is not None else mem
        out = self.fn(h, *args, **kwargs)
        out, extra = out if isinstance(out, tuple) else (out, None)
        if self.branch_norm is not None:
            out = apply_norm(self.branch_norm, out, condition)
        if self.gate is not None:
            out = out * self.gate
        if self.layerscale is not None:
            out = out * self.layerscale
        if self.adaptive_scale is not None:
            out = self.adaptive_scale(out, condition)
        if self.scale != 1.0:
            out = out * self.scale
        if drop and torch.compiler.is_compiling():
            # a compiled graph cannot branch on a random draw: compute the branch, keep it or not
            out = out * (torch.rand((), device=x.device) >= self.layer_dropout).to(out.dtype)
        return out, extra

    def extra_repr(self):
        s = f"placement={self.placement}"
        if self.post_norm is not None and self.placement != "post":
            s += ", post_norm=True"
        if self.layerscale is not None:
            s += ", layerscale"
        if self.shifts is not None:
            s += f", shifts={self.shifts}"
        if self.skip_constant != 1.0:
            s += f", skip_constant={self.skip_constant}"
        return s + (f", scale={self.scale}" if self.scale != 1.0 else "")
