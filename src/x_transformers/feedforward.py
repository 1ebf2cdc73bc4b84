"""Position-wise feed-forward blocks, GLU variants (2002.05202) and chunking (Reformer).

The default path is Linear -> activation -> dropout -> Linear; the options (SoLU, a LayerNorm
after the activation, soft clamps, a learned GLU gain, output dropout) are ``None``-able parts
built in ``__init__``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .norms import LayerNorm


def relu_squared(x):
    return F.relu(x) ** 2


def softclamp(x, value: float):
    """``value * tanh(x / value)``: the identity near 0, smoothly bounded by +-value (Gemma 2)."""
    return torch.tanh(x / value) * value


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

# SiTU-GLU's soft-clamped gates (ff_glu_softclamp): the activation's non-linear factor times a
# soft-clamped linear factor, sc(g) * Phi(g) for GELU and sc(g) * sigmoid(g) for swish
CLAMPED_GATES = {
    "gelu": lambda g, v: softclamp(g, v) * torch.special.ndtr(g),
    "swish": lambda g, v: softclamp(g, v) * torch.sigmoid(g),
}


class SoLU(nn.Module):
    """Softmax linear unit (Anthropic, 2022): ``LayerNorm(x * softmax(x))`` over the hidden channels."""

    def __init__(self, inner: int):
        super().__init__()
        self.norm = LayerNorm(inner, bias=False)

    def forward(self, x):
        return self.norm(x * x.softmax(dim=-1))


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
        self.act_name = "custom" if cfg.custom_activation is not None else "solu" if cfg.solu else cfg.activation
        if cfg.custom_activation is not None:  # a module is copied per block: its parameters are its own
            act = cfg.custom_activation
            self.act = copy.deepcopy(act) if isinstance(act, nn.Module) else act
        elif cfg.solu:
            self.act = SoLU(inner)
        else:
            self.act = ACTIVATIONS[cfg.activation]
        self.chunks = cfg.chunks
        self.softclamp_value = cfg.softclamp_value  # on the first projection's output, before the activation
        self.gate_clamp = cfg.glu_gate_softclamp_value if cfg.glu_softclamp_on else None
        self.up_clamp = cfg.glu_up_softclamp_value if cfg.glu_softclamp_on else None
        self.proj_in = nn.Linear(dim, inner * (2 if cfg.glu else 1), bias=bias)
        self.mult_bias = nn.Parameter(torch.ones(inner)) if cfg.glu_mult_bias else None
        self.post_act_norm = LayerNorm(inner, bias=False) if cfg.post_act_ln else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.proj_out = nn.Linear(inner, cfg.dim_out or dim_out or dim, bias=bias)
        self.out_dropout = nn.Dropout(cfg.sublayer_dropout) if cfg.sublayer_dropout > 0 else None
        self.zero_init_output = cfg.zero_init_output
        self.output_proj_depth = cfg.output_proj_depth

    def muon_parameters(self) -> list:
        """Upstream's Muon parameter group of a feed-forward: the weights of its linear maps."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Linear)]

    def init_output(self, std: float):
        """Initialise the output projection: zeros with ``ff_zero_init_output``, N(0, 1 / (2 *
        inner * depth)) with ``ff_output_proj_depth`` (OLMo's depth-scaled init), else N(0, std)."""
        w = self.proj_out.weight
        if self.zero_init_output:
            nn.init.zeros_(w)
        elif self.output_proj_depth is not None:
            nn.init.normal_(w, std=(2 * w.shape[1] * self.output_proj_depth) ** -0.5)
        else:
            nn.init.normal_(w, std=std)
        if self.proj_out.bias is not None:
            nn.init.zeros_(self.proj_out.bias)

    def _activate(self, h):
        if self.softclamp_value is not None:
            h = softclamp(h, self.softclamp_value)
        if not self.glu:
            return self.act(h)
        h, gate = h.chunk(2, dim=-1)
        if self.gate_clamp is not None:
            return softclamp(h, self.up_clamp) * CLAMPED_GATES[self.act_name](gate, self.gate_clamp)
        return h * self.act(gate)

    def _forward(self, x):
        h = self._activate(self.proj_in(x))
        if self.mult_bias is not None:
            h = h * self.mult_bias
        if self.post_act_norm is not None:
            h = self.post_act_norm(h)
        out = self.proj_out(self.dropout(h) if self.dropout is not None else h)
        return self.out_dropout(out) if self.out_dropout is not None else out

    def forward(self, x, deep_embed=None):
        """x (b, n, dim) -> (b, n, dim_out); ``deep_embed`` (b, n, dim_out): a per-token scale of
        the output (upstream's ``ff_deep_embed``)."""
        if self.chunks == 1 or x.shape[-2] < 2:
            out = self._forward(x)
        else:  # Reformer: position-wise, so computing it in chunks along the sequence gives the same
            # output with a peak hidden activation 1/chunks the size.
            out = torch.cat([self._forward(c) for c in x.chunk(self.chunks, dim=-2)], dim=-2)
        return out if deep_embed is None else out * deep_embed

    def extra_repr(self):
        kind = f"glu({self.act_name})" if self.glu else self.act_name
        return f"{kind}, chunks={self.chunks}"
