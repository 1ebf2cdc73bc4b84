"""Relative projection position bias (upstream's ``attn_use_rel_proj_pos_bias``, after the
Inkling model; no paper): each query reads its own curve over distances from a learned bank.

bias[b, h, i, j] = (W x_i)[h] . bank[:, d(i, j)] for d(i, j) = pos(i) - pos(j) in [0, max_dist), else 0:
``num_distance_basis`` learned curves over ``max_dist`` distances, mixed per query and head.
Positions count kept tokens (as every position here), so padding moves nothing and a KV cache
gives the full forward's bias.

Legend: b batch, h heads, n queries, m keys, r distance basis, D max distance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RelProjPositionBias(nn.Module):
    def __init__(self, dim: int, heads: int, num_distance_basis: int = 16, max_dist: int = 1024):
        super().__init__()
        self.heads, self.max_dist = heads, max_dist
        self.to_weights = nn.Linear(dim, heads * num_distance_basis)
        self.bank = nn.Parameter(torch.randn(num_distance_basis, max_dist) * 0.02)  # (r, D)

    def forward(self, x: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """x (b, n, dim) the queries' input; q_pos (b|1, n), k_pos (b|1, m) long -> (b, h, n, m)."""
        b, n, _ = x.shape
        w = self.to_weights(x).view(b, n, self.heads, -1).transpose(1, 2)  # (b, h, n, r)
        curves = w @ self.bank.to(w.dtype)  # (b, h, n, D)
        dist = q_pos[:, :, None] - k_pos[:, None, :]  # (b|1, n, m)
        valid = (dist >= 0) & (dist < self.max_dist)
        index = dist.clamp(0, self.max_dist - 1)[:, None].expand(b, self.heads, -1, -1)
        return curves.gather(-1, index) * valid[:, None].to(curves.dtype)
