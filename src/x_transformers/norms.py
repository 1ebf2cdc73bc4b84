"""Normalisation layers, chosen by name from a registry."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """Standard LayerNorm; ``bias=False`` drops the additive term."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, bias={self.bias is not None}"


class RMSNorm(nn.Module):
    """RMSNorm (1910.07467): x / rms(x) * g, no mean subtraction, a learned per-channel gain."""

    def __init__(self, dim: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ScaleNorm(nn.Module):
    """ScaleNorm (1910.05895): g * x / ||x||, one learned scalar per norm, initialised to sqrt(dim)."""

    def __init__(self, dim: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(float(dim) ** 0.5))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp(min=self.eps)


class SimpleRMSNorm(nn.Module):
    """RMSNorm without a gain: x / rms(x) (upstream's ``use_simple_rmsnorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], None, self.eps)

    def extra_repr(self):
        return f"eps={self.eps}"


class DynamicTanh(nn.Module):
    """Dynamic Tanh (DyT, 2503.10622): ``gamma * tanh(alpha * x) + beta``, a normalisation-free
    stand-in for LayerNorm; alpha is one learned scalar (initialised to ``init_alpha``), gamma and
    beta per channel. No statistics over the channels are taken."""

    def __init__(self, dim: int, init_alpha: float = 1.0, **_):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return torch.tanh(self.alpha * x) * self.gamma + self.beta

    def extra_repr(self):
        return f"{self.gamma.shape[0]}"


class Derf(nn.Module):
    """Dynamic erf (Derf, 2512.10938): ``gamma * erf(alpha * x + s) + beta``, alpha and s learned
    scalars (initialised to 0.5 and 0), gamma and beta per channel."""

    def __init__(self, dim: int, init_alpha: float = 0.5, init_shift: float = 0.0, **_):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))
        self.shift = nn.Parameter(torch.tensor(float(init_shift)))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return torch.erf(self.alpha * x + self.shift) * self.gamma + self.beta

    def extra_repr(self):
        return f"{self.gamma.shape[0]}"


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "scalenorm": ScaleNorm, "simple_rmsnorm": SimpleRMSNorm,
         "dynamic_tanh": DynamicTanh, "derf": Derf}


def make_norm(name: str, dim: int, eps: float = 1e-5, bias: bool = True, **options) -> nn.Module:
    """``options``: the norm's own settings (``init_alpha`` of DyT)."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid: {sorted(NORMS)}")
    return NORMS[name](dim, eps=eps, bias=bias, **options)
