"""Gates and scales around attention's output: what multiplies the heads' outputs before (and the
projection that follows) the output projection. Built by :class:`~x_transformers.attention.Attention`
from its :class:`~x_transformers.config.AttentionConfig`; each part is ``None`` when off.

- ``HeadScale`` (NormFormer, 2110.09456): a learned scale per head, init 1.
- ``ValueHeadGate`` ("attend to nothing", Quantizable Transformers 2306.12929): each head's output
  times sigmoid(w . x + b), w = 0 and b = 10 at init, so the gate starts open (~1).
- ``OutputGates`` (gated attention, 2505.06708; hybrid gated attention, HyGA): the merged heads'
  output o (b, n, h*e) times act(gx(x) + gh(o)), gx the input ("value") gate, gh the output gate,
  each per channel or per head (one logit broadcast over the head's channels), each a linear map
  or a low-rank one (down, optional SiLU, up); zero-initialised, so the logits start at 0 and the
  gate at sigmoid(0) = 1/2 (SiLU(0) = 0 with ``swiglu_values``: that output starts at zero).

Legend: b batch, n queries, h heads, e value dim per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRank(nn.Module):
    """x -> up(act(down(x))), bias-free; ``up`` is zero-initialised (the map starts at zero)."""

    def __init__(self, dim_in: int, dim_out: int, rank: int, silu: bool):
        super().__init__()
        if not (rank < dim_in or rank < dim_out):
            raise ValueError(f"a low-rank gate's rank ({rank}) must be below its input ({dim_in}) or output "
                             f"({dim_out}) width")
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)
        self.silu = silu

    def forward(self, x):
        h = self.down(x)
        return self.up(F.silu(h) if self.silu else h)

    def reset_parameters(self):
        nn.init.zeros_(self.up.weight)


def gate_projection(dim_in: int, dim_out: int, rank: int | None, silu: bool) -> nn.Module:
    """A zero-initialised bias-free projection: linear, or low-rank when ``rank`` is given."""
    if rank is None:
        proj = nn.Linear(dim_in, dim_out, bias=False)
        nn.init.zeros_(proj.weight)
        return proj
    proj = LowRank(dim_in, dim_out, rank, silu)
    proj.reset_parameters()
    return proj


def _zero_gates(module: nn.Module):
    if isinstance(module, LowRank):
        module.reset_parameters()
    elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.weight)


class HeadScale(nn.Module):
    """NormFormer's head scaling: out (b, h, n, e) times a learned per-head scale, init 1."""

    def __init__(self, heads: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, out):
        return out * self.scale.to(out.dtype)


class ValueHeadGate(nn.Module):
    """Each head's output (b, h, n, e) times sigmoid(W x + b) (b, h, n, 1), open at init."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.proj = nn.Linear(dim, heads)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, 10.0)

    def forward(self, x, out):
        gate = torch.sigmoid(self.proj(x)).transpose(1, 2).unsqueeze(-1)  # (b, n, h) -> (b, h, n, 1)
        return out * gate.to(out.dtype)


class OutputGates(nn.Module):
    """o (b, n, h*e) times act(gx(x) + gh(o)), the logits summed in head space (b, h, n, e|1)."""

    def __init__(self, dim: int, heads: int, dim_value: int, *, input_gate: bool, input_rank, input_headwise: bool,
                 output_gate: bool, output_rank, output_headwise: bool, silu_low_rank: bool, swiglu: bool):
        super().__init__()
        self.heads, self.swiglu = heads, swiglu
        inner = heads * dim_value
        self.input_gate = gate_projection(dim, heads if input_headwise else inner, input_rank,
                                          silu_low_rank) if input_gate else None
        self.output_gate = gate_projection(inner, heads if output_headwise else inner, output_rank,
                                           silu_low_rank) if output_gate else None

    def reset_parameters(self):
        for gate in (self.input_gate, self.output_gate):
            if gate is not None:
                _zero_gates(gate)

    def _head_space(self, logits):
        b, n, c = logits.shape
        return logits.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (b, h, n, e|1)

    def forward(self, x, out):
        logits = 0.0
        if self.input_gate is not None:
            logits = logits + self._head_space(self.input_gate(x))
        if self.output_gate is not None:
            logits = logits + self._head_space(self.output_gate(out))
        gate = F.silu(logits) if self.swiglu else torch.sigmoid(logits)
        b, n, _ = out.shape
        return (self._head_space(out) * gate).transpose(1, 2).reshape(b, n, -1)


def depth_scaled_(linear: nn.Linear, layer_depth: int):
    """OLMo's depth-scaled output init: N(0, 1 / (2 * fan_in * layer_depth))."""
    nn.init.normal_(linear.weight, std=(2 * linear.in_features * layer_depth) ** -0.5)


__all__ = ["HeadScale", "LowRank", "OutputGates", "ValueHeadGate", "depth_scaled_", "gate_projection"]
