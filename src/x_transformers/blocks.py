"""The block runner: one function runs one block of any stack, given a per-forward context.

Every stack runs its blocks through :func:`run_block`: the plain loop (:func:`run_sequential`),
the reversible coupling (``reversible.py``, one residual branch at a time) and the funnel
(``funnel.py``, which adds the pooled-query key/value override to the context). A keyword a stack
honours is therefore honoured by all of them.

:class:`ForwardContext` is what a forward computes once and every block reads, passed by name:
positions, the self-attention key mask, rotary angles, the position score modification (a
:class:`~x_transformers.positional.ScoreMod`, a description that ``attend()`` materialises only
when the chosen kernel needs the tensor), the cross-attention context and its mask, the cache,
(funnel) the sequence the first self-attention takes its keys/values from, and the input
re-injected into every branch (``reinject_input``).

Legend: b batch, n queries, m keys, h heads, r rotary dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .positional import DenseScoreMod, ScoreMod


@dataclass(frozen=True)
class ForwardContext:
    """What every block of one forward reads (built once per forward by the stack)."""

    positions: Tensor | None = None  # (b|1, n) long, the new tokens'
    key_positions: Tensor | None = None  # (b|1, m) long, cached keys included
    self_mask: Tensor | None = None  # (b, 1, 1, m) bool over self-attention keys, True = keep
    rotary: tuple[Tensor, Tensor] | None = None  # (cos, sin), each (b|1, 1, n, r)
    score_mod: ScoreMod | None = None  # the position bias of self-attention (ALiBi, T5, TUPE)
    context: Tensor | None = None  # (b, m_ctx, dim_context) for cross-attention
    context_mask: Tensor | None = None  # (b, 1, 1, m_ctx) bool
    cache: object | None = None  # a KVCache (cache.py): block i reads and extends cache.layer(i)
    need_weights: bool = False  # return attention maps
    # Funnel's query-only pooling (2006.03236): self-attention block `kv_block` takes its keys and
    # values from the unpooled sequence `kv`, with that sequence's mask, rotary and score mod
    kv: Tensor | None = None  # (b, m, dim)
    kv_block: int | None = None
    kv_mask: Tensor | None = None  # (b, 1, 1, m) bool
    kv_rotary: tuple[Tensor, Tensor] | None = None
    kv_score_mod: ScoreMod | None = None
    inject: Tensor | None = None  # (b, n, dim) added to every branch's input (reinject_input)
    token_mask: Tensor | None = None  # (b, n) bool, the new tokens kept (shift_tokens zeroes the others)
    # residual attention (RealFormer): the last self- / cross-attention block's scores, fresh per run
    self_scores: "ScoreCarry | None" = None
    cross_scores: "ScoreCarry | None" = None
    polar_angles: Tensor | None = None  # (b|1, 1, n, d) PoPE's angles at the new positions (positional.py)
    polar_bias: Tensor | None = None  # (1, h, 1, d) PoPE's learned key phase
    condition: Tensor | None = None  # (b, 1|n, c) the adaptive norms' and scales' condition (adaptive.py)
    # Transformer-XL recurrence (1901.02860, recurrence.py): per block of the layout, (the hidden
    # states (b, m, dim) a self-attention block prepends to its keys/values, its mask (b, 1, 1, m + k)
    # or None) or None; their rotary angles; the list that collects each self-attention block's
    # input (the next memories). key_positions then include the memory's.
    mems: tuple | None = None
    ff_embeds: tuple | None = None  # per block: a feed-forward's output scale (b, n, dim) (ff_deep_embed) or None
    mem_rotary: tuple[Tensor, Tensor] | None = None
    hiddens: list | None = None
    values: object | None = None  # a ValueResidual (value_residual.py): the first attentions' values
    # per block: (b, n|1, dim) added to a self-attention block's key/value input (not its queries), or
    # None (upstream's self_attn_kv_residuals; the Free Transformer's latent, 2510.17558)
    kv_residuals: tuple | None = None
    context_rotary: tuple | None = None  # cross-attention keys' rotary at upstream's context_pos (stack_calls.py)
    layer_hiddens: list | None = None  # receives each block's input (upstream's return_hiddens)
    layer_inputs: list | None = None  # LIMe (integrate_layers, hyper.py): the blocks' inputs so far, fresh per run
    causal: bool | None = None  # upstream's per-call causality of self-attention (None: the stack's own)
    extra_kv: tuple | None = None  # per block: (k, v, mask) prepended to self-attention's (stack_calls.py) or None
    contexts: tuple | None = None  # per block: a cross-attention's own context (cross_attn_kv_residuals) or None
    block_io: object | None = None  # a BlockIO (block_inputs.py): per-call block input transforms, block outputs

    # the tensors a recomputing autograd Function (reversible.py) takes as differentiable inputs
    DIFFERENTIABLE = ("context", "score_mod", "kv", "kv_score_mod", "inject", "condition", "polar_bias")

    def differentiable(self) -> dict[str, Tensor]:
        """The differentiable tensors this context carries, score mods materialised."""
        out = {}
        for name in self.DIFFERENTIABLE:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.dense() if isinstance(value, ScoreMod) else value
        return out

    def with_tensors(self, tensors: dict[str, Tensor]) -> "ForwardContext":
        """This context with the given differentiable tensors (score mods as dense biases)."""
        new = {k: DenseScoreMod(t) if k.endswith("score_mod") else t for k, t in tensors.items()}
        return replace(self, **new)


def block_kwargs(kind: str, i: int, ctx: ForwardContext) -> dict:
    """The keywords block i of kind ``a`` / ``c`` / ``f`` is called with under ``ctx``."""
    if kind == "f":
        scale = ctx.ff_embeds[i] if ctx.ff_embeds is not None else None
        return {} if scale is None else dict(deep_embed=scale)
    cache = ctx.cache.layer(i) if ctx.cache is not None else None
    extra = {} if ctx.values is None else dict(value_residual=ctx.values)
    if kind == "c":
        own = ctx.contexts[i] if ctx.contexts is not None else None
        out = dict(context=ctx.context if own is None else own, mask=ctx.context_mask, cache=cache, need_weights=ctx.need_weights,
                   query_mask=ctx.token_mask, **extra)
        if ctx.context_rotary is not None:  # queries at the tokens' positions, keys at the context's
            out.update(rotary=ctx.rotary, kv_rotary=ctx.context_rotary)
        return out if ctx.cross_scores is None else dict(out, residual_scores=ctx.cross_scores)
    if ctx.kv is not None and i == ctx.kv_block:  # pooled queries over the previous level's keys
        # (its scores, over other keys, start no residual chain: the next block's start afresh)
        return dict(mask=ctx.kv_mask, rotary=ctx.rotary, score_mod=ctx.kv_score_mod, kv=ctx.kv,
                    kv_rotary=ctx.kv_rotary, need_weights=ctx.need_weights)
    out = dict(mask=ctx.self_mask, rotary=ctx.rotary, score_mod=ctx.score_mod, cache=cache,
               need_weights=ctx.need_weights, positions=(ctx.positions, ctx.key_positions), **extra)
    if ctx.kv_residuals is not None and ctx.kv_residuals[i] is not None:
        out["kv_residual"] = ctx.kv_residuals[i]
    if ctx.polar_angles is not None:
        out["polar"] = (ctx.polar_angles, ctx.polar_bias)
    if ctx.causal is not None:
        out["causal"] = ctx.causal
    if ctx.extra_kv is not None and ctx.extra_kv[i] is not None:
        out["additional_kv"] = ctx.extra_kv[i]
    if ctx.mems is not None and ctx.mems[i] is not None:
        mem, mask = ctx.mems[i]  # the block's memory and its mask over (memory, keys)
        out.update(mem=mem, mem_rotary=ctx.mem_rotary, mask=mask)
    return out if ctx.self_scores is None else dict(out, residual_scores=ctx.self_scores)


def kv_residuals_per_block(layout, residuals: Tensor, b: int, n: int, dim: int) -> tuple:
    """Upstream's ``self_attn_kv_residuals``: (b, n|1, dim), for the first self-attention block, or
    (L, b, n|1, dim), the l-th for the l-th -> one entry per block of the layout (None: none)."""
    if not isinstance(residuals, Tensor) or not residuals.is_floating_point() or residuals.ndim not in (3, 4):
        raise ValueError(f"self_attn_kv_residuals must be a float tensor (b, n|1, dim) or (L, b, n|1, dim), got "
                         f"{getattr(residuals, 'dtype', type(residuals).__name__)} "
                         f"{tuple(getattr(residuals, 'shape', ()))}")
    residuals = residuals[None] if residuals.ndim == 3 else residuals
    count = sum(spec.kind == "a" for spec in layout)
    if residuals.shape[0] > count or residuals.shape[1] != b or residuals.shape[2] not in (1, n) \
            or residuals.shape[3] != dim:
        raise ValueError(f"self_attn_kv_residuals must be (L <= {count} self-attention blocks, b={b}, n={n} or 1, "
                         f"dim={dim}), got {tuple(residuals.shape)}")
    given = iter(residuals.unbind(0))
    return tuple(next(given, None) if spec.kind == "a" else None for spec in layout)


def drop_context_tokens(ctx: ForwardContext, p: float) -> ForwardContext:
    """Structured dropout of the cross-attention context (upstream's cross_attn_tokens_dropout): each
    row keeps a random subset of ceil((1 - p) * its kept tokens), the same count m' = max(1, (1 - p) * m)
    of columns for every row, so the context shrinks to (b, m', d)."""
    context, mask = ctx.context, ctx.context_mask  # (b, m, d), (b, 1, 1, m) or None
    b, m = context.shape[:2]
    keep = max(1, int((1 - p) * m))
    scores = torch.rand(b, m, device=context.device)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, 0, 0], -1.0)  # kept tokens first
    idx = scores.topk(keep, dim=-1).indices  # (b, m')
    context = context.gather(1, idx[..., None].expand(-1, -1, context.shape[-1]))
    if mask is not None:
        kept = mask[:, 0, 0]
        counts = torch.ceil(kept.sum(-1) * (1 - p)).long()  # (b,)
        new = kept.gather(1, idx) & (torch.arange(keep, device=idx.device) < counts[:, None])
        mask = new[:, None, None, :]
    return replace(ctx, context=context, context_mask=mask)


