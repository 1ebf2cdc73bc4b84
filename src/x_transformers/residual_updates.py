"""Residual updates other than the sum x + f: how a branch's output enters the stream.

    orthog_residual     x + (f - (f . u) u), u = x / |x| per token: only the part of the update
                        orthogonal to the stream is added (Oh et al., 2505.11881)
    mv_split_residual   x + beta * (f - mean f) + alpha * (mean f - mean x): the update's mean and
                        its variation about the mean get separate gains (Lu, 2605.06169);
                        ``residual_fn_kwargs``: init_alpha (0), init_beta (0.03), learned (False:
                        per-channel alpha, beta; True: linear functions of mean f, weights from 0)

Means are over the kept tokens of the sequence. Upstream takes them over the whole sequence, and
its orthogonal projection over the whole (n * d) sample, which in a causal stack lets a token see
later ones; here the projection is per token, and a causal stack takes prefix means (token t
averages tokens <= t), so causality holds. A prefix mean needs every earlier token, which a KV
cache does not keep: the stack refuses to decode mv_split_residual with a cache.

The checks of ``residual_fn_kwargs`` and ``rel_pos_kwargs`` (upstream's free-form dicts) live here
too; ``LayersConfig`` calls them.

Legend: b batch, n tokens, d dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class OrthogonalUpdate(nn.Module):
    """The branch output minus its projection on the stream, per token (in float32 at least)."""

    def forward(self, out, skip, mask=None):
        dtype = torch.promote_types(out.dtype, torch.float32)
        f, x = out.to(dtype), skip.to(dtype)
        unit = torch.nn.functional.normalize(x, dim=-1)
        return skip + (f - (f * unit).sum(-1, keepdim=True) * unit).to(out.dtype)


def sequence_mean(t, mask, causal: bool):
    """Mean over kept tokens: (b, 1, d), or (b, n, d) prefix means when causal. mask (b, n) or None."""
    w = torch.ones_like(t[..., :1]) if mask is None else mask[..., None].to(t.dtype)
    if causal:
        return (t * w).cumsum(dim=-2) / w.cumsum(dim=-2).clamp(min=1.0)
    return (t * w).sum(dim=-2, keepdim=True) / w.sum(dim=-2, keepdim=True).clamp(min=1.0)


class MeanVariationSplit(nn.Module):
    """x + beta * (f - mean f) + alpha * (mean f - mean x), means over the (kept) sequence."""

    def __init__(self, dim: int, causal: bool, init_alpha: float = 0.0, init_beta: float = 0.03,
                 learned: bool = False):
        super().__init__()
        self.causal, self.learned = causal, learned
        self.init_alpha, self.init_beta = float(init_alpha), float(init_beta)
        if learned:
            self.to_alpha, self.to_beta = nn.Linear(dim, dim), nn.Linear(dim, dim)
        else:
            self.alpha = nn.Parameter(torch.full((dim,), self.init_alpha))
            self.beta = nn.Parameter(torch.full((dim,), self.init_beta))
        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        if self.learned:  # the stack's GPT-2 init would overwrite these
            for lin, value in ((self.to_alpha, self.init_alpha), (self.to_beta, self.init_beta)):
                nn.init.zeros_(lin.weight)
                nn.init.constant_(lin.bias, value)

    def forward(self, out, skip, mask=None):
        mean_f, mean_x = sequence_mean(out, mask, self.causal), sequence_mean(skip, mask, self.causal)
        alpha = self.to_alpha(mean_f) if self.learned else self.alpha
        beta = self.to_beta(mean_f) if self.learned else self.beta
        return skip + (out - mean_f) * beta + (mean_f - mean_x) * alpha

    def extra_repr(self):
        return f"causal={self.causal}, learned={self.learned}"


def make_update(cfg, dim: int):
    """The residual update the config asks for, or None (the plain sum)."""
    if cfg.orthog_residual:
        return OrthogonalUpdate()
    if cfg.mv_split_residual:
        return MeanVariationSplit(dim, cfg.causal, **dict(cfg.residual_fn_kwargs or {}))
    return None


def check_residual_fn_kwargs(cfg):
    """LayersConfig's residual_fn_kwargs: gated_multi_residual's read_gate_rank, or mv_split_residual's gains."""
    given = cfg.residual_fn_kwargs
    if cfg.gated_multi_residual:  # hyper.GatedMultiResidual's read_gate_rank, required (as upstream)
        rank = (given or {}).get("read_gate_rank")
        if not isinstance(given, dict) or set(given) != {"read_gate_rank"} or isinstance(rank, bool) \
                or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"gated_multi_residual needs residual_fn_kwargs=dict(read_gate_rank=r), r >= 1, and "
                             f"nothing else; got {given!r}")
        return
    if given is None:
        return
    allowed = ("init_alpha", "init_beta", "learned")  # residual_updates.MeanVariationSplit's
    if not isinstance(given, dict) or set(given) - set(allowed):
        raise ValueError(f"residual_fn_kwargs must be a dict with keys among {allowed} (mv_split_residual's), "
                         f"got {given!r}")
    if given and not cfg.mv_split_residual:
        raise ValueError("residual_fn_kwargs configures mv_split_residual, which is off; set mv_split_residual=True "
                         "as well, or drop residual_fn_kwargs")
    if not isinstance(given.get("learned", False), bool) or not all(
            isinstance(given.get(k, 0.0), (int, float)) and not isinstance(given.get(k, 0.0), bool)
            and math.isfinite(given.get(k, 0.0)) for k in ("init_alpha", "init_beta")):
        raise ValueError(f"residual_fn_kwargs: learned must be True or False and init_alpha / init_beta finite "
                         f"numbers, got {given!r}")


def check_rel_pos_kwargs(cfg):
    """LayersConfig's rel_pos_kwargs: ALiBi's own slopes, upstream's one use of it."""
    given = cfg.rel_pos_kwargs
    if not given:  # None, or upstream's default {} spelled out
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"rel_pos_kwargs must be a dict, got {given!r}")
        return
    if not isinstance(given, dict) or set(given) != {"slopes"} or not cfg.alibi_pos_bias:
        raise ValueError(f"rel_pos_kwargs takes ALiBi's slopes only, dict(slopes=[one per ALiBi head]), with "
                         f"alibi_pos_bias=True; got {given!r}")
    slopes, n = given["slopes"], cfg.alibi_num_heads or cfg.heads
    if not isinstance(slopes, (list, tuple)) or len(slopes) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in slopes):
        raise ValueError(f"rel_pos_kwargs slopes must be {n} finite numbers (one per ALiBi head), got {slopes!r}")
