"""Conditioned norms and branch scales: a per-sample condition vector c steers every norm's gain
(adaptive LayerNorm / RMSNorm, as in DiT's adaLN, 2212.09748) and, with ``use_adaptive_layerscale``,
gates every branch (DiT's adaLN-Zero gate).

    AdaptiveLayerNorm   LN(x) * (1 + W c)                     W zero at init: the plain LN
    AdaptiveRMSNorm     x / |x| * sqrt(d) * (1 + W c)          W zero at init: SimpleRMSNorm
    AdaptiveLayerScale  f(x) * sigmoid(W c + b)               W zero, b = -2 at init: sigmoid(-2)

``adaptive_condition_mlp``: c first goes through SiLU(Linear(d_c, d_c * expansion)), once per forward.
The condition reaches the blocks through the forward context (``ForwardContext.condition``),
(b, 1, d) or (b, n, d); :func:`apply_norm` calls a norm with it only when the norm takes one.

Legend: b batch, n tokens, d dim, c condition width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _gain(proj: nn.Linear, condition, x):
    """proj(condition) shaped to broadcast over x: (b, 1|n, d), with a streams axis if x has one."""
    g = proj(condition)
    while g.ndim < x.ndim:  # hyper-connection streams (b, n, s, d)
        g = g.unsqueeze(-2)
    return g


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm without its own affine, gain 1 + W c (W zero at init)."""

    conditioned = True

    def __init__(self, dim: int, dim_condition: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.to_gamma = nn.Linear(dim_condition, dim, bias=False)
        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        nn.init.zeros_(self.to_gamma.weight)

    def forward(self, x, condition):
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + _gain(self.to_gamma, condition, x))


class AdaptiveRMSNorm(nn.Module):
    """x / |x| * sqrt(d), gain 1 + W c (W zero at init)."""

    conditioned = True

    def __init__(self, dim: int, dim_condition: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.to_gamma = nn.Linear(dim_condition, dim, bias=False)
        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        nn.init.zeros_(self.to_gamma.weight)

    def forward(self, x, condition):
        return F.normalize(x, dim=-1) * self.scale * (1 + _gain(self.to_gamma, condition, x))


class AdaptiveLayerScale(nn.Module):
    """A branch's output times sigmoid(W c + b): W zero, b = ``init_bias`` (-2) at init."""

    def __init__(self, dim: int, dim_condition: int, init_bias: float = -2.0):
        super().__init__()
        self.init_bias = init_bias
        self.to_gamma = nn.Linear(dim_condition, dim)
        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        nn.init.zeros_(self.to_gamma.weight)
        nn.init.constant_(self.to_gamma.bias, self.init_bias)

    def forward(self, out, condition):
        return out * torch.sigmoid(_gain(self.to_gamma, condition, out))


def apply_norm(norm, x, condition):
    """norm(x), with the condition when the norm is an adaptive one."""
    # (a class attribute: looked up on the type, a plain norm misses it without nn.Module's slow fallback)
    return norm(x, condition) if getattr(type(norm), "conditioned", False) else norm(x)


class Conditioning(nn.Module):
    """The stack's condition handling: checks the condition a forward gets and prepares it once
    (the optional SiLU MLP); builds the adaptive norms and branch scales of its blocks."""

    def __init__(self, cfg, dim: int):
        super().__init__()
        self.dim, self.dim_condition = dim, cfg.dim_condition or dim
        self.norm = "layernorm" if cfg.use_adaptive_layernorm else "rmsnorm" if cfg.use_adaptive_rmsnorm else None
        self.layerscale = cfg.use_adaptive_layerscale
        self.eps = cfg.norm_eps
        width = self.dim_condition * (cfg.adaptive_condition_mlp_expansion if cfg.adaptive_condition_mlp else 1)
        self.width = width  # what the norms and scales read
        self.mlp = nn.Sequential(nn.Linear(self.dim_condition, width, bias=False), nn.SiLU()) \
            if cfg.adaptive_condition_mlp else None

    def make_norm(self):
        if self.norm == "layernorm":
            return AdaptiveLayerNorm(self.dim, self.width, eps=self.eps)
        return AdaptiveRMSNorm(self.dim, self.width)

    def make_layerscale(self):
        return AdaptiveLayerScale(self.dim, self.width) if self.layerscale else None

    def forward(self, condition, b: int, n: int):
        """condition (b, c) or (b, n, c) -> (b, 1|n, width), checked."""
        if condition is None:
            raise ValueError(f"this stack has adaptive norms or scales (use_adaptive_*): pass condition=, a tensor "
                             f"of shape (batch, {self.dim_condition}) or (batch, seq, {self.dim_condition})")
        if not isinstance(condition, torch.Tensor) or not condition.is_floating_point() or condition.ndim not in (2, 3) \
                or condition.shape[0] != b or condition.shape[-1] != self.dim_condition \
                or (condition.ndim == 3 and condition.shape[1] != n):
            got = f"shape {tuple(condition.shape)} ({condition.dtype})" if isinstance(condition, torch.Tensor) \
                else type(condition).__name__
            raise ValueError(f"condition must be a float tensor of shape ({b}, {self.dim_condition}) or ({b}, {n}, "
                             f"{self.dim_condition}) (dim_condition={self.dim_condition}); got {got}")
        if condition.ndim == 2:
            condition = condition[:, None]  # (b, 1, c): every token
        return self.mlp(condition) if self.mlp is not None else condition

    def extra_repr(self):
        return f"dim_condition={self.dim_condition}, norm={self.norm}, layerscale={self.layerscale}"
