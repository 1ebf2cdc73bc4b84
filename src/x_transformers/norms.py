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


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "scalenorm": ScaleNorm, "simple_rmsnorm": SimpleRMSNorm}


def make_norm(name: str, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; valid: {sorted(NORMS)}")
    return NORMS[name](dim, eps=eps, bias=bias)
