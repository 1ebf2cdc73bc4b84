"""Upstream's module path ``x_transformers.x_transformers``, over this package's modules.

Code written against upstream (``from x_transformers.x_transformers import Decoder, ...``) imports
from here. The model classes are ours. ``Attention``, ``FeedForward`` and ``Attend`` take
upstream's constructor keywords (``Attention(dim, dim_head=64, heads=8, ...)``) and return what
upstream's return (``Attention(x)`` is the output tensor; ``Attend(q, k, v)`` is
``(out, intermediates)``), built on our :class:`~x_transformers.attention.Attention`,
:class:`~x_transformers.feedforward.FeedForward` and :func:`~x_transformers.attend.attend`.
Upstream names with no equivalent here are absent, never stubs. Norms keep our constructors
(``RMSNorm(dim)``, ``ScaleNorm(dim)`` compute upstream's function; our ``LayerNorm(dim)`` has an
additive bias, upstream's none). Checkpoints: :mod:`x_transformers.upstream`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import attention as _attention
from . import feedforward as _feedforward
from .attend import attend
from .config import AttentionConfig, FeedForwardConfig, build
from .layers import AttentionLayers, CrossAttender, Decoder, Encoder, PrefixDecoder
from .norms import LayerNorm, RMSNorm, ScaleNorm
from .vit import ViTransformerWrapper
from .wrappers import TransformerWrapper, XTransformer

__all__ = [
    "TransformerWrapper", "XTransformer", "AttentionLayers", "Encoder", "Decoder", "PrefixDecoder", "CrossAttender",
    "Attention", "FeedForward", "Attend", "AttendIntermediates", "LinearNoBias", "DEFAULT_DIM_HEAD",
    "LayerNorm", "RMSNorm", "ScaleNorm", "ViTransformerWrapper", "AttentionIntermediates", "RelativeProjPositionalBias",
]

DEFAULT_DIM_HEAD = 64  # upstream's attention head width
LinearNoBias = partial(nn.Linear, bias=False)


def _key_mask(mask: Tensor | None, name: str) -> Tensor | None:
    """(b, m) bool, True = keep -> (b, 1, 1, m), the shape our attention reads."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"{name} must be a (batch, seq) bool tensor with True = keep, got {mask.dtype} "
                         f"of shape {tuple(mask.shape)}")
    return mask[:, None, None, :]


class Attention(_attention.Attention):
    """Upstream's ``Attention(dim, dim_head=64, heads=8, causal=False, dim_context=None, ...)``.

    Other keywords are those of :class:`~x_transformers.config.AttentionConfig` (``kv_heads``,
    ``num_mem_kv``, ``qk_norm``, ``pre_talking_heads``, ...); ``one_kv_head=True`` is
    ``kv_heads=1``. ``forward(x, context=None, mask=None, context_mask=None)`` returns the output.
    """

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, causal: bool = False,
                 dim_context: int | None = None, one_kv_head: bool = False, **kwargs):
        if one_kv_head:
            if kwargs.get("kv_heads") not in (None, 1):
                raise ValueError(f"one_kv_head=True is kv_heads=1; got kv_heads={kwargs['kv_heads']} as well")
            kwargs["kv_heads"] = 1
        cfg = build(AttentionConfig, dict(dim_head=dim_head, **kwargs), "Attention")
        if cfg.kv_heads is not None and heads % cfg.kv_heads:
            raise ValueError(f"kv_heads ({cfg.kv_heads}) must divide heads ({heads})")
        cross = dim_context is not None
        super().__init__(dim, heads, cfg, causal=causal, cross=cross, dim_context=dim_context)

    def forward(self, x, context=None, mask=None, context_mask=None, return_intermediates: bool = False):
        """The output (b, n, dim); with ``return_intermediates``, also an :class:`AttentionIntermediates`
        holding the pre-softmax logits (b, h, n, m), hidden keys at -inf (what :meth:`qk_clip_` reads)."""
        if self.cross and context is None:
            raise ValueError("this Attention was built with dim_context: pass context=(batch, ctx_len, dim_context)")
        keys_mask = _key_mask(context_mask if self.cross else mask, "context_mask" if self.cross else "mask")
        if not return_intermediates:
            return super().forward(x, context, mask=keys_mask)[0]
        from .blocks import ScoreCarry

        carry = ScoreCarry()  # the explicit path hands its pre-softmax logits on, as for residual attention
        out, weights = super().forward(x, context, mask=keys_mask, residual_scores=carry, need_weights=True)
        logits = carry.scores
        n, m = logits.shape[-2:]
        visible = torch.ones(n, m, dtype=torch.bool, device=x.device)
        if self.causal:
            visible = visible.tril(m - n)
        if keys_mask is not None:
            visible = visible & keys_mask[..., -m:] if keys_mask.shape[-1] >= m else visible
        return out, AttentionIntermediates(logits.masked_fill(~visible, float("-inf")), weights)