class ScoreCarry:
    """Residual attention's carry (RealFormer, 2012.11747): the pre-softmax scores (b, h, n, m) of
    the last attention block of one kind in this run, which the next one adds to its own. A new
    carry per run (``AttentionLayers.run``), so no forward sees another's scores."""

    def __init__(self):
        self.scores = None


def run_block(kind: str, i: int, block, x, ctx: ForwardContext, *, branch_only: bool = False):
    """Run block i (a :class:`~x_transformers.residual.Residual`) of kind ``a``, ``c`` or ``f``.

    Returns (x + branch, weights or None); with ``branch_only`` (reversible coupling) the branch
    alone, (None, None) when layer dropout dropped it.
    """
    call = block.branch if branch_only else block
    kwargs = block_kwargs(kind, i, ctx)
    if ctx.inject is not None:
        kwargs["inject"] = ctx.inject
    if block.shifts is not None:
        kwargs["shift_mask"] = ctx.token_mask
    if ctx.condition is not None:
        kwargs["condition"] = ctx.condition
    if ctx.layer_inputs is not None:
        kwargs["layer_inputs"] = ctx.layer_inputs
    if getattr(block, "update", None) is not None and not branch_only:
        kwargs["seq_mask"] = ctx.token_mask
    return call(x, **kwargs)