class AttentionIntermediates(NamedTuple):
    """What :class:`Attention` returns beside its output with ``return_intermediates=True``: the
    pre-softmax logits and the weights (b, h, n, m)."""

    pre_softmax_attn: Tensor
    post_softmax_attn: Tensor | None = None


class RelativeProjPositionalBias(nn.Module):
    """Upstream's ``RelativeProjPositionalBias(dim, heads, num_distance_basis=16, max_dist=1024)``:
    ``forward(x, seq_len_k=None)`` -> the bias (b, h, n, m) of queries x (b, n, dim) over the last
    ``seq_len_k`` positions (the queries the last n), through our
    :class:`~x_transformers.rel_proj.RelProjPositionBias`."""

    def __init__(self, dim: int, heads: int, num_distance_basis: int = 16, max_dist: int = 1024):
        super().__init__()
        from .rel_proj import RelProjPositionBias

        self.bias = RelProjPositionBias(dim, heads, num_distance_basis, max_dist)

    def forward(self, x, seq_len_k: int | None = None):
        n = x.shape[1]
        m = n if seq_len_k is None else seq_len_k
        k_pos = torch.arange(m, device=x.device)[None]
        return self.bias(x, k_pos[:, m - n:], k_pos)


class FeedForward(_feedforward.FeedForward):
    """Upstream's ``FeedForward(dim, dim_out=None, mult=4, glu=False, swish=False,
    relu_squared=False, dropout=0., no_bias=False, ...)``: GELU unless ``swish`` / ``relu_squared``;
    upstream's newer keywords (``glu_mult_bias``, ``solu``, ``custom_activation``, ``post_act_ln``,
    ``sublayer_dropout``, ``zero_init_output``, ``output_proj_depth``, ``softclamp_value``,
    ``glu_softclamp``, ``glu_gate_softclamp_value``, ``glu_up_softclamp_value``) are the stacks'
    ``ff_*`` options of the same names."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: float = 4, glu: bool = False, swish: bool = False,
                 relu_squared: bool = False, dropout: float = 0.0, no_bias: bool = False, **newer):
        if swish and relu_squared:
            raise ValueError("choose one activation: swish=True or relu_squared=True, not both")
        unknown = set(newer) - set(_FF_NEWER)
        if unknown:
            raise TypeError(f"FeedForward got unexpected keyword(s) {sorted(unknown)}; upstream's are "
                            f"dim_out, mult, glu, swish, relu_squared, dropout, no_bias, {', '.join(_FF_NEWER)}")
        activation = "swish" if swish else "relu_squared" if relu_squared else "gelu"
        cfg = FeedForwardConfig(mult=mult, glu=glu, activation=activation, dropout=dropout, no_bias=no_bias, **newer)
        super().__init__(dim, cfg, dim_out=dim_out)
        if cfg.zero_init_output or cfg.output_proj_depth is not None:  # (a stack does this for its blocks)
            self.init_output(0.02)


_FF_NEWER = ("glu_mult_bias", "solu", "custom_activation", "post_act_ln", "sublayer_dropout", "zero_init_output",
             "output_proj_depth", "softclamp_value", "glu_softclamp", "glu_gate_softclamp_value", "glu_up_softclamp_value")


class AttendIntermediates(NamedTuple):
    """What ``Attend`` returns beside its output: the post-softmax weights (b, h, n, m) when asked."""

    post_softmax_attn: Tensor | None = None


class Attend(nn.Module):
    """Upstream's core attention module: ``Attend(causal=False, dropout=0., scale=None,
    sparse_topk=None)(q, k, v, mask=None, attn_bias=None) -> (out, intermediates)``, through our
    :func:`~x_transformers.attend.attend` (q (b, h, n, d), k / v (b, g, m, d), g dividing h).
    ``mask``: bool, True = keep, (b, m) or broadcastable to (b, h, n, m)."""

    def __init__(self, *, causal: bool = False, dropout: float = 0.0, scale: float | None = None,
                 sparse_topk: int | None = None, heads: int | None = None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.causal, self.dropout, self.scale, self.sparse_topk, self.heads = causal, dropout, scale, sparse_topk, heads

    def forward(self, q, k, v, mask=None, attn_bias=None, *, return_attn: bool = False):
        if self.heads is not None and q.shape[1] != self.heads:
            raise ValueError(f"Attend was built for {self.heads} heads, q has {q.shape[1]}")
        if mask is not None and mask.ndim == 2:
            mask = _key_mask(mask, "mask")
        out, weights = attend(q, k, v, mask=mask, causal=self.causal, bias=attn_bias, scale=self.scale,
                              dropout=self.dropout if self.training else 0.0, sparse_topk=self.sparse_topk,
                              need_weights=return_attn)
        return out, AttendIntermediates(post_softmax_attn=weights)