class UNetSkips(nn.Module):
    """U-Net skips over the layer units (U-ViT, 2209.12152): unit u of the upper half starts from
    ``W [x_mirror ; x]``, x_mirror the input of unit depth - 1 - u, W a bias-free (2 dim -> dim)
    projection per upper unit.

    ``plan``: block index where an upper unit starts -> (block index of its mirror's start, k),
    k indexing ``combines``.
    """

    def __init__(self, dim: int, depth: int, unit: int):
        super().__init__()
        upper = [u for u in range(depth) if u >= depth / 2]
        self.plan = {u * unit: ((depth - 1 - u) * unit, k) for k, u in enumerate(upper)}
        self.sources = {src for src, _ in self.plan.values()}
        self.combines = nn.ModuleList(nn.Linear(2 * dim, dim, bias=False) for _ in upper)

    def extra_repr(self):
        return f"pairs={sorted((src, i) for i, (src, _) in self.plan.items())}"


def run_sequential(layout, blocks, x, ctx: ForwardContext, attns: list | None = None, skips: UNetSkips | None = None):
    """The plain stack: every block in layout order. Attention maps go to ``attns`` if given;
    ``skips``: U-Net skips between layer units."""
    saved, io = {}, ctx.block_io
    for i, (spec, block) in enumerate(zip(layout, blocks)):
        if io is not None and i in io.starts:  # upstream's transform_block_inputs, before the skips
            x = io.starts[i](x)
        if skips is not None:
            if i in skips.sources:
                saved[i] = x
            if i in skips.plan:
                src, k = skips.plan[i]
                x = skips.combines[k](torch.cat((saved[src], x), dim=-1))
        if ctx.layer_hiddens is not None:
            ctx.layer_hiddens.append(x)
        if ctx.hiddens is not None and spec.kind == "a":
            ctx.hiddens.append(x)  # a self-attention block's input: its memory for the next segment
        x, w = run_block(spec.kind, i, block, x, ctx)
        if w is not None and attns is not None:
            attns.append(w)
        if io is not None and io.hiddens is not None and i in io.ends:  # (several streams: their sum)
            io.hiddens.append(x if x.ndim == 3 else x.sum(dim=-2))
    return x
